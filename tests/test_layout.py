"""The package layout: stages import one way, old import paths still work, the schedule built from
torch's schedulers is the poly curve, and the ``Example::`` blocks of the entry points run."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest
import torch

from trunet.pipeline.training.optim import build_scheduler, load_scheduler_state, poly_lr_lambda

PACKAGE = Path(__file__).resolve().parents[1] / "trunet"

# Stages in import order: a module may import its own stage or a lower one, never a later one.
LAYERS = [
    ("trunet.errors", "trunet.atomic", "trunet.progress", "trunet.config"),
    ("trunet.io",),
    ("trunet.data",),
    ("trunet.transforms",),
    ("trunet.models",),
    ("trunet.pipeline.precision", "trunet.pipeline.checkpoint"),
    ("trunet.pipeline.inference", "trunet.pipeline.evaluation"),
    ("trunet.pipeline.training",),
    ("trunet.pipeline.planning",),
]
# Kept for old imports (each re-exports a new home), and the entry points: they may import anything.
TOP = {
    "trunet.pipeline.config", "trunet.pipeline.data", "trunet.pipeline.train", "trunet.pipeline.plan",
    "trunet.pipeline.infer", "trunet.pipeline.evaluate", "trunet.pipeline.tracking",
    "trunet.pipeline.distributed", "trunet.pipeline.report", "trunet.pipeline.postprocess",
    "trunet.transforms.io", "trunet.cli", "trunet.demo", "trunet.__main__", "trunet", "trunet.pipeline",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module_level: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trunet"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("trunet"))
    return found


def _layer(module: str) -> int | None:
    if module in TOP:
        return None
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no stage of LAYERS")


def test_stages_import_one_way_and_without_circles():
    modules = _modules()
    graph = {m: {i for i in _imports(p, module_level=False) if i in modules and i != m} for m, p in modules.items()}
    for module, targets in graph.items():
        own = _layer(module)
        for target in targets:
            if own is not None and not module.startswith(target + "."):  # a package's own __init__ is fine
                assert _layer(target) is not None and _layer(target) <= own, f"{module} imports up: {target}"
    # no circle among modules (a package importing its own submodules is not one)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(t):] + [t])}")
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_only_the_cli_imports_inside_functions():
    """Function-level ``trunet`` imports only where a command loads its stage on demand (``--help`` stays
    instant) and in the lazy attribute of ``trunet.data``; none dodges a circle."""
    allowed = {"trunet.cli", "trunet.data"}
    for module, path in _modules().items():
        inner = _imports(path, module_level=False) - _imports(path, module_level=True)
        assert module in allowed or not inner, f"{module} imports {sorted(inner)} inside a function"


def test_old_import_paths_reexport_the_new_homes():
    from trunet import config, io
    from trunet.data import cases
    from trunet.pipeline import checkpoint, evaluation, inference, planning, training

    pairs = [
        ("trunet.pipeline.config", "load_config", config.load_config),
        ("trunet.pipeline.config", "ConfigError", config.ConfigError),
        ("trunet.transforms.io", "load_cine", io.load_cine),
        ("trunet.transforms.io", "save_cine_like", io.save_cine_like),
        ("trunet.pipeline.data", "resolve_cases", cases.resolve_cases),
        ("trunet.pipeline.data", "build_train_loader", training.loaders.build_train_loader),
        ("trunet.pipeline.train", "Trainer", training.Trainer),
        ("trunet.pipeline.train", "MaskedDiceCELoss", training.MaskedDiceCELoss),
        ("trunet.pipeline.plan", "estimate_memory", planning.estimate_memory),
        ("trunet.pipeline.plan", "build_criterion", training.losses.build_criterion),
        ("trunet.pipeline.infer", "Predictor", inference.Predictor),
        ("trunet.pipeline.infer", "run_prediction", inference.run_prediction),
        ("trunet.pipeline.evaluate", "run_evaluation", evaluation.run_evaluation),
        ("trunet.pipeline.postprocess", "keep_largest_components", inference.keep_largest_components),
        ("trunet.pipeline.tracking", "Tracker", training.tracking.Tracker),
        ("trunet.pipeline.distributed", "DistContext", training.distributed.DistContext),
        ("trunet.pipeline.checkpoint", "build_model", checkpoint.model_from_checkpoint),
    ]
    for module, name, obj in pairs:
        assert getattr(importlib.import_module(module), name) is obj, f"{module}.{name}"


@pytest.mark.parametrize("total, warmup, power", [(100, 10, 0.9), (50, 0, 0.9), (7, 3, 2.0), (1, 0, 0.9),
                                                  (20, 1, 0.9), (10, 9, 0.9), (5, 20, 0.9)])
def test_schedule_is_the_poly_curve(total, warmup, power):
    """The warm-up + poly schedule from torch's schedulers gives the rates of the written-out curve (to float
    rounding), also after a resume from its state dict."""
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)

    opt = optimizer()
    sched = build_scheduler(opt, total, warmup, power)
    factor = poly_lr_lambda(total, warmup, power)
    half = None
    for step in range(total + 3):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(step), rel=1e-12, abs=1e-18), step
        opt.step()
        sched.step()
        if step == total // 2:
            half = (step + 1, opt.state_dict(), sched.state_dict())
    start, opt_state, sched_state = half
    resumed_opt = optimizer()
    resumed = build_scheduler(resumed_opt, total, warmup, power)
    resumed_opt.load_state_dict(opt_state)
    resumed.load_state_dict(sched_state)
    for step in range(start, total + 3):
        assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(step), rel=1e-12, abs=1e-18)
        resumed_opt.step()
        resumed.step()


def test_a_checkpoint_of_the_former_lambda_schedule_resumes_on_the_same_curve():
    total, warmup, power = 40, 5, 0.9
    factor = poly_lr_lambda(total, warmup, power)
    old_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, factor)
    for _ in range(17):
        old_opt.step()
        old.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    sched = build_scheduler(opt, total, warmup, power)
    load_scheduler_state(sched, old.state_dict())
    opt.load_state_dict(old_opt.state_dict())
    for step in range(17, total + 2):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(step), rel=1e-12, abs=1e-18), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("module", [
    "trunet.models.unet",
    "trunet.models.factory",
    "trunet.pipeline.inference.predictor",
    "trunet.pipeline.evaluation.metrics",
    "trunet.pipeline.evaluation.run",
    "trunet.pipeline.planning.search",
])
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(mod, module) if t.examples]
    assert tests, f"{module} has no Example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {module} failed (output above)"
