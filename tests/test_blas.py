"""mlx_baldwhisper._blas: preloading an optimised BLAS must be correct and never break import.

Each check runs in a fresh interpreter, because the BLAS can only be swapped before
mlx.core is first imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLAS_PY = ROOT / "mlx_baldwhisper" / "_blas.py"

# Loads _blas.py by path (independent of the rest of the package), optionally after mlx.
SCRIPT = r"""
import importlib.util, json, logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
if "late" in sys.argv:
    import mlx.core
spec = importlib.util.spec_from_file_location("blas_under_test", sys.argv[1])
blas = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blas)
if "nocands" in sys.argv:
    blas.candidates = lambda: []
if "norebind" in sys.argv:
    def fail(lib):
        raise OSError("simulated")
    blas._rebind_mlx = fail
first, second = blas.ensure_fast_blas(), blas.ensure_fast_blas()
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
r = lambda *s: rng.standard_normal(s).astype(np.float32)
cases = {
    "enc": (r(1500, 512), r(512, 2048), False),
    "logits": (r(1, 512), r(512, 51865), False),
    "batched": (r(8, 64, 1500), r(8, 1500, 64), False),
    "transposed": (r(512, 1500), r(2048, 512), True),
}
errs, seconds = {}, {}
for name, (a, b, tr) in cases.items():
    A, B = mx.array(a), mx.array(b)
    mx.eval(A, B)
    start = time.perf_counter()
    y = np.array(A.T @ B.T if tr else A @ B)
    seconds[name] = time.perf_counter() - start
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = a64.T @ b64.T if tr else a64 @ b64
    errs[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
m = r(64, 64) + 8 * np.eye(64, dtype=np.float32)  # LAPACK (sgetrf/sgetri) is interposed too
inv = np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu))
errs["inv"] = float(np.abs(inv @ m - np.eye(64)).max())
print(json.dumps({"result": first, "stable": first == second, "errs": errs, "seconds": seconds,
                  "candidates": blas.candidates()}))
"""


def run(*args: str, unset: tuple[str, ...] = (), **env: str) -> tuple[dict, str]:
    e = {k: v for k, v in os.environ.items() if k not in unset and k != "MLX_BALDWHISPER_BLAS"}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(BLAS_PY), *args], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def check_correct(out: dict) -> None:
    assert out["stable"], "ensure_fast_blas() must be idempotent"
    for name, err in out["errs"].items():
        assert err < 1e-4, f"{name}: relative error {err:.2e} with BLAS {out['result']}"


def loadable_candidates(out: dict) -> list[str]:
    return [c for c in out["candidates"] if "/" in c]  # pip-installed, so expected to load


@pytest.mark.parametrize("unset", [(), ("OPENBLAS_CORETYPE",)], ids=["env", "detect-coretype"])
def test_fast_blas_is_used_and_correct(unset: tuple[str, ...]) -> None:
    out, err = run(unset=unset)
    check_correct(out)
    if sys.platform.startswith("linux") and loadable_candidates(out):
        assert out["result"] not in ("reference", "system"), err
    assert "BLAS: " in err, "one INFO line naming the BLAS in use"


def test_bogus_path_falls_back_without_raising() -> None:
    out, err = run(MLX_BALDWHISPER_BLAS="/nonexistent/libblas.so")
    check_correct(out)
    assert out["result"] != "/nonexistent/libblas.so"
    assert "unusable" in err


def test_nothing_found_warns_once_and_stays_correct() -> None:
    out, err = run("nocands", unset=("LD_PRELOAD",))
    check_correct(out)
    if sys.platform.startswith("linux"):
        assert out["result"] == "reference"
        assert err.count("decoding will be very slow") == 1


def test_opt_out_keeps_reference() -> None:
    out, err = run(MLX_BALDWHISPER_BLAS="reference")
    check_correct(out)
    assert out["result"] == ("reference" if sys.platform.startswith("linux") else "system")


def test_after_mlx_import_it_rebinds_mlx_to_the_fast_blas() -> None:
    """mlx.core first: libmlx's already-bound BLAS imports are re-pointed, as fast as preloading."""
    late, err = run("late", unset=("LD_PRELOAD",))
    check_correct(late)
    early, _ = run(unset=("LD_PRELOAD",))
    if early["result"] in ("reference", "system"):
        pytest.skip("no optimised BLAS here")
    assert late["result"] == early["result"], err
    assert "re-bound" in err and "imported before" not in err
    reference, _ = run(MLX_BALDWHISPER_BLAS="reference")
    assert late["seconds"]["enc"] < reference["seconds"]["enc"] / 5, (late["seconds"], reference["seconds"])


def test_after_mlx_import_a_failed_rebind_warns_once_with_the_fix() -> None:
    out, err = run("late", "norebind", unset=("LD_PRELOAD",))
    check_correct(out)
    if sys.platform.startswith("linux") and loadable_candidates(out):
        assert out["result"] == "reference"
        assert err.count("imported before mlx_baldwhisper") == 1, err
        assert "Fix: import mlx_baldwhisper before mlx.core" in err and "simulated" in err


@pytest.mark.parametrize("order", ["import mlx.core; import mlx_baldwhisper",
                                   "import mlx_baldwhisper; import mlx.core"])
def test_package_import_order_does_not_matter(order: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_BALDWHISPER_BLAS")}
    p = subprocess.run([sys.executable, "-W", "default", "-c", f"{order}; print(mlx_baldwhisper.BLAS)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "imported before" not in p.stderr and "Warning" not in p.stderr, p.stderr
    early, _ = run(unset=("LD_PRELOAD",))
    assert p.stdout.split()[-1] == early["result"]


def test_package_import_wires_blas_first() -> None:
    code = ("import mlx_baldwhisper as m\nfrom mlx_baldwhisper import _blas\n"
            "print(_blas.ensure_fast_blas(), getattr(m, 'BLAS', None))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got, pkg = p.stdout.split()[-2:]
    assert pkg in (got, "None")
    out, _ = run()
    if out["result"] not in ("reference", "system"):  # a fast BLAS is available here...
        assert got != "reference", "...so the package must load it before mlx.core: " + p.stderr


def test_non_linux_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("blas_platform_test", BLAS_PY)
    assert spec and spec.loader
    blas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blas)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas.ensure_fast_blas() == "system"


def test_encoder_thread_block_sets_and_restores_the_count() -> None:
    """``_blas.threads(n)`` raises OpenBLAS's thread count for the encoder and puts it back."""
    code = ("import mlx_baldwhisper\nfrom mlx_baldwhisper import _blas\n"
            "before = _blas.set_threads(1)\n"
            "if before is None:\n    print('none none none')\nelse:\n"
            "    with _blas.threads(2):\n        inside = _blas.set_threads(2)\n"
            "    after = _blas.set_threads(1)\n    print(before, inside, after)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    before, inside, after = p.stdout.split()[-3:]
    if before != "none":  # an OpenBLAS of ours is loaded: one thread by default
        assert (before, inside, after) == ("1", "2", "1")
