"""Make MLX's CPU matmuls use an optimised BLAS on Linux.

The ``mlx-cpu`` wheel links the reference Netlib BLAS (sgemm ~30-50x slower than OpenBLAS).
libmlx.so resolves ``cblas_sgemm`` (and LAPACK's ``*_`` routines) through the global symbol
scope, so an optimised BLAS loaded with RTLD_GLOBAL *before* ``import mlx.core`` interposes.
Afterwards it is too late for that (Python loads extensions RTLD_NOW: libmlx's imports are bound
at import), so when mlx.core came first libmlx's bound import slots are re-pointed instead.
Env: ``MLX_BALDWHISPER_BLAS=reference`` opts out, ``=/path/libblas.so`` picks a library.
BLAS threads default to 1 unless OPENBLAS_NUM_THREADS/MKL_NUM_THREADS/OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import mmap
import os
import platform
import struct
import sys
import tempfile
import warnings
from typing import Iterator, Optional

log = logging.getLogger("mlx_baldwhisper")
ENV_VAR = "MLX_BALDWHISPER_BLAS"
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
_result: Optional[str] = None
_handles: list[ctypes.CDLL] = []  # keep loaded libraries alive
_threads_override: Optional[int] = None  # cpu_threads(): the CLI's --threads
# ELF machine -> relocation types whose slot holds a plain symbol address (GLOB_DAT, JUMP_SLOT)
_ADDRESS_RELOCS = {62: (6, 7), 183: (1025, 1026)}  # x86-64, aarch64
_REFERENCE_LIBS = ("libblas", "libcblas", "liblapack")


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
        # encoder window 0.97 -> 0.69 s with the CPU backend's 2-thread kernels; no gain without).
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
    late = "mlx.core" in sys.modules
    for path in ([choice] if choice else []) + candidates():
        desc = _try(path, explicit=path == choice)
        if desc:
            return _adopt_late(path, desc) if late else _adopted(path, desc)
    log.warning("BLAS: no optimised BLAS found; MLX uses the reference BLAS and decoding will "
                "be very slow. Fix: pip install ngsolve-openblas, or apt install libopenblas0")
    return "reference"


def _adopted(path: str, desc: str, how: str = "") -> str:
    """Log the one INFO line naming the BLAS in use."""
    log.info("BLAS: %s (%s%s)", os.path.realpath(path) if "/" in path else path, desc, how)
    return path


def _adopt_late(path: str, desc: str) -> str:
    """mlx.core was imported first: re-bind libmlx to the library just loaded, else say how to fix."""
    try:
        n = _rebind_mlx(_handles[-1])
    except Exception as e:  # unknown layout, read-only slots, no /proc: warn, never raise
        preload = f", or start Python with LD_PRELOAD={path}" if len(_handles) == 1 else ""
        warnings.warn(
            f"mlx.core was imported before mlx_baldwhisper, so MLX keeps its reference BLAS "
            f"(matmuls 30-65x slower) and re-binding it failed ({e}). Fix: import "
            f"mlx_baldwhisper before mlx.core, or run the mlx_baldwhisper command{preload}.",
            RuntimeWarning)
        return "reference"
    return _adopted(path, desc, f"; {n} libmlx imports re-bound, mlx.core was imported first")


def _maps() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, file) of each mapping of this process."""
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(a, 16) for a in parts[0].split("-"))
            rows.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return rows


def _address_slots(path: str) -> Iterator[tuple[str, int]]:
    """(symbol, slot offset) of each import of an ELF64 library whose slot holds an address."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:6] != b"\x7fELF\x02\x01":
            raise OSError(f"{path} is not a little-endian ELF64 library")
        (machine,) = struct.unpack_from("<H", m, 0x12)
        if machine not in _ADDRESS_RELOCS:
            raise OSError(f"unsupported ELF machine {machine}")
        (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", m, 0x28), struct.unpack_from("<HH", m, 0x3A)
        # section header: name, type, flags, addr, offset, size, link, info, align, entsize
        secs = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize) for i in range(shnum)]
        for _, kind, _, _, off, size, link, *_ in secs:
            if kind != 4:  # SHT_RELA
                continue
            symtab, strtab = secs[link][4], secs[secs[link][6]][4]
            for r_offset, r_info, _ in struct.iter_unpack("<QQq", m[off:off + size]):
                if r_info & 0xFFFFFFFF in _ADDRESS_RELOCS[machine]:
                    name = strtab + struct.unpack_from("<I", m, symtab + (r_info >> 32) * 24)[0]
                    yield m[name:m.find(b"\0", name)].decode(), r_offset


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def _owner(address: int, libc: ctypes.CDLL) -> str:
    """File name of the library that holds ``address`` ("" if none)."""
    info = _DlInfo()
    if not address or not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.fname:
        return ""
    return os.path.basename(info.fname.decode())


def _rebind_mlx(lib: ctypes.CDLL) -> int:
    """Re-point libmlx's imports that are bound to the reference BLAS/LAPACK at ``lib``'s
    functions (what loading ``lib`` first would have done); returns how many were re-bound.

    Only slots in writable libmlx pages are written (the wheel's PLT slots are: partial RELRO).
    """
    maps = _maps()
    path = next((p for *_, p in maps if os.path.basename(p) == "libmlx.so"), None)
    if path is None:
        raise OSError("libmlx.so is not loaded")
    libc = ctypes.CDLL(None)
    link_map = ctypes.c_void_p()
    handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)._handle
    if libc.dlinfo(ctypes.c_void_p(handle), 2, ctypes.byref(link_map)) != 0:  # RTLD_DI_LINKMAP
        raise OSError("dlinfo failed on libmlx.so")
    base = ctypes.c_size_t.from_address(link_map.value).value  # link_map.l_addr
    mapped = [(lo, hi, "w" in perms) for lo, hi, perms, p in maps if p == path]
    todo = []
    for name, offset in _address_slots(path):
        slot = base + offset
        where = next((w for lo, hi, w in mapped if lo <= slot <= hi - 8), None)
        if where is None:
            raise OSError(f"libmlx.so slot for {name} is not mapped")
        bound = ctypes.c_void_p.from_address(slot)
        if not (_owner(bound.value or 0, libc).startswith(_REFERENCE_LIBS) and hasattr(lib, name)):
            continue
        if not where:
            raise OSError(f"libmlx.so's slot for {name} is read-only")
        todo.append((bound, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value))
    for bound, address in todo:
        bound.value = address
    return len(todo)


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


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """Use ``n`` threads for the encoder (its BLAS GEMMs and the CPU backend's numpy kernel pool)
    inside the block, over any env setting: the CLI's ``--threads``. 0/None: the default."""
    global _threads_override
    prev, _threads_override = _threads_override, (n or None)
    try:
        yield
    finally:
        _threads_override = prev


def encoder_threads() -> Optional[int]:
    """BLAS threads for the encoder: :func:`cpu_threads`, else ``MLX_BALDWHISPER_ENCODER_THREADS``,
    else the user's OPENBLAS_NUM_THREADS-style setting stands (None), else up to 2 cores
    (measured best on a 2-core machine; see benchmarks/RESULTS.md)."""
    if _threads_override:
        return _threads_override
    env = os.environ.get("MLX_BALDWHISPER_ENCODER_THREADS", "").strip()
    if env:
        return int(env)
    if any(v in os.environ for v in _THREAD_VARS):
        return None
    return min(os.cpu_count() or 1, 2)
