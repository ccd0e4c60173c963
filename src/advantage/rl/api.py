"""The Python API, as short as the command line:

    from advantage import train
    run = train("ppo", env_id="CartPole-v1", total_steps=50_000, out="runs/cartpole")
    run.last_metrics["episode_return"]

Values are resolved as on the command line: the algorithm's defaults (its defaults for Box actions on a continuous
environment without a preset) < its shipped preset for the environment < a YAML config file < keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from advantage.errors import UsageError
from advantage.rl.envs import action_space_kind
from advantage.rl.presets import preset_for
from advantage.run.checkpoint import removed_if_it_fails
from advantage.run.config import apply_overrides, load_config_file, load_yaml_mapping, resumed_config
from advantage.run.session import Run, default_run_dir

ALGORITHMS = ("reinforce", "a2c", "ppo", "trpo", "dqn")


def algorithm_module(name: str) -> ModuleType:
    """The module implementing algorithm `name` (it has `CONFIG`, `train` and `validate`)."""
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm '{name}'; expected one of {', '.join(ALGORITHMS)}")
    import importlib

    return importlib.import_module(f"advantage.rl.{name}")


def resolve_config(algorithm: str, fields: dict[str, Any], config_file: str | Path | None = None,
                   use_preset: bool = True, source: str = "arguments") -> Any:
    """The config of `algorithm`: defaults < preset for the environment < config file < `fields`.

    Where the environment has no shipped preset (or `use_preset` is off) and its actions are a Box, the algorithm's
    defaults for continuous control (its config's BOX_DEFAULTS) replace the discrete ones first: the first run on a
    new continuous task starts from settings made for such tasks. A preset keeps its own values as shipped.
    """
    module = algorithm_module(algorithm)
    config = module.CONFIG()
    from_file = load_config_file(config_file, algorithm) if config_file else {}
    env_id = fields.get("env_id") or from_file.get("env_id") or config.env_id
    preset = preset_for(algorithm, str(env_id)) if use_preset else None
    if preset:
        config = apply_overrides(config, preset, f"preset {algorithm}/{env_id}")
    elif box_defaults(algorithm) and action_space_kind(str(env_id)) == "Box":
        config = apply_overrides(config, box_defaults(algorithm), "defaults for Box actions")
    if from_file:
        config = apply_overrides(config, from_file, str(config_file))
    return apply_overrides(config, fields, source)


def box_defaults(algorithm: str) -> dict[str, Any]:
    """The fields `algorithm` sets differently for Box (continuous) actions, field -> value ({} if none)."""
    return dict(getattr(algorithm_module(algorithm).CONFIG, "BOX_DEFAULTS", {}))


def train(algorithm: str, out: str | Path | None = None, config_file: str | Path | None = None,
          use_preset: bool = True, **fields: Any) -> Run:
    """Train `algorithm` ("reinforce", "a2c", "ppo", "trpo", "dqn") and return its Run.

    Args:
        out: run directory (default runs/ALGO-ENV-seedS).
        config_file: optional YAML mapping of field: value.
        use_preset: apply the shipped preset for the environment.
        fields: any field of the algorithm's config (see `advantage train ALGO --help`).
    """
    config = resolve_config(algorithm, fields, config_file, use_preset)
    out = Path(out) if out else default_run_dir(algorithm, config.env_id, config.seed)
    with removed_if_it_fails(out):
        return algorithm_module(algorithm).train(config, out)


def resume(run_dir: str | Path, **fields: Any) -> Run:
    """Continue the run in `run_dir` from its last checkpoint (fields may override, e.g. a larger total_steps)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir}: no config.yaml there (not a run directory)")
    saved = load_yaml_mapping(run_dir / "config.yaml")
    name = saved.pop("algorithm", None)
    module = algorithm_module(str(name))
    config = resumed_config(module.CONFIG(), saved, run_dir / "config.yaml", fields)
    return module.train(config, run_dir, resume=True)
