"""The dependency rule of README's Layout section, checked on every import in the source.

Layers, top first; a module imports only from layers below its own (or from inside its own folder):

    commands → unlearning | tuning → orchestrator | evaluation → guard → shard_worker | aggregation | data
        → pipeline | neighbors → model → config → files → errors
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    {"commands"},
    {"unlearning", "tuning"},
    {"orchestrator", "evaluation"},
    {"guard"},
    {"shard_worker", "aggregation", "data"},
    {"pipeline", "neighbors"},
    {"model"},
    {"config"},
    {"files"},
    {"errors"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
SOURCE_FOLDERS = {"orchestrator", "shard_worker", "aggregation", "evaluation", "unlearning", "tuning"}


def unit_of_file(path: Path) -> str | None:
    """The layer unit a source file belongs to (None: the package's own __init__)."""
    rel = path.relative_to(REPO)
    if rel.parts[0] in SOURCE_FOLDERS:
        return rel.parts[0]
    if rel.parts[0] == "memshard":
        if rel.parts[1] == "__init__.py":
            return None
        return rel.parts[1].removesuffix(".py")
    raise AssertionError(f"{rel} is not source")


def unit_of_import(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in SOURCE_FOLDERS:  # the old generic names are gone: any such import is a defect
        return "generic:" + parts[0]
    if parts[0] != "memshard":
        return None
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path, text: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "memshard":  # `from memshard import data`
                found += [(node.lineno, f"memshard.{alias.name}") for alias in node.names]
    return found


def source_files() -> dict[Path, str]:
    files = sorted((REPO / "memshard").rglob("*.py"))
    for folder in sorted(SOURCE_FOLDERS):
        files += sorted((REPO / folder).rglob("*.py"))
    return {path: path.read_text() for path in files}


def layer_violations(files: dict[Path, str]) -> list[str]:
    """Every import of `files` (path -> source text) that breaks the rule, as 'file:line ...: why'."""
    problems = []
    for path, text in files.items():
        unit = unit_of_file(path)
        if unit is None:
            continue
        if unit not in RANK:
            problems.append(f"{path.relative_to(REPO)}: module {unit!r} has no layer in the rule")
            continue
        for line, module in imports_of(path, text):
            target = unit_of_import(module)
            if target is None or target == unit:
                continue
            where = f"{path.relative_to(REPO)}:{line} imports {module}"
            if target.startswith("generic:"):
                problems.append(f"{where}: import it as memshard.{module}")
            elif target not in RANK:
                problems.append(f"{where}: {target!r} has no layer in the rule")
            elif RANK[target] <= RANK[unit]:
                problems.append(f"{where}: {unit} may not import {target} (same or higher layer)")
    return problems


def test_every_import_points_down():
    assert layer_violations(source_files()) == []


def test_the_rule_catches_upward_peer_and_generic_imports():
    """The check itself can fail: each kind of broken import is reported."""
    probes = {
        REPO / "shard_worker" / "probe.py": "from memshard.orchestrator.train import train\n",
        REPO / "evaluation" / "probe.py": "import memshard.orchestrator.rounds\n",
        REPO / "memshard" / "config.py": "from memshard import data\n",
        REPO / "aggregation" / "probe.py": "from orchestrator.errors import MemshardError\n",
    }
    problems = layer_violations(probes)
    assert len(problems) == 4
    assert "shard_worker may not import orchestrator" in problems[0]
    assert "evaluation may not import orchestrator" in problems[1]
    assert "config may not import data" in problems[2]
    assert "import it as memshard.orchestrator.errors" in problems[3]


RULE = ("commands → unlearning | tuning → orchestrator | evaluation → guard → shard_worker | aggregation | data "
        "→ pipeline | neighbors → model → config → files → errors")


def test_readme_states_the_rule():
    readme = (REPO / "README.md").read_text()
    assert RULE in readme[readme.index("## Layout"):].replace("\n", " ")
    assert " → ".join(" | ".join(sorted(units, key=lambda u: RULE.index(u))) for units in LAYERS) == RULE


def module_of_file(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[1:] if rel.parts[0] == "memshard" else rel.parts
    return ".".join(("memshard", *parts)).removesuffix(".__init__")


def import_cycles(files: dict[Path, str]) -> list[list[str]]:
    """Every cycle of memshard modules that import each other (at the top or inside a function), each once."""
    modules = {module_of_file(path): text for path, text in files.items()}
    edges = {module: sorted({target for _, target in imports_of(Path(module), text) if target in modules} - {module})
             for module, text in modules.items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):]
            if frozenset(cycle) not in done:
                done.add(frozenset(cycle))
                cycles.append(cycle)
            return
        for target in edges[module]:
            if target not in finished:
                visit(target, [*path, module])
        finished.add(module)

    finished: set[str] = set()
    for module in sorted(modules):
        visit(module, [])
    return cycles


def test_no_two_modules_import_each_other():
    assert import_cycles(source_files()) == []


def test_the_cycle_check_finds_a_cycle():
    probes = {
        REPO / "evaluation" / "first.py": "from memshard.evaluation.second import b\n",
        REPO / "evaluation" / "second.py": "def b():\n    from memshard.evaluation.first import a\n",
        REPO / "evaluation" / "third.py": "from memshard.evaluation.first import a\n",
    }
    assert import_cycles(probes) == [["memshard.evaluation.first", "memshard.evaluation.second"]]
