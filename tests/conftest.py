import os
import shutil
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. The variable
# must be set before triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(__file__)))  # benchmarks.kernel_report

from helpers import PAIRS, TOLERANCES, compare_runs  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests pick their backend explicitly; a FASTOPT_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)



def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` again at every call of a device
    function (``@triton.jit`` helpers), about a millisecond each, although the launch that runs
    it has patched the same module already (and restores it when the launch ends); the
    kernels here call a dozen helpers per program. Skip those repeats: the launch's own patch
    is what they would have set."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch, executor = getattr(interpreter, "_patch_lang", None), \
        getattr(interpreter, "GridExecutor", None)
    if patch is None or executor is None or getattr(patch, "once_per_launch", False):
        return
    import inspect

    import triton.language as tl

    launch = {"patched": set(), "depth": 0}
    run = executor.__call__

    def call(self, *args, **kwargs):
        launch["depth"] += 1
        patched, launch["patched"] = launch["patched"], set()
        try:
            return run(self, *args, **kwargs)
        finally:
            launch["depth"] -= 1
            launch["patched"] = patched

    modules_of = {}  # id of a module's globals: the ids of the language modules it imported

    def patch_once(fn):
        langs = modules_of.get(id(fn.__globals__))
        if langs is None:
            langs = modules_of[id(fn.__globals__)] = {
                id(v) for v in fn.__globals__.values()
                if inspect.ismodule(v) and v in (tl, tl.core)}
        if launch["depth"] and langs <= launch["patched"]:
            return None  # a device function inside a launch: its modules are patched
        if launch["depth"]:
            launch["patched"] |= langs
        return patch(fn)

    patch_once.once_per_launch = True
    executor.__call__ = call
    interpreter._patch_lang = patch_once


def _cache_numpy_dtypes() -> None:
    """Triton's interpreter maps a Triton dtype to its numpy dtype by building a dict of
    eighteen entries on every call (hundreds of thousands of calls in a test of the Adafactor
    kernels, 6 % of its time): keep each answer (dtypes compare by value and hash)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    find = getattr(interpreter, "_get_np_dtype", None)
    if find is None or getattr(find, "cached", False):
        return
    known = {}

    def cached(tt_dtype):
        try:
            return known[tt_dtype]
        except KeyError:
            answer = known[tt_dtype] = find(tt_dtype)
            return answer
        except TypeError:  # unhashable: as it was
            return find(tt_dtype)

    cached.cached = True
    interpreter._get_np_dtype = cached


def pytest_configure(config):
    """Under the interpreter, record the GPU specialization of every kernel launch the suite
    makes (benchmarks/kernel_report.py); tests/test_kernels_compile.py compiles them all."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_language_once_per_launch()
        _cache_numpy_dtypes()
        try:
            from benchmarks import kernel_report
        except ImportError:  # triton missing: the kernels are not tested either
            return
        config._kernel_recording = kernel_report.recording()
        config._kernel_recording.__enter__()


def pytest_unconfigure(config):
    recording = getattr(config, "_kernel_recording", None)
    if recording is not None:
        recording.__exit__(None, None, None)
    started = getattr(config, "_gpu_variants", None)
    if started is not None:
        if started[1].poll() is None:  # a run that stopped before the compile check (-x,
            started[1].kill()  # -k, Ctrl-C) leaves no compiler behind
            started[1].wait()
        shutil.rmtree(os.path.dirname(started[0]), ignore_errors=True)  # nor its folder


def pytest_collection_modifyitems(config, items):
    """The compile check runs last, when every other test has launched its kernels; the GPU
    variants it also checks do not depend on the suite, so they compile meanwhile, in a child
    process on a core the (mostly single-threaded) interpreter tests leave idle."""
    last = [item for item in items if item.nodeid.startswith("tests/test_kernels_compile.py")]
    items[:] = [item for item in items if item not in last] + last
    if last and os.environ.get("TRITON_INTERPRET") == "1" and not config.option.collectonly:
        import subprocess
        import tempfile

        folder = tempfile.mkdtemp(prefix="fastopt-variants-")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = os.path.join(folder, "variants.json")
        config._gpu_variants = (out, subprocess.Popen(
            [sys.executable, "-m", "benchmarks.kernel_report", "--json", out, "--workers", "1"],
            cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.nice(5)))
