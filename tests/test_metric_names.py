"""docs/metrics.md is the one table of metric names: every algorithm and stage, run briefly (with the variants that
log more: PPO's KL penalty, RLHF with PPO-ptx, an adaptive β and a reward model), logs exactly the names the table
gives it, and every name in the table is logged by one of those runs."""

import json
import re
from pathlib import Path

import pytest

import advantage

ROOT = Path(__file__).resolve().parents[1]
ALL = ("reinforce", "a2c", "ppo", "trpo", "dqn", "sft", "reward", "dpo", "grpo", "rlhf")


def _table() -> dict[str, set[str]]:
    """{metric name: the algorithms that log it} from docs/metrics.md."""
    table = {}
    for line in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([^`]+)` \| ([^|]+) \|", line)
        if match:
            names = {re.sub(r"\s*\(.*\)", "", part).strip() for part in match.group(2).split(",")}
            table[match.group(1)] = set(ALL) if names == {"all"} else names
    return table


def _logged(run_dir: Path) -> set[str]:
    return {key for line in (run_dir / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict[str, tuple[str, set[str]]]:
    """{run name: (algorithm, the names its metrics.jsonl holds)}."""
    out = tmp_path_factory.mktemp("metric-names")
    classic = {"reinforce": {"baseline": "value"}, "a2c": {}, "a2c-n-step": {"advantage": "n_step"}, "ppo": {},
               "ppo-kl": {"variant": "kl_penalty", "target_kl": 0.01}, "trpo": {},
               "dqn": {"learning_starts": 200, "total_steps": 2000}}
    runs = {}
    for name, fields in classic.items():
        algorithm = name.split("-")[0]
        advantage.train(algorithm, out=out / name, **{"env_id": "CartPole-v1", "total_steps": 1024,
                                                         "progress": False, "tensorboard": False, **fields})
        runs[name] = (algorithm, _logged(out / name))
    common = dict(model="builtin:nano", task="arithmetic", task_max_operand=9, task_train_size=32,
                  task_eval_size=8, batch_size=4, max_steps=2, eval_every=1, progress=False, tensorboard=False)
    stages = {"sft": {}, "reward": {}, "dpo": {}, "grpo": {"group_size": 2, "max_new_tokens": 4},
              "rlhf": {"max_new_tokens": 4, "target_kl": 0.1, "ptx_coef": 0.5,
                       "reward_model": str(out / "reward" / "final"),
                       "ptx_data": str(out / "sft" / "data" / "sft_train.jsonl")}}
    for name, fields in stages.items():
        advantage.train(name, out=out / name, **common, **fields)
        runs[name] = (name, _logged(out / name))
    return runs


def test_the_table_names_every_algorithm_it_lists():
    table = _table()
    assert len(table) >= 60 and all(algorithms <= set(ALL) for algorithms in table.values()), table


def test_each_run_logs_only_what_the_table_gives_its_algorithm(logged):
    table = _table()
    for name, (algorithm, keys) in logged.items():
        allowed = {metric for metric, algorithms in table.items() if algorithm in algorithms}
        functions = "rewards/FUNCTION" in allowed  # a reward function's own figure, by its name
        unknown = {key for key in keys - allowed if not (functions and key.startswith("rewards/"))}
        assert not unknown, f"{name} logs names docs/metrics.md does not give it: {sorted(unknown)}"


def test_every_name_in_the_table_is_logged(logged):
    seen = set().union(*(keys for _, keys in logged.values()))
    seen |= {"rewards/FUNCTION"} if any(key.startswith("rewards/advantage.") for key in seen) else set()
    assert set(_table()) - seen == set()
