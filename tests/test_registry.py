"""The registry, the declarations and the test table agree: every optimizer fastopt exports is
tested (tests/optim_db.py), each elementwise optimizer's torch twin and Triton function take the
same arguments, and the flag bits mean the same on both sides."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch
from optim_db import NAMES, TESTED_APART

import fastopt
from fastopt import declaration, registry


def test_every_registered_optimizer_is_in_the_test_table():
    registered = set(registry.classes())
    assert registered == set(NAMES) | set(TESTED_APART), registered ^ (set(NAMES)
                                                                     | set(TESTED_APART))
    assert set(registered) <= set(fastopt.__all__)
    for name, cls in registry.classes().items():
        assert getattr(fastopt, name) is cls and registry.get(name.lower()) is cls


def test_the_base_class_names_no_optimizer():
    """fastopt/optimizer.py and the engine's modules know optimizers only by declaration."""
    import fastopt.elementwise
    import fastopt.layout
    import fastopt.optimizer
    import fastopt.plan
    import fastopt.state
    import fastopt.step

    names = [n for n in registry.classes() if n not in ("SGD",)]  # "SGD" is in words only
    for module in (fastopt.optimizer, fastopt.step, fastopt.elementwise, fastopt.state,
                   fastopt.layout, fastopt.plan):
        code = "\n".join(line for line in inspect.getsource(module).splitlines()
                         if not line.strip().startswith("#"))
        for name in names:
            assert f"{name}(" not in code and f"{name}." not in code, (module.__name__, name)


LIBRARY = pathlib.Path(fastopt.__file__).parent
SOURCES = sorted([*LIBRARY.rglob("*.py"), *(LIBRARY.parent / "kernels").rglob("*.py")])


def test_no_class_over_300_lines():
    """The house rule (issue 18): a class that grows past 300 lines is split by what it owns."""
    long = [(path.name, node.name, node.end_lineno - node.lineno + 1)
            for path in SOURCES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300]
    assert SOURCES and not long, long


def test_the_library_imports_no_program():
    """Demos, benchmarks and tests use the library; it never imports them."""
    programs = {"examples", "benchmarks", "tests", "optim_db", "helpers"}
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(path.name, n) for n in names if n.split(".")[0] in programs]
    assert not found, found


ELEMENTWISE = [cls for cls in registry.classes().values()
               if cls.declaration.update is None and cls.declaration.kernel]


@pytest.mark.parametrize("cls", ELEMENTWISE, ids=[c.__name__ for c in ELEMENTWISE])
def test_torch_twin_and_kernel_take_the_same_arguments(cls):
    pytest.importorskip("triton")
    import importlib

    declared = cls.declaration
    kernel = getattr(importlib.import_module(f"fastopt.kernels.{declared.kernel}"),
                     declared.kernel)
    twin = list(inspect.signature(declared.math).parameters)
    device = list(inspect.signature(kernel.fn).parameters)
    rename = {"row": "row_ptr", "flags": "FLAGS"}
    assert [rename.get(n, n) for n in twin] == device
    assert len(twin) == 7 + 1 + 8 + 1  # param, grad, b0..b3, row; lr; h0..h7; flags
    # the hyperparameters the declaration hands both are as many as they name
    opt = cls([torch.zeros(1, requires_grad=True)])
    hyper, flags = declared.hyper(opt, opt.param_groups[0])
    assert len(hyper) <= 8 and isinstance(flags, int)
    # the buffers each names are the declared ones, in order
    names = [b.name for b in declared.buffers]
    assert [n.rstrip("_") for n in twin[2:2 + len(names)]] == names  # sum_: not the builtin


def test_flag_bits_mean_the_same_in_the_library_and_the_kernels():
    pytest.importorskip("triton")
    from fastopt.kernels import ops

    for name in ("WEIGHT_DECAY", "DECOUPLED", "MOMENTUM", "CENTERED", "NESTEROV"):
        assert getattr(ops, name).value == getattr(declaration, name), name
    bits = [getattr(declaration, n) for n in ("WEIGHT_DECAY", "DECOUPLED", "MOMENTUM",
                                               "CENTERED", "NESTEROV")]
    assert ops.LR_ON_DEVICE.value not in bits and len(set(bits)) == len(bits)


@pytest.mark.parametrize("name", list(registry.classes()))
def test_signature_shows_torch_arguments_then_fastopt_options(name):
    cls = registry.get(name)
    parameters = inspect.signature(cls).parameters
    assert list(parameters)[0] == "params"
    for option in ("backend", "flatten_params"):
        assert option in parameters
    for option in declaration.PRECISION_OPTIONS:
        assert (option in parameters) == cls._takes(option), option
    reference = getattr(torch.optim, name, None)
    if reference is not None:  # torch.optim's own arguments, with its defaults
        for arg, p in inspect.signature(reference).parameters.items():
            if arg in parameters:
                assert parameters[arg].default == p.default, arg
