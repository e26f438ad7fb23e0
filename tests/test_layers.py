"""The package's layers: imports point down only (rules -> steps -> report -> lfd | cpm -> metrics -> data -> core),
lfd and cpm never import each other, and no module imports its own layer's upper modules in a cycle. Every
import counts, including those inside functions."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PKG = REPO / "workflow_lib"

#: rank of each layer: a module may import modules of a lower or equal rank (equal only inside its own subpackage)
RANK = {"core": 0, "data": 1, "metrics": 2, "lfd": 3, "cpm": 3, "survey": 4, "deblend": 4, "report": 5, "steps": 6}
#: deblend (rank 4, beside survey): combines the two methods (LFD neighbour models, CPM de-trending), so it sits
#: above both and below report, which shows its product; it does not import survey, nor survey it
#: inside lfd: the order of the LFD stages (a module imports only those before it)
LFD_ORDER = ["bspline", "geometry", "linsys", "edge", "prf", "motion", "solve", "io", "scene", "diagnostics", "plots"]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every workflow_lib module ``path`` imports, at any depth of its code."""
    me = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: -node.level] if not path.name == "__init__.py" else me.split(".")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("workflow_lib"):
                # `from workflow_lib.x import y` may name a submodule y
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("workflow_lib")}
    out.discard(me)
    return out


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def allowed(src: str, dst: str) -> bool:
    if dst == "workflow_lib":  # the package root holds only __version__
        return True
    ls, ld = layer(src), layer(dst)
    if ls == "root":
        return False
    if ls == ld:
        if ls == "lfd":
            a, b = src.split(".")[-1], dst.split(".")[-1]
            if a in LFD_ORDER and b in LFD_ORDER:
                return LFD_ORDER.index(b) < LFD_ORDER.index(a)
        return True
    if {ls, ld} == {"lfd", "cpm"}:
        return False
    return RANK.get(ld, 99) < RANK.get(ls, -1)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    bad = [dst for dst in sorted(imports_of(MODULES[module])) if not allowed(module, dst)]
    assert not bad, f"{module} imports upward or across: {bad}"


def test_no_import_cycles():
    graph = {m: {d for d in imports_of(p) if d in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule itself: core importing lfd, lfd importing cpm and prf importing solve are all refused."""
    assert not allowed("workflow_lib.core.settings", "workflow_lib.lfd.prf")
    assert not allowed("workflow_lib.lfd.solve", "workflow_lib.cpm.model")
    assert not allowed("workflow_lib.lfd.prf", "workflow_lib.lfd.solve")
    assert allowed("workflow_lib.lfd.solve", "workflow_lib.lfd.prf")
    assert allowed("workflow_lib.steps.lfd", "workflow_lib.lfd.solve")
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from workflow_lib.lfd import solve\n")
    assert "workflow_lib.lfd.solve" in {d for d in imports_of_text(f)}


def imports_of_text(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workflow_lib"):
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out
