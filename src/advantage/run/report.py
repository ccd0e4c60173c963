"""`advantage report`: figures and a self-contained HTML page from run directories.

A RUN_DIR argument may be a run directory (classic or language-model), a directory holding run directories (at any
depth), or a demo directory (`advantage demo`), whose comparison of the aligned policies, sample completions and
exact checks then join the page.

Classic runs that share their configuration up to the seed are one group, drawn as the mean of their curves with
the min-max spread shaded; different groups are overlaid. A run's learning curve is the mean return of its last
`window` finished training episodes against environment steps.

Every file is written to a temporary name and renamed, so an interrupted report leaves no half-written page.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advantage.errors import UsageError
from advantage.run.config import load_yaml_mapping
from advantage.run.files import atomic_path, atomic_write_text
from advantage.run.metrics import read_jsonl

# Config fields that do not change what a run learns: runs differing only in these (and the seed) are one group.
_NOT_SETTINGS = {"seed", "progress", "tensorboard", "threads", "checkpoint_every", "keep_checkpoints", "label",
                 "max_nonfinite", "vectorization"}


@dataclass
class RunInfo:
    """A run directory, its config.yaml, and whether it is a classic run or a language-model stage."""

    path: Path
    config: dict[str, Any]
    named: bool = True  # given on the command line, not found below a directory that was

    @property
    def algorithm(self) -> str:
        """The algorithm or the language-model stage ("ppo", "sft", ...)."""
        return str(self.config.get("algorithm", "?"))

    @property
    def classic(self) -> bool:
        """True for a Gymnasium run (it has an environment), False for a language-model stage."""
        return "env_id" in self.config

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics.jsonl rows (empty if none)."""
        path = self.path / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []


# ------------------------------------------------------------------------------------------------------ discovery


def _run_info(run_dir: Path) -> RunInfo:
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    return RunInfo(run_dir, load_yaml_mapping(config_path))


def find_runs(paths: list[Path]) -> tuple[list[RunInfo], list[dict[str, Any]]]:
    """The run directories named by `paths` (searched below each one that is not itself a run) and the summaries
    (demo.json) of the demo directories among them.

    Raises:
        UsageError: a path that does not exist or holds no run directory.
    """
    runs: list[RunInfo] = []
    demos: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path}: no such directory")
        if (path / "config.yaml").exists():
            runs.append(_run_info(path))
            continue
        if (path / "demo.json").exists():
            demos.append(json.loads((path / "demo.json").read_text()))
        found = sorted(config.parent for config in path.rglob("config.yaml")
                       if not {"final", "checkpoints"} & set(config.relative_to(path).parts[:-1]))
        if not found:
            raise UsageError(f"{path}: not a run directory (no config.yaml in it or below it)")
        for run_dir in found:
            info = _run_info(run_dir)
            info.named = False
            runs.append(info)
    return runs, demos


# ------------------------------------------------------------------------------------------------- classic runs


def solved_return(env_id: str) -> float | None:
    """The return at which Gymnasium calls `env_id` solved (its spec's reward_threshold: CartPole-v1 475, Acrobot-v1
    -100, MountainCar-v0 -110, ...), or None for a task without one or an id Gymnasium does not know."""
    import gymnasium as gym

    try:
        threshold = gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return None
    return None if threshold is None else float(threshold)


def threshold_summary(run_dir: Path, env_id: str, window: int = 20) -> str:
    """One line saying whether a run's mean return over `window` training episodes reached the task's solved return:
    at which step it first did, or that it never did and the best it reached ('' for a task without a threshold)."""
    threshold = solved_return(env_id)
    path = run_dir / "episodes.jsonl"
    if threshold is None or not path.exists():
        return ""
    if not read_jsonl(path):
        return f"never reached the threshold {threshold:g}: no episode finished"
    steps, rolling = learning_curve(run_dir, window)
    if (rolling >= threshold).any():
        return (f"reached the threshold {threshold:g} (mean of {window} episodes) at step "
                f"{int(steps[int(np.argmax(rolling >= threshold))])}")
    return (f"never reached the threshold {threshold:g} (mean of {window} episodes); best mean return "
            f"{float(rolling.max()):.1f}, last {float(rolling[-1]):.1f}")


def learning_curve(run_dir: Path, window: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(steps, rolling mean return over the last `window` episodes) of one run."""
    path = run_dir / "episodes.jsonl"
    if not path.exists():
        raise UsageError(f"{run_dir}: no episodes.jsonl (not a run directory of a classic algorithm)")
    rows = read_jsonl(path)
    if not rows:
        raise UsageError(f"{path}: no finished episode yet")
    steps = np.array([row["step"] for row in rows], dtype=np.float64)
    returns = np.array([row["return"] for row in rows], dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(returns)])
    counts = np.minimum(np.arange(1, len(returns) + 1), window)
    rolling = (cumulative[1:] - cumulative[np.arange(1, len(returns) + 1) - counts]) / counts
    return steps, rolling


def _has_episodes(run_dir: Path) -> bool:
    path = run_dir / "episodes.jsonl"
    return path.exists() and path.stat().st_size > 0


def group_runs(runs: list[RunInfo]) -> dict[str, list[RunInfo]]:
    """Classic runs grouped by configuration up to the seed, in the order first seen, under a readable label: the
    runs' `label` if set, else 'ALGO ENV' plus the settings in which groups of the same ALGO ENV differ."""
    keyed: dict[tuple, list[RunInfo]] = {}
    for run in runs:
        key = tuple(sorted((k, str(v)) for k, v in run.config.items() if k not in _NOT_SETTINGS))
        keyed.setdefault((str(run.config.get("label") or ""), key), []).append(run)
    by_base: dict[str, list[tuple]] = defaultdict(list)
    for label, key in keyed:
        if not label:
            config = dict(key)
            by_base[f"{config.get('algorithm', '?')} {config.get('env_id', '?')}"].append(key)
    labels = {}
    for (label, key), members in keyed.items():
        if label:
            labels[(label, key)] = label
            continue
        config = dict(key)
        base = f"{config.get('algorithm', '?')} {config.get('env_id', '?')}"
        siblings = [dict(k) for k in by_base[base]]
        differing = sorted(k for k in config if any(s.get(k) != config[k] for s in siblings))
        labels[(label, key)] = base + (f" ({', '.join(f'{k}={config[k]}' for k in differing)})" if differing else "")
    return {labels[group]: members for group, members in keyed.items()}


def _mean_and_spread(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 200):
    end = min(steps[-1] for steps, _ in curves)
    grid = np.linspace(min(steps[0] for steps, _ in curves), end, points)
    values = np.stack([np.interp(grid, steps, values) for steps, values in curves])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _series(run: RunInfo, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of the first of `keys` the run logs, over the metrics rows that have it."""
    rows = run.metrics()
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            steps, values = zip(*points)
            return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return None


@dataclass
class GroupFigures:
    """The table row of one group of classic runs (figures over its runs, i.e. seeds)."""

    label: str
    runs: int
    final_return_mean: float
    final_return_std: float
    best_return: float
    solved: int
    median_steps_to_solve: float | None
    median_seconds_to_solve: float | None
    median_steps_per_second: float | None


def group_figures(label: str, runs: list[RunInfo], window: int = 20) -> GroupFigures:
    """Final return (mean of the last `window` episodes), best rolling mean, how many runs reached the
    environment's solved return and when (median steps and seconds), and the median steps per second."""
    finals, bests, steps_to, seconds_to, speeds = [], [], [], [], []
    threshold = solved_return(str(runs[0].config.get("env_id")))
    for run in runs:
        steps, rolling = learning_curve(run.path, window)
        finals.append(rolling[-1])
        bests.append(rolling.max())
        if threshold is not None and (rolling >= threshold).any():
            first = int(np.argmax(rolling >= threshold))
            steps_to.append(steps[first])
            seconds_to.append(read_jsonl(run.path / "episodes.jsonl")[first]["time_s"])
        speed = [row["charts/sps"] for row in run.metrics() if row.get("charts/sps")]
        if speed:
            speeds.append(speed[-1])
    return GroupFigures(label, len(runs), float(np.mean(finals)), float(np.std(finals)), float(np.max(bests)),
                        len(steps_to), float(np.median(steps_to)) if steps_to else None,
                        float(np.median(seconds_to)) if seconds_to else None,
                        float(np.median(speeds)) if speeds else None)


# -------------------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    with atomic_path(path, suffix=f".tmp{path.suffix}") as temporary:  # savefig reads the format from the name
        figure.savefig(temporary)
    _pyplot().close(figure)
    return path


def _colours(labels: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def plot_learning_curves(groups: dict[str, list[RunInfo]], path: Path, window: int = 20,
                         title: str | None = None) -> Path:
    """Every group's learning curve (mean over its runs, min-max shaded) in one PNG."""
    plt = _pyplot()
    colours = _colours(list(groups))
    figure, axis = plt.subplots(figsize=(9, 5.2 + 0.22 * ((len(groups) + 1) // 2)), dpi=110)
    for label, runs in groups.items():
        curves = [learning_curve(run.path, window) for run in runs]
        grid, mean, low, high = _mean_and_spread(curves)
        axis.plot(grid, mean, color=colours[label], label=f"{label} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            axis.fill_between(grid, low, high, color=colours[label], alpha=0.15)
    env_ids = {str(run.config.get("env_id")) for runs in groups.values() for run in runs}
    for threshold in {solved_return(env_id) for env_id in env_ids} - {None}:
        axis.axhline(threshold, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("environment steps")
    _steps_axis(axis)
    axis.set_ylabel(f"return (mean of the last {window} episodes)")
    axis.set_title(title or "learning curves (mean over seeds, min-max shaded)")
    axis.grid(alpha=0.3)
    # Below the plot, so that no curve is hidden behind it.
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    figure.tight_layout()
    return _save(figure, path)


def _steps_axis(axis) -> None:
    """Tick labels like 20k and 1.5M instead of 20000 and 1500000, which run into each other on small panels."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _position) -> str:
        if abs(value) >= 1e6:
            return f"{value / 1e6:g}M"
        return f"{value / 1e3:g}k" if abs(value) >= 1e3 else f"{value:g}"

    axis.xaxis.set_major_formatter(FuncFormatter(label))


def plot_steps_per_second(table: list[GroupFigures], colours: dict[str, Any], path: Path) -> Path:
    """Median environment steps per second of every group, as bars."""
    plt = _pyplot()
    rows = [row for row in table if row.median_steps_per_second]
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2), dpi=110)
    axis.barh([row.label for row in rows], [row.median_steps_per_second for row in rows],
              color=[colours[row.label] for row in rows])
    for y, row in enumerate(rows):
        axis.text(row.median_steps_per_second, y, f" {row.median_steps_per_second:,.0f}", va="center", fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("environment steps per second (median over seeds; one thread)")
    axis.set_title("speed")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_series_panels(panels: list[tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]], colours: dict[str, Any],
                       path: Path, xlabel: str, title: str, legend: bool = True) -> Path:
    """Side-by-side panels, each {label: (steps, values)} drawn as lines (one legend below them all)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), dpi=110, squeeze=False)
    for axis, (name, lines) in zip(axes[0], panels):
        for label, (steps, values) in lines.items():
            axis.plot(steps, values, color=colours.get(label), label=label, linewidth=1.2)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel(xlabel)
        _steps_axis(axis)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for axis in axes[0][1:]:
        more = axis.get_legend_handles_labels()
        handles += [handle for handle, label in zip(*more) if label not in labels]
        labels += [label for label in more[1] if label not in labels]
    handles = handles if legend else []
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    return _save(figure, path)


def _mean_series(runs: list[RunInfo], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    curves = [series for series in (_series(run, keys) for run in runs) if series is not None and len(series[0])]
    if not curves:
        return None
    if len(curves) == 1:
        return curves[0]
    grid, mean, _, _ = _mean_and_spread(curves, points=100)
    return grid, mean


# The panels drawn for each language-model stage: (title, metric keys tried in order; the later ones are the names
# that older run directories used, docs/metrics.md).
LM_PANELS: dict[str, list[tuple[str, tuple[str, ...]]]] = {  # in the seeds' order
    "sft": [("training loss (NLL per token)", ("losses/nll",)),
            ("held-out exact match (greedy)", ("eval/exact_match",))],
    "reward": [("training loss", ("losses/reward",)), ("pair accuracy (training batches)", ("rewards/accuracy",)),
               ("held-out pair accuracy", ("eval/accuracy",))],
    "rlhf": [("reward-model score of the samples", ("rewards/score",)),
             ("exact match of the samples", ("rewards/exact_match",)),
             ("KL to the start per answer", ("kl/per_answer", "kl/sequence"))],
    "dpo": [("DPO loss", ("losses/dpo",)), ("implicit-reward accuracy (held-out)", ("eval/accuracy",)),
            ("log-prob accuracy (held-out)", ("eval/logp_accuracy",))],
    "grpo": [("mean reward of the samples", ("rewards/mean",)),
             ("KL to the reference per token", ("kl/per_token", "policy/kl_ref")),
             ("held-out reward (greedy)", ("eval/reward",))],
}


_STAGE_ORDER = {stage: index for index, stage in enumerate(LM_PANELS)}  # the seeds' order: SFT, reward, RLHF, ...


def plot_lm_stage(run: RunInfo, path: Path) -> Path | None:
    """The stage's panels (LM_PANELS) against optimizer steps, or None if it logged none of them."""
    panels = []
    for title, keys in LM_PANELS.get(run.algorithm, []):
        series = _series(run, keys)
        if series is not None:
            panels.append((title, {run.algorithm: series}))
    if not panels:
        return None
    return plot_series_panels(panels, {}, path, "optimizer steps", f"{run.algorithm} ({run.path.name})", legend=False)


def plot_comparison(comparison: list[dict[str, Any]], path: Path) -> Path:
    """Bars of every aligned policy's held-out figures (from `advantage.lm.compare`)."""
    plt = _pyplot()
    names = [row["name"] for row in comparison]
    colours = _colours(names)
    panels = [("greedy accuracy", "greedy_accuracy"), ("sampled accuracy", "sampled_accuracy"),
              ("reward-model score", "reward_model_score"), ("KL to SFT per answer (nats)", "kl_to_reference")]
    panels = [(title, key) for title, key in panels if all(row.get(key) is not None for row in comparison)]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), dpi=110, squeeze=False)
    for axis, (title, key) in zip(axes[0], panels):
        values = [row[key] for row in comparison]
        axis.bar(range(len(names)), values, color=[colours[name] for name in names])
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("aligned policies on the held-out prompts", fontsize=11)
    figure.tight_layout()
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------------- the PNG


def write_report(run_dirs: list[Path], out: Path, window: int = 20, title: str | None = None) -> Path:
    """The learning curves of the classic runs among `run_dirs` in one PNG `out`; returns its path."""
    runs, _ = find_runs(run_dirs)
    classic = [run for run in runs if run.classic and (run.named or _has_episodes(run.path))]
    if not classic:
        raise UsageError(f"{', '.join(map(str, run_dirs))}: no classic run to plot (language-model stages: write "
                         f"the HTML report with --out DIR)")
    for run in classic:
        learning_curve(run.path, window)  # one-line error naming a run without episodes, before drawing
    return plot_learning_curves(group_runs(classic), out, window, title)


# ----------------------------------------------------------------------------------------------------- the page


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d2228; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #d8dde3; }
p.lead { color: #4b5560; margin-top: 0; }
img { max-width: 100%; border: 1px solid #e4e8ec; border-radius: 4px; margin: 0.6em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #d8dde3; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f5f7; } td.text, th.text { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
.right { color: #1a7f37; } .wrong { color: #c62828; }
code { background: #f3f5f7; padding: 0 0.25em; border-radius: 3px; }
"""

# Marks the page once every image has loaded (or failed): body[data-images] = "loaded/total", which a headless
# browser's DOM dump shows (tests/test_demo_report.py).
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});
"""


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    def cell(tag: str, index: int, value: Any) -> str:
        css = ' class="text"' if index < text_columns else ""
        content = value if isinstance(value, _Raw) else _number(value)
        return f"<{tag}{css}>{content}</{tag}>"

    head = "".join(cell("th", i, _Raw(html.escape(h))) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """HTML that a table cell takes as is."""


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _solved_cell(row: GroupFigures, threshold: float | None) -> str:
    """'2/3', or for a group none of whose runs got there 'never: 0/3 reached T' (not a silent blank)."""
    if threshold is None:
        return f"{row.solved}/{row.runs} (no threshold)"
    return f"{row.solved}/{row.runs}" if row.solved else f"never: 0/{row.runs} reached {threshold:g}"


def _classic_section(classic: list[RunInfo], out: Path, window: int) -> str:
    groups = group_runs(classic)
    colours = _colours(list(groups))
    table = [group_figures(label, runs, window) for label, runs in groups.items()]
    parts = ["<h2>Policy gradient on Gymnasium</h2>",
             f"<p>{len(classic)} runs in {len(groups)} groups (a group = one configuration over its seeds).</p>",
             _image(plot_learning_curves(groups, out / "learning_curves.png", window), "learning curves")]
    kl_lines, clip_lines = {}, {}
    for label, runs in groups.items():
        kl = _mean_series(runs, ("policy/approx_kl", "policy/kl_old_new", "losses/approx_kl", "losses/kl"))
        if kl is not None:
            kl_lines[label] = kl
        clip = _mean_series(runs, ("policy/clip_fraction", "losses/clip_fraction"))
        if clip is not None:
            clip_lines[label] = clip
    panels = [(name, lines) for name, lines in (("KL(pi_old || pi) per update", kl_lines),
                                                  ("clip fraction (PPO)", clip_lines)) if lines]
    if panels:
        parts.append(_image(plot_series_panels(panels, colours, out / "kl_and_clip_fraction.png",
                                               "environment steps", "trust region: how far each update moved"),
                            "KL and clip fraction"))
    parts.append(_image(plot_steps_per_second(table, colours, out / "steps_per_second.png"), "steps per second"))
    env_ids = sorted({str(run.config.get("env_id")) for run in classic})
    threshold_note = ", ".join(f"{env} {solved_return(env):g}" if solved_return(env) is not None else
                               f"{env}: none" for env in env_ids)
    parts.append(f"<p>Final return: mean of the last {window} training episodes at the end of each run (mean ± std "
                 f"over runs). Solved: the rolling mean first reaches the task's threshold ({threshold_note}).</p>")
    parts.append(_table(
        ["group", "runs", "final return", "± std", "best", "solved", "median steps to solve",
         "median s to solve", "steps/s"],
        [[row.label, row.runs, row.final_return_mean, row.final_return_std, row.best_return,
          _solved_cell(row, solved_return(str(groups[row.label][0].config.get("env_id")))),
          row.median_steps_to_solve, row.median_seconds_to_solve, row.median_steps_per_second] for row in table]))
    return "\n".join(parts)


def _lm_section(lm_runs: list[RunInfo], demos: list[dict[str, Any]], out: Path) -> str:
    parts = ["<h2>Language models</h2>"]
    for demo in demos:
        language = demo.get("language_models") or {}
        comparison = language.get("comparison") or []
        if not comparison:
            continue
        parts.append("<p>The SFT model and the three aligned from it, on the held-out prompts: accuracy of the "
                     "greedy answer and of sampled answers (temperature 1), the reward model's mean score of the "
                     "sampled answers, and KL(pi || pi_SFT) per answer (k1, sampled from pi).</p>")
        parts.append(_image(plot_comparison(comparison, out / "aligned_policies.png"), "aligned policies"))
        parts.append(_table(["policy", "greedy accuracy", "sampled accuracy", "reward-model score",
                             "KL to SFT (nats/answer)", "answer tokens"],
                            [[row["name"], row["greedy_accuracy"], row["sampled_accuracy"],
                              row["reward_model_score"], row["kl_to_reference"], row["mean_answer_tokens"]]
                             for row in comparison]))
        prompts, answers = language.get("prompts") or [], language.get("answers") or []
        if prompts and len(answers) == len(prompts):  # the demo writes each held-out prompt's right answer beside it
            rows = []
            for index, (prompt, right) in enumerate(zip(prompts, answers)):
                cells = [_Raw(f"<code>{html.escape(prompt)}</code>"), _Raw(html.escape(right))]
                for row in comparison:
                    said = row["completions"][index] if index < len(row["completions"]) else ""
                    css = "right" if said.strip() == right else "wrong"
                    cells.append(_Raw(f'<span class="{css}">{html.escape(said.strip()) or "(empty)"}</span>'))
                rows.append(cells)
            parts.append("<p>Greedy completions before (SFT) and after alignment:</p>")
            parts.append(_table(["prompt", "answer", *[row["name"] for row in comparison]], rows,
                                text_columns=2 + len(comparison)))
    for index, run in enumerate(lm_runs, start=1):
        figure = plot_lm_stage(run, out / f"lm_{index:02d}_{run.algorithm}.png")
        if figure is not None:
            parts.append(f"<h3>{html.escape(run.algorithm)}: <code>{html.escape(str(run.path))}</code></h3>")
            parts.append(_image(figure, f"{run.algorithm} training"))
    return "\n".join(parts)


def _real_model_section(demos: list[dict[str, Any]]) -> str:
    """The demo's real chat model: held-out accuracy before and after GRPO, and a few answers (the demo supplies
    every figure, the verifier's judgement included)."""
    parts = []
    for demo in demos:
        real = demo.get("real_model")
        if not real:
            continue
        accuracy = real["accuracy"]
        parts.append("<h2>A real chat model</h2>")
        parts.append(f"<p>{html.escape(real['model'])} with LoRA (r 16), {real['steps']} GRPO steps of 8 questions "
                     f"x 8 sampled answers on two-number addition asked in chat form; the reward is the verifier "
                     f"reading the data's answer column. Held-out accuracy of the greedy answer on "
                     f"{real['eval_prompts']} questions:</p>")
        parts.append(_table(["", "held-out accuracy"], [["before (the instruct model)", accuracy["before"]],
                                                        ["after GRPO", accuracy["after"]]]))
        rows = []
        for example in real["examples"]:
            cells = [_Raw(html.escape(example["question"])), _Raw(html.escape(example["answer"]))]
            for said, right in ((example["before"], example["before_right"]),
                                (example["after"], example["after_right"])):
                css = "right" if right else "wrong"
                cells.append(_Raw(f'<span class="{css}">{html.escape(said.strip()) or "(empty)"}</span>'))
            rows.append(cells)
        parts.append("<p>Greedy answers before and after (green: the verifier says right):</p>")
        parts.append(_table(["question", "answer", "before", "after"], rows, text_columns=4))
    return "\n".join(parts)


def _verify_section(demos: list[dict[str, Any]]) -> str:
    rows = [row for demo in demos for row in demo.get("verify") or []]
    if not rows:
        return ""
    passed = sum(row["passed"] for row in rows)
    return "\n".join([
        "<h2>Exact checks (<code>advantage verify</code>)</h2>",
        f"<p>{passed} of {len(rows)} rows agree with the seeds. Exact bias: relative error of the expectation "
        "computed by enumeration (total-variation distance to pi* for DPO); MC |z|: the Monte Carlo mean's distance "
        "from the exact value in standard errors; variance: trace of one sample's covariance.</p>",
        _table(["group", "estimator", "formula", "exact bias", "MC |z|", "variance", "expected", "result"],
               [[row["group"], row["estimator"], row["formula"], row["exact_bias"], row["mc_z"], row["variance"],
                 row["expected"], _Raw(f'<span class="{"pass" if row["passed"] else "fail"}">'
                                       f'{"PASS" if row["passed"] else "FAIL"}</span>')] for row in rows],
               text_columns=3)])


def write_html_report(paths: list[Path], out: Path, window: int = 20, title: str | None = None) -> Path:
    """Write OUT/index.html (self-contained: every figure embedded) and the PNG figures beside it; return the page.

    Raises:
        UsageError: a path that is not (and does not hold) a run directory, or a classic run without episodes.
    """
    runs, demos = find_runs(paths)
    # A run found below a directory that has not finished an episode yet (just started) is left out; one named on
    # the command line is an error, below.
    classic = [run for run in runs if run.classic and (run.named or _has_episodes(run.path))]
    lm_runs = sorted((run for run in runs if not run.classic), key=lambda run: _STAGE_ORDER.get(run.algorithm, 99))
    for run in classic:
        learning_curve(run.path, window)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    timing = ""
    for demo in demos:
        seconds = demo.get("seconds") or {}
        if seconds:
            timing = "; ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    if classic:
        sections.append(_classic_section(classic, out, window))
    if lm_runs or any((demo.get("language_models") or {}).get("comparison") for demo in demos):
        sections.append(_lm_section(lm_runs, demos, out))
    sections.append(_real_model_section(demos))
    sections.append(_verify_section(demos))
    heading = html.escape(title or "advantage report")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{heading}</title>"
            f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>\n<h1>{heading}</h1>\n"
            f"<p class=\"lead\">{len(runs)} run directories: {html.escape(', '.join(map(str, paths)))}"
            f"{'. Time: ' + html.escape(timing) if timing else ''}.</p>\n" + "\n".join(sections) + "\n</body></html>\n")
    target = out / "index.html"
    atomic_write_text(target, page)
    return target
