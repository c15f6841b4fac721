"""air-reg's C++ CPU kernels: built once per machine, cached, loaded with ``ctypes``.

``csrc/small_head_attention.cpp`` (attention for heads of size 1-16, ``speed.attention``),
``csrc/dropout.cpp`` (counter-based dropout, ``speed.dropout``), ``csrc/warp.cpp`` (the
warps of instance optimisation, ``air_reg.speed.warp``), ``csrc/refine_loop.cpp`` and
``csrc/refine_loop3d.cpp`` (a refinement level's whole Adam loop, 2-D and 3-D,
``speed.refine_loop``), ``csrc/affine_loop.cpp`` (a level of the 2-D affine stage, the same
module) and ``csrc/local_match.cpp`` (AiR-Match's local window match at inference,
``speed.local_match``) are compiled together into one
library with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``;
``-O3 -march=native -fopenmp``, a few seconds) into ``$AIR_REG_CACHE`` (default
``~/.cache/air_reg``), keyed by sources, compiler and CPU. Their threads are the OpenMP threads
torch already runs (the library resolves to torch's libgomp); without OpenMP, Python threads
(ctypes releases the GIL). The build is explicit with ``python -m air_reg.speed build``, else
it happens on first use (logged). Without a compiler, or off Linux (the sources use GCC vector
extensions, which MSVC lacks, and Apple clang has no OpenMP), the callers fall back to torch
ops: ``available()`` says why once. ``calls()`` counts which path each op took.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from air_reg.errors import UserError

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "small_head_attention.cpp", CSRC / "dropout.cpp", CSRC / "warp.cpp",
           CSRC / "refine_loop.cpp", CSRC / "refine_loop3d.cpp",
           CSRC / "affine_loop.cpp", CSRC / "local_match.cpp")  # fmt: skip
# included by the sources: in the cache key
HEADERS = (CSRC / "interp.h", CSRC / "mi.h", CSRC / "team.h", CSRC / "vec.h")
FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared"]
# Tried in this order until one builds: without -march=native the build is portable (slower);
# without -fopenmp (Apple clang) the kernels' threads are Python threads instead.
OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])


class KernelUnavailable(UserError, RuntimeError):
    """The kernels could not be built or loaded here (no compiler, or it failed)."""


def cache_dir() -> Path:
    root = os.environ.get("AIR_REG_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "air_reg"
    )
    return Path(root) / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )
    if not cxx:
        raise KernelUnavailable(
            "no C++ compiler found: install g++ or clang++ (or set CXX), "
            "or set speed.attention=sdpa"
        )
    return cxx


def _run_compiler(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"could not run {cmd[0]}: {e}") from e


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def _build(cxx: str, out: Path) -> None:
    """Compile to a temporary file, then rename: concurrent builders (DDP ranks) are safe."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    except OSError as e:
        raise KernelUnavailable(
            f"cannot write the kernel cache {out.parent} ({e}); "
            "set AIR_REG_CACHE to a writable folder"
        ) from e
    os.close(fd)
    try:
        err = ""
        for extra in OPTIONAL_FLAGS:
            res = _run_compiler([cxx, *FLAGS, *extra, *map(str, SOURCES), "-o", tmp])
            if res.returncode == 0:
                os.replace(tmp, out)
                return
            err = res.stderr.strip()[-800:]
        names = ", ".join(s.name for s in SOURCES)
        raise KernelUnavailable(f"{cxx} could not build {names}:\n{err}")
    finally:
        Path(tmp).unlink(missing_ok=True)


class View(ctypes.Structure):
    """A (B, N, H * D) float32 tensor with unit channel stride, as the attention kernel
    reads it."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("batch_stride", ctypes.c_long),
        ("token_stride", ctypes.c_long),
    ]

    @classmethod
    def array(cls, *tensors: torch.Tensor) -> ctypes.Array:
        return (cls * len(tensors))(*(cls(t.data_ptr(), *t.stride()[:2]) for t in tensors))


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels, built on the first call here (raises ``KernelUnavailable``)."""
    if sys.platform != "linux" and not os.environ.get("AIR_REG_KERNELS_ANY_OS"):
        raise KernelUnavailable(
            f"air-reg's CPU kernels are built on Linux only (this is {sys.platform}); "
            "set AIR_REG_KERNELS_ANY_OS=1 to try anyway"
        )
    missing = [s for s in (*SOURCES, *HEADERS) if not s.is_file()]
    if missing:
        raise KernelUnavailable(f"kernel source missing: {missing[0]} (reinstall air-reg)")
    cxx = _compiler()
    version = _run_compiler([cxx, "--version"]).stdout
    sources = [s.read_text() for s in (*SOURCES, *HEADERS)]
    key = "\n".join([*sources, cxx, version, " ".join(FLAGS), _cpu_signature()])
    path = cache_dir() / f"air_reg_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.is_file():
        log.info("building air-reg's CPU kernels with %s (once per machine)", cxx)
        _build(cxx, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"could not load {path}: {e} (delete it to rebuild)") from e
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    u32, u64 = ctypes.c_uint, ctypes.c_uint64
    lib.air_attn_work_floats.argtypes, lib.air_attn_work_floats.restype = [i32, i32, i32], i64
    for fn in (lib.air_attn_fwd, lib.air_attn_bwd):
        fn.argtypes = [ctypes.POINTER(View), ptr, i64, i32, i32, i32, f32, ptr, i32, i32, i32]
    lib.air_dropout.argtypes = [ptr, ptr, i64, u64, u32, f32, i32, i32, i32, i32]
    lib.air_relu_dropout_bwd.argtypes = [ptr, ptr, ptr, i64, f32, i32, i32, i32]
    lib.air_upwarp_fwd.argtypes = [ptr, ptr, ptr, *[i64] * 6, i32, i32, i32]
    lib.air_upwarp_bwd.argtypes = [ptr, ptr, ptr, ptr, *[i64] * 6, i32, i32, i32]
    lib.air_square_fwd.argtypes = [ptr, ptr, i64, i64, i64, i32, i32, i32]
    lib.air_square_bwd.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, i32, i32]
    lib.air_flow_penalty.argtypes = [ptr, ptr, ptr, i64, i64, i64, f32, f32, f32, i32, i32, i32]
    lib.air_local_match.argtypes = [ptr, ptr, ptr, ptr, *[i64] * 5, f32, f32, i32, i32, i32]
    for fn in (lib.air_dropout, lib.air_relu_dropout_bwd, lib.air_upwarp_fwd, lib.air_upwarp_bwd,
               lib.air_square_fwd, lib.air_square_bwd, lib.air_flow_penalty,
               lib.air_local_match):  # fmt: skip
        fn.restype = None
    lib.openmp = bool(lib.air_attn_openmp())  # asked once, not on every call
    return lib


def why_not(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None when they can): they run on CPU
    float32 tensors, in eager mode (``torch.compile`` traces the torch ops instead)."""
    if any(t.device.type != "cpu" for t in tensors):
        return "it runs on CPU tensors only"
    if any(t.dtype != torch.float32 for t in tensors):
        return "it takes float32 only"
    if torch.compiler.is_compiling():
        return "torch.compile traces the torch ops instead"
    return None


_failure: list[str] = []  # why the kernels cannot be built or loaded here, once it failed


def available() -> bool:
    """Whether the kernels run here. A failure is logged once and remembered: callers then
    use torch ops without trying the compiler again in this process."""
    if _failure:
        return False
    try:
        library()
    except KernelUnavailable as e:
        _failure.append(str(e))
        log.warning(
            "air-reg's CPU kernels unavailable, using torch ops instead "
            "(SDPA attention, torch dropout masks): %s",
            e,
        )
        return False
    return True


def failure() -> str | None:
    """Why the kernels are unavailable here, once ``available()`` found out (else None)."""
    return _failure[0] if _failure else None


_calls: Counter = Counter()  # (op, path) -> calls in this process, for the run record


def count(op: str, path: str) -> None:
    _calls[op, path] += 1


def calls() -> dict[str, dict[str, int]]:
    """How often each op ran on each path in this process: {"attention": {"kernel": n}}."""
    out: dict[str, dict[str, int]] = {}
    for (op, path), n in sorted(_calls.items()):
        out.setdefault(op, {})[path] = n
    return out


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool): no-OpenMP builds


def run_shares(call, threads: int) -> list:
    """Run ``call(t0, t1)`` over the shares ``0 .. threads - 1`` of a kernel's work: one call
    when the library has OpenMP (it runs the shares in parallel), else one call per share on
    Python threads. Returns the calls' results."""
    global _pool
    if library().openmp or threads == 1:
        return [call(0, threads)]
    if _pool is None or _pool[:2] != (os.getpid(), threads):  # new size, or a forked child
        _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, "air-kernels"))
    return list(_pool[2].map(lambda t: call(t, t + 1), range(threads)))
