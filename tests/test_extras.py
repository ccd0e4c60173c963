"""`pip install advantage` without extras: the classic algorithms work, and a command that needs an extra says so.

The optional modules are hidden from a child interpreter by an import hook, as if their extras were not installed.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

HIDDEN = ["transformers", "tokenizers", "datasets", "pyarrow", "jinja2", "peft", "gguf", "matplotlib", "mujoco"]

RUNNER = textwrap.dedent(f"""
    import sys

    class HideOptionalModules:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HIDDEN!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, HideOptionalModules())
    from advantage.cli import main

    sys.exit(main(sys.argv[1:]))
""")


def _advantage(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)


def test_classic_training_needs_no_extra(tmp_path):
    done = _advantage(tmp_path, "train", "ppo", "--env-id", "CartPole-v1", "--total-steps", "512",
                      "--num-envs", "2", "--num-steps", "128", "--progress", "false", "--out", "cartpole")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cartpole" / "final").is_dir()
    evaluated = _advantage(tmp_path, "eval", "cartpole", "--episodes", "2")
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_command_needing_an_extra_names_it_in_one_line(tmp_path):
    done = _advantage(tmp_path, "sft", "--model", "builtin:nano", "--task", "arithmetic", "--max-steps", "1",
                      "--progress", "false", "--out", "sft")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'lm' extra" in lines[0] and "pip install 'advantage[lm]'" in lines[0], done.stderr
    assert not (tmp_path / "sft").exists()
