"""Batched sampling (`advantage.lm.generation.generate`) against a slow reference loop and a fresh forward pass.

The reference is the MDP of seed 003 run one prompt at a time: at every step the whole prefix (prompt + tokens so
far) goes through the model with no cache and no padding, and the next token is read from the last position.
"""

import copy
from collections import Counter

import pytest
import torch

from advantage.lm.generation import Generated, _cache_keyword, generate, greedy_decode, sample_tokens
from advantage.lm.kv_cache import key_value_cache
from advantage.lm.logprobs import collate, completion_log_probs
from advantage.lm.models import build_model

torch.set_num_threads(1)
PAD, EOS = 0, 3
# Different lengths, a one-token prompt among them: left padding must leave every row as it would be alone.
PROMPTS = [[5, 17, 23, 9], [40], [11, 12, 13, 14, 15, 16, 18], [70, 71]]
ARCHITECTURES = ["qwen2", "llama", "gpt2"]


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2,
                        eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def models():
    built = {architecture: build_model("nano", architecture, seed=1).eval() for architecture in ("qwen2", "llama")}
    # GPT-2's learned absolute positions show whether position ids count real tokens only (rotary ones would not).
    built["gpt2"] = build_gpt2().eval()
    return built


@torch.no_grad()
def slow_next_token_logits(model, prefix):
    """(V,) next-token logits of `prefix` alone: the whole prefix through the model, no cache, no padding."""
    return model(input_ids=torch.tensor([prefix])).logits[0, -1].float()


def slow_greedy(model, prompt, max_new_tokens):
    """argmax at every step, the prefix recomputed from scratch each time (no EOS: always max_new_tokens tokens)."""
    completion = []
    for _ in range(max_new_tokens):
        completion.append(int(slow_next_token_logits(model, prompt + completion).argmax()))
    return completion


def truncated(completion, eos_id=None, stop_sequences=()):
    """`completion` cut right after its first EOS or its first complete stop sequence."""
    for end in range(1, len(completion) + 1):
        if completion[end - 1] == eos_id or any(completion[:end][-len(stop):] == stop for stop in stop_sequences):
            return completion[:end]
    return completion


def repeated(prompts, times):
    """Each prompt `times` times in a row, as the rows of a `Generated` with samples_per_prompt=times."""
    return [prompt for prompt in prompts for _ in range(times)]


def fresh_log_probs(model, generated, temperature):
    """The sampled tokens' log-probabilities recomputed by one forward pass over prompt + completion."""
    prompts = repeated(generated.prompts, generated.samples_per_prompt)
    batch = collate(prompts, generated.completions, pad_id=PAD)
    with torch.no_grad():
        per_position = completion_log_probs(model, batch, temperature=temperature)
    return [row[mask] for row, mask in zip(per_position, batch.completion_mask)]


# ------------------------------------------------------------------------------------------------ greedy decoding


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("samples_per_prompt", [1, 3])
def test_greedy_equals_the_slow_loop_for_every_prompt(models, architecture, samples_per_prompt):
    model = models[architecture]
    generated = generate(model, PROMPTS, samples_per_prompt=samples_per_prompt, max_new_tokens=8, eos_id=-1,
                         pad_id=PAD, greedy=True)
    assert isinstance(generated, Generated) and generated.samples_per_prompt == samples_per_prompt
    assert generated.prompts == PROMPTS
    assert len(generated.completions) == len(PROMPTS) * samples_per_prompt
    expected = [slow_greedy(model, prompt, 8) for prompt in PROMPTS]
    assert generated.completions == repeated(expected, samples_per_prompt)  # row b * G + g is sample g of b
    assert generated.sampled_log_probs.shape == (len(PROMPTS) * samples_per_prompt, 8)
    assert generated.sampled_log_probs.dtype == torch.float32


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_greedy_decode_in_batches_equals_the_slow_loop(models, batch_size):
    """The one greedy decoder of the evaluations: any batch size gives every prompt its own greedy completion."""
    generated = greedy_decode(models["llama"], PROMPTS, max_new_tokens=8, eos_id=-1, pad_id=PAD,
                              batch_size=batch_size)
    assert generated.prompts == PROMPTS and generated.samples_per_prompt == 1
    assert generated.completions == [slow_greedy(models["llama"], prompt, 8) for prompt in PROMPTS]
    assert generated.sampled_log_probs.shape == (len(PROMPTS), 8)


def test_the_cache_grows_beyond_its_capacity(models):
    model = models["qwen2"]
    prefix = PROMPTS[2] + [30, 31, 32]
    cache = key_value_cache(model, capacity=2)  # smaller than the prompt: the buffers have to grow
    with torch.no_grad():
        keyword = {_cache_keyword(model): cache}  # `cache` since transformers 5.24, `past_key_values` before
        model(input_ids=torch.tensor([PROMPTS[2]]), **keyword, use_cache=True)
        for length in range(len(PROMPTS[2]), len(prefix)):
            logits = model(input_ids=torch.tensor([[prefix[length]]]), **keyword, use_cache=True).logits[0, -1]
            assert torch.allclose(logits, slow_next_token_logits(model, prefix[:length + 1]), atol=1e-5)
    assert cache.get_seq_length() == len(prefix)


# -------------------------------------------------------------------------------- log-probabilities of the samples


def most_common_token(completions):
    """The token sampled most often: as EOS it makes rows stop at different steps."""
    return Counter(token for completion in completions for token in completion).most_common(1)[0][0]


@pytest.fixture
def dropped_rows(monkeypatch):
    """Counts the finished rows that leave the decoding batch (through `DynamicCache.batch_select_indices`)."""
    from transformers import DynamicCache

    counts = {"calls": 0, "dropped": 0}
    original = DynamicCache.batch_select_indices

    def counting(cache, indices):
        counts["calls"] += 1
        counts["dropped"] += cache.layers[0].keys.shape[0] - len(indices)
        return original(cache, indices)

    monkeypatch.setattr(DynamicCache, "batch_select_indices", counting)
    return counts


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_equal_a_fresh_forward_pass(models, architecture, temperature, dropped_rows):
    model = models[architecture]
    sampling = dict(samples_per_prompt=4, max_new_tokens=10, pad_id=PAD, temperature=temperature)
    first = generate(model, PROMPTS, eos_id=-1, generator=torch.Generator().manual_seed(0), **sampling)
    # A common token as EOS, so that rows stop at different steps and leave the batch while others go on.
    generated = generate(model, PROMPTS, eos_id=most_common_token(first.completions),
                         generator=torch.Generator().manual_seed(0), **sampling)
    assert min(len(completion) for completion in generated.completions) < 10 and dropped_rows["dropped"] > 0
    fresh = fresh_log_probs(model, generated, temperature)
    for row, completion in enumerate(generated.completions):
        sampled = generated.sampled_log_probs[row]
        assert torch.allclose(sampled[:len(completion)], fresh[row], atol=1e-4)
        assert bool((sampled[len(completion):] == 0).all())


# ------------------------------------------------------------------------------------------------ top-k and top-p


def test_top_k_1_and_a_tiny_top_p_are_greedy(models):
    model = models["llama"]
    greedy = generate(model, PROMPTS, samples_per_prompt=2, max_new_tokens=6, eos_id=-1, pad_id=PAD, greedy=True)
    for filtering in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, PROMPTS, samples_per_prompt=2, max_new_tokens=6, eos_id=-1, pad_id=PAD,
                           generator=torch.Generator().manual_seed(1), **filtering)
        assert sampled.completions == greedy.completions
        assert bool((sampled.sampled_log_probs == 0).all())  # one token left: probability 1


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_top_k_samples_only_among_the_k_most_likely_tokens(models, architecture):
    model = models[architecture]
    temperature, k = 1.5, 5  # a high temperature spreads the samples over all k tokens
    generated = generate(model, PROMPTS, samples_per_prompt=4, max_new_tokens=6, eos_id=-1, pad_id=PAD,
                         temperature=temperature, top_k=k, generator=torch.Generator().manual_seed(2))
    outside_greedy = 0
    for prompt, completion, log_probs in zip(repeated(PROMPTS, 4), generated.completions,
                                             generated.sampled_log_probs):
        for t, token in enumerate(completion):
            logits = slow_next_token_logits(model, prompt + completion[:t]) / temperature
            top = logits.topk(k)
            assert token in top.indices.tolist()
            # The log-probability is the one of the renormalised top-k distribution.
            expected = logits[token] - torch.logsumexp(top.values, dim=0)
            assert torch.isclose(log_probs[t], expected, atol=1e-4)
            outside_greedy += token != int(top.indices[0])
    assert outside_greedy > 0  # it did sample, not just take the argmax


def test_top_p_renormalises_over_the_nucleus(models):
    model = models["qwen2"]
    top_p = 0.5
    generated = generate(model, PROMPTS[:2], samples_per_prompt=3, max_new_tokens=4, eos_id=-1, pad_id=PAD,
                         top_p=top_p, generator=torch.Generator().manual_seed(3))
    for prompt, completion, log_probs in zip(repeated(PROMPTS[:2], 3), generated.completions,
                                             generated.sampled_log_probs):
        for t, token in enumerate(completion):
            probs = torch.softmax(slow_next_token_logits(model, prompt + completion[:t]), dim=-1)
            sorted_probs, order = probs.sort(descending=True)
            nucleus = order[(sorted_probs.cumsum(0) - sorted_probs) < top_p]  # smallest set reaching top_p
            assert token in nucleus.tolist()
            assert torch.isclose(log_probs[t], torch.log(probs[token] / probs[nucleus].sum()), atol=1e-4)


# ------------------------------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_eos_stops_its_row_and_the_others_go_on(models, architecture, dropped_rows):
    model = models[architecture]
    unstopped = [slow_greedy(model, prompt, 8) for prompt in PROMPTS]
    eos_id = unstopped[0][2]  # row 0 emits it at step 2; some other row never does
    assert any(eos_id not in completion for completion in unstopped[1:])
    generated = generate(model, PROMPTS, samples_per_prompt=2, max_new_tokens=8, eos_id=eos_id, pad_id=PAD,
                         greedy=True)
    expected = [truncated(completion, eos_id=eos_id) for completion in unstopped]
    assert generated.completions == repeated(expected, 2)
    assert generated.completions[0][-1] == eos_id and len(generated.completions[0]) <= 3
    lengths = [len(completion) for completion in generated.completions]
    assert max(lengths) == 8  # max_new_tokens caps the rows that never emit EOS
    assert dropped_rows["dropped"] >= 2  # the two samples of prompt 0 left the batch early
    for row, length in enumerate(lengths):
        assert bool((generated.sampled_log_probs[row, length:] == 0).all())
        assert bool((generated.sampled_log_probs[row, :length] <= 0).all())


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_stop_sequences_stop_a_row_and_stay_in_its_completion(models, architecture):
    model = models[architecture]
    unstopped = [slow_greedy(model, prompt, 8) for prompt in PROMPTS]
    stop_sequences = [unstopped[0][1:3], [unstopped[2][4]], [PAD, PAD, PAD]]  # two tokens, one token, never
    generated = generate(model, PROMPTS, max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True,
                         stop_sequences=stop_sequences)
    expected = [truncated(completion, stop_sequences=stop_sequences) for completion in unstopped]
    assert generated.completions == expected
    assert generated.completions[0][-2:] == stop_sequences[0] and len(generated.completions[0]) <= 3
    assert generated.completions[2][-1:] == stop_sequences[1]


def test_sampled_rows_stop_at_eos_and_max_new_tokens_caps_the_rest(models):
    model = models["llama"]
    generated = generate(model, PROMPTS, samples_per_prompt=8, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                         temperature=2.0, generator=torch.Generator().manual_seed(4))
    lengths = [len(completion) for completion in generated.completions]
    for completion in generated.completions:
        assert EOS not in completion[:-1]  # nothing after EOS
        assert completion[-1] == EOS or len(completion) == 12
    assert min(lengths) < 12 and max(lengths) == 12  # some rows stopped, others ran to the cap
    assert generated.sampled_log_probs.shape == (len(PROMPTS) * 8, 12)


def test_the_loop_ends_when_every_row_has_finished(models):
    model = models["qwen2"]
    first_tokens = generate(model, PROMPTS, max_new_tokens=1, eos_id=-1, pad_id=PAD, greedy=True).completions
    stop_sequences = first_tokens  # every row's first greedy token stops it
    generated = generate(model, PROMPTS, max_new_tokens=50, eos_id=-1, pad_id=PAD, greedy=True,
                         stop_sequences=stop_sequences)
    assert all(len(completion) == 1 for completion in generated.completions)
    assert generated.sampled_log_probs.shape == (len(PROMPTS), 50)
    assert bool((generated.sampled_log_probs[:, 1:] == 0).all())


# --------------------------------------------------------------------------------------------------- determinism


def test_the_same_seed_gives_the_same_completions(models):
    model = models["gpt2"]

    def sample(seed):
        return generate(model, PROMPTS, samples_per_prompt=3, max_new_tokens=10, eos_id=EOS, pad_id=PAD,
                        generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(7), sample(7), sample(8)
    assert first.completions == again.completions
    assert torch.equal(first.sampled_log_probs, again.sampled_log_probs)
    assert first.completions != other.completions


# ------------------------------------------------------------------------------------------ model modes and PEFT


def test_the_model_samples_in_eval_mode_and_keeps_its_own_mode(models):
    model = copy.deepcopy(models["gpt2"]).train()  # GPT-2 has dropout: in train mode its outputs would be random
    model.transformer.h[0].eval()  # a submodule with its own mode keeps it too
    generated = generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, pad_id=PAD, greedy=True)
    assert generated.completions == [slow_greedy(models["gpt2"], prompt, 6) for prompt in PROMPTS]
    assert model.training and model.transformer.h[1].training and not model.transformer.h[0].training


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_a_peft_lora_model_generates(models):
    from peft import LoraConfig, get_peft_model

    base = build_model("nano", "qwen2", seed=1)
    # Random (not zero) LoRA B matrices, so the adapter changes the outputs and must be used.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    lora = get_peft_model(base, config)
    weights = {name: parameter.detach().clone() for name, parameter in lora.named_parameters()}
    # Sampling runs on the weights with the adapters folded in (lora_folding.adapters_folded)...
    generated = generate(lora, PROMPTS, samples_per_prompt=2, max_new_tokens=6, eos_id=-1, pad_id=PAD, greedy=True)
    # ...and afterwards every weight is bit for bit what it was, the adapters switched on again.
    assert all(torch.equal(parameter, weights[name]) for name, parameter in lora.named_parameters())
    assert all(not module.disable_adapters for module in lora.modules() if hasattr(module, "lora_A"))
    lora.eval()
    expected = [slow_greedy(lora, prompt, 6) for prompt in PROMPTS]
    assert generated.completions == repeated(expected, 2)
    assert expected != [slow_greedy(models["qwen2"], prompt, 6) for prompt in PROMPTS]  # the adapter mattered
    sampled = generate(lora, PROMPTS, samples_per_prompt=2, max_new_tokens=6, eos_id=EOS, pad_id=PAD,
                       temperature=0.8, generator=torch.Generator().manual_seed(5))
    fresh = fresh_log_probs(lora, sampled, 0.8)
    for row, completion in enumerate(sampled.completions):
        assert torch.allclose(sampled.sampled_log_probs[row, :len(completion)], fresh[row], atol=1e-4)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_a_lora_model_on_bfloat16_weights_generates_with_its_float32_adapters_folded_in():
    from peft import LoraConfig, get_peft_model

    base = build_model("nano", "qwen2", seed=1).to(torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    lora = get_peft_model(base, config)
    adapter = next(parameter for name, parameter in lora.named_parameters() if "lora_A" in name)
    assert adapter.dtype == torch.float32  # PEFT keeps adapters in float32: the fold has to cast their delta
    weights = {name: parameter.detach().clone() for name, parameter in lora.named_parameters()}
    generated = generate(lora, PROMPTS, max_new_tokens=6, eos_id=-1, pad_id=PAD, greedy=True)
    assert all(len(completion) == 6 for completion in generated.completions)
    assert all(parameter.dtype == weights[name].dtype and torch.equal(parameter, weights[name])
               for name, parameter in lora.named_parameters())


# ----------------------------------------------------------------------------- the fixed-shape step (CUDA graphs)


def decoded_with(monkeypatch, mode, model, **arguments):
    """`generate` with its decoding mode forced: "fixed" is the fixed-shape step of a CUDA graph run without the
    graph, "graph" asks for the capture (which fails on a CPU)."""
    from advantage.lm import generation

    with monkeypatch.context() as patched:
        patched.setattr(generation, "decoding_mode", lambda *_: mode)
        return generate(model, PROMPTS, **arguments)


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "llama, eager attention"])
def test_the_fixed_shape_step_samples_what_the_loop_samples(models, architecture, monkeypatch):
    """Same tokens, same log-probabilities: the step of a CUDA graph (fixed shapes, a mask over the whole cache,
    keys written at a position held in a tensor, finished rows kept) against the ordinary loop. Finished rows stay in
    the fixed batch, so the loop keeps them too here: the random numbers drawn per step then match row for row."""
    from advantage.lm import generation

    # eager attention adds the mask to the scores: the additive mask is what both implementations take as it is
    model = build_model("nano", "llama", seed=1, attn_implementation="eager").eval() if "eager" in architecture \
        else models[architecture]
    monkeypatch.setattr(generation, "COMPACT_BELOW", 0.0)
    sampling = dict(samples_per_prompt=3, max_new_tokens=9, pad_id=PAD, temperature=0.8)
    first = generate(model, PROMPTS, eos_id=-1, generator=torch.Generator().manual_seed(1), **sampling)
    # The same draws until a row meets a common token as EOS, or the stop sequence that ends the first row at 5.
    ends = dict(eos_id=most_common_token(first.completions), stop_sequences=[first.completions[0][3:5]])
    loop = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **ends, **sampling)
    fixed = decoded_with(monkeypatch, "fixed", model, generator=torch.Generator().manual_seed(1), **ends, **sampling)
    assert fixed.completions == loop.completions
    assert len(loop.completions[0]) <= 5 and any(len(completion) == 9 for completion in loop.completions)
    assert torch.allclose(fixed.sampled_log_probs, loop.sampled_log_probs, atol=1e-5)
    greedy = decoded_with(monkeypatch, "fixed", model, max_new_tokens=6, eos_id=-1, pad_id=PAD, greedy=True)
    assert greedy.completions == [slow_greedy(model, prompt, 6) for prompt in PROMPTS]


def test_the_warm_up_step_leaves_every_position_after_the_prompts_zero(models):
    """The warm-up before a capture writes real keys after the prompts; a position never attended must still hold
    zeros afterwards (attention weighs it by 0, and 0 x NaN is NaN)."""
    from advantage.lm import cuda_graphs, generation

    model = models["llama"]
    extra = generation._model_inputs(model)
    prompt_ids, prompt_mask = generation.left_pad(PROMPTS, PAD, torch.device("cpu"))
    width = prompt_ids.shape[1]
    cache = key_value_cache(model, width + 6)
    with torch.no_grad():
        _, batch = generation._prefill(model, prompt_ids, prompt_mask, cache, 2, 6, extra)
        cuda_graphs.FixedShapeStep(model, cache, batch, width + 6, {**extra, generation._cache_keyword(model): cache},
                                  capture=False)
    for layer in cache.layers:
        assert layer.key_buffer.shape[2] == width + 6 and layer.key_buffer[:, :, :width].abs().sum() > 0
        assert not layer.key_buffer[:, :, width:].any() and not layer.value_buffer[:, :, width:].any()


class HostReads:
    """Records every operation that reads a tensor's values back to the host (`.item()`, `bool(t)`, `nonzero`, ...):
    inside a CUDA graph capture each one is an error. A CPU run of the step shows whether the GPU's capture can work."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self.reads = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(name in str(func) for name in ("_local_scalar_dense", "nonzero", "masked_select", "unique")):
                    reads.append(str(func))
                elif "index" in str(func) and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                        isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1]):
                    # A boolean mask as an index counts its True entries first (a nonzero inside the CPU kernel,
                    # which the dispatcher does not show).
                    reads.append(f"{func} with a boolean mask")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "qwen2 with LoRA"])
def test_the_fixed_shape_step_never_reads_a_value_back_to_the_host(models, architecture):
    from advantage.lm import cuda_graphs, generation
    from advantage.lm.lora_folding import adapters_folded

    model = models[architecture.split()[0]]
    if "LoRA" in architecture:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    extra = generation._model_inputs(model)
    prompt_ids, prompt_mask = generation.left_pad(PROMPTS, PAD, torch.device("cpu"))
    width = prompt_ids.shape[1]
    cache = key_value_cache(model, width + 4)
    probe = HostReads()
    with torch.no_grad(), adapters_folded(model):
        _, batch = generation._prefill(model, prompt_ids, prompt_mask, cache, 2, 4, extra)
        step = cuda_graphs.FixedShapeStep(model, cache, batch, width + 4,
                                         {**extra, generation._cache_keyword(model): cache}, capture=False)
        with probe.mode:
            step(batch.last_tokens, batch.positions + 1, batch.attention_mask, width + 1)
        assert probe.reads == []
        with probe.mode:  # the probe sees them: transformers' own mask of a padded batch reads values back
            model(input_ids=prompt_ids, attention_mask=prompt_mask)
        assert probe.reads


def test_every_decoding_graph_of_a_process_captures_into_one_pool_on_one_stream(models, monkeypatch):
    """With stand-ins for CUDA's streams and graphs: each call's graph is captured into the same memory pool on the
    same stream (a fresh pool per call would hold its memory after its graph is gone), and the last graph is kept
    until the next is captured (a pool no graph uses cannot be captured into again)."""
    import contextlib

    from advantage.lm import cuda_graphs, generation

    events = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def capture_begin(self, pool=None):
            events.append(("begin", self, pool, current[-1]))

        def capture_end(self):
            events.append(("end", self, cuda_graphs._decoding_graphs[torch.device("cpu")].last_graph))

    current = [Stream()]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", len(events)))
    monkeypatch.setattr(cuda_graphs, "_decoding_graphs", {})
    model = models["qwen2"]
    extra = generation._model_inputs(model)
    steps = []
    for prompts in (PROMPTS, PROMPTS[:2]):  # two calls of different shapes
        prompt_ids, prompt_mask = generation.left_pad(prompts, PAD, torch.device("cpu"))
        cache = key_value_cache(model, prompt_ids.shape[1] + 4)
        with torch.no_grad():
            _, batch = generation._prefill(model, prompt_ids, prompt_mask, cache, 2, 4, extra)
            steps.append(cuda_graphs.FixedShapeStep(model, cache, batch, prompt_ids.shape[1] + 4,
                                                    {**extra, generation._cache_keyword(model): cache}, capture=True))
    begins = [event for event in events if event[0] == "begin"]
    ends = [event for event in events if event[0] == "end"]
    assert len(begins) == len(ends) == 2 and begins[0][2] == begins[1][2]  # one pool
    assert begins[0][3] is begins[1][3] is cuda_graphs._decoding_graphs[torch.device("cpu")].capture_stream
    assert ends[1][2] is steps[0].graph  # the first graph still held while the second is captured
    assert cuda_graphs._decoding_graphs[torch.device("cpu")].last_graph is steps[1].graph


def test_a_failed_capture_warns_once_and_decodes_without_a_graph(models, monkeypatch):
    """On a CPU the capture fails (no CUDA stream): generate says so, gives what the ordinary loop gives, and later
    calls in the process do not try again."""
    from advantage.lm import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_capture_failed", False)
    model = models["qwen2"]
    expected = [slow_greedy(model, prompt, 5) for prompt in PROMPTS]
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        generated = decoded_with(monkeypatch, "graph", model, max_new_tokens=5, eos_id=-1, pad_id=PAD, greedy=True)
    assert generated.completions == expected
    assert cuda_graphs._capture_failed
    assert cuda_graphs.decoding_mode(model, torch.device("cuda", 0), True, key_value_cache(model, 20), 10,
                                     False) == "dynamic"


def test_only_a_gpu_run_that_can_use_a_graph_asks_for_one(models, monkeypatch):
    from advantage.lm import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_capture_failed", False)
    model, gpu, cpu = models["llama"], torch.device("cuda", 0), torch.device("cpu")

    def mode(device=gpu, cuda_graph=True, steps=10, on=model, sharded=False):
        return cuda_graphs.decoding_mode(on, device, cuda_graph, key_value_cache(on, 20), steps, sharded)

    assert mode() == "graph"
    assert mode(device=cpu) == "dynamic" and mode(cuda_graph=False) == "dynamic"
    assert mode(sharded=True) == "dynamic"  # every forward pass of a sharded model is a collective
    assert mode(steps=cuda_graphs.MIN_GRAPH_STEPS - 1) == "dynamic"  # too few steps to repay a capture
    flex = copy.deepcopy(model)
    flex.config._attn_implementation = "flex_attention"  # would not take the additive mask as it is
    assert mode(on=flex) == "dynamic"


# ----------------------------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize("arguments, name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(samples_per_prompt=0), "samples_per_prompt"),
    (dict(prompts=[]), "prompts"), (dict(prompts=[[1], []]), "prompts"), (dict(stop_sequences=[[]]), "stop_sequences"),
])
def test_invalid_arguments_raise_a_value_error_naming_the_argument(models, arguments, name):
    call = dict(prompts=PROMPTS, max_new_tokens=4, eos_id=EOS, pad_id=PAD, samples_per_prompt=1)
    call.update(arguments)
    with pytest.raises(ValueError, match=name):
        generate(models["qwen2"], call.pop("prompts"), **call)


def test_min_new_tokens_forbids_eos_until_then():
    model = build_model("nano", "qwen2", seed=1)
    prompts = [[5, 6, 7], [8, 9]]
    plain = generate(model, prompts, samples_per_prompt=4, max_new_tokens=6, eos_id=3, pad_id=0, greedy=True)
    eos = plain.completions[0][0]  # the token greedy decoding emits first: make it EOS
    early = generate(model, prompts, samples_per_prompt=4, max_new_tokens=6, eos_id=eos, pad_id=0, greedy=True)
    assert all(len(completion) == 1 for completion in early.completions[:4])
    held = generate(model, prompts, samples_per_prompt=4, max_new_tokens=6, eos_id=eos, pad_id=0, greedy=True,
                    min_new_tokens=3)
    for completion in held.completions:
        assert eos not in completion[:3] and len(completion) >= 3


def test_a_fixed_shape_decoding_loop_reads_one_value_back_a_step(models, monkeypatch):
    """On a GPU every value read back to the host stalls the queue of launches until the GPU has caught up. The
    decoding loop around the graphed step reads one a step (how many rows are still alive), min_new_tokens included
    (its end tokens are masked by an addition, not selected by a boolean mask)."""
    probe = HostReads()
    with probe.mode:
        generated = decoded_with(monkeypatch, "fixed", models["qwen2"], samples_per_prompt=2, max_new_tokens=6,
                                 eos_id=[3, 4], pad_id=PAD, min_new_tokens=4,
                                 generator=torch.Generator().manual_seed(0))
    steps = max(len(completion) for completion in generated.completions)
    assert set(probe.reads) == {"aten._local_scalar_dense.default"}  # no nonzero, no boolean mask
    assert len(probe.reads) == 2 + steps  # the prefill's two (transformers' mask of padded prompts), one a step
    assert all(len(completion) >= 4 for completion in generated.completions)


def test_no_end_token_holds_back_no_token():
    """eos_id=-1 (no end token, as the benchmarks use) forbids nothing under min_new_tokens: not the last token of the
    vocabulary either (index -1)."""
    model = build_model("nano", "qwen2", seed=1).eval()
    last = model.config.vocab_size - 1
    prompt = [5, 6, 7]
    with torch.no_grad():  # the last token's head row along the prompt's final hidden state: its logit becomes 100
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight[last] = 100 * hidden / hidden.square().sum()
    plain = generate(model, [prompt], max_new_tokens=1, eos_id=-1, pad_id=0, greedy=True)
    held = generate(model, [prompt], max_new_tokens=1, eos_id=-1, pad_id=0, greedy=True, min_new_tokens=1)
    assert plain.completions == [[last]] and held.completions == [[last]]


def test_sample_tokens_draws_each_token_with_its_probability():
    """The inverse-CDF sampler: over 200,000 rows each token's frequency is within 5 standard errors of its
    probability, a masked token (-inf) is never drawn, and the reported log-probability is the token's own."""
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 1.0, -3.0])
    probabilities = torch.softmax(logits, dim=-1)
    rows = 200_000
    tokens, log_probs = sample_tokens(logits.expand(rows, -1), generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=len(logits)).double() / rows
    standard_errors = (probabilities.double() * (1 - probabilities.double()) / rows).sqrt()
    assert frequencies[3] == 0
    assert bool(((frequencies - probabilities.double()).abs() <= 5 * standard_errors + 1e-12).all()), frequencies
    assert torch.allclose(log_probs, torch.log_softmax(logits, dim=-1)[tokens])
