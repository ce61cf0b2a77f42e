"""The package's shape (docs/architecture.md): layers are processes, imports only go one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atelier3d"

GATEWAY = ("atelier3d.serve", "atelier3d.stages", "atelier3d.api", "atelier3d.clients")
MODEL_SIDE = ("atelier3d.models", "atelier3d.deployments", "atelier3d.optimizations")
WEB = {"fastapi", "starlette", "gradio"}
GRAPH = "atelier3d.serve.app"  # build_app binds the deployments: the one bridge between the sides


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for fn in ast.walk(tree)
                   if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(f"{node.module}.{alias.name}", id(node) in in_function)
                    for alias in node.names]
            out.append((node.module, id(node) in in_function))
    return out


def own_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {target for target, _ in imports(path) if target in modules and target != name}
            for name, path in modules.items()}


def test_no_import_cycles_among_the_packages_modules():
    graph = own_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_gateway_side_never_imports_torch_and_models_never_import_web_frameworks():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for target, _ in imports(path):
            top = target.split(".")[0]
            crosses = target.startswith(MODEL_SIDE) and name != GRAPH
            if name.startswith(GATEWAY) and (top == "torch" or crosses):
                wrong.append(f"{name} imports {target}")
            if name.startswith(MODEL_SIDE) and top in WEB:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_api_contract_and_the_client_import_without_the_server_stack():
    code = ("import sys, atelier3d.api, atelier3d.clients\n"
            "heavy = {'torch', 'ray', 'gradio', 'fastapi', 'diffusers', 'transformers'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]"


def test_serving_the_app_loads_no_torch_in_the_gateway_process():
    code = ("import sys, atelier3d.serve.app, atelier3d.serve.gateway\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent).stdout.strip()
    assert out == "False"
