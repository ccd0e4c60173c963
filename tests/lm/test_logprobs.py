"""Log-probabilities of completions: alignment, masks, batch invariance under padding, gradient isolation.

The reference everywhere is seed 003's MDP: state = token prefix, action = next token, so
log pi(completion | prompt) = sum_t log pi(a_t | s_t), each term computed by running the model on the prefix alone.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from advantage.lm.logprobs import (
    PromptCompletionBatch,
    answer_log_probs,
    answer_sequence_log_probs,
    collate,
    collate_shared_prompt,
    completion_log_probs,
    position_ids_from_attention_mask,
    sequence_log_probs,
    token_log_probs,
)
from advantage.lm.models import build_model

torch.set_num_threads(1)
PAD = 0
# Different prompt and completion lengths, including an empty completion and a one-token prompt.
PROMPTS = [[5, 17, 23, 9], [40], [11, 12, 13, 14, 15, 16, 18], [70, 71]]
COMPLETIONS = [[33, 34], [60, 61, 62, 63, 64, 65], [], [80, 81, 82]]


@pytest.fixture(scope="module")
def models():
    built = {architecture: build_model("nano", architecture, seed=1).eval() for architecture in ("qwen2", "llama")}
    # Rotary embeddings (qwen2, llama) are blind to a constant shift of positions; GPT-2's learned absolute
    # positions are not, so it is the model that shows left padding needs position ids from the attention mask.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2,
                        eos_token_id=3, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        built["gpt2"] = GPT2LMHeadModel(config).eval()
    return built


def test_collate_layout_right_and_left():
    right = collate([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=PAD, padding_side="right")
    assert right.input_ids.tolist() == [[1, 2, 3, 5], [4, 6, 7, PAD]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert right.completion_mask.tolist() == [[False, False, False, True], [False, True, True, False]]
    assert right.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 2]]
    left = collate([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=PAD, padding_side="left")
    assert left.input_ids.tolist() == [[1, 2, 3, 5], [PAD, 4, 6, 7]]
    assert left.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert left.completion_mask.tolist() == [[False, False, False, True], [False, False, True, True]]
    assert left.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_completion_mask_covers_exactly_the_completion_tokens(padding_side):
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side=padding_side)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        mask, real = batch.completion_mask[row], batch.attention_mask[row].bool()
        assert batch.input_ids[row][mask].tolist() == completion
        assert batch.input_ids[row][real].tolist() == prompt + completion
        assert not mask[0] and bool((mask <= real).all())
        assert batch.position_ids[row][real].tolist() == list(range(len(prompt) + len(completion)))


def test_collate_and_from_masks_reject_completion_tokens_without_a_prefix():
    with pytest.raises(ValueError, match="prompt"):
        collate([[]], [[1]], pad_id=PAD)
    with pytest.raises(ValueError):
        collate([[1]], [[1], [2]], pad_id=PAD)
    ids = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="position 0"):
        PromptCompletionBatch.from_masks(ids, torch.ones_like(ids), torch.tensor([[True, True]]))
    batch = PromptCompletionBatch.from_masks(ids, torch.tensor([[0, 1]]), torch.tensor([[False, True]]))
    assert batch.position_ids.tolist() == [[0, 0]]


def test_token_log_probs_by_hand_on_fixed_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64) * 3
    input_ids = torch.randint(0, 7, (2, 5), generator=generator)
    result = token_log_probs(logits, input_ids)
    assert result.shape == (2, 5)
    for b in range(2):
        assert result[b, 0] == 0
        for t in range(1, 5):
            expected = torch.log_softmax(logits[b, t - 1], dim=-1)[input_ids[b, t]]
            assert torch.isclose(result[b, t].double(), expected, atol=1e-6)
    # Half precision goes through float32 row by row: equal to float32 on the same (rounded) logits.
    rounded = logits.to(torch.bfloat16)
    assert torch.allclose(token_log_probs(rounded, input_ids), token_log_probs(rounded.float(), input_ids),
                          atol=1e-6)


def slow_sequence_log_prob(model, prompt, completion, temperature=1.0):
    """sum_t log pi(a_t | s_t), each state s_t = prompt + a_<t run through the model on its own (no padding)."""
    total = 0.0
    for t, action in enumerate(completion):
        state = torch.tensor([prompt + completion[:t]])
        next_token_logits = model(input_ids=state).logits[0, -1] / temperature
        total += torch.log_softmax(next_token_logits.double(), dim=-1)[action].item()
    return total


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_sequence_log_probs_is_the_sum_over_actions_of_the_mdp(models, architecture):
    model = models[architecture]
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side="left")
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            result = sequence_log_probs(model, batch, temperature=temperature)
            expected = [slow_sequence_log_prob(model, p, c, temperature) for p, c in zip(PROMPTS, COMPLETIONS)]
            assert result.shape == (len(PROMPTS),)
            assert torch.allclose(result.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert result[2] == 0  # the empty completion


@pytest.mark.parametrize("architecture", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_each_example_alone_equals_it_in_a_padded_batch(models, architecture, padding_side):
    model = models[architecture]
    with torch.no_grad():
        batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side=padding_side)
        batched = completion_log_probs(model, batch)  # (B, T)
        assert batched.dtype == torch.float32 and batched.shape == batch.input_ids.shape
        assert bool((batched[~batch.completion_mask] == 0).all())
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            alone = completion_log_probs(model, collate([prompt], [completion], pad_id=PAD))[0]  # no padding
            assert torch.allclose(batched[row][batch.completion_mask[row]], alone[len(prompt):], atol=1e-5)
            assert torch.isclose(batched[row].sum(), alone.sum(), atol=1e-5)


class WithoutLogitsToKeep(nn.Module):
    """A causal LM whose forward takes only the three batch tensors, and which remembers its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logits = None

    def forward(self, input_ids, attention_mask, position_ids):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if output.logits.requires_grad:
            output.logits.retain_grad()
        self.logits = output.logits
        return output


def test_the_head_runs_on_the_scored_tokens_only_and_changes_nothing(models):
    model = models["qwen2"]
    prompts, completions = [PROMPTS[0], PROMPTS[2], [7, 8, 9]], [COMPLETIONS[0], [1, 2], []]
    batch = collate(prompts, completions, pad_id=PAD, padding_side="right")
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: head_rows.append(inputs[0].shape[:-1]))
    try:
        with torch.no_grad():
            chunked = completion_log_probs(model, batch)
            full = completion_log_probs(WithoutLogitsToKeep(model), batch)  # no head_parts: the whole forward
    finally:
        hook.remove()
    assert head_rows == [(4,), (3, 9)]  # the 4 completion tokens' states; the fallback ran the head on all 3 x 9
    assert torch.allclose(chunked, full, atol=1e-6)


def test_chunked_head_has_the_gradient_of_the_whole_forward_pass(models):
    model = models["llama"].train()
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side="left")
    gradients = []
    for wrapped in (model, WithoutLogitsToKeep(model)):
        (completion_log_probs(wrapped, batch, temperature=0.7) ** 2).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    model.eval()
    for name, gradient in gradients[0].items():
        # float rounding only: within a millionth of the tensor's largest entry (entries reach ~50 here)
        assert (gradient - gradients[1][name]).abs().max() <= 1e-6 * gradient.abs().max(), name


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation produced while the mode is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return output


def test_a_large_vocabulary_never_materialises_batch_by_vocabulary_logits(monkeypatch):
    """Qwen2.5's vocabulary (151,936) on one small layer: 24 answers x 16 tokens would be 58M logits at once; no
    operation of the forward or backward pass (training) or of a no-grad pass may produce more than one chunk."""
    from advantage.lm import logprobs

    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_ELEMENTS", 1 << 22)  # 27 rows of 151,936...
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 64)  # ...raised to 64: six chunks of the 384 answer tokens
    chunk = 64 * 151_936
    vocabulary = 151_936
    model = build_model("nano", "qwen2", seed=1, vocab_size=vocabulary, num_hidden_layers=1, hidden_size=32,
                        intermediate_size=64, tie_word_embeddings=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocabulary, (6,), generator=generator).tolist() for _ in range(4)]
    answers = [[torch.randint(4, vocabulary, (16,), generator=generator).tolist() for _ in range(6)] for _ in range(4)]
    batch = collate_shared_prompt(prompts, answers, PAD)
    weights = model.get_input_embeddings().weight.numel()  # the embedding (and tied head) itself is allowed
    for grad in (True, False):
        recorder = LargestTensor()
        with torch.set_grad_enabled(grad), recorder:
            log_probs = answer_log_probs(model, batch)
            if grad:
                log_probs.sum().backward()
        assert recorder.largest <= max(weights, chunk) < 24 * 16 * vocabulary, grad
    gradient = model.get_input_embeddings().weight.grad
    assert gradient is not None and bool(gradient.abs().sum() > 0)


def test_logits_that_are_not_the_plain_head_are_finished_or_fall_back(models):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2ForCausalLM

    from advantage.lm.logprobs import head_parts

    config = Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=PAD)

    class Doubled(Qwen2ForCausalLM):
        """Post-processing that no config field describes: the split must be refused."""

        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2
            return output

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        gemma = Gemma2ForCausalLM(config).eval()
        doubled = Doubled(models["qwen2"].config).eval()
    assert head_parts(gemma).finish is not None  # soft-capping, read from the config
    assert head_parts(doubled) is None
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD)
    with torch.no_grad():
        for model in (gemma, doubled):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
            expected = token_log_probs(logits, batch.input_ids) * batch.completion_mask
            assert torch.allclose(completion_log_probs(model, batch), expected, atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_gradient_flows_only_through_completion_positions(models, padding_side):
    model = models["llama"]
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side=padding_side)
    embeddings = {}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        embeddings["output"] = output

    hook = model.get_input_embeddings().register_forward_hook(keep_embeddings)
    recorder = WithoutLogitsToKeep(model)
    try:
        sequence_log_probs(recorder, batch).sum().backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    # d/d logits[t]: non-zero exactly where logits[t] scores a completion token t + 1.
    scores_a_completion_token = torch.zeros_like(batch.completion_mask)
    scores_a_completion_token[:, :-1] = batch.completion_mask[:, 1:]
    logit_gradient_norm = recorder.logits.grad.abs().sum(dim=-1)  # (B, T)
    assert bool((logit_gradient_norm[~scores_a_completion_token] == 0).all())
    assert bool((logit_gradient_norm[scores_a_completion_token] > 0).all())
    # Padding never influences the result: zero gradient at the embeddings of pad tokens.
    embedding_gradient_norm = embeddings["output"].grad.abs().sum(dim=-1)  # (B, T)
    padded = batch.attention_mask == 0
    assert bool((embedding_gradient_norm[padded] == 0).all())


def test_position_ids_from_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_a_peft_model_goes_through_the_same_path():
    from peft import LoraConfig, get_peft_model

    base = build_model("nano", "qwen2", seed=1).eval()
    batch = collate(PROMPTS, COMPLETIONS, pad_id=PAD, padding_side="left")
    with torch.no_grad():
        expected = completion_log_probs(base, batch)
        lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).eval()
        assert torch.allclose(completion_log_probs(lora, batch), expected, atol=1e-6)  # LoRA starts as the identity


# ------------------------------------------------------------------------------------------- one prompt, K answers

# Three prompts of different lengths; K = 3 answers for the first, 2 for the others (the third one empty-padded),
# and one empty answer.
SHARED_PROMPTS = [[5, 17, 23, 9], [40], [11, 12, 13, 14, 15, 16, 18]]
SHARED_ANSWERS = [[[33, 34], [60, 61, 62], [7]], [[80, 81, 82, 83], [9]], [[], [44, 45]]]


def test_collate_shared_prompt_layout():
    batch = collate_shared_prompt([[1, 2, 3], [4]], [[[5], [6, 7]], [[8, 9, 10]]], pad_id=PAD)
    assert batch.answers_per_prompt == 2
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 7], [4, 8, 9, 10, PAD, PAD]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 3, 4] and batch.position_ids[1, :4].tolist() == [0, 1, 2, 3]
    assert batch.answer_ids.tolist() == [[5, PAD, PAD], [6, 7, PAD], [8, 9, 10], [PAD, PAD, PAD]]
    assert batch.answer_mask.sum(dim=1).tolist() == [1, 2, 3, 0]
    assert batch.answer_columns[:3].tolist() == [[3, 0, 0], [4, 5, 0], [1, 2, 3]]
    assert batch.predictor_columns[:3].tolist() == [[2, 0, 0], [2, 4, 0], [0, 1, 2]]  # the prompt's end, then t - 1
    # Row 0: the prompt is causal; answer 6 7 sees the prompt and itself, never answer 5.
    assert batch.attention[0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                 [1, 1, 0, 0, 0, 0],
                                                 [1, 1, 1, 0, 0, 0],
                                                 [1, 1, 1, 1, 0, 0],
                                                 [1, 1, 1, 0, 1, 0],
                                                 [1, 1, 1, 0, 1, 1]]
    assert not batch.attention[1, :4, 4:].any()  # no real token sees padding
    assert batch.real_tokens == 4 + 6  # each prompt once
    concatenated = batch.concatenated()
    assert concatenated.input_ids[concatenated.attention_mask.bool()].tolist() == \
        [1, 2, 3, 5, 1, 2, 3, 6, 7, 4, 8, 9, 10, 4]


@pytest.mark.parametrize("architecture", ["qwen2", "llama", "gpt2"])
def test_prompt_once_equals_the_prompt_repeated_before_each_answer(models, architecture):
    model = models[architecture]
    batch = collate_shared_prompt(SHARED_PROMPTS, SHARED_ANSWERS, pad_id=PAD)
    with torch.no_grad():
        shared = answer_log_probs(model, batch)  # (B * K, A)
        concatenated = batch.concatenated()
        repeated = completion_log_probs(model, concatenated)  # (B * K, T)
    assert shared.shape == batch.answer_ids.shape
    assert bool((shared[~batch.answer_mask] == 0).all())
    assert bool((shared[batch.answer_mask] != 0).all())
    assert torch.allclose(shared[batch.answer_mask], repeated[concatenated.completion_mask], atol=1e-5)
    assert torch.allclose(answer_sequence_log_probs(model, batch), sequence_log_probs(model, concatenated), atol=1e-5)
    with torch.no_grad():  # the temperature divides the logits on both paths
        assert torch.allclose(answer_sequence_log_probs(model, batch, temperature=0.7),
                              sequence_log_probs(model, concatenated, temperature=0.7), atol=1e-5)
    # ... and each answer alone, with no padding at all (seed 003's sum over the answer's actions).
    for b, (prompt, group) in enumerate(zip(SHARED_PROMPTS, SHARED_ANSWERS)):
        for k, answer in enumerate(group):
            alone = completion_log_probs(model, collate([prompt], [answer], pad_id=PAD))[0, len(prompt):]
            row = b * batch.answers_per_prompt + k
            assert torch.allclose(shared[row][batch.answer_mask[row]], alone, atol=1e-5)


def test_prompt_once_has_the_gradient_of_the_prompt_repeated(models):
    model = models["qwen2"]
    batch = collate_shared_prompt(SHARED_PROMPTS, SHARED_ANSWERS, pad_id=PAD)
    weights = torch.linspace(-1.0, 2.0, batch.answer_ids.shape[0])  # a loss that weighs answers differently

    def gradient(log_probs):
        model.zero_grad(set_to_none=True)
        (log_probs * weights).sum().backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters()]
        model.zero_grad(set_to_none=True)
        return gradients

    shared = gradient(answer_sequence_log_probs(model, batch))
    repeated = gradient(sequence_log_probs(model, batch.concatenated()))
    for ours, theirs in zip(shared, repeated):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert any(bool(g.abs().sum() > 0) for g in shared)


@pytest.mark.parametrize("architecture", ["qwen2", "llama", "gpt2", "qwen2 whole forward"])
def test_fixed_shape_scoring_of_padded_widths_equals_the_ordinary_one(models, architecture):
    """What a CUDA graph replays (`fixed_shape=True`: every answer slot scored, then masked; rows and answers padded
    to recurring widths) gives the ordinary log-probabilities and gradients."""
    model = models[architecture.split()[0]]
    model = WithoutLogitsToKeep(model) if "whole" in architecture else model
    plain = collate_shared_prompt(SHARED_PROMPTS, SHARED_ANSWERS, pad_id=PAD)
    padded = collate_shared_prompt(SHARED_PROMPTS, SHARED_ANSWERS, pad_id=PAD, width_multiple=32,
                                   answer_width_multiple=8)
    assert padded.input_ids.shape == (3, 32) and padded.answer_ids.shape == (9, 8)
    assert plain.input_ids.shape[1] < 32 and plain.answer_ids.shape[1] < 8  # the padding is real
    weights = torch.linspace(-1.0, 2.0, plain.answer_ids.shape[0])

    def scored(batch, fixed_shape):
        model.zero_grad(set_to_none=True)
        tokens = answer_log_probs(model, batch, temperature=0.7, fixed_shape=fixed_shape)
        (tokens.sum(dim=-1) * weights).sum().backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters()]
        model.zero_grad(set_to_none=True)
        return tokens.detach(), gradients

    ordinary, ordinary_gradients = scored(plain, False)
    fixed, fixed_gradients = scored(padded, True)
    assert bool((fixed[:, ordinary.shape[1]:] == 0).all()) and bool((fixed[~padded.answer_mask] == 0).all())
    torch.testing.assert_close(fixed[:, :ordinary.shape[1]], ordinary, atol=1e-5, rtol=0)
    for ours, theirs in zip(fixed_gradients, ordinary_gradients):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert any(bool(g.abs().sum() > 0) for g in fixed_gradients)
