"""Make MLX's CPU matmuls use an optimised BLAS on Linux.

The ``mlx-cpu`` wheel links the reference Netlib BLAS (sgemm ~30-50x slower than OpenBLAS).
libmlx.so resolves ``cblas_sgemm`` (and LAPACK's ``*_`` routines) through the global symbol
scope, so an optimised BLAS loaded with RTLD_GLOBAL *before* ``import mlx.core`` interposes.
Env: ``MLX_BALDWHISPER_BLAS=reference`` opts out, ``=/path/libblas.so`` picks a library.
BLAS threads default to 1 unless OPENBLAS_NUM_THREADS/MKL_NUM_THREADS/OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import platform
import sys
import tempfile
from typing import Iterator, Optional

log = logging.getLogger("mlx_baldwhisper")
ENV_VAR = "MLX_BALDWHISPER_BLAS"
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
_result: Optional[str] = None
_handles: list[ctypes.CDLL] = []  # keep loaded libraries alive


def _site_glob(pattern: str) -> list[str]:
    """Glob ``pattern`` in every sys.path dir, without importing anything."""
    dirs = dict.fromkeys(p for p in sys.path if p and os.path.isdir(p))
    return [f for d in dirs for f in sorted(glob.glob(os.path.join(d, pattern)))]


def candidates() -> list[str]:
    """Default search order: newest/fastest OpenBLAS first, then distro, cvxopt's, MKL."""
    return (
        _site_glob("ngsolve_openblas/libopenblas*.so*")  # pip, OpenBLAS 0.3.33 DYNAMIC_ARCH
        + ["libopenblas.so.0", "libopenblasp.so.0"]  # distro package, via the ld.so cache
        + _site_glob("cvxopt.libs/libopenblas*.so*")  # pip, OpenBLAS 0.3.15 single-threaded
        + sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))  # pip mkl
    )


def _coretype() -> Optional[str]:
    """OPENBLAS_CORETYPE from CPU flags: old OpenBLAS misdetects new CPUs (Zen4 -> Barcelona)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return "SkylakeX"  # AVX-512 kernels: also right for Zen4/5, Ice Lake, Sapphire Rapids
    return "Haswell" if {"avx2", "fma"} <= flags else None  # AVX2 kernels (Zen1-3 too)


@contextlib.contextmanager
def _env_defaults(**kv: Optional[str]) -> Iterator[None]:
    """Set unset env vars while OpenBLAS loads (it reads them then), then restore."""
    added = [k for k, v in kv.items() if v is not None and k not in os.environ]
    os.environ.update({k: str(kv[k]) for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _dlopen(path: str) -> ctypes.CDLL:
    """dlopen RTLD_LOCAL (promoted once verified); borrow a wheel's libgfortran if missing."""
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        if "libgfortran" not in str(e) or not os.path.isabs(path):
            raise
    here = os.path.dirname(path)  # cvxopt.libs style: hashed libgfortran beside the lib
    for pat in ("libquadmath*", "libgfortran*"):
        for dep in sorted(glob.glob(os.path.join(here, pat))):
            _handles.append(ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL))
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        if "libgfortran.so.5" not in str(e):
            raise
    # Wants the distro libgfortran.so.5 (absent): load a wheel's copy (mlx-cpu ships one),
    # then open the lib via a symlink dir so its $ORIGIN lookup finds that same file.
    gfs = _site_glob("mlx_cpu.libs/libgfortran*.so.5*") or _site_glob("*.libs/libgfortran*.so.5*")
    _handles.append(ctypes.CDLL(gfs[0], mode=ctypes.RTLD_GLOBAL))
    with tempfile.TemporaryDirectory(prefix="mlxbw-blas-") as tmp:
        link = os.path.join(tmp, os.path.basename(path))
        os.symlink(gfs[0], os.path.join(tmp, "libgfortran.so.5"))
        os.symlink(path, link)
        return ctypes.CDLL(link)


def _describe(lib: ctypes.CDLL) -> Optional[str]:
    """Name an optimised BLAS from its marker symbols; None if it is not one."""
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
        conf, core = lib.openblas_get_config(), lib.openblas_get_corename()
        return f"{conf.decode().strip()}, core {core.decode()}"
    return "Intel MKL" if hasattr(lib, "MKL_Get_Version_String") else None


def _try(path: str, explicit: bool) -> Optional[str]:
    """Load one candidate, verify it, then make its symbols global; None if unusable."""
    user_threads = any(v in os.environ for v in _THREAD_VARS)
    try:
        # THREAD_TIMEOUT 4 (2^4 cycles, OpenBLAS's minimum): worker threads stop spinning
        # right after a GEMM, so the encoder's numpy kernels get the cores (measured:
        # encoder window 0.97 -> 0.69 s with cpu_ops' 2-thread kernels; no gain without).
        with _env_defaults(OPENBLAS_CORETYPE=_coretype(), OPENBLAS_THREAD_TIMEOUT="4",
                           OPENBLAS_NUM_THREADS=None if user_threads else "1"):
            lib = _dlopen(path)
        desc = _describe(lib) or ("custom BLAS" if explicit else None)
        if not hasattr(lib, "cblas_sgemm") or desc is None:
            raise OSError("no cblas_sgemm, or not an optimised BLAS")
        lib = ctypes.CDLL(lib._name, mode=ctypes.RTLD_GLOBAL)  # same object, now global
    except Exception as e:  # OSError, or no wheel libgfortran to borrow
        (log.warning if explicit else log.debug)("BLAS candidate %s unusable: %s", path, e)
        return None
    if not user_threads:  # >1 thread spin-waits beside MLX's own thread: erratic stalls
        for fn in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(1)
    _handles.append(lib)
    return desc


def _ensure() -> str:
    if not sys.platform.startswith("linux"):
        log.info("BLAS: left to the platform (%s)", sys.platform)  # macOS: Accelerate
        return "system"
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() == "reference":
        log.info("BLAS: reference Netlib BLAS (%s=reference)", ENV_VAR)
        return "reference"
    scope = ctypes.CDLL(None)  # e.g. LD_PRELOAD, or loaded earlier by the user
    pre = _describe(scope) if hasattr(scope, "cblas_sgemm") else None
    if pre:
        log.info("BLAS: %s (already in the global scope)", pre)
        return "preloaded"
    if "mlx.core" in sys.modules:
        log.warning("BLAS: mlx.core was imported before mlx_baldwhisper and keeps the slow "
                    "reference BLAS; import mlx_baldwhisper first")
        return "reference"
    for path in ([choice] if choice else []) + candidates():
        desc = _try(path, explicit=path == choice)
        if desc:
            log.info("BLAS: %s (%s)", os.path.realpath(path) if "/" in path else path, desc)
            return path
    log.warning("BLAS: no optimised BLAS found; MLX uses the reference BLAS and decoding will "
                "be very slow. Fix: pip install ngsolve-openblas, or apt install libopenblas0")
    return "reference"


def ensure_fast_blas() -> str:
    """Load an optimised BLAS before mlx.core is imported; idempotent, never raises.

    Returns the library loaded (path or soname), "preloaded", "reference" or "system".
    """
    global _result
    if _result is None:
        try:
            _result = _ensure()
        except Exception as e:  # never break the package import over speed
            log.warning("BLAS: setup failed (%s); using the slow reference BLAS", e)
            _result = "reference"
    return _result


def set_threads(n: int) -> Optional[int]:
    """Set the loaded OpenBLAS's thread count (process-wide); returns the previous count,
    or None when no OpenBLAS of ours is loaded (macOS, MKL, reference BLAS)."""
    for lib in _handles:
        if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads"):
            prev = int(lib.openblas_get_num_threads())
            lib.openblas_set_num_threads(int(n))
            return prev
    return None


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[None]:
    """Run a block of large GEMMs (the encoder) on ``n`` BLAS threads, then restore.

    Decoding steps stay single-threaded (their small GEMMs stall beside MLX's thread);
    the encoder's 1500-row GEMMs split well across cores.
    """
    prev = set_threads(n) if n and n > 0 else None
    try:
        yield
    finally:
        if prev is not None:
            set_threads(prev)


def encoder_threads() -> Optional[int]:
    """BLAS threads for the encoder: ``MLX_BALDWHISPER_ENCODER_THREADS``, else the user's
    OPENBLAS_NUM_THREADS-style setting stands (None), else up to 2 cores (measured best
    on a 2-core machine; see benchmarks/RESULTS.md)."""
    env = os.environ.get("MLX_BALDWHISPER_ENCODER_THREADS", "").strip()
    if env:
        return int(env)
    if any(v in os.environ for v in _THREAD_VARS):
        return None
    return min(os.cpu_count() or 1, 2)
