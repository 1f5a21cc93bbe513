"""The layering rules of README.md's "Architecture", kept by a test so later changes keep them:
the optimizer mixin only wires (a size limit), nothing in the library depends on the optimizer,
the optimizer names no paradigm's state and does not branch on the paradigm, and the library
never imports the test oracle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hvd_qpr"
MIXIN_MAX_LINES = 300
# the state classes the averagers own; the optimizer sees them only through the averager
PARADIGM_STATE = {"GossipState", "OverlapState", "GossipGroup", "InFlight"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _mixin() -> ast.ClassDef:
    tree = _tree(PACKAGE / "optimizer.py")
    return next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_DistributedOptimizer"
    )


def test_the_mixin_stays_small():
    mixin = _mixin()
    lines = mixin.end_lineno - mixin.lineno + 1
    assert lines <= MIXIN_MAX_LINES, f"_DistributedOptimizer has {lines} lines"


def test_nothing_in_the_library_imports_the_optimizer():
    offenders = [
        path.relative_to(PACKAGE.parent)
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "optimizer.py") or path.parent != PACKAGE
        if {"hvd_qpr.optimizer", "hvd_qpr.DistributedOptimizer"} & _imports(_tree(path))
    ]
    assert not offenders, offenders
    # the package's __init__ reaches it lazily, by name only
    assert "hvd_qpr.optimizer" not in _imports(_tree(PACKAGE / "__init__.py"))


def test_the_optimizer_names_no_paradigm_state():
    source = (PACKAGE / "optimizer.py").read_text()
    named = sorted(name for name in PARADIGM_STATE if name in source)
    assert not named, f"optimizer.py names {named}"


def test_the_mixin_does_not_branch_on_the_paradigm():
    """No isinstance on an averager, no averager class named inside the class body: the
    factory picks the averager, the mixin calls it."""
    averagers = {"RingAllReduce", "Gossip", "Overlap"}
    used = {
        node.id
        for node in ast.walk(_mixin())
        if isinstance(node, ast.Name) and (node.id in averagers or node.id == "isinstance")
    }
    assert not used & averagers, f"the mixin names {sorted(used & averagers)}"
    for node in ast.walk(_mixin()):
        if isinstance(node, ast.Attribute) and node.attr in ("topology", "overlap", "gossip"):
            assert isinstance(node.value, ast.Attribute) and node.value.attr == "_qpr_averager"


def test_the_library_does_not_import_the_test_oracle():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "reference.py":
            continue
        assert "hvd_qpr.reference" not in _imports(_tree(path)), path


def test_the_example_script_imports_and_parses_every_paradigm():
    """examples/train.py (what make demo runs) imports only names the library still has."""
    import importlib.util

    path = PACKAGE.parent / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("hvd_qpr_example_train", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = train.parser().parse_args(["--topology", "one-peer", "--aggregation", "gtopk"])
    assert (args.topology, args.aggregation) == ("one-peer", "gtopk")
