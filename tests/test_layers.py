"""The package's imports run one way, top to bottom (docs/layout.md):

    cli, jobs -> study -> study_report -> sweep -> prepare, train.launch -> train.loop -> train.validation, eval.run
      -> train.strategy, train.dataset, eval.* -> assemble -> model, inputs, cf
      -> data.*, checkpoint -> data.contract -> storage -> config, atomic

Every `import gensr_ray...` statement counts, those inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (module prefix, layer): the longest matching prefix wins; higher layers import lower ones
LAYERS = [
    ("gensr_ray.config", 0), ("gensr_ray.atomic", 0), ("gensr_ray.allocator", 0),
    ("gensr_ray.console", 0),
    ("gensr_ray.storage", 1), ("gensr_ray.ray_init", 1), ("gensr_ray.tracking", 1),
    ("gensr_ray.data.contract", 2),
    ("gensr_ray.data", 3), ("gensr_ray.checkpoint", 3),
    ("gensr_ray.cf", 4), ("gensr_ray.model", 4), ("gensr_ray.inputs", 4),
    ("gensr_ray.assemble", 5),
    ("gensr_ray.train.strategy", 6), ("gensr_ray.train.dataset", 6),
    ("gensr_ray.train.negatives", 6), ("gensr_ray.eval", 6),
    ("gensr_ray.export", 6),
    ("gensr_ray.train.validation", 7), ("gensr_ray.train.curves", 7),
    ("gensr_ray.train.progress", 7), ("gensr_ray.train.conflict", 7),
    ("gensr_ray.train.diagnose", 9), ("gensr_ray.train.conflict_study", 10),
    ("gensr_ray.train.loop", 8), ("gensr_ray.eval.run", 7),
    ("gensr_ray.train.launch", 9), ("gensr_ray.prepare", 9),
    ("gensr_ray.sweep", 10), ("gensr_ray.study_report", 11),
    ("gensr_ray.study", 12),
    ("gensr_ray.cli", 13),
    ("jobs", 14),
]
# the plain-torch model reads no files and builds no inputs
MODEL_MAY_IMPORT = ("gensr_ray.config", "gensr_ray.atomic", "gensr_ray.storage",
                    "gensr_ray.data.contract", "gensr_ray.model")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[str, int]:
    matches = [(p, n) for p, n in LAYERS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} has no layer in tests/test_layers.py"
    return max(matches, key=lambda m: len(m[0]))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (any statement, at any depth)."""
    files = sorted((root / "gensr_ray").rglob("*.py")) + sorted((root / "jobs").glob("*.py"))
    # packages (__init__.py) hold no code that imports; `from gensr_ray.data import contract`
    # counts as an import of gensr_ray.data.contract
    files = [f for f in files if f.name != "__init__.py"]
    modules = {_module_name(f, root) for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name in modules:
                    targets.add(name)
                elif name.startswith("gensr_ray.") and name == names[0]:
                    # a module path that does not exist (a stale import after a move)
                    package = name.rsplit(".", 1)[0]
                    assert package in modules or (root / package.replace(".", "/")).is_dir(), name
                    assert (root / (name.replace(".", "/") + ".py")).exists() or (
                        root / name.replace(".", "/")).is_dir(), f"{f}: imports missing {name}"
        graph[_module_name(f, root)] = targets - {_module_name(f, root)}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of a same-layer module of another group."""
    bad = []
    for source, targets in graph.items():
        s_group, s_layer = _layer(source)
        for target in sorted(targets):
            t_group, t_layer = _layer(target)
            same_group = t_layer == s_layer and t_group == s_group
            if t_layer > s_layer or (t_layer == s_layer and not same_group):
                bad.append(f"{source} -> {target}")
    return bad


def test_imports_only_run_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_model_is_plain_torch():
    graph = import_graph()
    for source, targets in graph.items():
        if source.startswith("gensr_ray.model"):
            bad = [t for t in targets if not t.startswith(MODEL_MAY_IMPORT)]
            assert not bad, f"{source} imports {bad}"


def test_the_checks_catch_an_upward_import():
    graph = {"gensr_ray.data.writer": {"gensr_ray.model.gensr"}, "gensr_ray.model.gensr": set()}
    assert upward_imports(graph) == ["gensr_ray.data.writer -> gensr_ray.model.gensr"]
