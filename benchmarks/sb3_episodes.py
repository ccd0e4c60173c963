"""What the Stable-Baselines3 peer scripts (sb3_defaults.py, sb3_hopper_zoo.py) share: a callback that writes every
finished training episode to an episodes.jsonl, as our runs do. Imported from the peers' environment (SB3 installed)."""

from __future__ import annotations

import json
from pathlib import Path


def episode_logger(path: str | Path):
    """(an SB3 callback writing one line per finished episode to `path`: step, return, length; the list of returns
    it fills). Close the callback's `log` after `learn()`."""
    from stable_baselines3.common.callbacks import BaseCallback

    returns: list[float] = []

    class Episodes(BaseCallback):
        log = open(path, "w")

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append(float(info["episode"]["r"]))
                    self.log.write(json.dumps({"step": self.num_timesteps, "return": returns[-1],
                                               "length": int(info["episode"]["l"])}) + "\n")
                    self.log.flush()
            return True

    return Episodes(), returns
