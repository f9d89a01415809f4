"""The package's import graph has no cycle (data flows one way, as DESIGN.md draws it), and
every module imports on its own in a fresh interpreter."""
import ast
import os
import subprocess
import sys

import pytest

import fastddpm

PKG_DIR = os.path.dirname(fastddpm.__file__)


def _module_files():
    """{module name: path} for fastddpm.* and fastddpm.kernels.* (the package roots excluded:
    `fastddpm/__init__.py` re-exports everything by design)."""
    import fastddpm.kernels as K

    out = {}
    for pkg, folder in (("fastddpm", PKG_DIR), ("fastddpm.kernels", os.path.dirname(K.__file__))):
        for f in sorted(os.listdir(folder)):
            if f.endswith(".py") and f != "__init__.py":
                out[f"{pkg}.{f[:-3]}"] = os.path.join(folder, f)
    return out


def _imports(name, path, known):
    """fastddpm modules that `name` imports anywhere in its file (top level or inside functions)."""
    pkg = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph():
    files = _module_files()
    return {name: _imports(name, path, files) for name, path in files.items()}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                cyc = visit(v)
                if cyc:
                    return cyc
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state:
            cyc = visit(u)
            if cyc:
                return cyc
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "fastddpm.schedule" in graph["fastddpm.compat"]  # the graph sees imports at all
    assert "fastddpm.graphs" in graph["fastddpm.sampler"]   # ... including those inside functions
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_down():
    """DESIGN.md: schedule below compat; sampler above graphs."""
    graph = import_graph()

    def reaches(a, b):
        seen, todo = set(), [a]
        while todo:
            u = todo.pop()
            if u == b:
                return True
            if u not in seen:
                seen.add(u)
                todo.extend(graph[u])
        return False

    assert not reaches("fastddpm.schedule", "fastddpm.compat")
    assert not reaches("fastddpm.graphs", "fastddpm.sampler")
    assert reaches("fastddpm.compat", "fastddpm.schedule") and reaches("fastddpm.sampler", "fastddpm.graphs")
    # the sampler over the model call; the loops' cache (graphs) over one captured loop (graph_loop)
    assert not reaches("fastddpm.model_call", "fastddpm.sampler") and reaches("fastddpm.sampler", "fastddpm.model_call")
    assert not reaches("fastddpm.graph_loop", "fastddpm.graphs") and reaches("fastddpm.graphs", "fastddpm.graph_loop")


def test_each_setting_lives_in_one_module():
    """Module-level settings that tests and users set (monkeypatch.setattr(module, NAME, ...)) are
    read from one module only: a copy elsewhere would take the assignment and change nothing, and
    pytest's setattr refuses a name the module does not have."""
    from fastddpm import graph_loop, graphs, model_call, sampler

    homes = {"COMPILE_BACKEND": model_call, "EMULATE_ON_CPU": graphs, "CHUNK_STEPS": graphs, "MAX_ENTRIES": graphs}
    for name, home in homes.items():
        assert hasattr(home, name), name
        for other in (sampler, graphs, graph_loop, model_call):
            assert other is home or not hasattr(other, name), f"{name} also in {other.__name__}"


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["fastddpm.schedule", "fastddpm.compat", "fastddpm.graphs", "fastddpm.sampler",
                                    "fastddpm.diffusers_schedule", "fastddpm.layout", "fastddpm.model_call",
                                    "fastddpm.graph_loop"])
def test_module_imports_in_a_fresh_interpreter(module):
    code = f"import importlib; print(importlib.import_module({module!r}).__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == module, r.stderr[-2000:]
