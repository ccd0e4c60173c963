"""The GPU check (benchmarks/gpu_check.py, issue 15) as the CPU suite can run it: `--device cpu` takes the same
path through the script as a GPU run (every language-model stage as a child process, the CUDA-graph sampling check,
results.json rewritten after every row), so a lent GPU's minutes are not spent on the script's own mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(tmp_path, *arguments):
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--model", "builtin:nano", "--steps", "1", "--out", str(tmp_path / "check"), *arguments],
                          capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600)


def test_every_stage_row_of_the_check_passes_on_the_cpu(tmp_path):
    done = gpu_check(tmp_path, "--only", "stages")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "check" / "results.json").read_text())
    rows = {row["check"]: row for row in report["stages"]}
    assert set(rows) == {"sampling, CUDA graph against the loop", *(f"{stage}, one device" for stage in
                         ("sft", "reward", "dpo", "grpo", "rlhf", "grpo-bf16-lora"))}
    assert all(row["ok"] and not row["error"] for row in rows.values()), rows
    sampling = rows["sampling, CUDA graph against the loop"]
    assert sampling["rows_equal"] == "64/64" and sampling["max_log_prob_difference"] == 0.0
    assert all(isinstance(row["last_loss"], float) for name, row in rows.items() if name.endswith("one device"))
    assert "| grpo-bf16-lora, one device | True |" in done.stdout  # the table printed at the end


def test_a_child_that_outlives_its_timeout_costs_its_row_only(tmp_path):
    done = gpu_check(tmp_path, "--only", "stages", "--timeout", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "check" / "results.json").read_text())["stages"]
    assert len(rows) == 7 and all(row["ok"] is False for row in rows)
    assert all(row["error"] == ["killed: still running after 1 s"] for row in rows)


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    done = gpu_check(tmp_path, "--only", "stages,gpu")
    assert done.returncode == 2 and "unknown part(s) gpu" in done.stderr
    assert not (tmp_path / "check").exists()


def test_a_failed_capture_is_reported_once_for_each_kind():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    decoding = "x.py:1: RuntimeWarning: generate: the decoding step could not be captured as a CUDA graph (E)"
    training = "y.py:2: RuntimeWarning: a training pass could not be captured as a CUDA graph (E)"
    done = subprocess.CompletedProcess([], 0, "", "\n".join([decoding, "other", training, decoding, training]))
    assert gpu_check._graph_fallback(done) == [decoding, training]
    assert gpu_check._graph_fallback(subprocess.CompletedProcess([], 0, "", "fine\n")) == []
