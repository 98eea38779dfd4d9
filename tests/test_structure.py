"""Properties of the code's shape that the design promises: no import cycle, a kernel library that
stands alone, and a search step that reads back to the host once."""
import ast
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("probprune", "probprune_kernels")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str):
    """Every module of our packages that ``path`` imports, at top level or inside functions."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        yield from (n for n in names if n.split(".")[0] in PACKAGES)


def _graph():
    modules = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    modules[_module_name(path)] = path
    # An import of a package attribute (``from . import ops``) names the module when one exists.
    return {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    assert "probprune.models" in graph and "probprune_kernels.ops" in graph
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            # a package's __init__ re-exporting its modules is not a cycle through them
            if n == m.rpartition(".")[0] or state.get(n) == "done":
                continue
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
            visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_kernel_library_never_imports_the_engine():
    bad = {m: sorted(i for i in deps if i.split(".")[0] == "probprune")
           for m, deps in _graph().items() if m.startswith("probprune_kernels")}
    assert not any(bad.values()), bad


class _HostReads:
    """Counts tensor -> Python conversions made from engine code (probprune/), the ones that
    stall a GPU; the reference kernels' own conversions (the CPU path) do not count."""
    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        import sys

        self.calls = []
        engine = os.path.join(ROOT, "probprune") + os.sep
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _original=original, _name=name, **kw):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(engine):
                    self.calls.append((_name, os.path.basename(caller)))
                return _original(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("baseline", ["leave-one-out", "moving-average"])
def test_a_search_step_reads_back_once(tiny_model_dirs, monkeypatch, baseline):
    from probprune.budget import Budget
    from probprune.forward import MaskedCausalLM
    from probprune.models import load_model
    from probprune.policy import Policy, PolicyConfig, PolicyState
    from probprune.search import Search, SearchForward, SearchState
    from probprune.units import UnitSpace

    model, _ = load_model(tiny_model_dirs["qwen2"])
    engine = MaskedCausalLM(model, include_layers=True)
    space = UnitSpace(engine.units.shape, True, channel_block=5)
    budget = Budget.build(space, 0.3)
    probs = budget.project(torch.full((space.n_units,), 0.7, dtype=torch.float64)).float()
    pool = torch.randint(0, model.config.vocab_size, (6, 10))
    mask = budget.hard_mask(probs)
    search = Search(SearchForward(engine, space), budget,
                    Policy(PolicyConfig(steps=10, baseline=baseline), PolicyState(probs)),
                    SearchState.start(probs, mask, 5.0), pool, pool[:2], steps=10, k=3,
                    batch_size=2, eval_every=100, seed=0)
    search.run_step()  # the first step sets the running scales
    reads = _HostReads(monkeypatch)
    record = search.run_step()
    assert reads.calls == [("tolist", "search.py")]
    assert len(record["losses"]) == 3 and record["valid"] == 3
