"""Configs are dataclasses whose every field carries a one-line help; YAML presets, files and CLI flags fill them.

Precedence (later wins): the dataclass defaults < the defaults for the environment's action space (classic, Box
actions) < a shipped preset for the environment < `--config FILE.yaml` < command-line flags. Every layer is applied
with `apply_overrides`, which remembers where each field's value came from (`sources_of`); the resolved config is
written to RUN_DIR/config.yaml with that source as a comment on each line that did not keep its default, and the
run prints the same in one line when it starts (`describe_sources`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from advantage.errors import UsageError
from advantage.run.files import atomic_write_text


def require(condition: bool, field: str, message: str, value: Any) -> None:
    """Raise UsageError naming `field` unless `condition` holds: "field 'lr' must be > 0, got -1"."""
    if not condition:
        raise UsageError(f"field '{field}' {message}, got {value!r}")


def param(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with a one-line help string (shown by --help and in the docs)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def field_type(cls: type, name: str) -> type:
    """The plain Python type of a config field (Optional[X] -> X; Literal[...] -> str)."""
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    return hint


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a Literal field, else None."""
    hint = typing.get_type_hints(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is typing.Literal:
            return typing.get_args(candidate)
    return None


def coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Convert `value` to the field's type, or raise UsageError naming the field and where it came from."""
    if value is None:
        return None
    kind = field_type(cls, name)
    allowed = choices(cls, name)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = lowered in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif kind is str:
            value = str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: field '{name}' expects {kind.__name__}, got {value!r}") from None
    if allowed is not None and value not in allowed:
        raise UsageError(f"{source}: field '{name}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def renamed_fields(config_class: type) -> dict[str, str]:
    """The old names of a config class's renamed fields, old -> new (its class attribute RENAMED): they still work,
    with a one-line notice, so that older commands, config files and run directories keep working."""
    return dict(getattr(config_class, "RENAMED", {}))


_NOTICES_GIVEN: set[tuple[str, str]] = set()


def _notice_renamed(old: str, new: str, source: str) -> None:
    if (old, source) not in _NOTICES_GIVEN:
        _NOTICES_GIVEN.add((old, source))
        print(f"advantage: '{old}' ({source}) is now called '{new}'; the old name still works for now",
              file=sys.stderr)


def apply_overrides(config: Any, overrides: dict[str, Any], source: str) -> Any:
    """A copy of `config` with fields replaced from a mapping (unknown keys are an error naming `source`; a renamed
    field's old name is read as the new one, with a notice). The copy remembers that those fields came from
    `source` (`sources_of`)."""
    names = {f.name for f in dataclasses.fields(config)}
    renamed = renamed_fields(type(config))
    updates = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name in renamed:
            _notice_renamed(name, renamed[name], source)
            name = renamed[name]
        if name not in names:
            raise UsageError(f"{source}: unknown field '{key}' for {type(config).__name__}")
        updates[name] = coerce(type(config), name, value, source)
    # A field set again moves to its new source's group, so that the groups read in the order they were applied.
    earlier = {name: where for name, where in sources_of(config).items() if name not in updates}
    return with_sources(dataclasses.replace(config, **updates), {**earlier, **{name: source for name in updates}})


def sources_of(config: Any) -> dict[str, str]:
    """Where each field set by `apply_overrides` came from, field -> source ("preset ppo/Acrobot-v1", "command
    line", a file name, ...); a field absent here has its dataclass default."""
    return dict(getattr(config, "_sources", {}))


def with_sources(config: Any, sources: dict[str, str]) -> Any:
    """`config` remembering `sources` (field -> where its value came from); returns the same object."""
    object.__setattr__(config, "_sources", dict(sources))
    return config


def describe_sources(name: str, config: Any) -> str:
    """One line saying where the values of a resolved config came from, grouped by source in the order applied:
    "ppo Swimmer-v5: defaults for Box actions (num_envs=1, num_steps=2048); command line (seed=2); the rest: ppo's
    defaults". A field set to its default value is still listed (its source chose it)."""
    groups: dict[str, list[str]] = {}
    for field, source in sources_of(config).items():
        groups.setdefault(source, []).append(f"{field}={getattr(config, field)}")
    subject = getattr(config, "env_id", None) or getattr(config, "model", "")
    parts = [f"{source} ({', '.join(fields)})" for source, fields in groups.items()]
    parts.append(f"the rest: {name}'s defaults")
    return f"{name} {subject}: " + "; ".join(parts)


_ANNOTATION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): .*?  # from (.+)$")


def read_sources(path: str | os.PathLike) -> dict[str, str]:
    """The sources that `save_config` wrote as comments in a run's config.yaml (field -> source)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {match[1]: match[2] for match in map(_ANNOTATION.match, lines) if match}


def resumed_config(config: Any, saved: dict[str, Any], path: str | os.PathLike, fields: dict[str, Any]) -> Any:
    """The config of a resumed run: `config` (its class's defaults) with the fields `saved` from its config.yaml at
    `path`, each keeping the source its start wrote beside it, then `fields` (the resume's own arguments)."""
    config = apply_overrides(config, saved, str(path))
    config = with_sources(config, read_sources(path))  # not "config.yaml" for every field
    return apply_overrides(config, fields, "arguments")


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file (and line, for syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def load_config_file(path: str | os.PathLike, algorithm: str) -> dict[str, Any]:
    """The fields of a --config file for `algorithm`; a run's own config.yaml may be given as it is.

    config.yaml names its algorithm (or stage); that entry is dropped when it matches, and a file written for
    another algorithm is refused in one line rather than half-applied.
    """
    fields = load_yaml_mapping(path)
    written_for = fields.pop("algorithm", algorithm)
    if written_for != algorithm:
        raise UsageError(f"{path}: this config is for '{written_for}', not '{algorithm}'")
    return fields


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain mapping (for YAML, metrics and TensorBoard)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike, algorithm: str) -> None:
    """Write the resolved config as YAML (with the algorithm's name), atomically; each field that did not keep its
    dataclass default carries its source as a comment ("num_envs: 1  # from defaults for Box actions")."""
    sources = sources_of(config)
    lines = []
    for line in yaml.safe_dump({"algorithm": algorithm, **to_dict(config)}, sort_keys=False).splitlines():
        key = line.split(":", 1)[0]
        # Only a complete one-line `key: value` gets a comment (a long string may continue on the next line).
        if key in sources and not line.startswith((" ", "-")) and _one_line(line, key, getattr(config, key)):
            line = f"{line}  # from {sources[key]}"
        lines.append(line)
    atomic_write_text(path, "\n".join(lines) + "\n")


def _one_line(line: str, key: str, value: Any) -> bool:
    try:
        return yaml.safe_load(line) == {key: value}
    except yaml.YAMLError:
        return False
