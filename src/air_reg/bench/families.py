"""Families of 2-D pairs with known fields, from images inside installed wheels: the measurement
bed of refinement (issue 31) and of zero-shot models (issue 32).

    from air_reg.bench.families import family
    batches = family("large", 18, size=(160, 208), seed=0, split="test")

A batch is a dict: ``fixed``, ``moving`` (B, 1, H, W) float32 in [0, 1]; ``flow`` (B, 2, H, W)
the true field in pixels on the fixed grid (channel 0 rows); ``moving_in_fixed_contrast``: the
moving image before any contrast change (the same tensor as ``moving`` outside the contrast
family), with ``fixed = warp(moving_in_fixed_contrast, flow)`` exactly (``air_reg.warp``:
``fixed(p) = moving(p + flow(p))``, border padding); ``inside`` (B, 1, H, W) bool: p + flow(p)
lands inside the moving image; ``edges``: ``inside`` and the fixed image's gradient magnitude in
its top 20 % (where an error is visible); ``source`` and ``contrast``: one string per pair.

Families (``FAMILIES``), each field folding-free (``air_reg.data.synthetic.multiscale_flows``,
a 4 x 4 plus 8 x 8 B-spline velocity, scaling and squaring):

- ``small``: largest displacement uniform in 2-3 px (a nearly aligned pair);
- ``large``: an affine part (rotation +-10 deg, scale 0.9-1.1, shear +-0.05, shift +-8 px per
  axis, about the centre) after a smooth part of 4-6 px (``synthetic.affine_after``);
- ``contrast``: a smooth field of 3-5 px and a contrast change of the moving image: MNI152
  slices rendered T2-like from the template's grey/white-matter maps (CSF bright, grey mid,
  white dark, background black: not a monotonic function of T1), the other images inverted
  with a gamma, or folded (``|x - m|`` at the m that leaves it uncorrelated with x, with a
  gamma), half each.

Sources and split (``SOURCES``: choices are made on ``tune``, figures reported on ``test``):
scikit-image's bundled images (the files in its wheel, read directly: never ``pooch``), as
luminance, a random crop of 60-100 % of the largest window of the target aspect, resized; and
nilearn's MNI152 2009a T1 template, axial slices (``air_reg.data.brain``'s reading) fitted
inside the target size with zero padding. ``tune``: camera, coffee (photographs), coins,
moon, cell (microscopy), brick, gravel (textures), text, and MNI152 slices z 77-86 (the brain
benchmark's validation block); ``test``: astronaut, chelsea (photographs), hubble_deep_field
(astronomy), ihc (histology), retina, grass (texture), phantom (Shepp-Logan), page, and MNI152
slices z 47-56 and 97-106 (its test blocks, 10 or more slices from the tuning block).
Histology, retina, astronomy and the phantom are domains never seen in tuning. Pair ``i`` uses
source ``i mod 9`` (MNI152 first) and its own generator: the first k pairs of any ``n`` are
the same pairs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from air_reg.data import brain
from air_reg.data.synthetic import affine_after, known_flows, multiscale_flows, random_affines
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.models.components.spatial_transformer import warp

FAMILIES = ("small", "large", "contrast")
SPLITS = ("tune", "test")
SIZE = (160, 208)  # (H, W)
MNI = "mni152"
SKIMAGE = {
    "tune": ("camera", "coffee", "coins", "moon", "cell", "brick", "gravel", "text"),
    "test": ("astronaut", "chelsea", "hubble_deep_field", "ihc", "retina", "grass", "phantom",
             "page"),
}  # fmt: skip
SKIMAGE_FILES = {"hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg"}  # else .png
MNI_Z = {"tune": tuple(range(77, 87)), "test": (*range(47, 57), *range(97, 107))}
SOURCES = {s: (MNI, *SKIMAGE[s]) for s in SPLITS}
SMALL_PX, LARGE_PX, CONTRAST_PX = (2.0, 3.0), (4.0, 6.0), (3.0, 5.0)  # largest displacement
CROP = (0.6, 1.0)  # a crop's side, as a fraction of the largest window of the target aspect
EDGE_QUANTILE = 0.8
HINT = 'pip install "air-reg[families]" (scikit-image and nilearn)'
LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage.color.rgb2gray's


class MissingExtraError(brain.MissingExtraError):
    """scikit-image or nilearn, whose bundled images the families read, is not installed."""


# -- sources: (H, W) float32 images at their own size, read once a process --------------------
@functools.cache
def skimage_image(name: str) -> np.ndarray:
    """scikit-image's bundled ``name`` as luminance in [0, 1], read from the file in its wheel."""
    try:
        import skimage.data
    except ImportError:
        raise MissingExtraError(
            f"the benchmark families read scikit-image's images: {HINT}"
        ) from None
    from PIL import Image

    path = Path(os.path.dirname(skimage.data.__file__)) / SKIMAGE_FILES.get(name, f"{name}.png")
    if not path.is_file():
        raise MissingExtraError(f"scikit-image lacks its bundled {path.name}: {HINT}")
    with Image.open(path) as im:
        x = np.asarray(im)
    scale = np.iinfo(x.dtype).max if x.dtype.kind in "ui" else 1.0
    x = x.astype(np.float32) / scale
    return x[..., :3] @ LUMINANCE if x.ndim == 3 else x


@functools.lru_cache(maxsize=1)
def mni_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 T1, grey- and white-matter volumes from nilearn's wheel, each in [0, 1]."""
    try:
        files = brain.nilearn_files()
    except brain.MissingExtraError:
        raise MissingExtraError(f"the benchmark families read nilearn's MNI152: {HINT}") from None
    return tuple(brain.read_volume(files[k]) / 255.0 for k in ("t1", "gm", "wm"))


def mni_slice(z: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice ``z`` (233 x 197) as T1 and as a T2-like rendering of the same anatomy:
    CSF (inside the head, neither grey nor white) 0.95, grey 0.55, white 0.25, air 0."""
    t1, gm, wm = (brain.axial(v, z) for v in mni_volumes())
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * (t1 > 0)
    return t1, (0.95 * csf + 0.55 * gm + 0.25 * wm).astype(np.float32)


# -- pairs -------------------------------------------------------------------------------------
def stretch(x: torch.Tensor) -> torch.Tensor:
    """Percentiles 0.5 and 99.5 of ``x`` to 0 and 1, clipped: one scale for every source."""
    lo, hi = torch.quantile(x.flatten(), torch.tensor([0.005, 0.995]))
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def crop(image: np.ndarray, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A random window of the target aspect, ``CROP`` of the largest one, resized: (1, H, W)."""
    h, w = image.shape
    side = min(h, w * size[0] / size[1])  # the largest window's height
    f = CROP[0] + (CROP[1] - CROP[0]) * torch.rand((), generator=g).item()
    wh, ww = max(2, round(f * side)), max(2, round(f * side * size[1] / size[0]))
    top = int(torch.randint(h - wh + 1, (), generator=g))
    left = int(torch.randint(w - ww + 1, (), generator=g))
    window = torch.from_numpy(np.ascontiguousarray(image[top : top + wh, left : left + ww]))
    return stretch(resize(window[None, None], size)[0])


def fit(images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """(h, w) images fitted whole inside ``size``, centred, zero padding: (len, H, W)."""
    h, w = images[0].shape
    s = min(size[0] / h, size[1] / w)
    inner = (max(2, round(h * s)), max(2, round(w * s)))
    x = resize(torch.from_numpy(np.stack(images))[None], inner)[0]  # clamped to [0, 1]
    top, left = (size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2
    return F.pad(x, (left, size[1] - inner[1] - left, top, size[0] - inner[0] - top))


def fold_point(x: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The intensity m at which ``|x - m|`` is uncorrelated with ``x`` (bisection: the
    correlation falls from +1 at m = min to -1 at m = max), whatever the histogram's skew."""
    lo, hi = x.min(), x.max()
    xc = x.flatten() - x.mean()
    for _ in range(iterations):
        m = (lo + hi) / 2
        y = (x.flatten() - m).abs()
        if (xc * (y - y.mean())).sum() > 0:
            lo = m
        else:
            hi = m
    return (lo + hi) / 2


def remap(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, str]:
    """A non-monotonic contrast change of a [0, 1] image: inverted (``1 - x``), or folded
    (``|x - m|`` rescaled, m from ``fold_point``: the result is uncorrelated with ``x``), then a
    gamma in [0.5, 2]."""
    gamma = float(torch.empty(()).uniform_(-0.69, 0.69, generator=g).exp())
    if torch.rand((), generator=g).item() < 0.5:
        return (1 - x).clamp(0, 1) ** gamma, "inverted"
    folded = (x - fold_point(x)).abs()
    return (folded / folded.max().clamp_min(1e-6)) ** gamma, "folded"


def pair_seed(seed: int, name: str, split: str, i: int) -> int:
    return ((seed * 7919 + FAMILIES.index(name)) * 104729 + SPLITS.index(split)) * 1_000_003 + i


def make_pair(
    name: str, split: str, i: int, size: tuple[int, int], seed: int, shift_px: float | None = None
) -> dict:
    """Pair ``i`` of family ``name``: images (1, H, W), flow (2, H, W), source and contrast;
    ``shift_px``: the large family's affine shift range (+- px per axis; None: 8)."""
    g = torch.Generator().manual_seed(pair_seed(seed, name, split, i))
    source = SOURCES[split][i % len(SOURCES[split])]
    if source == MNI:
        z = MNI_Z[split][int(torch.randint(len(MNI_Z[split]), (), generator=g))]
        t1, t2 = fit(list(mni_slice(z)), size)[:, None]  # (1, H, W) each
        source = f"{MNI}:z{z:03d}"
    else:
        t1 = crop(skimage_image(source), size, g)
        source = f"skimage:{source}"
    u = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(1, generator=g)  # noqa: E731
    px = {"small": SMALL_PX, "large": LARGE_PX, "contrast": CONTRAST_PX}[name]
    flow = multiscale_flows(1, size, g, u(px))
    if name == "large":
        shift = {} if shift_px is None else {"shift_px": float(shift_px)}
        flow = affine_after(flow, *random_affines(1, g, **shift))
    moving, contrast = t1, "none"
    if name == "contrast":
        moving, contrast = (t2, "t2-like") if source.startswith(MNI) else remap(t1, g)
    return {"moving": moving, "same": t1, "flow": flow[0], "source": source,
            "contrast": contrast}  # fmt: skip


def mni_known(
    split: str, g: torch.Generator, size: tuple[int, int] = (233, 197), max_px: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving, true flow) of every MNI152 T1 axial slice of ``split`` (``MNI_Z``),
    fitted to ``size``, each the moving image of a pair whose fixed image is it warped by a
    smooth ``known_flows`` field of at most ``max_px`` (drawn from ``g``)."""
    _check_split(split)
    return _under_known(torch.stack([fit(list(mni_slice(z)), size)[0:1] for z in MNI_Z[split]]),
                        g, max_px)  # fmt: skip


def skimage_known(
    split: str, g: torch.Generator, size: tuple[int, int] = (512, 512), max_px: float = 8.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving, true flow) of every scikit-image source of ``split`` (``SKIMAGE``), a
    random crop (``crop``) resized to ``size``, each the moving image of a pair whose fixed image
    is it warped by a smooth ``known_flows`` field of at most ``max_px`` (crops and fields
    drawn from ``g``, in that order)."""
    _check_split(split)
    return _under_known(torch.stack([crop(skimage_image(n), size, g) for n in SKIMAGE[split]]),
                        g, max_px)  # fmt: skip


def _under_known(moving: torch.Tensor, g: torch.Generator, max_px: float):
    """(fixed, moving, flow): ``moving`` (B, 1, H, W) warped by ``known_flows`` from ``g``."""
    flow = known_flows(len(moving), tuple(moving.shape[2:]), g, max_px=max_px)
    return warp(moving, flow), moving, flow


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose 'tune' (for choices) or 'test'")


def masks(fixed: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, edges) (B, 1, H, W) bool: p + flow(p) inside the image; and the fixed image's
    gradient magnitude in its top ``1 - EDGE_QUANTILE`` there."""
    h, w = fixed.shape[-2:]
    rows = torch.arange(h, dtype=flow.dtype).view(1, h, 1) + flow[:, 0]
    cols = torch.arange(w, dtype=flow.dtype).view(1, 1, w) + flow[:, 1]
    inside = ((rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1))[:, None]
    gy, gx = torch.gradient(fixed, dim=(2, 3))
    grad = (gy.square() + gx.square()).sqrt().flatten(1)  # (B, H * W)
    cut = torch.quantile(grad, EDGE_QUANTILE, dim=1).view(-1, 1, 1, 1)
    return inside, inside & (grad.view_as(fixed) >= cut) & (grad.view_as(fixed) > 0)


def family(
    name: str,
    n: int,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
    *,
    split: str = "test",
    batch_size: int | None = None,
    shift_px: float | None = None,
) -> list[dict]:
    """The first ``n`` pairs of family ``name`` on ``split``'s sources, in batches of
    ``batch_size`` (default: one batch); the module docstring gives the keys. Seeded: the same
    arguments give the same tensors in any process. ``shift_px``: the large family's shifts
    (+- px per axis) instead of its 8 (motions beyond the benchmark's, e.g. to see where a
    local window stops reaching)."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; choose one of {FAMILIES}")
    _check_split(split)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 16 or n < 1:
        raise ConfigError(f"family: need n >= 1 pairs of size (H, W) >= 16, got {n}, {size}")
    pairs = [make_pair(name, split, i, size, seed, shift_px) for i in range(n)]
    batches = []
    for start in range(0, n, batch_size or n):
        chunk = pairs[start : start + (batch_size or n)]
        same = torch.stack([p["same"] for p in chunk])  # (B, 1, H, W)
        flow = torch.stack([p["flow"] for p in chunk])  # (B, 2, H, W)
        fixed = warp(same, flow)
        inside, edges = masks(fixed, flow)
        moving = torch.stack([p["moving"] for p in chunk])
        batches.append({
            "fixed": fixed, "moving": moving if name == "contrast" else same, "flow": flow,
            "moving_in_fixed_contrast": same, "inside": inside, "edges": edges,
            "source": [p["source"] for p in chunk], "contrast": [p["contrast"] for p in chunk],
            "family": name, "split": split,
        })  # fmt: skip
    return batches
