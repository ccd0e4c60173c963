"""`advantage.lm.compare`: the KL to the reference it reports is KL(pi || pi_ref) (seed 000's k1 under samples
from pi), checked against the exact KL of the first answer token; the accuracies are the task's exact match."""

import torch

from advantage.lm.compare import compare_policies
from advantage.lm.examples import encode_prompt
from advantage.lm.models import load_causal_lm, save_builtin, save_pretrained

PROMPTS = ["3+4=", "5+5=", "9+0=", "1+8="]


def exact_first_token_kl(policy_dir, reference_dir, samples_per_prompt):
    """(KL, standard error of its estimate from samples_per_prompt samples per prompt): the exact
    sum_v pi(v | x) (log pi(v | x) - log pi_ref(v | x)) at the first answer token, averaged over the prompts, and
    the exact variance of one sample's log-ratio turned into the standard error of the sampled mean."""
    policy, tokenizer = load_causal_lm(policy_dir)
    reference, _ = load_causal_lm(reference_dir)
    kls, variances = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            log_pi = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
            log_ref = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
            ratio = log_pi - log_ref
            kls.append(float((log_pi.exp() * ratio).sum()))
            variances.append(float((log_pi.exp() * ratio ** 2).sum()) - kls[-1] ** 2)
    return sum(kls) / len(kls), (sum(variances) / samples_per_prompt) ** 0.5 / len(PROMPTS)


def sharper_model(directory, seed):
    """A built-in model whose output layer is scaled up: a peaked next-token distribution, far from another's."""
    save_builtin("nano", directory, seed=seed)
    model, tokenizer = load_causal_lm(directory)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    save_pretrained(model, tokenizer, directory)
    return directory


def test_the_kl_to_the_reference_is_the_exact_kl_within_sampling_error(tmp_path):
    reference = save_builtin("nano", tmp_path / "reference", seed=1)
    other = sharper_model(tmp_path / "other", seed=2)
    rows = compare_policies({"reference": reference, "other": other}, reference, PROMPTS, samples_per_prompt=2000,
                            max_new_tokens=1, seed=0, shown=2)
    by_name = {row.name: row for row in rows}
    exact, standard_error = exact_first_token_kl(other, reference, 2000)
    print("exact", exact, "sampled", by_name["other"].kl_to_reference, "standard error", standard_error)
    assert exact > 0.5  # the two models differ
    assert abs(by_name["other"].kl_to_reference - exact) < 4 * standard_error
    assert abs(by_name["reference"].kl_to_reference) < 1e-5  # the same model: log pi - log pi_ref = 0 per sample
    for row in rows:
        assert row.mean_answer_tokens == 1.0 and len(row.completions) == 2
        assert 0.0 <= row.greedy_accuracy <= 1.0 and row.reward_model_score is None
