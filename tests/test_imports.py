"""The package's import graph (every import, deferred ones included) has no cycle."""

import ast
from pathlib import Path

import resnet_jax

ROOT = Path(resnet_jax.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n for n in names if n in modules}
    return out


def test_no_import_cycles():
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    # A package's __init__ re-exports its modules: an edge into a package means its __init__.
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package importing its own submodules is no cycle
                continue
            if state.get(n) == 1:
                cycle.extend(stack[stack.index(n):] + [m, n] if n in stack else [m, n])
                return True
            if state.get(n) is None and visit(n, [*stack, m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(files) if state.get(m) is None), cycle
