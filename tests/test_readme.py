"""Every command in the README runs, in the README's order, in one working directory, so the guide cannot drift
from the code.

What is run: every line of every ```bash block (continuation lines joined, comments dropped), every ```python
block, and every data or code block introduced by a line "`path`:" is written to that path first (the files the
commands read). A command whose comment says "exit 2: MESSAGE" must fail with exit code 2 and one line of error
that contains MESSAGE; every other command must succeed.

Budgets are cut so the whole README runs in a couple of minutes; the flags are appended, and the last value of a
flag wins: training runs get --total-steps 4096 (6144 when resuming), language-model stages --max-steps 2 and
--eval-max-prompts 4 (on the real chat model also batches of 2 and 2 held-out prompts), `advantage pairs`
--max-prompts 8, evaluations --episodes 2 (or --eval-max-prompts 4 for a language model), and everything
--progress false. `bash scripts/main.sh` is the session's quick demo
(tests/test_demo.py checks what it wrote). `bash scripts/test.sh` is this very suite: the test checks that CI runs
exactly it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from advantage import cli

pytestmark = pytest.mark.slow  # the whole README, the real model included

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LM_STAGES = ("sft", "reward", "dpo", "grpo", "rlhf")


@dataclass
class Step:
    """One thing the README asks the reader to do: write a file, run a command, or run a Python snippet."""

    line: int
    kind: str  # "file", "command" or "python"
    text: str
    path: str = ""
    expected_error: str = ""

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def readme_steps() -> list[Step]:
    """The README's steps in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    steps: list[Step] = []
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        language, start = fence.group(1), index + 1
        end = start
        while not lines[end].startswith("```"):
            end += 1
        body = lines[start:end]
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        designated = re.fullmatch(r"`([^`]+)`:", previous.strip())
        if designated:
            steps.append(Step(start + 1, "file", "\n".join(body) + "\n", path=designated.group(1)))
        elif language == "python":
            steps.append(Step(start + 1, "python", "\n".join(body) + "\n"))
        elif language == "bash":
            steps.extend(_commands(body, start + 1))
        index = end + 1
    return steps


def _commands(body: list[str], first_line: int) -> list[Step]:
    steps, pending, pending_line = [], "", 0
    for offset, line in enumerate(body):
        if not pending:
            pending_line = first_line + offset
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        command, _, comment = pending.partition(" #")
        error = re.search(r"exit 2: (.*)$", comment)
        if command.strip():
            steps.append(Step(pending_line, "command", command.strip(),
                              expected_error=error.group(1).strip() if error else ""))
        pending = ""
    return steps


STEPS = readme_steps()


def _last_mentions(steps: list[Step]) -> dict[int, list[str]]:
    """{step index: the runs/X and models/X directories no later step names}."""
    last = {}
    for index, step in enumerate(steps):
        for directory in re.findall(r"\b((?:runs|models)/[\w.-]+)", step.text):
            last[directory] = index
    done: dict[int, list[str]] = {}
    for directory, index in last.items():
        done.setdefault(index, []).append(directory)
    return done


LAST_MENTIONS = _last_mentions(STEPS)
BIG_DIRECTORY = 100 * 2**20  # bytes: a real model's directory (0.5-0.6 GB); the small runs stay for the report


def test_the_readme_has_what_the_issue_asks_for():
    kinds = [step.kind for step in STEPS]
    commands = [step.text for step in STEPS if step.kind == "command"]
    assert commands[:2] == ["bash scripts/main.sh", "bash scripts/test.sh"]  # the quick start comes first
    assert "python" in kinds and kinds.count("file") >= 4
    for stage in LM_STAGES:  # a worked example of every stage on the user's own model and data
        assert any(c.startswith(f"advantage {stage} --model my-model") or
                   c.startswith(f"advantage {stage} --model runs/my-sft/final") for c in commands), stage
    assert any(c.startswith("torchrun ") for c in commands)
    assert sum(bool(step.expected_error) for step in STEPS) >= 5


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The reader's working directory: empty but for the repository's benchmark configs (the README names one)."""
    directory = tmp_path_factory.mktemp("reader")
    (directory / "benchmarks").symlink_to(ROOT / "benchmarks")
    yield directory
    # The README fetches the real model and trains it (over 1 GB here): freed now rather than at the session's end.
    shutil.rmtree(directory, ignore_errors=True)


# The real chat model's steps take seconds each on 2 cores: its runs also get smaller batches.
REAL_MODEL_BATCH = {"grpo": ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8"],
                    "sft": ["--batch-size", "2"], "dpo": ["--batch-size", "2"], "reward": ["--batch-size", "2"]}


def _real_model(argv: list[str]) -> bool:
    return any("smollm2" in argument or "runs/smol-" in argument for argument in argv)


def _budget(argv: list[str]) -> list[str]:
    if "--help" in argv or argv[0] in ("verify", "report"):
        return argv
    if argv[0] == "train":
        return [*argv, "--total-steps", "6144" if "--resume" in argv else "4096", "--progress", "false"]
    if argv[0] in LM_STAGES:
        real = [*REAL_MODEL_BATCH.get(argv[0], []), "--eval-max-prompts", "2"] if _real_model(argv) else []
        return [*argv, "--max-steps", "2", "--eval-max-prompts", "4", *real, "--progress", "false"]
    if argv[0] == "pairs":
        return [*argv, "--max-prompts", "8", "--progress", "false"]
    if argv[0] == "eval":
        language_model = cli._is_language_model(Path(argv[1]))
        return [*argv, *(["--eval-max-prompts", "4"] if language_model else ["--episodes", "2"])]
    return argv


def _run_advantage(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # --help
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("step", STEPS, ids=str)
def test_readme_step(step, workspace, quick_demo, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    if step.kind == "file":
        path = workspace / step.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(step.text, encoding="utf-8")
        return
    if step.kind == "python":
        monkeypatch.syspath_prepend(str(workspace))
        exec(compile(step.text, str(step), "exec"), {"__name__": "__readme__"})
        return
    argv = shlex.split(step.text)
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if argv[:2] == ["bash", "scripts/test.sh"]:
        return  # this suite itself (test_ci_runs_the_readme_test_command)
    if argv[:2] == ["bash", "scripts/main.sh"]:
        out, done = quick_demo  # the same script with --quick, run once per session
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "report" / "index.html").exists()
        return
    if argv[0] == "advantage":
        code, error = _run_advantage(_budget(argv[1:]), capsys)
    elif argv[0] == "torchrun":
        done = subprocess.run([*argv, "--max-steps", "2", "--progress", "false"], cwd=workspace, env=environment,
                              capture_output=True, text=True, timeout=600)
        code, error = done.returncode, done.stderr
    elif argv[0] == "python":
        done = subprocess.run([sys.executable, *argv[1:]], cwd=workspace, env=environment, capture_output=True,
                              text=True, timeout=600)
        code, error = done.returncode, done.stderr
    else:
        pytest.fail(f"{step}: no rule to run {argv[0]!r}; teach tests/test_readme.py")
    if step.expected_error:
        lines = [line for line in error.strip().splitlines() if line.startswith("advantage")]
        assert code == 2 and len(lines) == 1, (step, code, error[-2000:])
        assert step.expected_error in lines[0], (step, lines[0])
    else:
        assert code == 0, (step, step.text, error[-3000:])
    # The real model's directories are freed once no later command names them (the replay would hold 3 GB).
    for directory in LAST_MENTIONS.get(STEPS.index(step), []):
        path = workspace / directory
        if path.is_dir() and sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) > BIG_DIRECTORY:
            shutil.rmtree(path)
