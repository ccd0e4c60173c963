"""The package's layers: cli -> demo -> rl / lm -> run -> objectives, and nothing imports upward.

Every import of an advantage module, at the top of a file or inside a function, is read from the source with `ast`.
A module may import its own package or a lower layer; rl and lm (the two halves, one layer) never import each
other; the language-model stages never import one another (what they share lives in modules named for it:
examples.py, preferences.py, session.py, online.py).
"""

import ast
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "advantage"

# Lower numbers are lower layers. errors.py holds the exception types every layer raises.
LAYERS = {
    "errors": 0,
    "objectives": 1,
    "run": 2, "exact": 2,
    "rl": 3, "lm": 3, "verify": 3,
    "demo": 4,
    "cli": 5,
    "__init__": 6,  # advantage.train / advantage.resume: the public entry points over both halves
}
STAGES = {"sft", "reward", "dpo", "grpo", "rlhf"}


def _module_name(path: Path, source: Path = SOURCE) -> str:
    parts = path.relative_to(source.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, source: Path) -> set[str]:
    """The advantage modules `path` imports (relative imports resolved)."""
    package = _module_name(path, source).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from advantage.lm import sft`
    return {name for name in found if name == "advantage" or name.startswith("advantage.")}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _violations(source: Path = SOURCE) -> list[str]:
    modules = {_module_name(path, source) for path in source.rglob("*.py")}
    found = []
    for path in sorted(source.rglob("*.py")):
        importer = _module_name(path, source)
        own = _component(importer)
        for imported in sorted(_imports(path, source)):
            if imported not in modules and imported.rsplit(".", 1)[0] in modules:
                imported = imported.rsplit(".", 1)[0]  # `from advantage.lm.session import X`: X is a name
            if imported == "advantage":
                continue
            other = _component(imported)
            where = f"{path.relative_to(source)} imports {imported}"
            if other != own and LAYERS[other] >= LAYERS[own]:
                found.append(f"{where}: layer {own} ({LAYERS[own]}) may not import {other} ({LAYERS[other]})")
            stage, used = importer.split(".")[-1], imported.split(".")
            if own == "lm" == other and stage in STAGES and len(used) > 2 and used[2] in STAGES and used[2] != stage:
                found.append(f"{where}: one language-model stage imports another")
    return found


def test_every_module_is_in_a_layer():
    components = {_component(_module_name(path)) for path in SOURCE.rglob("*.py")}
    assert components <= set(LAYERS), components - set(LAYERS)


def test_nothing_imports_upward_and_stages_do_not_import_each_other():
    assert _violations() == []


def test_the_check_sees_an_upward_import_and_a_stage_importing_a_stage(tmp_path):
    """The rules bite: a copy of the package in which run/ imports lm/, and dpo imports sft, is reported."""
    copy = tmp_path / "advantage"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "run" / "metrics.py").open("a", encoding="utf-8") as file:
        file.write("\n\ndef _upward():\n    from advantage.lm.session import LMConfig\n\n    return LMConfig\n")
    with (copy / "lm" / "dpo.py").open("a", encoding="utf-8") as file:
        file.write("\n\nfrom advantage.lm import sft  # noqa\n")
    found = _violations(copy)
    assert any("run/metrics.py imports advantage.lm.session" in line for line in found), found
    assert any("lm/dpo.py imports advantage.lm.sft: one language-model stage imports another" in line
               for line in found), found
