"""Every kernel specialization the test suite launches, and every variant a GPU launches
(``benchmarks.kernel_report.gpu_variants``), compiled for sm_90 and sm_80 by Triton's real
compiler, without a GPU: it compiles, uses no local memory, does not spill on sm_90, moves every
element stream in 128-bit accesses when the layout is aligned, and keeps fp64 out of the
per-element work. The static cost model holds the kernels memory-bound.

The suite's launches are recorded under the interpreter by tests/conftest.py, and this module
runs last (see ``pytest_collection_modifyitems``). Compiling needs a process without
``TRITON_INTERPRET``: a child runs ``python -m benchmarks.kernel_report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from benchmarks import kernel_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.kernel_report", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(child: subprocess.Popen, out: str) -> list:
    _, stderr = child.communicate(timeout=1500)
    assert os.path.exists(out), stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, request) -> list:
    """[(result, analysis)]: the GPU variants on sm_90 and sm_80 (compiled while the suite ran:
    tests/conftest.py starts them), and the suite's own launches on sm_90."""
    folder = tmp_path_factory.mktemp("kernels")
    specs = folder / "specs.json"
    specs.write_text(json.dumps(list(kernel_report.RECORDED.values())))
    if os.environ.get("FASTOPT_KERNEL_SPECS"):  # keep them: python -m benchmarks.kernel_report
        with open(os.environ["FASTOPT_KERNEL_SPECS"], "w") as f:  # --specs FILE --report
            f.write(specs.read_text())
    started = getattr(request.config, "_gpu_variants", None)
    if started is None:  # this module alone, or a GPU machine: compile them now
        out = str(folder / "variants.json")
        started = (out, _child("--json", out))
    recorded = str(folder / "recorded.json")
    child = _child("--no-variants", "--specs", str(specs), "--specs-arch", "90", "--json",
                   recorded)
    results = _results(started[1], started[0]) + _results(child, recorded)
    return [(r, kernel_report.analyse(r)) for r in results]


def _name(result) -> str:
    return f"{kernel_report.describe(result['spec'])} sm_{result['arch']}"


def test_the_suite_launches_were_recorded():
    """When the whole suite runs, its launches are part of the check (a lone run of this
    module checks the GPU variants only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the suite runs the kernels on a GPU: nothing recorded")
    recorded = kernel_report.RECORDED
    if not recorded:
        pytest.skip("no other test ran in this session")
    kernels = {spec["kernel"] for spec in recorded.values()}
    assert {"adam", "sgd", "elementwise"} <= kernels, kernels
    from fastopt import registry

    declared = {cls.declaration.kernel for cls in registry.classes().values()
                if cls.declaration.update is None}
    launched = {spec["constexprs"]["MATH"].split(":")[1] for spec in recorded.values()
                if spec["kernel"] == "elementwise"}
    assert declared <= launched, declared - launched  # every optimizer's kernel ran


def test_every_specialization_compiles_for_sm90_and_sm80(compiled):
    """Every GPU variant for both targets, every launch the suite made for sm_90."""
    archs = {r["arch"] for r, _ in compiled}
    assert archs == {90, 80}
    failed = [f"{_name(r)}: {r['error']}" for r, _ in compiled if "error" in r]
    assert not failed, "\n".join(failed[:5])


def test_no_local_memory_and_no_spills_on_sm90(compiled):
    bad = [_name(r) for r, _ in compiled if "error" not in r and
           (r["local"] or r["stack_bytes"] or (r["arch"] == 90 and r["spill_bytes"]))]
    assert not bad, bad


def test_every_stream_of_an_aligned_launch_moves_in_128_bit_accesses(compiled):
    aligned = [(r, a) for r, a in compiled if a.get("aligned")]
    assert len(aligned) >= len(compiled) // 2  # the aligned layout is the common case
    bad = [f"{_name(r)}: {p}" for r, a in aligned for p in a["problems"] if "-bit accesses" in p]
    assert not bad, "\n".join(bad)


def test_fp64_only_in_per_program_scalars(compiled):
    bad = [f"{_name(r)}: {r['fp64']}" for r, _ in compiled
           if "error" not in r and r["spec"]["kernel"] not in kernel_report.SCALAR_KERNELS
           and r["fp64"] > 0]
    assert not bad, bad


def test_the_cost_model_holds_the_kernels_memory_bound(compiled):
    """Predicted on an H100: fp32/bf16 Adam, AdamW and SGD use at most half the issue slots
    while streaming at 90 % of copy bandwidth; 8-bit Adam on fp32 params (16 bytes per
    element) reaches 85 % of it; every other optimizer's kernel (fastopt.registry), in every
    storage, reaches 90 % of it."""
    shares, fractions, declared = {}, {}, {}
    for r, a in compiled:
        spec = r["spec"]
        if "issue_share" not in a or not a.get("aligned"):
            continue
        name = _name(r)
        if spec["kernel"] in ("adam", "sgd"):
            shares[name] = a["issue_share"]
        elif spec["kernel"] == "adam_int8" and spec["signature"]["param_ptr"] == "*fp32":
            fractions[name] = a["predicted_fraction"]
        elif spec["kernel"] == "elementwise":
            declared[name] = a["predicted_fraction"]
    assert shares and fractions and declared
    over = {k: round(v, 2) for k, v in shares.items() if v > 0.5}
    assert not over, over
    short = {k: round(v, 2) for k, v in fractions.items() if v < 0.85}
    assert not short, short
    short = {k: round(v, 2) for k, v in declared.items() if v < 0.9}
    assert not short, short
