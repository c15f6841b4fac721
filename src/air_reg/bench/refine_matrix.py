"""The refinement-speed matrix of issue #31 (``experiments/refine_matrix.py``): model-free
refinement (MSE and MI) one pair a call and batched, beside ANTs SyN and SimpleITK Demons,
at 28 x 28, 233 x 197 and 512 x 512, on pairs with known fields, in one interleaved run.

Pairs (``make_pairs``): a source image is the moving image; the fixed one is it warped by a
known smooth diffeomorphism (``air_reg.data.synthetic.known_flows``, largest displacement
``Size.max_px``). Sources: MNIST test digits (28 x 28), MNI152 T1 axial test slices of
``air_reg.bench.families`` (233 x 197), scikit-image's bundled test images of the families,
a random crop resized (512 x 512). Family ``same``: ``fixed = warp(moving, flow)``; family
``contrast``: ``fixed = warp(C(moving), flow)``, with C the MNI152 slice's T2-like rendering
(``families.mni_slice``), ``families.remap`` for scikit-image (inverted or folded, with a
gamma) and ``1 - x`` with a gamma for digits (folding a near-binary digit leaves a constant).
``same`` and ``contrast`` share the moving images and the fields.

Timing (``run``): per size, one untimed warm-up call per method (on the first family's first
pair); then round r calls every (method, mode) once, the order rotating every round: single
mode on pair r; batched mode (air-reg rows only) on pair r and the next ``Size.batch - 1``
(wrapping) in one call, its per-pair time the call / batch, its EPE pair r's (every row is
scored on the same pairs). A ratio is the median over rounds of the per-round ratio
(``speed.timing.speedup``: measurements seconds apart, on a shared host). All methods run with
the same thread count (torch's, ITK's for ANTs and Demons). ANTs runs twice: with our settings
(``classical.SYN_DEFAULTS``: CC, iterations (100, 70, 50); Mattes MI on ``contrast``) and with
antspyx's own defaults (``ANTSPYX_DEFAULTS``: Mattes, (40, 20, 0), no full-resolution level),
faster and coarser; the issue's 1/10 target is read against both.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from air_reg import metrics as M
from air_reg.bench import families as fam
from air_reg.bench.family_bench import DEMONS, MATTES, STEPS, make_method
from air_reg.bench.speed.timing import speedup
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.data.idx import load_dataset
from air_reg.data.synthetic import known_flows
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.models.components.spatial_transformer import warp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    """One size of the matrix: its source, the fields' peak (px), the batched rows' batch."""

    name: str
    shape: tuple[int, int]  # (H, W)
    source: str  # mnist | mni152 | skimage
    max_px: float
    batch: int


SIZES = (Size("28x28", (28, 28), "mnist", 2.0, 8),
         Size("233x197", (233, 197), "mni152", 5.0, 8),
         Size("512x512", (512, 512), "skimage", 8.0, 4))  # fmt: skip
QUICK_SIZES = (Size("28x28", (28, 28), "mnist", 2.0, 4),
               Size("233x197", (233, 197), "mni152", 5.0, 4),
               Size("128x128", (128, 128), "skimage", 4.0, 4))  # fmt: skip
FAMILIES = ("same", "contrast")
METHODS = ("identity", "refine", "refine_mi", "syn", "syn_quick", "demons")
# antspyx's own defaults (Mattes MI, 32 bins, iterations (40, 20, 0): no full-resolution
# level), the configuration issue #31 timed at 0.2 s a 233 x 197 pair; "syn" is ours
# (classical.SYN_DEFAULTS: CC, (100, 70, 50); Mattes MI on the contrast family)
ANTSPYX_DEFAULTS = {"syn_metric": "mattes", "syn_sampling": 32, "reg_iterations": (40, 20, 0)}
BATCHED = ("refine", "refine_mi")  # the rows also timed batched
SOURCES = ("mnist", "mni152", "skimage")
LABELS = {"identity": "identity", "refine": "refine {steps} (MSE)",
          "refine_mi": "refine {steps} (MI)", "syn": "ANTs SyNOnly",
          "syn_quick": "ANTs SyNOnly, antspyx defaults (Mattes, 40/20/0)",
          "demons": "SimpleITK Demons"}  # fmt: skip
FIELDS = ("size", "family", "method", "label", "mode", "batch", "pairs", "ms", "ms_min",
          "ms_max", "epe", "epe_edges", "x_ants", "x_ants_quick", "x_demons", "x_mse",
          "ms_rounds")  # fmt: skip


# -- pairs -------------------------------------------------------------------------------------
@functools.cache
def mnist_test() -> torch.Tensor:
    """The 10,000 MNIST test digits (10000, 28, 28) in [0, 1] (the repository's idx files)."""
    images, _ = load_dataset("mnist", download=False)
    return images[-10000:].float() / 255.0


def render_contrast(image: torch.Tensor, source: str, g: torch.Generator):
    """A non-monotonic contrast change of a [0, 1] image (any shape): ``(image, name)``;
    digits inverted with a gamma in [0.5, 2], other sources by ``families.remap``."""
    if source != "mnist":
        return fam.remap(image, g)
    gamma = float(torch.empty(()).uniform_(-0.69, 0.69, generator=g).exp())
    return (1 - image).clamp(0, 1) ** gamma, "inverted"


def _source(size: Size, i: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pair i's moving image and its contrast-changed rendering, (1, H, W) each, and a name."""
    if size.source == "mnist":
        k = int(torch.randint(10000, (), generator=g))
        x = resize(mnist_test()[k][None, None], size.shape)[0]
        return x, render_contrast(x, "mnist", g)[0], f"mnist:{k}"
    if size.source == "mni152":
        z = fam.MNI_Z["test"][int(torch.randint(len(fam.MNI_Z["test"]), (), generator=g))]
        t1, t2 = fam.fit(list(fam.mni_slice(z)), size.shape)[:, None]
        return t1, t2, f"mni152:z{z:03d}"
    name = fam.SKIMAGE["test"][i % len(fam.SKIMAGE["test"])]
    x = fam.crop(fam.skimage_image(name), size.shape, g)
    return x, render_contrast(x, "skimage", g)[0], f"skimage:{name}"


def make_pairs(size: Size, family: str, n: int, seed: int = 0) -> dict:
    """``n`` pairs of ``family`` at ``size``: ``fixed``, ``moving`` (n, 1, H, W), ``flow``
    (n, 2, H, W) the true field, ``edges`` (n, 1, H, W) bool (``families.masks``) and
    ``source``; seeded, and the same moving images and fields in both families."""
    if family not in FAMILIES or size.source not in SOURCES:
        raise ConfigError(f"make_pairs: family {family!r} / source {size.source!r}; choose "
                          f"from {FAMILIES} / {SOURCES}")  # fmt: skip
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(size.name.encode()))
    drawn = [_source(size, i, g) for i in range(n)]
    moving = torch.stack([d[0] for d in drawn])
    flow = known_flows(n, size.shape, g, max_px=size.max_px)
    shown = torch.stack([d[1] for d in drawn]) if family == "contrast" else moving
    fixed = warp(shown, flow)
    edges = fam.masks(fixed, flow)[1]
    return {"fixed": fixed, "moving": moving, "flow": flow, "edges": edges,
            "source": [d[2] for d in drawn]}  # fmt: skip


# -- methods -----------------------------------------------------------------------------------
def make_methods(family: str, methods, steps: int, threads: int) -> dict[str, Callable]:
    """``{key: (fixed, moving) -> flow}`` for (B, 1, H, W) pairs; a method whose package is
    missing is left out with a warning. ANTs uses Mattes MI (32 bins) on ``contrast``."""
    out = {}
    for key in methods:
        if key in ("identity", "refine", "refine_mi"):
            out[key] = make_method(key, family, steps)
        elif key == "syn" and has_ants():
            extra = MATTES if family == "contrast" else {}
            out[key] = lambda f, m, e=extra: ants_syn(f, m, transform="SyNOnly",
                                                      num_threads=threads, **e)  # fmt: skip
        elif key == "syn_quick" and has_ants():
            out[key] = lambda f, m: ants_syn(f, m, transform="SyNOnly", num_threads=threads,
                                             **ANTSPYX_DEFAULTS)  # fmt: skip
        elif key == "demons" and has_simpleitk():
            out[key] = lambda f, m: demons(f, m, **DEMONS, num_threads=threads)
        elif key in METHODS:
            log.warning("%s: its package is missing, row left out", key)
        else:
            raise ConfigError(f"unknown method {key!r}; choose from {METHODS}")
    return out


def label_of(key: str, family: str, steps: int = STEPS) -> str:
    """A row's label; ANTs' names its metric."""
    extra = {"syn": " (Mattes MI)" if family == "contrast" else " (CC)"}.get(key, "")
    return LABELS[key].format(steps=steps) + extra


# -- the run -----------------------------------------------------------------------------------
def ratio(times: dict, row, ref) -> float:
    """Median over rounds of times[row] / times[ref] (NaN when either is missing)."""
    if row not in times or ref not in times:
        return math.nan
    return speedup(times, row, ref)


def _epe(flow, pairs: dict, i: int) -> tuple[float, float]:
    """Pair i's EPE (px) over every pixel and over its ``edges``; flow (1, 2, H, W)."""
    target, edges = pairs["flow"][i : i + 1], pairs["edges"][i : i + 1]
    return M.epe(flow, target).item(), M.epe(flow, target, edges).item()


def run_family(size: Size, family: str, pairs: dict, fns: dict, n: int, turn: int = 0):
    """The interleaved rounds of one (size, family): ``{(key, mode): [ms per pair]}`` and
    ``{(key, mode): [(epe, epe_edges)]}`` of pair r in round r, batched or not (the same pairs
    in every row); identity is scored, never timed. ``pairs`` holds n or more pairs."""
    count = len(pairs["fixed"])
    jobs = {(k, "single"): fn for k, fn in fns.items() if k != "identity"}
    jobs |= {(k, "batched"): fns[k] for k in BATCHED if k in fns}
    zero = torch.zeros_like(pairs["flow"][:1])
    scores = {("identity", "-"): [_epe(zero, pairs, i) for i in range(n)]}
    scores = (scores if "identity" in fns else {}) | {j: [] for j in jobs}
    times = {j: [] for j in jobs}
    for r in range(n):
        order = list(jobs)[(turn + r) % len(jobs) :] + list(jobs)[: (turn + r) % len(jobs)]
        for key, mode in order:  # batched: pair r first, then the next ones (wrapping)
            k = [r] if mode == "single" else [(r + j) % count for j in range(size.batch)]
            fixed, moving = pairs["fixed"][k], pairs["moving"][k]
            tic = time.perf_counter()
            with torch.no_grad():
                flow = jobs[key, mode](fixed, moving).detach()
            times[key, mode].append(1000 * (time.perf_counter() - tic) / len(k))
            scores[key, mode].append(_epe(flow[:1], pairs, r))  # pair r, as single
        log.info("%s %s round %d: %s", size.name, family, r,
                 {f"{k}/{m}": round(t[-1]) for (k, m), t in times.items()})  # fmt: skip
    return times, scores


def run(sizes=SIZES, n: int = 8, *, families=FAMILIES, methods=METHODS, steps: int = STEPS,
        seed: int = 0, threads: int | None = None) -> list[dict]:  # fmt: skip
    """The matrix: one row (``FIELDS``) per (size, family, method, mode). ``threads``
    (default: torch's current count) is set for torch, ANTs and Demons alike."""
    if n < 1:
        raise ConfigError(f"refine_matrix.run: n must be >= 1 pairs, got {n}")
    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, turn = [], 0
    try:
        for size in sizes:
            for i, family in enumerate(families):
                pairs = make_pairs(size, family, max(n, size.batch), seed)
                fns = make_methods(family, methods, steps, threads)
                if i == 0:  # warm-up: kernel builds, ITK's threads, first calls at this size
                    for fn in fns.values():
                        fn(pairs["fixed"][:1], pairs["moving"][:1])
                times, scores = run_family(size, family, pairs, fns, n, turn)
                turn += n
                rows += summarise(size, family, times, scores, steps)
    finally:
        torch.set_num_threads(old)
    return rows


def summarise(size: Size, family: str, times: dict, scores: dict, steps: int) -> list[dict]:
    """Table rows of one (size, family): median ms per pair, mean EPE, the ratios."""
    rows = []
    for key, mode in scores:
        t, s = times.get((key, mode), []), scores[key, mode]
        batch = size.batch if mode == "batched" else 1
        edges = [v for _, v in s if v == v]  # NaN: no edge pixel
        rows.append({
            "size": size.name, "family": family, "method": key,
            "label": label_of(key, family, steps), "mode": mode, "batch": batch,
            "pairs": len(s),
            "ms": statistics.median(t) if t else math.nan,
            "ms_min": min(t, default=math.nan), "ms_max": max(t, default=math.nan),
            "epe": sum(e for e, _ in s) / len(s),
            "epe_edges": sum(edges) / len(edges) if edges else math.nan,
            "x_ants": ratio(times, (key, mode), ("syn", "single")),
            "x_ants_quick": ratio(times, (key, mode), ("syn_quick", "single")),
            "x_demons": ratio(times, (key, mode), ("demons", "single")),
            "x_mse": ratio(times, (key, mode), ("refine", mode)) if key == "refine_mi"
                     else math.nan,
            "ms_rounds": ";".join(f"{v:.1f}" for v in t),
        })  # fmt: skip
    return rows


# -- the report --------------------------------------------------------------------------------
def _f(x: float, fmt: str = ".0f") -> str:
    return "-" if x != x else format(x, fmt)


def table(rows: list[dict]) -> str:
    """Markdown: one row per (size, family, method, mode)."""
    lines = ["| size | family | method | mode | ms/pair (median) | min-max | EPE px | "
             "EPE edges px | ÷ ANTs | ÷ ANTs quick | ÷ Demons | MI ÷ MSE | pairs |",
             "|---" * 13 + "|"]  # fmt: skip
    for r in rows:
        mode = f"batched x{r['batch']}" if r["mode"] == "batched" else r["mode"]
        spread = "-" if r["ms"] != r["ms"] else f"{r['ms_min']:.0f}-{r['ms_max']:.0f}"
        lines.append(
            f"| {r['size']} | {r['family']} | {r['label']} | {mode} | {_f(r['ms'])} | "
            f"{spread} | {r['epe']:.3f} | {_f(r['epe_edges'], '.3f')} "
            f"| {_f(r['x_ants'], '.3f')} | {_f(r['x_ants_quick'], '.3f')} "
            f"| {_f(r['x_demons'], '.3f')} | {_f(r['x_mse'], '.2f')} "
            f"| {r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


def _get(rows, size, family, method, mode, col):
    hit = [r[col] for r in rows if (r["size"], r["family"], r["method"], r["mode"]) ==
           (size, family, method, mode)]  # fmt: skip
    return hit[0] if hit else math.nan


# the issue's targets: (what, size, family, method, column, goal)
TARGETS = (
    ("refine MSE ÷ ANTs SyN (CC), same contrast", "233x197", "same", "refine", "x_ants", 0.1),
    ("refine MI ÷ ANTs SyN (Mattes), contrast change", "233x197", "contrast", "refine_mi",
     "x_ants", 0.1),
    ("refine MSE ÷ ANTs SyN (antspyx defaults), same contrast", "233x197", "same", "refine",
     "x_ants_quick", 0.1),
    ("refine MI ÷ ANTs SyN (antspyx defaults), contrast change", "233x197", "contrast",
     "refine_mi", "x_ants_quick", 0.1),
    ("refine MSE ÷ Demons, same contrast", "28x28", "same", "refine", "x_demons", 0.1),
)  # fmt: skip


def targets(rows: list[dict]) -> str:
    """Markdown: the issue's targets as measured (single pair unless batched; ``-``: not run)."""
    lines = ["| target (issue #31) | size | measured | goal | met |", "|---" * 5 + "|"]

    def add(what, size, value, goal=None, fmt=".3f") -> None:
        met = "-" if goal is None or value != value else ("yes" if value <= goal else "no")
        goal = "-" if goal is None else f"<= {goal:g}"
        lines.append(f"| {what} | {size} | {_f(value, fmt)} | {goal} | {met} |")

    for what, size, family, key, col, goal in TARGETS:
        add(what, size, _get(rows, size, family, key, "single", col), goal)
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for size in sizes:
        add("refine MI ÷ MSE, same contrast", size,
            _get(rows, size, "same", "refine_mi", "single", "x_mse"), 2.0, ".2f")  # fmt: skip
    for size, key in [(s, k) for s in sizes for k in BATCHED]:
        one, many = (_get(rows, size, "same", key, m, "ms") for m in ("single", "batched"))
        add(f"{key} batched ms/pair (÷ single-pair ms: {_f(many / one, '.2f')})", size, many,
            fmt=".0f")  # fmt: skip
    return "\n".join(lines) + "\n"
