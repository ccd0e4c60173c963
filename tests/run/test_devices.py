"""Where the models and batches live (issue 15, the CPU's part): `--device` resolves in one place
(`run.processes.resolve_device`), asking for a GPU that is not there is one line and exit 2, and batches move to
the device whole."""

import dataclasses

import pytest
import torch

from advantage import cli
from advantage.errors import UsageError
from advantage.lm.logprobs import collate_shared_prompt
from advantage.lm.preferences import collate_rankings
from advantage.run.processes import Processes, resolve_device, to_device


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu_and_cpu_is_the_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert Processes("auto").device == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:1", "auto-gpu", "tpu", "cuda:x"])
def test_a_device_that_is_not_there_is_a_usage_error_naming_the_field(no_gpu, requested):
    with pytest.raises(UsageError, match="field 'device'"):
        resolve_device(requested)


def test_cuda_takes_the_local_rank_and_cuda_n_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="cuda:2 does not exist"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_asking_for_cuda_without_a_gpu_is_one_line_exit_2_and_writes_nothing(stage, no_gpu, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main([stage, "--model", "builtin:nano", "--task", "arithmetic", "--max-steps", "1", "--batch-size", "2",
                     "--progress", "false", "--device", "cuda", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "field 'device'" in lines[0], lines
    assert not out.exists()


def test_a_batch_moves_whole_nested_batches_included():
    """Every tensor of a batch (and of the batches it holds) goes to the device; other fields stay as they are.
    The meta device stands in for a GPU here: nothing is computed, only placed."""
    shared = collate_shared_prompt([[5, 6, 7], [8]], [[[1, 2], [3]], [[4, 4, 4], [9]]], 0)
    moved = to_device(shared, torch.device("meta"))
    for field in dataclasses.fields(shared):
        before, after = getattr(shared, field.name), getattr(moved, field.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape, field.name
        else:
            assert after == before, field.name
    assert all(tensor.device.type == "cpu" for tensor in vars(shared).values() if isinstance(tensor, torch.Tensor))
    from advantage.lm.preferences import RankedExample

    rankings = collate_rankings([RankedExample([5, 6], [[1, 2], [3]]), RankedExample([7], [[4], [9, 9]])], 0)
    moved = to_device(rankings, torch.device("meta"))
    tensors = [value for value in vars(moved.answers).values() if isinstance(value, torch.Tensor)]
    assert tensors and all(tensor.device.type == "meta" for tensor in tensors)
    assert moved.mask.device.type == "meta"


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the autocast is built, not entered
def test_bf16_autocast_acts_on_the_device_the_run_computes_on(monkeypatch):
    """An autocast context covers one device type: on a GPU run a CPU autocast would leave every product float32."""
    from types import SimpleNamespace

    from advantage.lm.config import mixed_precision

    assert mixed_precision(SimpleNamespace(mixed_precision="bf16", device="cpu")).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for device in ("cuda", "auto", "cuda:0"):
        context = mixed_precision(SimpleNamespace(mixed_precision="bf16", device=device))
        assert context.device == "cuda" and context.fast_dtype == torch.bfloat16, device
    assert not isinstance(mixed_precision(SimpleNamespace(mixed_precision="no", device="cuda")), torch.autocast)


def test_summed_gradients_keep_each_parameters_dtype(monkeypatch, tmp_path):
    """Float32 adapters beside a bfloat16 head go through one float32 all-reduce; each gradient comes back in its
    parameter's dtype (a float32 gradient on a bfloat16 parameter is refused). A one-process gloo group stands in
    for several: the all-reduce is the identity, the flattening and the dtypes are what is checked."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    processes = Processes("cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        processes.world_size = 2  # take the all-reduce path
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1).to(torch.bfloat16))
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        expected = [parameter.grad.clone() for parameter in model.parameters()]
        processes.sum_gradients(model)
        for parameter, grad in zip(model.parameters(), expected):
            assert parameter.grad.dtype == parameter.dtype and torch.equal(parameter.grad, grad)
    finally:
        dist.destroy_process_group()
