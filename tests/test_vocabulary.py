"""One concept, one name (docs/math.md, "Names"): the configs of both halves use the objectives' argument names, and
the old names keep working with a one-line notice."""

import dataclasses
import inspect

import yaml

from advantage import cli
from advantage.lm.rlhf import RLHFConfig
from advantage.lm.session import stage_module
from advantage.objectives.kl import kl_loss_term
from advantage.objectives.policy_gradient import clipped_value_loss
from advantage.objectives.ppo import adaptive_kl_beta, clipped_surrogate_loss
from advantage.objectives.returns import gae
from advantage.rl.api import ALGORITHMS, algorithm_module
from advantage.rl.ppo import PPOConfig
from advantage.run.config import apply_overrides, renamed_fields

OLD_NAMES = {"clip_coef", "value_clip_coef", "kl_beta", "kl_coef", "lam", "ppo_epochs", "whiten_advantages"}


def _configs():
    yield from (algorithm_module(name).CONFIG for name in ALGORITHMS)
    yield from (stage_module(name).CONFIG for name in ("sft", "reward", "dpo", "grpo", "rlhf"))


def test_one_name_per_concept():
    for config in _configs():
        fields = {field.name for field in dataclasses.fields(config)}
        assert not fields & OLD_NAMES, (config.__name__, fields & OLD_NAMES)
        assert set(renamed_fields(config).values()) <= fields, config.__name__
    # The names are the objectives' own argument names.
    assert "gae_lambda" in inspect.signature(gae).parameters
    assert "clip_range" in inspect.signature(clipped_surrogate_loss).parameters
    assert "clip_range" in inspect.signature(clipped_value_loss).parameters
    assert "beta" in inspect.signature(kl_loss_term).parameters
    assert "beta" in inspect.signature(adaptive_kl_beta).parameters
    for config in (PPOConfig, RLHFConfig):
        assert {"clip_range", "value_clip_range", "gae_lambda", "beta", "update_epochs",
                "normalize_advantage"} <= {field.name for field in dataclasses.fields(config)}, config.__name__


def test_old_names_still_work_with_a_notice(tmp_path, capsys):
    config = apply_overrides(RLHFConfig(), {"lam": 0.9, "kl_coef": 0.2, "ppo-epochs": 3, "whiten_advantages": False},
                             "runs/old/config.yaml")
    assert (config.gae_lambda, config.beta, config.update_epochs, config.normalize_advantage) == (0.9, 0.2, 3, False)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 4 and "advantage: 'lam' (runs/old/config.yaml) is now called 'gae_lambda'" in notices[0]

    # On the command line: the old flag is read as the new field, and the run's config.yaml has the new name.
    code = cli.main(["train", "ppo", "--env-id", "CartPole-v1", "--clip-coef", "0.3", "--total-steps", "256",
                     "--num-envs", "2", "--num-steps", "64", "--progress", "false", "--out", str(tmp_path / "ppo")])
    assert code == 0
    assert "'clip_coef' (command line) is now called 'clip_range'" in capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "ppo" / "config.yaml").read_text())
    assert saved["clip_range"] == 0.3 and "clip_coef" not in saved
    assert "--clip-coef" not in cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
