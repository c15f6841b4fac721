"""air-reg's CPU attention kernel for small heads (``attn_kernel`` = ``auto`` or ``cpu``).

The paper's AiR has 4 heads of size 4. PyTorch's fused CPU attention is tuned for heads of
64-128; at size 4 a training step spends most of its time there. ``csrc/small_head_attention.cpp``
computes the same exact softmax attention (no approximation; its float32 error against a
float64 reference is no larger than SDPA's) with the head size as a compile-time constant
and SIMD lanes over queries or keys, forward and backward, in O(N) memory, reading the q/k/v
projections in place. It is compiled on first use with the machine's C++ compiler (``$CXX``,
else ``c++``/``g++``/``clang++``; ``-O3 -march=native -fopenmp``, a few seconds) into
``$AIR_REG_CACHE`` (default ``~/.cache/air_reg``), keyed by source, compiler and CPU, and
called through ``ctypes``. Its threads are the OpenMP threads torch already runs (without
OpenMP: Python threads; ctypes releases the GIL). Without a compiler, ``auto`` falls back to
``F.scaled_dot_product_attention`` with one warning.

Scope: CPU float32 tensors, head size 1/2/4/8/16, as many keys as queries, no mask, no
attention dropout, eager mode (under ``torch.compile`` SDPA is used).
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
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

HEAD_SIZES = (1, 2, 4, 8, 16)  # what the kernel takes (attn_kernel=cpu)
AUTO_HEAD_SIZES = (1, 2, 4, 8)  # where attn_kernel=auto uses it: faster than SDPA there
# (experiments/attention_kernels.py; at 16 its accumulators no longer fit in registers)
KERNELS = ("auto", "cpu", "sdpa")  # the ``attn_kernel`` choices
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "small_head_attention.cpp"
FLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared"]
# Tried in this order until one builds: without -march=native the build is portable (slower);
# without -fopenmp (Apple clang) the kernel's threads are Python threads instead.
OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (no compiler, or it failed)."""


# --- building and loading -----------------------------------------------------------------


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
            "or set model.net.attn_kernel=sdpa"
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
            res = _run_compiler([cxx, *FLAGS, *extra, str(SOURCE), "-o", tmp])
            if res.returncode == 0:
                os.replace(tmp, out)
                return
            err = res.stderr.strip()[-800:]
        raise KernelUnavailable(f"{cxx} could not build {SOURCE.name}:\n{err}")
    finally:
        Path(tmp).unlink(missing_ok=True)


class View(ctypes.Structure):
    """A (B, N, H * D) float32 tensor with unit channel stride, as the kernel reads it."""

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
    """The compiled kernel, built on the first call here (raises ``KernelUnavailable``)."""
    if not SOURCE.is_file():
        raise KernelUnavailable(f"kernel source missing: {SOURCE} (reinstall air-reg)")
    cxx = _compiler()
    version = _run_compiler([cxx, "--version"]).stdout
    key = "\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_signature()])
    path = cache_dir() / f"small_head_attention-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.is_file():
        log.info("building the small-head attention kernel with %s (once per machine)", cxx)
        _build(cxx, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"could not load {path}: {e} (delete it to rebuild)") from e
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.air_attn_work_floats.argtypes, lib.air_attn_work_floats.restype = [i32, i32, i32], i64
    for fn in (lib.air_attn_fwd, lib.air_attn_bwd):
        fn.argtypes = [ctypes.POINTER(View), ptr, i64, i32, i32, i32, f32, ptr, i32, i32, i32]
    lib.openmp = bool(lib.air_attn_openmp())  # asked once, not on every call
    return lib


_failure: list[str] = []  # why the kernel cannot be built or loaded here, once it failed


def available() -> bool:
    """Whether the kernel runs here. A failure is logged once and remembered: ``auto`` then
    uses SDPA without trying the compiler again in this process."""
    if _failure:
        return False
    try:
        library()
    except KernelUnavailable as e:
        _failure.append(str(e))
        log.warning("small-head attention kernel unavailable, using SDPA instead: %s", e)
        return False
    return True


# --- calling it -----------------------------------------------------------------------------


def applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> str | None:
    """Why (B, N, heads * d) inputs cannot go through the kernel (None when they can)."""
    if any(t.device.type != "cpu" for t in (q, k, v)):
        return "it runs on CPU tensors only"
    if any(t.dtype != torch.float32 for t in (q, k, v)):
        return "it takes float32 only"
    if q.dim() != 3 or not q.shape == k.shape == v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        return f"q, k, v must be (B, N, heads * d) of one shape (got {shapes})"
    if q.shape[-1] % heads or q.shape[-1] // heads not in HEAD_SIZES:
        return f"head size {q.shape[-1]} / {heads} is not one of {HEAD_SIZES}"
    if torch.compiler.is_compiling():
        return "torch.compile traces SDPA instead"
    return None


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool): no-OpenMP builds


def _launch(fn, views: ctypes.Array, lse: torch.Tensor, heads: int, d: int, backward: bool):
    """Run kernel ``fn`` over all (batch x head) slices on ``torch.get_num_threads()`` threads."""
    global _pool
    lib = library()
    slices, n = lse.shape
    threads = max(1, min(torch.get_num_threads(), slices))
    work = torch.empty(threads * lib.air_attn_work_floats(n, d, int(backward)))

    def ranges(t0: int, t1: int) -> int:  # threads t0 .. t1 - 1 of `threads`
        args = (slices, n, heads, d, d**-0.5, work.data_ptr(), threads, t0, t1)
        return fn(views, lse.data_ptr(), *args)

    if lib.openmp or threads == 1:
        bad = ranges(0, threads)
    else:
        if _pool is None or _pool[:2] != (os.getpid(), threads):  # new size, or a forked child
            _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, "air-attn"))
        bad = any(_pool[2].map(lambda t: ranges(t, t + 1), range(threads)))
    if bad:
        raise RuntimeError(f"small-head attention kernel rejected head size {d}")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SmallHeadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads):
        q, k, v = (_unit_stride(t.detach()) for t in (q, k, v))
        (b, n, c), d = q.shape, q.shape[-1] // heads
        out, lse = q.new_empty(b, n, c), q.new_empty(b * heads, n)
        _launch(library().air_attn_fwd, View.array(q, k, v, out), lse, heads, d, False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = _unit_stride(grad)  # a name keeps a copy alive: the views hold raw pointers
        grads = [torch.empty_like(out) for _ in range(3)]
        views = View.array(q, k, v, out, grad, *grads)
        _launch(library().air_attn_bwd, views, lse, ctx.heads, q.shape[-1] // ctx.heads, True)
        return (*grads, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` of (B, N, heads * d) tensors -> (B, N, heads * d).

    Head h uses channels h * d .. h * d + d - 1, as ``rearrange(t, "b n (h d) -> b h n d")``.
    Same result as ``F.scaled_dot_product_attention`` on those heads up to float32 rounding.
    Raises ``ValueError`` for inputs it cannot take (see ``applicable``) and
    ``KernelUnavailable`` when it cannot be built here.
    """
    why = applicable(q, k, v, heads)
    if why:
        raise ValueError(f"the small-head attention kernel cannot take these inputs: {why}")
    return _SmallHeadAttention.apply(q, k, v, heads)
