"""`advantage verify` and the command line's contract: a table, exit code 0 only if all rows pass, usage errors 2."""

import subprocess
import sys

import pytest

from advantage import cli, verify


def test_every_verify_check_passes_for_several_seeds():
    for seed in (1,):  # seed 0 (the default) runs in the console-script test below, the README's and the demo's
        rows = verify.run_all(seed=seed)
        assert len(rows) >= 25
        failed = [row for row in rows if not row.passed]
        assert not failed, failed
        groups = {row.group for row in rows}
        assert groups == {"policy gradient", "DPO optimum", "KL value", "KL gradient"}


def test_a_failing_row_fails_the_command(monkeypatch, capsys):
    bad = verify.CheckResult("policy gradient", "f", "broken", 1.0, 9.0, 1.0, "unbiased", False)
    monkeypatch.setattr(verify, "CHECKS", (lambda seed: [bad],))
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 FAILED" in out


def test_verify_console_script_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "advantage.cli", "verify"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "all checks pass" in done.stdout
    assert "FAIL" not in done.stdout
    assert done.stdout.count("PASS") >= 25


def test_a_usage_error_of_the_console_script_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "advantage.cli", "nonsense"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advantage"), done.stderr


@pytest.mark.parametrize("argv", [["verify", "--seed", "-3"], ["verify", "--seed", "x"], ["nonsense"], []])
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advantage"), lines
