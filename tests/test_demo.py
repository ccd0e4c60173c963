"""`advantage demo --quick` (through scripts/main.sh, as the README runs it) and its report: every part ran and
wrote its run directory, the figures are there, and the page renders with every figure in a real headless browser
(Debian's chromium)."""

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from advantage import cli
from advantage.demo import CLASSIC_VARIANTS, QUICK, run_classic

pytestmark = pytest.mark.slow  # the quick demo: about 3 minutes


def test_the_demo_runs_every_part_and_writes_its_run_directories(quick_demo):
    out, done = quick_demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "report" / "index.html")
    summary = json.loads((out / "demo.json").read_text())
    # Part 1: every psi form and algorithm of the seeds, with the same budget and seeds.
    labels = [record["label"] for record in summary["classic"]]
    assert labels == [variant.label for variant in CLASSIC_VARIANTS for _ in QUICK.classic_seeds]
    for record in summary["classic"]:
        run_dir = Path(record["run_dir"])
        assert run_dir.parent == out / "classic"
        assert (run_dir / "final").is_dir() and (run_dir / "episodes.jsonl").stat().st_size > 0
        assert f"total_steps: {QUICK.classic_steps}" in (run_dir / "config.yaml").read_text()
    # Part 2: five stages, and the comparison of the SFT model with the three aligned from it.
    language = summary["language_models"]
    assert sorted(language["run_dirs"]) == ["dpo", "grpo", "reward", "rlhf", "sft"]
    for run_dir in language["run_dirs"].values():
        assert Path(run_dir).parent == out / "lm" and (Path(run_dir) / "final" / "config.json").exists()
    # Each shown prompt with its right answer (the report reads them; it knows no task): "73+8=" -> "81".
    assert [str(eval(prompt.rstrip("="))) for prompt in language["prompts"]] == language["answers"]
    comparison = {row["name"]: row for row in language["comparison"]}
    assert list(comparison) == ["SFT (start)", "RLHF-PPO", "DPO", "GRPO"]
    for row in comparison.values():
        for key in ("greedy_accuracy", "sampled_accuracy", "reward_model_score", "kl_to_reference"):
            assert math.isfinite(row[key]), (row["name"], key)
        assert 0 <= row["greedy_accuracy"] <= 1 and len(row["completions"]) == len(language["prompts"])
    # The SFT model against itself: the sampler's log-probabilities and a forward pass agree, so its KL is 0.
    assert abs(comparison["SFT (start)"]["kl_to_reference"]) < 1e-4
    assert all(row["kl_to_reference"] > 1e-3 for name, row in comparison.items() if name != "SFT (start)")
    # Part 3: the real chat model, before and after GRPO.
    real = summary["real_model"]
    assert real["model"] == "smollm2-135m-instruct" and real["steps"] == QUICK.real_model_steps
    assert (Path(real["run_dir"]) / "final" / "config.json").exists() and Path(real["run_dir"]).parent == out / "real"
    assert all(0 <= real["accuracy"][when] <= 1 for when in ("before", "after"))
    assert len(real["examples"]) == 6 and all(example["question"].startswith("What is ") for example in
                                                real["examples"])
    # Part 4: the exact checks.
    assert len(summary["verify"]) >= 25 and all(row["passed"] for row in summary["verify"])
    assert re.search(r"exact checks: (\d+)/\1 pass", done.stderr)


@pytest.mark.browser
def test_the_report_embeds_every_figure_and_renders_in_headless_chromium(quick_demo, tmp_path):
    out, done = quick_demo
    assert done.returncode == 0, done.stderr[-3000:]
    page = (out / "report" / "index.html").read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    # Learning curves, KL and clip fraction, steps/s, the aligned policies, the five stages' training curves and the
    # real model's GRPO.
    assert len(images) == 10, [alt for alt, _ in images]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert len(list((out / "report").glob("*.png"))) == 10
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained: nothing to fetch
    for text in ("REINFORCE, total return (psi_1)", "TRPO", "Greedy completions", "RLHF-PPO", "A real chat model",
                 "smollm2-135m-instruct", "PASS"):
        assert text in page, text

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed to render the report (apt-get install chromium)"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = (out / "report" / "index.html").as_uri()
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    # The page's own script counts the images that finished loading with a non-zero size.
    assert 'data-images="10/10"' in dom.stdout, dom.stdout[:500] + dom.stderr[-1000:]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,6000", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 100_000


def test_report_rebuilds_the_page_from_the_demo_directory(quick_demo, tmp_path, capsys):
    out, done = quick_demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again" / "index.html")
    page = (tmp_path / "again" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 10 and "Exact checks" in page


def test_re_running_the_demo_keeps_the_finished_runs(quick_demo):
    out, done = quick_demo
    assert done.returncode == 0, done.stderr[-3000:]
    before = {path: path.stat().st_mtime_ns for path in (out / "classic").glob("*/metrics.jsonl")}
    records = run_classic(QUICK, out, progress=False)
    assert len(before) == len(CLASSIC_VARIANTS) * len(QUICK.classic_seeds)
    assert {Path(record["run_dir"]) / "metrics.jsonl" for record in records} == set(before)
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_the_demo_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert str(tmp_path) in error and error.count("\n") == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
