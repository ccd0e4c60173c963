"""Training passes replayed as CUDA graphs (`cuda_graphs.GraphedPasses`), checked where a CPU can check them.

A CPU cannot capture a graph. What it can show: the passes a graph would replay (batches padded to recurring widths,
copied into fixed input buffers, every answer slot scored) train exactly as the ordinary passes do, they read no
value back to the host (inside a capture that is an error), the stages ask for graphs only where they can work, and
a failed capture costs nothing but a warning.
"""

import copy

import pytest
import torch
from lm_helpers import metrics, small_config
from safetensors.torch import load_file
from test_generation import HostReads

from advantage.lm import dpo
from advantage.lm.cuda_graphs import GRAPH_WIDTH_MULTIPLE, GraphedPasses, training_graphs
from advantage.lm.data import write_jsonl
from advantage.lm.dpo import DPOConfig, accumulate_gradients, reference_log_probs
from advantage.lm.logprobs import head_parts
from advantage.lm.models import build_model
from advantage.lm.preferences import RankedExample
from advantage.lm.tokenizer import build_char_tokenizer

torch.set_num_threads(1)
PAIRS = [("12+3=", "15\n", "16\n"), ("7+80=", "87\n", "88\n"), ("1=", "1\n", "a longer answer\n"),
         ("what is 99+1? ", "100\n", "101\n"), ("x", "y", "z"), ("45+45=", "90\n", "91\n"),
         ("long prompt " * 3, "ok\n", "no\n"), ("2+2=", "4\n", "5\n")]


def examples():
    tokenizer = build_char_tokenizer()
    eos = tokenizer.eos_token_id
    return [RankedExample(tokenizer.encode(prompt), [tokenizer.encode(chosen) + [eos], tokenizer.encode(rejected)
                                                     + [eos]]) for prompt, chosen, rejected in PAIRS]


def ordinary_and_graphed(monkeypatch, tmp_path, module, config):
    """`module.train(config)` twice: with ordinary passes, then through `GraphedPasses` without a capture (what a GPU
    would replay). Returns the two runs by name and the training `GraphedPasses` made."""
    made = []

    def cpu_graphs(model, *args, **kwargs):
        made.append(GraphedPasses(model.parameters(), capture=False))
        return made[-1]

    runs = {"ordinary": module.train(config, tmp_path / "ordinary")}
    monkeypatch.setattr(module, "training_graphs", cpu_graphs)
    runs["graphed"] = module.train(config, tmp_path / "graphed")
    return runs, made


def test_dpo_trains_the_same_through_the_passes_a_graph_replays(tmp_path, monkeypatch):
    """Six steps of DPO (batches of 2 pairs: several shapes, and shapes met again) with every pass, the reference
    pass's included, on the fixed input buffers of `GraphedPasses`, its shared gradient buffers and the
    fixed-shape scoring give the losses and weights of ordinary passes."""
    data = tmp_path / "train.jsonl"
    write_jsonl([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS], data)
    config = small_config(DPOConfig, data=str(data), batch_size=2, max_steps=6, learning_rate=1e-3, beta=0.5,
                          log_every=1)
    runs, made = ordinary_and_graphed(monkeypatch, tmp_path, dpo, config)
    graphs = made[0].graphs
    assert 2 <= len(graphs) < 6  # several shapes, each with its own buffers, and shapes met again
    widths = [shape[1] for key in graphs for name, shape, *_ in key if name == "answers.input_ids"]
    assert widths and all(width % GRAPH_WIDTH_MULTIPLE == 0 for width in widths)
    ordinary, graphed = (metrics(runs[name].run_dir) for name in ("ordinary", "graphed"))
    assert [row["losses/dpo"] for row in graphed] == pytest.approx([row["losses/dpo"] for row in ordinary], abs=1e-5)
    before, after = (load_file(str(runs[name].run_dir / "final" / "model.safetensors")) for name in runs)
    start = build_model("nano", seed=1).state_dict()
    for key, tensor in before.items():
        assert not torch.equal(tensor, start[key]), key  # training moved every weight
        torch.testing.assert_close(after[key], tensor, atol=1e-5, rtol=1e-4, msg=key)


class ProbedPasses(GraphedPasses):
    """GraphedPasses on a CPU, recording every value a pass reads back to the host."""

    def __init__(self, parameters):
        super().__init__(parameters, capture=False)
        self.probe = HostReads()

    def __call__(self, inputs, compute):
        with self.probe.mode:
            return super().__call__(inputs, compute)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@pytest.mark.parametrize("head", ["trained head", "LoRA (frozen head)"])
def test_a_graphed_dpo_pass_reads_no_value_back_to_the_host(head):
    model = build_model("nano", seed=3)
    if "LoRA" in head:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pairs = examples()
    reference = reference_log_probs(build_model("nano", seed=4), pairs, 8, pad=0)
    head_parts(model)  # its one-time check of the head runs an ordinary forward pass (before training, in a stage)
    probed = ProbedPasses(model.parameters())
    accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5, graphs=probed)
    assert probed.probe.reads == []
    accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5, graphs=probed, rpo_alpha=1.0)  # RPO's term
    accumulate_gradients(model, pairs, reference, 1, 0, "simpo", 0.5, graphs=probed)  # SimPO's lengths
    assert probed.probe.reads == []
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    ordinary = ProbedPasses(model.parameters())  # the probe does see the ordinary pass's reads (its nonzero)
    with ordinary.probe.mode:
        accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5)
    assert ordinary.probe.reads
    without_gradients = ProbedPasses(())  # the reference pass, replayed too
    with torch.no_grad():
        replayed = reference_log_probs(model, pairs, 2, 0, graphs=without_gradients)  # 4 chunks, fewer shapes
    assert without_gradients.probe.reads == [] and len(without_gradients.graphs) < 4
    torch.testing.assert_close(replayed, reference_log_probs(model, pairs, 2, 0), atol=1e-5, rtol=0)


def test_training_graphs_are_asked_for_only_where_they_can_work():
    model = build_model("nano", seed=1)
    cuda = torch.device("cuda")
    fine = dict(sharded=False, world_size=1, micro_batches=1, checkpointing=False, autocast=False)
    assert isinstance(training_graphs(model, cuda, True, **fine), GraphedPasses)  # builds nothing on the device yet
    assert training_graphs(model, torch.device("cpu"), True, **fine) is None
    assert training_graphs(model, cuda, False, **fine) is None
    for change in ({"sharded": True}, {"world_size": 2}, {"micro_batches": 2}, {"checkpointing": True},
                   {"autocast": True}):
        assert training_graphs(model, cuda, True, **{**fine, **change}) is None, change
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"  # takes no additive mask
    assert training_graphs(flash, cuda, True, **fine) is None
    from advantage.lm.models import ScalarHeadModel

    scorer = ScalarHeadModel.from_causal_lm(model)  # a reward model: the attention of its body
    assert isinstance(training_graphs(scorer, cuda, True, **fine), GraphedPasses)


def test_a_failed_capture_warns_once_and_the_passes_go_on_without_a_graph(monkeypatch):
    """On a CPU the capture fails (no CUDA): the first pass's gradients stay, a warning says why, and every later
    pass runs as it is, with the ordinary result (up to rounding: the batches are still padded)."""
    monkeypatch.setattr(GraphedPasses, "_first_pass",
                        lambda self, graphed, compute: tuple(out.detach() for out in compute(graphed.inputs)))
    model = build_model("nano", seed=3)
    pairs = examples()
    reference = reference_log_probs(build_model("nano", seed=4), pairs, 8, pad=0)
    graphs = GraphedPasses(model.parameters(), capture=True)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        first, _, _ = accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5, graphs=graphs)
    assert graphs.failed and not graphs.graphs
    first_gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    second, _, _ = accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5, graphs=graphs)  # no warning
    ordinary_gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    plain, _, _ = accumulate_gradients(model, pairs, reference, 1, 0, "sigmoid", 0.5)
    assert first == second and abs(second - plain) < 1e-6
    for a, b, c in zip(first_gradients, ordinary_gradients, (p.grad for p in model.parameters())):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5)


def test_every_shape_shares_one_set_of_gradient_buffers_and_unused_parameters_get_none():
    """Passes met again (here without a capture) leave their gradients in one set of buffers shared by every shape,
    equal to an ordinary pass's; a parameter the pass does not use keeps no gradient."""
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    parameters = [*used.parameters(), *unused.parameters()]
    graphs = GraphedPasses(parameters, capture=False)

    def compute(inputs):
        loss = (used(inputs["x"]) ** 2).mean()
        loss.backward()
        return (loss,)

    pointers = set()
    for index, rows in enumerate((2, 5, 2, 5, 2)):  # two shapes, each met again from the third pass on
        x = torch.randn(rows, 4)
        (loss,) = graphs({"x": x}, compute)
        gradients = [p.grad for p in parameters]
        for p in parameters:
            p.grad = None
        (expected,) = compute({"x": x})
        assert torch.equal(loss, expected.detach())
        for gradient, p in zip(gradients, parameters):
            assert (gradient is None) == (p.grad is None)
            if p.grad is not None:
                assert torch.equal(gradient, p.grad)
        if index >= 2:
            pointers.add(gradients[0].data_ptr())
        for p in parameters:
            p.grad = None
    assert len(graphs.graphs) == 2 and all(p.grad is None for p in unused.parameters())
    assert len(pointers) == 1 and pointers == {graphs.gradients[0].data_ptr()}  # one buffer for both shapes


class FakeGraph:
    """Stands for a CUDAGraph whose capture_end fails (an invalidated capture) or succeeds."""

    def __init__(self, end_fails: bool):
        self.end_fails, self.pools = end_fails, []

    def capture_begin(self, pool=None):
        self.pools.append(pool)

    def capture_end(self):
        if self.end_fails:
            raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("end_fails", [True, False])
def test_a_failed_capture_tells_the_allocator_it_ended_unless_the_graph_did(monkeypatch, end_fails):
    """capture_end raises before it tells the allocator that the capture is over; left so, every later allocation
    of the process would behave as if a capture were running. `record` tells it and releases the pool's share, once;
    when capture_end itself succeeded (the work raised), the graph does that and `record` must not."""
    import contextlib

    from advantage.lm.cuda_graphs import record

    class Stream:
        def wait_stream(self, other):
            pass

    from advantage.lm import cuda_graphs

    calls = []
    monkeypatch.setattr(cuda_graphs, "_failed_graphs", [])
    monkeypatch.setattr(cuda_graphs, "_end_generator_capture", lambda device, stream: calls.append(("generator",)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda.memory, "_cuda_endAllocateToPool", lambda *args: calls.append(("end", args)))
    monkeypatch.setattr(torch.cuda.memory, "_cuda_releasePool", lambda *args: calls.append(("release", args)))

    def work():
        raise RuntimeError("a value read back to the host")

    graph = FakeGraph(end_fails)
    with pytest.raises(RuntimeError):
        record(graph, torch.device("cuda", 0), Stream(), (0, 7), work)
    assert graph.pools == [(0, 7)]
    # Told once; the failed graph kept, so that its destructor cannot release the pool again; the default generator
    # taken out of capture mode.
    assert calls == ([("end", (0, (0, 7))), ("release", (0, (0, 7))), ("generator",)] if end_fails else [])
    assert cuda_graphs._failed_graphs == ([graph] if end_fails else [])
    calls.clear()
    assert record(FakeGraph(False), torch.device("cuda", 0), Stream(), (0, 7), lambda: "recorded") == "recorded"
    assert calls == []


# ------------------------------------------------------------------------------------------------------------- GRPO


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@pytest.mark.parametrize("aggregation, lora", [("token", False), ("sequence", True)])
def test_grpo_trains_the_same_through_the_passes_a_graph_replays(tmp_path, monkeypatch, aggregation, lora):
    """Six steps of GRPO (two iterations a batch, a KL to the reference in the loss) with every pass, those of
    log pi_old and log pi_ref included, on the fixed input buffers of `GraphedPasses`, its shared gradient buffers,
    batches padded to recurring widths and the fixed-shape scoring give the losses, figures and weights of ordinary
    passes; with LoRA the reference is the policy with its adapters switched off."""
    from advantage.lm import grpo

    scoring = []

    class ScoringPasses(GraphedPasses):
        def __init__(self, parameters, capture):
            super().__init__(parameters, capture)
            scoring.append(self)

    rewards = tmp_path / "lengths.py"  # a reward that spreads every group (the nano model never answers right)
    rewards.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    config = small_config(grpo.GRPOConfig, task="arithmetic", task_max_operand=99, task_train_size=24,
                          task_eval_size=2, batch_size=2, group_size=4, max_new_tokens=6, max_steps=6,
                          num_iterations=2, beta=0.1, learning_rate=1e-3, aggregation=aggregation, log_every=1,
                          reward_functions=f"{rewards}:length", **(dict(lora_r=4) if lora else {}))
    monkeypatch.setattr(grpo, "GraphedPasses", ScoringPasses)  # log pi_old's and log pi_ref's (graphed run only)
    runs, made = ordinary_and_graphed(monkeypatch, tmp_path, grpo, config)
    graphs = made[0].graphs
    assert 1 <= len(graphs) <= 3
    assert len(scoring) == 2 and all(1 <= len(passes.graphs) <= 3 for passes in scoring)  # log pi_old, log pi_ref
    widths = [shape[1] for key in graphs for name, shape, *_ in key if name == "input_ids"]
    assert widths and all(width % GRAPH_WIDTH_MULTIPLE == 0 for width in widths)
    ordinary, graphed = ([row for row in metrics(runs[name].run_dir) if "losses/grpo" in row]
                         for name in ("ordinary", "graphed"))
    assert len(ordinary) == len(graphed) == 6
    for key in ("losses/grpo", "rewards/mean", "policy/approx_kl", "policy/clip_fraction", "kl/per_token"):
        assert [row[key] for row in graphed] == pytest.approx([row[key] for row in ordinary], abs=1e-5), key
    assert any(row["policy/approx_kl"] > 0 for row in ordinary)  # the second iterations moved the ratio
    before, after = (load_file(str(runs[name].run_dir / "final" / "model.safetensors")) for name in runs)
    start = build_model("nano", seed=1).state_dict()
    moved = {key for key, tensor in before.items() if not torch.equal(tensor, start[key])}
    assert moved == set(before) if not lora else {key for key in moved if "proj" in key} == moved != set()
    for key, tensor in before.items():  # with LoRA: the adapted projections, the adapters merged into final/
        torch.testing.assert_close(after[key], tensor, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kl_placement,ratio_level,cut_answers", [("loss_weighted", "token", False),
                                                                   ("reward", "token", False),
                                                                   ("loss_weighted", "sequence", True)])
def test_a_graphed_grpo_pass_reads_no_value_back_to_the_host(kl_placement, ratio_level, cut_answers):
    """GRPO's pass, with pi_old and pi_ref given, reads nothing back inside what a graph replays; its figures are
    read once afterwards. The same with GSPO's ratio per answer and with cut answers left out of the loss."""
    from advantage.lm.grpo import Collected, GRPOConfig, MicroBatch, accumulate_gradients
    from advantage.lm.logprobs import answer_log_probs, collate_shared_prompt
    from advantage.lm.online import OnlineModels
    from advantage.run.processes import Processes

    model = build_model("nano", seed=3).train()
    batch = collate_shared_prompt([[5, 6, 7], [8, 9]], [[[10, 11, 3], [12, 3]], [[13, 3], []]], 0,
                                  GRAPH_WIDTH_MULTIPLE, 8)
    with torch.no_grad():
        old = answer_log_probs(model, batch) + 0.05 * batch.answer_mask  # a moved policy: ratios away from 1
        reference = answer_log_probs(build_model("nano", seed=4), batch)
    in_loss = torch.tensor([1.0, 0.0, 1.0, 1.0]) if cut_answers else None  # answer 1 [12, 3] as if cut
    micro = MicroBatch(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), old, reference, in_loss)
    collected = Collected(None, torch.zeros(4), {}, [micro], float(micro.loss_mask().sum()), 4.0, 0.0)
    config = GRPOConfig(model="builtin:nano", group_size=2, beta=0.1, kl_placement=kl_placement, num_iterations=2,
                        importance_ratio_level=ratio_level, mask_truncated_completions=cut_answers)
    probed = ProbedPasses(model.parameters())
    loss, sums = accumulate_gradients(model, collected, config, Processes(), graphs=probed)
    assert probed.probe.reads == []
    assert all(p.grad is not None for p in model.parameters())
    graphed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    plain_loss, plain_sums = accumulate_gradients(model, collected, config, Processes())
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert sums["tokens"] == plain_sums["tokens"] == (5 if cut_answers else 7)
    assert sums["answer_tokens"] == 7  # the throughput counts every token the pass went through
    assert sums["approx_kl_sum"] > 0 and sums["approx_kl_sum"] == pytest.approx(plain_sums["approx_kl_sum"])
    for a, b in zip(graphed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    scoring = ProbedPasses(())  # log pi_old's pass, replayed too
    models = OnlineModels(model, None, None, 0, (3,))
    replayed = models.policy_log_probs(batch, 1.0, scoring)
    assert scoring.probe.reads == [] and len(scoring.graphs) == 1
    torch.testing.assert_close(replayed, models.policy_log_probs(batch, 1.0), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("loss", ["bt", "plackett_luce"])
def test_the_reward_model_trains_the_same_through_the_passes_a_graph_replays(tmp_path, monkeypatch, loss):
    """Six steps of the reward model with every pass on the fixed input buffers of `GraphedPasses` and batches
    padded to recurring widths give the losses, accuracies and weights of ordinary passes."""
    from advantage.lm import reward

    data = tmp_path / "train.jsonl"
    if loss == "bt":
        write_jsonl([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS], data)
    else:  # rankings of 3 and 2 answers: the masks matter
        write_jsonl([{"prompt": p, "responses": [c, r, "x"] if index % 2 else [c, r]}
                     for index, (p, c, r) in enumerate(PAIRS)], data)
    config = small_config(reward.RewardConfig, data=str(data), batch_size=2, max_steps=6, learning_rate=1e-3,
                          loss=loss, log_every=1)
    runs, made = ordinary_and_graphed(monkeypatch, tmp_path, reward, config)
    assert 2 <= len(made[0].graphs) < 6
    ordinary, graphed = (metrics(runs[name].run_dir) for name in ("ordinary", "graphed"))
    for key in ("losses/reward", "rewards/accuracy", "rewards/margin"):
        assert [row[key] for row in graphed] == pytest.approx([row[key] for row in ordinary], abs=1e-5), key
    before, after = (runs[name].model.state_dict() for name in runs)
    start = build_model("nano", seed=1).model.state_dict()  # the body the reward model starts from
    body = {key.removeprefix("body."): tensor for key, tensor in before.items() if key.startswith("body.")}
    assert body.keys() == start.keys() and all(not torch.equal(body[key], start[key]) for key in start)
    # Adam moves a weight by about the learning rate whatever the size of its gradient: where a gradient is ~0, the
    # rounding of the padded shapes can flip its sign. A wrong gradient would move every weight by about 1e-3.
    differences = torch.cat([(after[key] - tensor).abs().flatten() for key, tensor in before.items()])
    assert float(differences.max()) < 0.5 * 1e-3 and float((differences > 1e-5).float().mean()) < 1e-3


@pytest.mark.parametrize("loss,center", [("bt", 0.0), ("kwise", 0.0), ("plackett_luce", 0.0), ("kwise", 0.1)])
def test_a_graphed_reward_pass_reads_no_value_back_to_the_host(loss, center):
    from advantage.lm.models import ScalarHeadModel
    from advantage.lm.reward import accumulate_gradients

    model = ScalarHeadModel.from_causal_lm(build_model("nano", seed=3), seed=0).train()
    rankings = examples()
    if loss != "bt":  # one ranking of three answers
        rankings[0] = RankedExample(rankings[0].prompt_ids, [*rankings[0].completion_ids, [40, 41]])
    probed = ProbedPasses(model.parameters())
    first, _, _ = accumulate_gradients(model, rankings, 1, 0, loss, graphs=probed, center_rewards_coefficient=center)
    assert probed.probe.reads == []
    graphed = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    plain, _, _ = accumulate_gradients(model, rankings, 1, 0, loss, center_rewards_coefficient=center)
    assert first == pytest.approx(plain, abs=1e-6)
    for a, b in zip(graphed, (p.grad for p in model.parameters() if p.grad is not None)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
