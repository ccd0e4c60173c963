"""`advantage report`: a PNG of grouped learning curves; errors name the bad run directory."""

import json

import numpy as np

from advantage import cli
from advantage.run.report import learning_curve


def fake_run(root, name, algorithm, seed, returns):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(f"algorithm: {algorithm}\nenv_id: CartPole-v1\nseed: {seed}\n")
    lines = [json.dumps({"step": 100 * (i + 1), "time_s": i, "return": r, "length": 10}) for i, r in enumerate(returns)]
    (run / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_learning_curve_is_the_rolling_mean(tmp_path):
    run = fake_run(tmp_path, "a", "ppo", 1, [1.0, 2.0, 3.0, 4.0])
    steps, rolling = learning_curve(run, window=2)
    np.testing.assert_allclose(steps, [100, 200, 300, 400])
    np.testing.assert_allclose(rolling, [1.0, 1.5, 2.5, 3.5])


def test_report_writes_a_png(tmp_path, capsys):
    runs = [fake_run(tmp_path, f"ppo{s}", "ppo", s, list(np.linspace(10, 500, 50) + s)) for s in (1, 2)]
    runs.append(fake_run(tmp_path, "rf", "reinforce", 1, list(np.linspace(10, 300, 50))))
    out = tmp_path / "plots" / "curves.png"
    assert cli.main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert str(out) in capsys.readouterr().out


def test_report_on_a_non_run_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "missing" in error and error.count("\n") == 0
    assert not (tmp_path / "x.png").exists()
