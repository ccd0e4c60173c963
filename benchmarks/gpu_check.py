"""The GPU check (issue 15): every language-model stage for a few steps on one CUDA device (and on two, under
torchrun, when two exist), then GRPO and DPO speed against TRL on the same GPU, alternating sides.

Prepared on the CPU machines, meant to be run as one script on a lent GPU machine (which has no package index: carry
the wheels it lacks, and the peers' scripts, in ignored folders). From the repository root:

    python benchmarks/gpu_check.py --out gpu_check --bench-dir shared/bench [--model DIR] [--steps 3] [--runs 2]
        [--only stages,two,classic,speed]

benchmarks/gpu_prepare.sh makes everything it needs there (wheels, the peers' scripts, the real model in two
halves) and says which calls to make; benchmarks/gpu_device.sh is what those calls run.

--model defaults to SmolLM2-135M-Instruct in ~/.cache/advantage when it is there (`advantage fetch-model`), else
builtin:tiny. The TRL side runs ../shared/bench/trl_grpo.py and trl_dpo.py (their workloads, one run per child)
with `use_cpu` switched off; it is skipped, and said so, when trl does not import. `--device cpu` runs the same
check on the CPU (a dry run of the script itself).

Writes OUT/results.json and prints a markdown table: per stage, seconds, the last loss and the peak GPU memory
(torch.cuda.max_memory_allocated); per classic algorithm, its seconds on the CPU and on the GPU (what
`--device auto` should choose); per speed workload, each side's figure and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path.home() / ".cache" / "advantage" / "models" / "smollm2-135m-instruct"

# One stage in a fresh process, its peak GPU memory printed as the last line (the stage prints nothing else there).
STAGE_CHILD = """
import json, sys, time, torch
from advantage import cli
began = time.perf_counter()
code = cli.main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"exit": code, "seconds": round(time.perf_counter() - began, 2), "peak_gpu_mib": peak}))
"""

# Sampling with the decoding step captured as a CUDA graph against the ordinary loop, on the same model and prompts:
# the same greedy completions and log-probabilities (TF32 off for the comparison), the seconds of each (median of
# three after a warm-up), generate's warnings, and whether the default stream is current again afterwards.
GRAPH_CHILD = """
import json, statistics, sys, time, warnings, torch
from advantage.lm.generation import generate
name, device = sys.argv[1], torch.device(sys.argv[2])
if name.startswith("builtin:"):
    from advantage.lm.models import build_model
    model = build_model(name.split(":")[1].split("-")[0], seed=0)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name)
model = model.to(device).eval()
torch.backends.cuda.matmul.allow_tf32 = False
prompts = [[10 + (7 * row + 3 * column) % 50 for column in range(4 + 5 * row)] for row in range(8)]
def run(graph):
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = generate(model, prompts, samples_per_prompt=8, max_new_tokens=32, eos_id=-1, pad_id=0, greedy=True,
                   cuda_graph=graph)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - began
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    graphed, _ = run(True)
    seconds_graph = statistics.median(run(True)[1] for _ in range(3))
plain, _ = run(False)
seconds_plain = statistics.median(run(False)[1] for _ in range(3))
same = sum(a == b for a, b in zip(graphed.completions, plain.completions))
stream_ok = device.type != "cuda" or torch.cuda.current_stream() == torch.cuda.default_stream()
print(json.dumps({"rows_equal": f"{same}/{len(plain.completions)}",
                  "max_log_prob_difference": float((graphed.sampled_log_probs - plain.sampled_log_probs).abs().max()),
                  "seconds_graph": round(seconds_graph, 4), "seconds_plain": round(seconds_plain, 4),
                  "default_stream_after": stream_ok, "warnings": [str(w.message)[:300] for w in caught][:3]}))
"""

# A peer's benchmark child with TRL's `use_cpu` switched off (their scripts pin the CPU).
# On a GPU, float32 products on TF32 tensor cores as in our processes (`run.processes.Processes`), so that the two
# sides are compared at the same precision.
PEER_CHILD = """
import json, runpy, sys, torch
sys.path.insert(0, sys.argv[1])
import trl_common
trl_common.COMMON_ARGS["use_cpu"] = sys.argv[2] == "cpu"
if sys.argv[2] != "cpu":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
sys.argv = [sys.argv[3], "--child", *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"peak_gpu_mib": peak}))
"""


def _json_lines(done: subprocess.CompletedProcess) -> list[dict]:
    lines = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def _run(command: list[str], timeout: int, environment: dict | None = None) -> subprocess.CompletedProcess:
    """The child's completed process; one that outlives `timeout` is killed and comes back with exit code 124 and
    the reason as its last line of stderr, so that one hung child costs its row, not the whole check."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                   **(environment or {})})
    except subprocess.TimeoutExpired as expired:
        def text(value) -> str:
            return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
        return subprocess.CompletedProcess(command, 124, text(expired.stdout),
                                           text(expired.stderr) + f"\nkilled: still running after {timeout} s")


def _error(done: subprocess.CompletedProcess) -> list[str]:
    """The last line of a failed child's stderr (its error, or why it was killed); [] when it succeeded."""
    return done.stderr.strip().splitlines()[-1:] if done.returncode else []


def _graph_fallback(done: subprocess.CompletedProcess) -> list[str]:
    """The warnings, if the child printed them, that a capture failed: the decoding step's (`generate`) and a
    training pass's (`GraphedPasses`), each once."""
    lines = [line for line in done.stderr.splitlines() if "captured as a CUDA graph" in line]
    return list(dict.fromkeys(lines))[:3]


class Report:
    """results.json, rewritten (to a temporary file, then renamed) after every row: a call cut short by the
    machine's time limit still brings back every row finished before."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "stages": [], "two_processes": [], "classic": [], "speed": []}
        self.save()

    def add(self, part: str, row: dict) -> None:
        self.data[part].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        partial = self.path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(self.data, indent=1))
        partial.replace(self.path)


def write_data(directory: Path) -> dict[str, Path]:
    """Chat-format data for every stage: two-number additions as SFT rows, preference pairs and prompts with
    their answer column, and the verifier as a reward function file."""
    directory.mkdir(parents=True, exist_ok=True)
    questions = [(a, b) for a in range(10, 26) for b in (3, 17)]

    def reply(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    rows = {
        "sft": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "completion": reply(str(a + b))}
                for a, b in questions],
        "prefs": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "chosen": reply(str(a + b)),
                   "rejected": reply(str(a + b + 1))} for a, b in questions],
        "prompts": [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
                    for a, b in questions],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(item) + "\n" for item in items))
    paths["rewards"] = directory / "rewards.py"
    paths["rewards"].write_text("def correct(prompts, completions, answer, **kwargs):\n"
                                "    return [float(a in c[0]['content']) for c, a in zip(completions, answer)]\n")
    return paths


def stage_commands(model: str, data: dict[str, Path], out: Path, steps: int, device: str) -> dict[str, list[str]]:
    """The five stages, each `steps` optimizer steps; rlhf reads the reward model the reward stage writes."""
    real = not model.startswith("builtin:")
    common = ["--max-steps", str(steps), "--progress", "false", "--tensorboard", "false", "--device", device,
              "--batch-size", "8"]
    on_data = {
        "sft": ["--data", str(data["sft"])] if real else ["--task", "arithmetic"],
        "reward": ["--data", str(data["prefs"])] if real else ["--task", "arithmetic"],
        "dpo": ["--data", str(data["prefs"])] if real else ["--task", "arithmetic"],
        "grpo": ["--data", str(data["prompts"]), "--reward-functions", f"{data['rewards']}:correct"] if real
        else ["--task", "arithmetic"],
        "rlhf": ["--data", str(data["prompts"])] if real else ["--task", "arithmetic"],
    }
    extra = {"grpo": ["--group-size", "8", "--max-new-tokens", "32"],
             "rlhf": ["--reward-model", str(out / "reward" / "final"), "--max-new-tokens", "32",
                      "--update-epochs", "1"]}
    return {stage: [stage, "--model", model, *on_data[stage], *extra.get(stage, []), *common,
                    "--out", str(out / stage)] for stage in ("sft", "reward", "dpo", "grpo", "rlhf")}


def last_loss(run_dir: Path) -> float | None:
    """The stage's loss at its last logged step: `losses/total` where a stage sums several, else its first loss."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for row in reversed([json.loads(line) for line in path.read_text().splitlines()]):
        losses = {key: value for key, value in row.items() if key.startswith("losses/") and
                  key != "losses/grad_norm" and isinstance(value, (int, float))}
        if losses:
            return losses.get("losses/total", next(iter(losses.values())))
    return None


def check_stages(args, out: Path, report: Report) -> None:
    done = _run([sys.executable, "-c", GRAPH_CHILD, args.model, args.device], timeout=args.timeout)
    figures = (_json_lines(done) or [{}])[-1]
    report.add("stages", {"check": "sampling, CUDA graph against the loop", "ok": done.returncode == 0, **figures,
                          "error": _error(done)})
    data = write_data(out / "data")
    commands = stage_commands(args.model, data, out / "one_gpu", args.steps, args.device)
    # bfloat16 weights with float32 LoRA adapters, folded into the weights while sampling (a mix that once failed)
    commands["grpo-bf16-lora"] = [*commands["grpo"], "--dtype", "bfloat16", "--lora-r", "8",
                                  "--out", str(out / "one_gpu" / "grpo-bf16-lora")]  # the last --out wins
    for stage, command in commands.items():
        done = _run([sys.executable, "-c", STAGE_CHILD, *command], timeout=args.timeout)
        figures = (_json_lines(done) or [{}])[-1]
        report.add("stages", {"check": f"{stage}, one device", "ok": done.returncode == 0 and figures.get("exit") == 0,
                              "seconds": figures.get("seconds"), "peak_gpu_mib": figures.get("peak_gpu_mib"),
                              "last_loss": last_loss(out / "one_gpu" / stage),
                              "graph_fallback": _graph_fallback(done),
                              "error": _error(done)})


def check_two_processes(args, out: Path, report: Report) -> None:
    """sft and grpo under torchrun on two GPUs (each process on cuda:LOCAL_RANK, NCCL), each data parallel and then
    sharded with FSDP2."""
    import torch

    if args.device == "cpu" or torch.cuda.device_count() < 2:
        report.add("two_processes", {"check": "two processes", "ok": None, "note": "fewer than two GPUs: not run"})
        return
    data = write_data(out / "data")
    for label, stage, extra in (("sft", "sft", []), ("sft-fsdp", "sft", ["--sharding", "fsdp"]),
                                ("grpo", "grpo", []), ("grpo-fsdp", "grpo", ["--sharding", "fsdp"])):
        run_dir = out / "two_gpus" / label
        command = [*stage_commands(args.model, data, out / "two_gpus", args.steps, "cuda")[stage], *extra,
                   "--out", str(run_dir)]  # the last --out wins
        began = time.perf_counter()
        done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "advantage.cli",
                     *command], timeout=args.timeout)
        report.add("two_processes", {"check": f"{label}, two processes", "ok": done.returncode == 0,
                                     "seconds": round(time.perf_counter() - began, 2),
                                     "last_loss": last_loss(run_dir),
                                     "error": _error(done)})


def speed(args, out: Path, report: Report) -> None:
    """GRPO s/step and DPO pairs/s, ours and TRL's alternating, `--runs` each, on the peers' workloads."""
    try:
        import trl  # noqa: F401
        peers = True
    except ImportError:
        peers = False
    model_dir = "" if args.model.startswith("builtin:") else args.model
    lora = ["--model-dir", model_dir, "--lora-r", str(args.lora_r)] if model_dir else []
    workloads = {
        "grpo": ([sys.executable, str(ROOT / "benchmarks" / "lm_grpo.py"), "--child", "--bench-dir", args.bench_dir,
                  "--threads", "4", "--steps", "8", *lora], "trl_grpo.py", ["--threads", "4", "--steps", "8", *lora]),
        "dpo": ([sys.executable, str(ROOT / "benchmarks" / "lm_speed.py"), "--child", "dpo", "--bench-dir",
                 args.bench_dir, "--threads", "4", "--pairs", "512", *lora], "trl_dpo.py",
                ["--threads", "4", "--pairs", "512", *lora]),
    }
    for name, (ours, peer_script, peer_arguments) in workloads.items():
        for run in range(args.runs):
            done = _run(ours, timeout=args.timeout, environment={"ADVANTAGE_BENCH_DEVICE": args.device})
            figures = (_json_lines(done) or [{}])[-1]
            report.add("speed", {"workload": name, "side": "advantage", "run": run, "ok": done.returncode == 0,
                                 **figures, "graph_fallback": _graph_fallback(done), "error": _error(done)})
            if run == 0 and args.device != "cpu":  # what the CUDA graphs (decoding step, training pass) buy
                graphed = figures
                done = _run(ours, timeout=args.timeout, environment={"ADVANTAGE_BENCH_DEVICE": args.device,
                                                                     "ADVANTAGE_BENCH_CUDA_GRAPHS": "0"})
                figures = (_json_lines(done) or [{}])[-1]
                # The same training without graphs: equal losses (DPO) and rewards (GRPO) up to float rounding.
                same = {key: [graphed.get(key), figures.get(key)] for key in ("first_loss", "last_loss", "rewards")
                        if key in figures}
                report.add("speed", {"workload": name, "run": run, "ok": done.returncode == 0, **figures,
                                     "side": "advantage, --cuda-graphs false", "graphed_against_not": same,
                                     "error": _error(done)})  # the side after the child's own "side"
            if not peers:
                continue
            done = _run([sys.executable, "-c", PEER_CHILD, args.bench_dir, args.device,
                         str(Path(args.bench_dir) / peer_script), *peer_arguments], timeout=args.timeout)
            lines = _json_lines(done)
            figures = {**(lines[-2] if len(lines) >= 2 else {}), **(lines[-1] if lines else {})}
            report.add("speed", {"workload": name, "side": "TRL", "run": run, "ok": done.returncode == 0, **figures,
                                 "error": _error(done)})
    if not peers:
        report.add("speed", {"workload": "TRL", "ok": None,
                             "note": "trl does not import here: the peers' side not run"})


# The classic algorithms on both devices (`--device auto` is the CPU for them: this measures whether it should be).
CLASSIC = {"ppo CartPole-v1": ["ppo", "--env-id", "CartPole-v1", "--total-steps", "16384"],
           # PPO's Box defaults (2,048-step rollouts, 10 epochs of minibatches of 64), the MuJoCo workload's shape,
           # on an environment that needs no MuJoCo on the GPU machine.
           "ppo Pendulum-v1": ["ppo", "--env-id", "Pendulum-v1", "--no-preset", "--total-steps", "8192"],
           "a2c CartPole-v1": ["a2c", "--env-id", "CartPole-v1", "--total-steps", "8000"],
           "trpo Pendulum-v1": ["trpo", "--env-id", "Pendulum-v1", "--total-steps", "8192"],
           "reinforce CartPole-v1": ["reinforce", "--env-id", "CartPole-v1", "--total-steps", "8000"],
           "dqn CartPole-v1": ["dqn", "--env-id", "CartPole-v1", "--total-steps", "8000"]}


def classic_devices(args, out: Path, report: Report) -> None:
    """Each classic algorithm for a few thousand steps on the CPU and on the GPU, one thread: seconds and steps/s
    (the update's device; collection is on the CPU either way)."""
    devices = ["cpu"] if args.device == "cpu" else ["cpu", "cuda"]
    for name, command in CLASSIC.items():
        for device in devices:
            run_dir = out / "classic" / f"{name.replace(' ', '-')}-{device}"
            done = _run([sys.executable, "-m", "advantage.cli", "train", *command, "--device", device, "--threads",
                         "1", "--progress", "false", "--tensorboard", "false", "--out", str(run_dir)],
                        timeout=args.timeout)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
                if (run_dir / "metrics.jsonl").exists() else []
            last = metrics[-1] if metrics else {}
            report.add("classic", {"check": f"{name}, {device}", "ok": done.returncode == 0,
                                   "seconds": last.get("time_s"),
                                   "steps_per_s": round(last["step"] / last["time_s"]) if last else None,
                                   "error": _error(done)})


def table(report: dict) -> str:
    lines = ["| check | ok | seconds | last loss | peak GPU MiB |", "|---|---|---|---|---|"]
    for row in report["stages"] + report["two_processes"]:
        lines.append(f"| {row['check']} | {row.get('ok')} | {row.get('seconds')} | {row.get('last_loss')} | "
                     f"{row.get('peak_gpu_mib')} |")
    lines += ["", "| classic algorithm, device | ok | seconds | steps/s |", "|---|---|---|---|"]
    lines += [f"| {row['check']} | {row['ok']} | {row['seconds']} | {row['steps_per_s']} |"
              for row in report.get("classic", [])]
    lines += ["", "| workload | side | run | ok | figure (grpo: median s/step; dpo: pairs/s) | peak GPU MiB |",
              "|---|---|---|---|---|---|"]
    for row in report["speed"]:
        figure = (f"{row.get('median_step_s')} s/step" if row.get("workload") == "grpo" else
                  f"{row.get('pairs_per_s') or row.get('samples_per_s')} pairs/s") if "note" not in row else row["note"]
        lines.append(f"| {row.get('workload')} | {row.get('side', '')} | {row.get('run', '')} | {row.get('ok')} | "
                     f"{figure} | {row.get('peak_gpu_mib')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--model", default=str(SMOLLM2) if SMOLLM2.is_dir() else "builtin:tiny")
    parser.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a dry run of the script)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=240, help="seconds a child may run before it is killed "
                        "(its row then says so); a lent machine's call lasts at most 600 s")
    parser.add_argument("--only", default="stages,two,classic,speed",
                        help="the parts to run, comma-separated: stages (each LM stage on one device), two (two "
                             "processes, when two GPUs exist), classic (classic algorithms, CPU against GPU), speed "
                             "(against TRL)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    unknown = parts - {"stages", "two", "classic", "speed"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "device": args.device,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    print(json.dumps(header), flush=True)
    report = Report(out / "results.json", header)
    for part, check in (("classic", classic_devices), ("stages", check_stages), ("two", check_two_processes),
                        ("speed", speed)):
        if part in parts:
            check(args, out, report)
    print(table(report.data))


if __name__ == "__main__":
    main()
