"""The layering contract, checked on every import in the tree (module level and function-local alike).

Rooms and what each may import from the project (besides itself):

==================  =====================================================================
room                may import
==================  =====================================================================
``physics``         nothing (knows neither the bus, the scenarios nor the agents)
``bus``             nothing (knows nothing of radiotherapy)
``scenarios``       physics
``agents.drl``      physics, scenarios (no bus)
``agents.llm``      physics, scenarios, agents.drl (no bus; it reads the DRL's knowledge)
``agents``          bus, physics, scenarios, agents.drl, agents.llm
``session``         agents and everything below it
``stack``           agents and everything below it
``experiment``      session, stack and everything below them
``cli``             anything
==================  =====================================================================

and no cycle between rooms. Run ``python tests/test_layering.py [ROOT]`` to print the violations of another
checkout (e.g. the tree before this contract existed).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Source folders and the ``m2m`` package each is installed as (pyproject's package-dir).
FOLDERS = ("physics", "bus", "scenarios", "agents", "session", "stack", "experiment", "cli")

BELOW_AGENTS = {"bus", "physics", "scenarios", "agents.drl", "agents.llm"}
ALLOWED: dict[str, set[str]] = {
    "physics": set(),
    "bus": set(),
    "scenarios": {"physics"},
    "agents.drl": {"physics", "scenarios"},
    "agents.llm": {"physics", "scenarios", "agents.drl"},
    "agents": BELOW_AGENTS,
    "session": {"agents", *BELOW_AGENTS},
    "stack": {"agents", *BELOW_AGENTS},
    "experiment": {"session", "stack", "agents", *BELOW_AGENTS},
    "cli": {"experiment", "session", "stack", "agents", *BELOW_AGENTS},
}


def room_of(module: str) -> str | None:
    """The room of an ``m2m.…`` module name (``m2m.agents.drl.env`` → ``agents.drl``), None outside the project."""
    parts = module.split(".")
    if parts[0] != "m2m" or len(parts) < 2:
        return None
    if parts[1] == "agents" and len(parts) > 2 and parts[2] in ("drl", "llm"):
        return f"agents.{parts[2]}"
    return parts[1]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["m2m", *parts])


def _is_module(module: str, root: Path) -> bool:
    """Whether ``m2m.a.b`` names a module or package of the tree under ``root`` (not a name inside one)."""
    parts = module.split(".")[1:]
    path = root.joinpath(*parts)
    return path.is_dir() or path.with_suffix(".py").is_file()


def project_imports(root: Path) -> Iterator[tuple[str, int, str]]:
    """(file, line, imported m2m module) for every import statement in the source folders, at any depth."""
    for folder in FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            here = _module_name(path, root)
            package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against this module's package
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base_mod = ".".join([*anchor, node.module] if node.module else anchor)
                    else:
                        base_mod = node.module or ""
                    targets = [base_mod]
                    # ``from m2m.agents import drl`` imports the subpackage m2m.agents.drl
                    targets += [f"{base_mod}.{a.name}" for a in node.names if _is_module(f"{base_mod}.{a.name}", root)]
                else:
                    continue
                for target in targets:
                    if target.startswith("m2m."):
                        yield str(path.relative_to(root)), node.lineno, target


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks :data:`ALLOWED`, then every cycle between rooms."""
    found: list[str] = []
    edges: dict[str, set[str]] = {}
    for file, line, target in project_imports(root):
        source_room = room_of(_module_name(root / file, root))
        target_room = room_of(target)
        if source_room is None or target_room is None or source_room == target_room:
            continue
        edges.setdefault(source_room, set()).add(target_room)
        if target_room not in ALLOWED.get(source_room, set()):
            found.append(f"{file}:{line}: {source_room} imports {target} ({target_room})")
    found.extend(f"cycle between rooms: {' -> '.join(c)}" for c in _cycles(edges))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected group of rooms (depth-first search)."""
    cycles: list[list[str]] = []
    seen_groups: set[frozenset[str]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycle = [*path[path.index(nxt):], nxt]
                group = frozenset(cycle)
                if group not in seen_groups:
                    seen_groups.add(group)
                    cycles.append(cycle)
            elif len(path) < len(edges) + 1:
                walk(nxt, [*path, nxt])

    for start in sorted(edges):
        walk(start, [start])
    return cycles


def test_every_import_respects_the_layering() -> None:
    problems = violations()
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_the_walker_sees_function_local_imports_and_cycles(tmp_path: Path) -> None:
    """A physics module importing the bus inside a function, and two rooms importing each other, are caught."""
    (tmp_path / "physics").mkdir()
    (tmp_path / "physics" / "dose.py").write_text("def f():\n    from m2m.bus.client import BusClient\n")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "a.py").write_text("import m2m.session.client\n")
    (tmp_path / "session").mkdir()
    (tmp_path / "session" / "s.py").write_text("from m2m.agents import runtime\n")
    problems = violations(tmp_path)
    assert "physics/dose.py:2: physics imports m2m.bus.client (bus)" in problems
    assert "agents/a.py:1: agents imports m2m.session.client (session)" in problems
    assert any(p.startswith("cycle between rooms:") and "agents" in p and "session" in p for p in problems)


def test_every_source_folder_is_a_room_of_the_contract() -> None:
    """A new top-level package must be placed in the contract before it can hold code."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {name.removeprefix("m2m.") for name in package_dir} == set(FOLDERS)
    assert all(folder == name.removeprefix("m2m.") for name, folder in package_dir.items())
    assert set(FOLDERS) | {"agents.drl", "agents.llm"} == set(ALLOWED)


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    problems = violations(target)
    print("\n".join(problems) or "layering: no violation")
    print(f"{len(problems)} violation(s) in {target}")
    sys.exit(1 if problems else 0)
