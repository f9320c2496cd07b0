"""The house rules: no import cycle inside ray_cifar; the engine and the loop import neither Ray nor DALI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import ray_cifar

PACKAGE_DIR = os.path.dirname(os.path.abspath(ray_cifar.__file__))


def module_names(root: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under root (a package's __init__ is the package's name)."""
    modules = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
        for name in files:
            if name.endswith(".py"):
                modules[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return modules


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (inside functions too).

    `from .a import b` counts as an edge to `a` (and to `a.b` when that is a module); importing a
    module `p.q` also runs `p/__init__`, so every enclosing package counts as an edge too (except
    the importer's own enclosing packages: Python has run those before the importer starts).
    """
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        edges: set[str] = set()
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the module and every package above it
                    candidate = ".".join(parts[:i])
                    if candidate in modules and candidate != name and candidate not in own_packages:
                        edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_ray_cifar():
    graph = import_graph(PACKAGE_DIR, "ray_cifar")
    assert {"ray_cifar.config.schema", "ray_cifar.validation", "ray_cifar.loop"} <= set(graph)
    assert "ray_cifar.config" in graph["ray_cifar.optim"]  # importing config.schema runs config/__init__
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def write_package(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root / "pkg")


def test_cycle_finder_sees_function_level_relative_and_package_init_imports(tmp_path):
    # a -> b at module level; b -> a only inside a function: still a cycle.
    root = write_package(tmp_path / "one", {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n",
                                            "pkg/b.py": "def f():\n    from .a import x\n"})
    assert find_cycle(import_graph(root, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]
    # low imports sub.schema; sub/__init__ imports high; high imports low: a cycle through the package's __init__.
    root = write_package(tmp_path / "two", {"pkg/__init__.py": "", "pkg/low.py": "from .sub.schema import X\n",
                                            "pkg/high.py": "import pkg.low\n", "pkg/sub/__init__.py":
                                            "from ..high import Y\n", "pkg/sub/schema.py": "X = 1\n"})
    cycle = find_cycle(import_graph(root, "pkg"))
    assert cycle is not None and "pkg.sub" in cycle, cycle
    # Without the back edge: no cycle.
    root = write_package(tmp_path / "three", {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n",
                                              "pkg/b.py": "import os\n"})
    assert find_cycle(import_graph(root, "pkg")) is None


BLOCKED_IMPORT = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray" or name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import ray_cifar.engine, ray_cifar.loop, ray_cifar.models, ray_cifar.optim, ray_cifar.config, ray_cifar.validation
import ray_cifar.data.loader, ray_cifar.data.pipelines
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "ray" or m.startswith("nvidia.dali"))
print("LEAKED", leaked)
"""


def test_engine_loop_config_and_registries_import_without_ray_or_dali():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(PACKAGE_DIR)] + sys.path)}
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LEAKED []" in result.stdout, result.stdout


RAY_LAYER = "ray_cifar.tuning"
ENTRY_POINTS = {"ray_cifar.tune", "ray_cifar.train", "ray_cifar.__main__"}


def imports_of(path: str) -> set[str]:
    """Top-level names of the absolute imports anywhere in a file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_ray_layer_and_the_entry_points_import_ray():
    modules = module_names(PACKAGE_DIR, "ray_cifar")
    assert any(name.startswith(RAY_LAYER + ".") for name in modules)
    below = {name for name, path in modules.items() if "ray" in imports_of(path)
             and not (name == RAY_LAYER or name.startswith(RAY_LAYER + ".") or name in ENTRY_POINTS)}
    assert not below, f"these import Ray but sit below the Ray layer ({RAY_LAYER}): {sorted(below)}"
    # The layer above may import the layers below it, never the reverse.
    graph = import_graph(PACKAGE_DIR, "ray_cifar")
    upward = {(name, target) for name, targets in graph.items() for target in targets
              if (target == RAY_LAYER or target.startswith(RAY_LAYER + "."))
              and not (name.startswith(RAY_LAYER) or name in ENTRY_POINTS)}
    assert not upward, f"imports from below into the Ray layer: {sorted(upward)}"


REPORT_LAYERS = ["study", "tables", "schedulers", "figures", "page", "cli"]  # as ray_cifar/report/__init__ says


def test_the_reports_modules_import_only_the_layers_before_them():
    graph = import_graph(PACKAGE_DIR, "ray_cifar")
    inside = sorted(name for name in graph if name.startswith("ray_cifar.report."))
    assert {name.rsplit(".", 1)[1] for name in inside} == set(REPORT_LAYERS) | {"__main__"}
    for name in inside:
        layer = name.rsplit(".", 1)[1]
        place = len(REPORT_LAYERS) if layer == "__main__" else REPORT_LAYERS.index(layer)
        for target in graph[name]:
            if target.startswith("ray_cifar.report."):
                assert REPORT_LAYERS.index(target.rsplit(".", 1)[1]) < place, f"{name} imports {target}"
            assert not target.startswith("ray_cifar.tuning"), f"{name} imports the Ray layer ({target})"
