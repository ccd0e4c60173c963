"""Tuned hyperparameters shipped with the package: presets/ALGO.yaml maps an environment id to field overrides.

They apply when the environment matches (unless --no-preset); --config and flags still override them.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def preset_for(algorithm: str, env_id: str) -> dict[str, Any]:
    """The preset overrides of `algorithm` for `env_id`, or {} if none is shipped."""
    resource = resources.files(__package__) / f"{algorithm}.yaml"
    if not resource.is_file():
        return {}
    table = yaml.safe_load(resource.read_text(encoding="utf-8")) or {}
    return dict(table.get(env_id) or {})
