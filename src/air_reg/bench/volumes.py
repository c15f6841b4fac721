"""The volume benchmark (issue 34, ``experiments/volume_benchmark.py``): nilearn's MNI152 T1 under
known smooth 3-D fields, every method on the same pairs, pair by pair, the order rotating.

    from air_reg.bench.volumes import pair, run
    p = pair("large", 0, mm=2)          # fixed, moving (1, 1, D, H, W), flow (1, 3, D, H, W)

Volumes: the MNI152 2009a T1 (197 x 233 x 189 at 1 mm, our axes (D, H, W) = the file's
(x, y, z)), at ``mm`` mm by ``mm``-cubed averaging (zero-padded to a multiple first), labels 1
grey and 2 white matter (``air_reg.data.brain.label_map`` of the averaged maps), the head mask
T1 > 0. Families (``FAMILIES``): a stationary velocity on 4^3 plus 8^3 B-spline grids,
integrated by scaling and squaring, its largest displacement (mm) ``small`` 2.5-3.5, ``large``
8-10 then an affine part (rotation up to 10 deg about a random axis, scale 0.9-1.1, shear
+-0.05, shift +-8 mm per axis, about the centre), ``contrast`` 2.5-3.5 with a T2-like moving
image (CSF 0.95, grey 0.55, white 0.25, air 0: ``families.mni_slice``'s rendering). The
coefficients are drawn on the coarse grids, so a pair is the same field at every ``mm``.
``fixed = warp(moving_in_fixed_contrast, flow)``; fixed labels and mask are warped (nearest).

Scores per pair and method (``FIELDS``): EPE in mm over the fixed head mask, label Dice (GM,
WM), HD95 in mm (mean of the two), folding % (det J <= 0), seconds of the call and ``peak_mb``:
the process's peak resident memory during the call above its resident memory just before
(``PeakMemory``: glibc's ``malloc_trim`` first, then the kernel's high-water mark reset through
/proc/self/clear_refs; threads and the C++ libraries count, memory mapped before the call and
reused does not).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from air_reg import metrics as M
from air_reg.bench.tables import checkpoint_name
from air_reg.data import brain
from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    identity_grid,
    integrate_velocity,
    resample,
    resize_flow,
    warp,
)

log = logging.getLogger(__name__)
FAMILIES = ("small", "large", "contrast")
PEAK_MM = {"small": (2.5, 3.5), "large": (8.0, 10.0), "contrast": (2.5, 3.5)}
GRIDS = (4, 8)  # B-spline control grids of the velocity (the k-th at std 1 / (k + 1))
AFFINE = {"rotation_deg": 10.0, "scale": 0.1, "shear": 0.05, "shift_mm": 8.0}
STEPS = 50  # refine_steps of the refined rows
DEMONS = {"iterations": 50, "smoothing_sigma": 1.5, "levels": 3}
# Mattes MI (32 bins) as antsRegistrationSyNQuick.sh has it: CC (radius 2) took > 400 s a 2 mm
# pair on our 2 shared cores, Mattes 37 s; shrink 4, 2, 1 with sigmas 2, 1, 0 voxels
SYN = {"syn_metric": "mattes", "syn_sampling": 32, "reg_iterations": (100, 70, 20)}
LABELS = {"identity": "identity", "refine": "air-reg refine {steps}",
          "syn": "ANTs SyN (affine + SyN)", "demons": "SimpleITK Demons, 3 levels"}  # fmt: skip
NET, NET_REFINE = "net", "net+refine"
FIELDS = ("family", "pair", "mm", "shape", "true_peak_mm", "method", "label", "epe_mm",
          "dice_gm", "dice_wm", "hd95_mm", "folding", "seconds", "peak_mb")  # fmt: skip


# -- the template ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def template(mm: int = 2) -> dict:
    """MNI152 at ``mm`` mm: ``t1``, ``t2`` (T2-like), ``labels`` (float 0/1/2), ``mask``
    (bool), each (1, 1, D, H, W); ``spacing`` (mm,) * 3."""
    from air_reg.bench.families import mni_volumes

    if isinstance(mm, bool) or not isinstance(mm, int) or mm < 1:
        raise ConfigError(f"the volume size is a whole number of mm >= 1 (2mm, 1mm), got {mm!r}")
    t1, gm, wm = (torch.from_numpy(v)[None, None] for v in mni_volumes())  # [0, 1]
    if mm > 1:  # mm^3 averages; the zero padding is background
        pads = [p for n in reversed(t1.shape[2:]) for p in (0, -n % mm)]
        t1, gm, wm = (F.avg_pool3d(F.pad(x, pads), mm) for x in (t1, gm, wm))
    csf = (1.0 - gm - wm).clamp(0, 1) * (t1 > 0)
    labels = brain.label_map(t1[0, 0].numpy(), 255 * gm[0, 0].numpy(), 255 * wm[0, 0].numpy())
    return {"t1": t1, "t2": 0.95 * csf + 0.55 * gm + 0.25 * wm, "mask": t1 > 0,
            "labels": torch.from_numpy(labels.astype(np.float32))[None, None],
            "spacing": (float(mm),) * 3}  # fmt: skip


# -- known fields ------------------------------------------------------------------------------
def smooth_field(size, spacing, g: torch.Generator, peak_mm: float) -> torch.Tensor:
    """(1, 3, *size) voxels: a B-spline velocity integrated (7 squarings), the velocity scaled
    twice so that the largest displacement is ``peak_mm`` (within ~1 %)."""
    coarse = [torch.randn(1, 3, n, n, n, generator=g) / (k + 1) for k, n in enumerate(GRIDS)]
    velocity = sum(CoarseToDense(in_size=(n,) * 3, out_size=tuple(size), mode="bspline")(c)
                   for n, c in zip(GRIDS, coarse, strict=True))  # fmt: skip
    mm = torch.tensor(spacing).view(1, 3, 1, 1, 1)
    for _ in range(2):
        flow = integrate_velocity(velocity, 7)
        velocity = velocity * (peak_mm / (flow * mm).norm(dim=1).max().clamp_min(1e-6))
    return integrate_velocity(velocity, 7)


def random_affine(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (3, 3), t (3,) mm): ``AFFINE``'s rotation about a random axis, scale, shear, shift."""
    u = lambda *s: 2 * torch.rand(*s, generator=g, dtype=torch.float64) - 1  # noqa: E731
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm()
    angle = math.radians(AFFINE["rotation_deg"]) * u(())
    k = torch.zeros(3, 3, dtype=torch.float64)  # cross-product matrix: Rodrigues' formula
    k[0, 1], k[0, 2], k[1, 2] = -axis[2], axis[1], -axis[0]
    k = k - k.T
    rot = torch.eye(3, dtype=torch.float64) + angle.sin() * k + (1 - angle.cos()) * k @ k
    upper = torch.eye(3, dtype=torch.float64) * (1 + AFFINE["scale"] * u(()))
    upper[0, 1], upper[0, 2], upper[1, 2] = AFFINE["shear"] * u(3)
    return (rot @ upper).float(), (AFFINE["shift_mm"] * u(3)).float()


def affine_after(flow: torch.Tensor, a: torch.Tensor, t: torch.Tensor, spacing) -> torch.Tensor:
    """p -> T(p + flow(p)) - p in voxels, T(q) = A (q - c) + c + t in mm about the centre c."""
    size = flow.shape[2:]
    mm = torch.tensor(spacing).view(1, 3, 1, 1, 1)
    grid = identity_grid(size)[None]  # (1, 3, D, H, W)
    centre = torch.tensor([(n - 1) / 2 for n in size]).view(1, 3, 1, 1, 1)
    q = (grid + flow - centre) * mm
    moved = torch.einsum("ij,bjdhw->bidhw", a, q) + t.view(1, 3, 1, 1, 1)
    return moved / mm + centre - grid


def pair(name: str, i: int, mm: int = 2, seed: int = 0, crop=None) -> dict:
    """Pair ``i`` of family ``name``: fixed, moving, moving_in_fixed_contrast (1, 1, D, H, W),
    flow (1, 3, D, H, W) voxels, fixed/moving labels, ``mask`` (the fixed head), spacing;
    ``crop``: the central (D, H, W) window only (tests)."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; choose one of {FAMILIES}")
    tpl = template(mm)
    if crop is not None:
        box = tuple(slice((n - c) // 2, (n - c) // 2 + c)
                    for n, c in zip(tpl["t1"].shape[2:], crop, strict=True))  # fmt: skip
        tpl = {k: v[(..., *box)] if torch.is_tensor(v) else v for k, v in tpl.items()}
    g = torch.Generator().manual_seed(((seed * 7919 + FAMILIES.index(name)) * 104729) + i)
    lo, hi = PEAK_MM[name]
    peak = lo + (hi - lo) * torch.rand((), generator=g).item()
    size, spacing = tuple(tpl["t1"].shape[2:]), tpl["spacing"]
    flow = smooth_field(size, spacing, g, peak)
    if name == "large":
        flow = affine_after(flow, *random_affine(g), spacing)
    moving = tpl["t2"] if name == "contrast" else tpl["t1"]
    return {"fixed": warp(tpl["t1"], flow), "moving": moving, "flow": flow,
            "moving_in_fixed_contrast": tpl["t1"], "moving_labels": tpl["labels"],
            "fixed_labels": warp(tpl["labels"], flow, mode="nearest"),
            "mask": warp(tpl["mask"].float(), flow, mode="nearest") > 0.5,
            "spacing": spacing, "family": name, "pair": i, "mm": mm}  # fmt: skip


# -- measuring ---------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """``with PeakMemory() as m: ...``; then ``m.mb``: peak RSS during the block minus RSS
    before it (NaN where /proc/self/clear_refs cannot reset the high-water mark)."""

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(OSError):  # not glibc: no trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel first
        self.mb, self.before = math.nan, _status_kb("VmRSS:")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.ok = True
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc) -> None:
        if self.ok:
            self.mb = (_status_kb("VmHWM:") - self.before) / 1024


def score(flow: torch.Tensor, p: dict) -> dict:
    """One pair's scores (``FIELDS``' metric columns) for an estimated flow (1, 3, D, H, W)."""
    mm = p["spacing"][0]  # isotropic
    dice = M.label_dice(p["fixed_labels"], warp(p["moving_labels"], flow, mode="nearest"),
                        p["moving_labels"], num_labels=2)[0]  # fmt: skip
    hd = M.label_hd95(p["fixed_labels"], warp(p["moving_labels"], flow, mode="nearest"),
                      p["moving_labels"], num_labels=2)  # fmt: skip
    return {"epe_mm": M.epe(flow, p["flow"], p["mask"], p["spacing"]).item(),
            "dice_gm": dice[0].item(), "dice_wm": dice[1].item(),
            "hd95_mm": mm * M.mean_over_labels(hd).item(),
            "folding": M.folding(flow).item()}  # fmt: skip


# -- methods -----------------------------------------------------------------------------------
def make_method(key: str, family: str, steps: int = STEPS) -> Callable | None:
    """``(fixed, moving) -> flow`` for (1, 1, D, H, W) pairs, or None when its package is
    missing: the refinement with an affine stage on ``large`` and MI on ``contrast``; ANTs SyN
    with its affine stage (``SYN``: Mattes MI); Demons (``DEMONS``); learned models
    (``net:<ckpt>`` one-shot at their trained size, ``net+refine:<ckpt>`` refined from it)."""
    import air_reg
    from air_reg import classical

    mi = {"similarity": "mi"} if family == "contrast" else {}
    affine = {"affine_steps": 100} if family == "large" else {}
    if key == "identity":
        return lambda f, m: torch.zeros(len(f), 3, *f.shape[2:])
    if key == "refine":
        return air_reg.load_model(None, refine_steps=steps, **mi, **affine)
    if key == "syn":
        ok = classical.has_ants()
        return (lambda f, m: classical.ants_syn(f, m, transform="SyN", **SYN)) if ok else None
    if key == "demons":
        ok = classical.has_simpleitk()
        return (lambda f, m: classical.demons(f, m, **DEMONS)) if ok else None
    kind, _, source = key.partition(":")
    if kind not in (NET, NET_REFINE) or not source:
        raise ConfigError(f"unknown method {key!r}; choose from {sorted(LABELS)} or net:<ckpt>")
    one_shot = _one_shot(air_reg.load_model(Path(source)))
    if kind == NET:
        return one_shot
    refiner = air_reg.load_model(Path(source), refine_steps=steps, **mi, **affine)
    return lambda f, m: refiner(f, m, init_flow=one_shot(f, m))


def _one_shot(model) -> Callable:
    """A network at its trained (D, H, W) (the pair resampled to it), its flow brought back."""

    def run(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        size = tuple(f.shape[2:]) if model.net_takes_any_size else tuple(model.image_size)
        shrink = any(s < n for s, n in zip(size, f.shape[2:], strict=True))
        with torch.no_grad():
            flow = model(resample(f, size, shrink), resample(m, size, shrink))
        return resize_flow(flow, tuple(f.shape[2:]))

    return run


def label_of(key: str, steps: int = STEPS) -> str:
    kind, _, source = key.partition(":")
    if kind in (NET, NET_REFINE) and source:
        name = checkpoint_name(source)
        return f"{name} one-shot" if kind == NET else f"{name} + refine {steps}"
    return LABELS[key].format(steps=steps)


def run(families, n: int, methods: list[str], *, mm: int = 2, seed: int = 0, steps: int = STEPS,
        crop=None, sink: Callable[[list[dict]], None] | None = None) -> list[dict]:  # fmt: skip
    """Every method on pairs 0..n-1 of each family, one row (``FIELDS``) per pair and method;
    the order rotates every pair. Timed calls use torch's default threads, the rest one; each
    method first runs untimed on a 24^3 crop (kernel builds, ITK's threads)."""
    threads, rows, turn = torch.get_num_threads(), [], 0
    for name in families:
        fns = {k: make_method(k, name, steps) for k in methods}
        for k in [k for k, fn in fns.items() if fn is None]:
            log.warning("%s: its package is missing, row left out", k)
            del fns[k]
        for i in range(n):
            torch.set_num_threads(1)
            p = pair(name, i, mm, seed, crop)
            if i == 0:
                small = tuple(slice((s - 24) // 2, (s - 24) // 2 + 24) if s > 24 else slice(None)
                              for s in p["fixed"].shape[2:])  # fmt: skip
                for fn in fns.values():
                    fn(p["fixed"][(..., *small)], p["moving"][(..., *small)])
            keys = list(fns)[turn % len(fns) :] + list(fns)[: turn % len(fns)]
            turn += 1
            peak_true = (p["flow"] * p["spacing"][0]).norm(dim=1).max().item()
            for k in keys:
                torch.set_num_threads(threads)
                with PeakMemory() as mem:
                    tic = time.perf_counter()
                    flow = fns[k](p["fixed"], p["moving"]).detach().float()
                    seconds = time.perf_counter() - tic
                torch.set_num_threads(1)
                rows.append({"family": name, "pair": i, "mm": mm,
                             "shape": "x".join(map(str, p["fixed"].shape[2:])),
                             "true_peak_mm": peak_true, "method": k, "label": label_of(k, steps),
                             **score(flow, p), "seconds": seconds, "peak_mb": mem.mb})  # fmt: skip
                log.info("%s pair %d %s: EPE %.2f mm, %.1f s", name, i, k, rows[-1]["epe_mm"],
                         seconds)  # fmt: skip
            if sink is not None:
                sink(rows[-len(keys) :])
    torch.set_num_threads(threads)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per family, each method's means over pairs."""
    cols = ("epe_mm", "dice_gm", "dice_wm", "hd95_mm", "folding", "seconds", "peak_mb")
    lines = ["| family | method | EPE mm | Dice GM | Dice WM | HD95 mm | folding % | s/pair | "
             "peak MB | pairs |", "|---" * 10 + "|"]  # fmt: skip
    for f in dict.fromkeys(r["family"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in rows if r["family"] == f):
            p = [r for r in rows if r["family"] == f and r["method"] == m]
            cells = [f"{np.nanmean([r[c] for r in p]):.3g}" for c in cols]
            lines.append(f"| {f} | {p[0]['label']} | " + " | ".join(cells) + f" | {len(p)} |")
    return "\n".join(lines) + "\n"
