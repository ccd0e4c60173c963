"""The processes training together, or just this one, and the device each computes on: the one place
torch.distributed is touched and the device is decided.

A command launched by torchrun (or `accelerate launch`) finds WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous
address in its environment and joins the process group here; everything else asks a `Processes` object what to do
(its device, its share of a batch, whether it writes the run directory).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from advantage.errors import UsageError

DEVICES_HELP = "auto (CUDA when present, else the CPU), cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N"
Movable = TypeVar("Movable")


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device a process computes on, from the `device` field: auto, cpu, cuda or cuda:N.

    "auto" is CUDA when torch sees a GPU, else the CPU; "cuda" is the process's own GPU, cuda:LOCAL_RANK (0 outside
    torchrun). Raises UsageError, naming the field, for anything else or for CUDA where torch sees no GPU.
    """
    name = requested.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"field 'device': {requested!r} asks for CUDA, but torch sees no GPU on this machine "
                             f"(use --device cpu, or auto)")
        index = local_rank if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise UsageError(f"field 'device': cuda:{index} does not exist (torch sees {torch.cuda.device_count()} "
                             f"GPUs)")
        return torch.device("cuda", index)
    raise UsageError(f"field 'device': {requested!r} is not a device; expected {DEVICES_HELP}")


def to_device(value: Movable, device: torch.device) -> Movable:
    """A tensor, or a dataclass of tensors (a batch, possibly holding batches), with every tensor on `device`;
    anything else as it is."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {field.name: to_device(getattr(value, field.name), device) for field in dataclasses.fields(value)
                   if field.init}
        return dataclasses.replace(value, **changes)
    return value


class Processes:
    """The processes training together, or just this one.

    Launched by torchrun (or `accelerate launch`), which sets WORLD_SIZE, RANK and the rendezvous address, every
    stage trains with data parallelism over torch.distributed: each process takes its share of every batch
    (`DataOrder`), the gradients are summed over the processes before the optimizer step, and every process then
    takes the same step, so the weights stay identical everywhere. Losses are normalised by counts over the whole
    batch of all processes, so N processes compute the gradient of one process with the same batch. Only rank 0
    writes the run directory and shows progress. Without WORLD_SIZE > 1 nothing of torch.distributed is touched.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # float32 matrix products on TF32 tensor cores (10-bit mantissa inputs, float32 accumulation): what the
            # peers' GPU recipes run, several times faster than full float32 on recent GPUs. The CUDA switches only:
            # `torch.set_float32_matmul_precision` would also let oneDNN use TF32 for the CPU's products, and setting
            # torch's newer `fp32_precision` switches makes any later read of these (by a library) raise.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world_size > 1 and not dist.is_initialized():
            # NCCL takes only CUDA tensors, gloo only CPU ones: the backend follows the device.
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world_size > 1 else 0

    def put(self, value: Movable) -> Movable:
        """`value` (a tensor or a batch) on this process's device."""
        return to_device(value, self.device)

    @property
    def is_main(self) -> bool:
        """True on the process that writes the run directory (rank 0)."""
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return [float(value) for value in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, model: nn.Module) -> None:
        """Replace every trainable parameter's .grad by its sum over the processes, in one all-reduce. A model sharded
        with FSDP2 (`--sharding fsdp`) had its gradients reduce-scattered as sums in the backward pass already."""
        from torch.distributed.fsdp import FSDPModule

        if self.world_size == 1 or isinstance(model, FSDPModule):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        offset = 0
        for parameter, grad in zip([p for p in model.parameters() if p.requires_grad], grads):
            # the concatenation is in the widest dtype (float32 adapters beside a bfloat16 head): back to each one's
            parameter.grad = flat[offset:offset + grad.numel()].view_as(grad).to(grad.dtype, copy=True)
            offset += grad.numel()

    def gather_rows(self, local: Tensor, total: int) -> Tensor:
        """Interleave the rows each process computed for its share `range(rank, total, world_size)` of `total` items.

        Args:
            local: (ceil((total - rank) / world_size), ...) this process's rows, in the order of its share.
        Returns:
            (total, ...) every item's row, in the original order.
        """
        if self.world_size == 1:
            return local
        most = -(-total // self.world_size)
        padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=self.device)
        local = local.to(self.device)
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        result = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=self.device)
        for rank, rows in enumerate(gathered):
            result[rank::self.world_size] = rows[:len(range(rank, total, self.world_size))]
        return result

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            dist.barrier()


def close_processes() -> None:
    """Leave torch.distributed's process group if a stage joined one (at the end of a torchrun-launched command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
