"""Issue 16, item 3: a run that never reaches its task's solved return says so at the end, and so does the report;
one that does says when."""

import json

from advantage import cli
from advantage.run.report import solved_return, threshold_summary


def _episodes(run_dir, returns):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "episodes.jsonl").write_text("".join(
        json.dumps({"step": 100 * (i + 1), "time_s": i, "return": r, "length": 10}) + "\n"
        for i, r in enumerate(returns)))
    return run_dir


def test_solved_returns_are_gymnasiums():
    assert solved_return("CartPole-v1") == 475.0 and solved_return("MountainCar-v0") == -110.0
    assert solved_return("Pendulum-v1") is None and solved_return("NoSuchTask-v0") is None


def test_the_line_says_when_the_mean_first_reached_the_threshold_or_the_best_it_reached(tmp_path):
    # Means of the last 2 episodes: 10, 255, 490 (first >= 475 at the third episode, step 300), 495.
    reached = threshold_summary(_episodes(tmp_path / "a", [10, 500, 480, 510]), "CartPole-v1", window=2)
    assert reached == "reached the threshold 475 (mean of 2 episodes) at step 300"
    never = threshold_summary(_episodes(tmp_path / "b", [-200, -150, -170]), "MountainCar-v0", window=2)
    assert never == "never reached the threshold -110 (mean of 2 episodes); best mean return -160.0, last -160.0"
    assert threshold_summary(_episodes(tmp_path / "c", [-900.0]), "Pendulum-v1") == ""
    assert threshold_summary(_episodes(tmp_path / "d", []), "MountainCar-v0") == \
        "never reached the threshold -110: no episode finished"


def test_a_run_that_learns_nothing_ends_with_an_honest_line(tmp_path, capsys):
    # 40 iterations of 4 x 128 steps: the environments restart every 4 (a checkpoint segment), so the 200-step
    # episodes of MountainCar finish.
    assert cli.main(["train", "ppo", "--env-id", "MountainCar-v0", "--total-steps", "20480", "--progress", "false",
                     "--out", str(tmp_path / "run")]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ppo MountainCar-v0: never reached the threshold -110 (mean of 20 episodes); best mean "
                           "return -200.0"), last
