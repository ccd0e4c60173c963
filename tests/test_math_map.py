"""docs/math.md cannot drift: every test and every function it names exists."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")


def test_every_named_test_exists():
    checked = 0
    for line in MATH.splitlines():
        current_file = None
        for token in re.findall(r"`([^`]*::[^`]*)`", line):
            path, _, names = token.partition("::")
            if path:
                current_file = path
            assert current_file, f"no test file for {token!r} in: {line}"
            source = (ROOT / "tests" / current_file).read_text(encoding="utf-8")
            for name in names.split("::"):
                name = name.split("[")[0]
                assert re.search(rf"^\s*(def|class) {re.escape(name)}\b", source, re.M), f"{current_file}::{name}"
                checked += 1
    assert checked > 100


def test_every_named_function_exists():
    checked = 0
    for module_path, attribute in re.findall(r"`((?:objectives\.[a-z_]+)|exact|verify)\.([A-Za-z0-9_]+)", MATH):
        module = importlib.import_module(f"advantage.{module_path}")
        assert hasattr(module, attribute), f"{module_path}.{attribute}"
        checked += 1
    assert checked > 40


def test_every_objective_function_is_in_the_map():
    """The other direction: each public function of advantage.objectives appears in docs/math.md."""
    import advantage.objectives as objectives

    public = [name for name in objectives.__all__ if callable(getattr(objectives, name))
              and not isinstance(getattr(objectives, name), type)]
    missing = [name for name in public if name not in MATH]
    assert not missing, missing


def _objective_imports(relative: str) -> set[str]:
    """The functions a source file imports from advantage.objectives (constants and types left out)."""
    import ast

    tree = ast.parse((ROOT / "src" / "advantage" / relative).read_text(encoding="utf-8"))
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("advantage.objectives") for alias in node.names
            if alias.name[0].islower()}


def _used_by_rows() -> list[tuple[str, str]]:
    """(file, objectives-used cell) of every row of the tables whose header has an "objectives used" column."""
    rows, column = [], None
    for line in MATH.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            column = None
        elif "objectives used" in cells:
            column = cells.index("objectives used")
        elif column is not None and not set(cells[0]) <= set("-: "):
            rows.append((cells[0].strip("`"), cells[column]))
    return rows


def test_the_used_by_tables_match_the_imports():
    """docs/math.md's "objectives used" cells name exactly the objectives each algorithm and stage imports; a name
    marked "via `file`" is imported by that file."""
    rows = _used_by_rows()
    assert {path for path, _ in rows} >= {"rl/reinforce.py", "rl/a2c.py", "rl/ppo.py", "rl/trpo.py", "rl/dqn.py",
                                          "lm/sft.py", "lm/reward.py", "lm/dpo.py", "lm/grpo.py", "lm/rlhf.py"}
    for path, cell in rows:
        listed, via = set(), []
        for part in cell.split(";"):
            names = set(re.findall(r"`([a-z_0-9]+)`", part))
            if " via " in part:
                via.extend((other, names) for other in re.findall(r"`([a-z_/]+\.py)`", part))
            else:
                listed |= names
        imported = _objective_imports(path)
        assert listed == imported, (path, "listed, not imported:", listed - imported, "imported, not listed:",
                                    imported - listed)
        for other, names in via:
            assert names <= _objective_imports(other), (path, other, names)


def test_the_source_cites_docs_math_sections_never_the_seeds_by_number():
    """A reader of the repository cannot open the seeds: comments point to docs/math.md sections, which exist."""
    sections = set(re.findall(r"^## (\w+)\.", MATH, re.M))
    cited = 0
    for path in sorted((ROOT / "src" / "advantage").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bseeds? 00\d", text, re.I), path
        for section in re.findall(r"docs/math\.md §(\w+)", text):
            assert section in sections, (path, section)
            cited += 1
    assert cited > 50
