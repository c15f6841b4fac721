"""The brain MRI benchmark (``experiments/brain_mri.py``, ``refine_speed.py``): real 2-D slices
at their own size, air-reg through ``register`` beside ANTs SyN and Demons on the same pairs.

Data: ``python -m air_reg.data.brain`` writes the folder (``data_root``). Two kinds of pairs:
real ones (slices 2..6 apart, ``pairs.csv``), scored by label Dice, HD95, MSE and folding; and
known deformations (``air_reg.data.synthetic.known_flows`` with ``max_px=MAX_PX``), scored by
the end-point error on the head. The report: ``air_reg.bench.brain_report``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from air_reg import metrics as M
from air_reg.bench.training import export, train_for
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.config import compose_config
from air_reg.data.synthetic import KINDS, known_flows
from air_reg.errors import DataError
from air_reg.models.components.spatial_transformer import warp

log = logging.getLogger(__name__)
NETS = ("brain_mapt", "brain_dirnet", "brain_air_unet", "brain_voxelmorph")  # experiment=
HEAD = 0.02  # EPE is averaged where the fixed image is above this (the head, not the air)
MAX_PX = 6.0  # largest displacement of the known deformations
# The peers' settings, chosen on the validation split (docs/protocol.md, "Brain MRI").
DEMONS = {"iterations": 100, "smoothing_sigma": 1.5}
SYN = {}  # air_reg.classical.ants_syn's defaults (SYN_DEFAULTS)


# -- data ----------------------------------------------------------------------------------
def data_root(default: str | Path = "data/brain_mni152") -> Path:
    """The folder ``python -m air_reg.data.brain`` wrote: $AIR_REG_BRAIN, else ``default``."""
    return Path(os.environ.get("AIR_REG_BRAIN", default))


def load_split(root: Path, split: str) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    """The (fixed, moving) slice names of ``split`` and every slice they use, (H, W) float32."""
    folder = root / "slices"
    if not (folder / "pairs.csv").is_file():
        raise DataError(f"no {folder}/pairs.csv: run `python -m air_reg.data.brain` first")
    with open(folder / "pairs.csv") as fh:
        pairs = [(r["fixed"], r["moving"]) for r in csv.DictReader(fh) if r["split"] == split]
    names = sorted({n for p in pairs for n in p})
    return pairs, {n: np.load(folder / n).astype(np.float32) for n in names}


def labels_of(root: Path, name: str) -> np.ndarray:
    """The slice's label map (H, W): 0 background/CSF, 1 grey, 2 white matter."""
    return np.asarray(Image.open(root / "slices" / "labels" / f"{Path(name).stem}.png"))


def extra_image(root: Path) -> np.ndarray:
    """matplotlib's 256 x 256 head slice: never used for training or tuning."""
    return np.load(root / "extra" / "s1045.npy").astype(np.float32)


def known_flow(kind: str, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """One known smooth diffeomorphism (1, 2, H, W) of ``kind`` ("bspline": a 4 x 4 B-spline
    velocity, the kind tuned on; "gaussian": smoothed noise, never tuned on), max MAX_PX."""
    return known_flows(1, size, g, kind=kind, max_px=MAX_PX)


def known_sets(sources: dict[str, list[np.ndarray]], seeds: int, g: torch.Generator) -> dict:
    """``{"<source>, <kind>": (fixed, moving, target flows)}``: each image of each source
    warped by ``seeds`` known deformations of each kind (fixed = the warped image)."""
    known = {}
    for kind in KINDS:
        for src, images in sources.items():
            ks = [(img, known_flow(kind, img.shape, g)) for img in images for _ in range(seeds)]
            moved = [warp(torch.from_numpy(img)[None, None], t)[0, 0].numpy() for img, t in ks]
            known[f"{src}, {kind}"] = (moved, [img for img, _ in ks], [t for _, t in ks])
    return known


def train_networks(budget: str, runs: Path, weights: Path) -> None:
    """Train the ``NETS`` (``experiment=brain_*``) one after the other for ``budget`` each;
    export each best checkpoint (by val/mse) to ``weights/<net>.ckpt``."""
    for net in NETS:
        run = runs / net
        shutil.rmtree(run, ignore_errors=True)
        tic = time.time()
        ckpt = train_for(net, None, budget, run, test=True)
        weights.mkdir(parents=True, exist_ok=True)
        export(ckpt, weights / f"{net}.ckpt")
        metrics = json.loads((run / "metrics.json").read_text())
        tested = {k: round(v, 5) for k, v in metrics.items() if k.startswith("test/")}
        log.info("%s: %.0f s, test %s", net, time.time() - tic, tested)


# -- methods: a method maps lists of (H, W) images to (flows, seconds) -------------------------
def ours(name: str, overrides: list[str]):
    """A method running ``air_reg.register`` (the code of ``python -m air_reg.register``) on
    folders of .npy pairs; its time is the computation ``register`` reports (batched)."""

    from air_reg.register import register  # here: refine_speed needs the data, not register

    def run(fixed: list[np.ndarray], moving: list[np.ndarray]):
        work = Path(tempfile.mkdtemp(prefix="brain_mri_"))
        try:
            for sub, images in (("fixed", fixed), ("moving", moving)):
                (work / sub).mkdir()
                for i, x in enumerate(images):
                    np.save(work / sub / f"p{i:04d}.npy", x)
            cfg = compose_config("register", [f"fixed={work / 'fixed'}",
                                              f"moving={work / 'moving'}", "figures=false",
                                              *overrides], work / "out")  # fmt: skip
            out = register(cfg)
            flows = [np.load(work / "out" / "flow" / f"p{i:04d}.npy") for i in range(len(fixed))]
            return flows, out["seconds"]
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run.__name__ = name
    return run


def peer(fn, **settings):
    """A method calling ``fn(fixed, moving, **settings)`` pair by pair, timed around the call."""

    def run(fixed: list[np.ndarray], moving: list[np.ndarray]):
        flows, seconds = [], 0.0
        for f, m in zip(fixed, moving, strict=True):
            ft, mt = torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None]
            tic = time.perf_counter()
            flows.append(fn(ft, mt, **settings)[0].numpy())
            seconds += time.perf_counter() - tic
        return flows, seconds

    return run


def methods(steps: int, overrides: list[str], which: list[str], weights: Path) -> dict:
    """The rows: identity, the brain networks (``weights/<net>.ckpt``) one-shot and refined,
    model-free refinement (``overrides``: register settings of the refined rows), ANTs SyN
    and Demons (``which``: "nets", "peers")."""
    found = {"identity": peer(lambda f, m: torch.zeros(1, 2, *f.shape[-2:]))}
    refined = [f"refine_steps={steps}", *overrides]
    for net in NETS if "nets" in which else ():
        ckpt = weights / f"{net}.ckpt"
        if not ckpt.is_file():
            log.warning("no %s: train it (experiments/results/brain/TRAINING.md)", ckpt)
            continue
        found[f"{net} one-shot"] = ours(net, [f"ckpt_path={ckpt}"])
        found[f"{net} + refine {steps}"] = ours(net, [f"ckpt_path={ckpt}", *refined])
    found[f"model-free refine {steps}"] = ours("none", ["weights=none", *refined])
    if "peers" not in which:
        return found
    if has_ants():
        found["ANTs SyN"] = peer(ants_syn, **SYN)
    if has_simpleitk():
        found["Demons"] = peer(demons, **DEMONS)
    return found


# -- scoring -------------------------------------------------------------------------------
def score_real(flows, fixed, moving, fixed_labels, moving_labels) -> list[dict]:
    """Per real pair: Dice of grey and white matter and their mean, HD95, MSE, folding %."""
    rows = []
    for flow, f, m, fl, ml in zip(flows, fixed, moving, fixed_labels, moving_labels, strict=True):
        flow_t = torch.from_numpy(flow)[None]
        f_t, m_t = torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None]
        labels = [torch.from_numpy(x.astype(np.float32))[None, None] for x in (fl, ml)]
        per_label, means = M.label_metrics(*labels, flow_t)
        rows.append({
            "dice_gm": per_label[0, 0].item(), "dice_wm": per_label[0, 1].item(),
            "dice": means["dice_labels"].item(), "hd95": means["hd95"].item(),
            "mse": M.mse(warp(m_t, flow_t), f_t).item(),
            "folding": M.folding(flow_t).item(),
        })  # fmt: skip
    return rows


def score_known(flows, targets, fixed) -> list[dict]:
    """Per known pair: the end-point error on the head and folding %."""
    rows = []
    for flow, target, f in zip(flows, targets, fixed, strict=True):
        flow_t = torch.from_numpy(flow)[None]
        head = torch.from_numpy(f)[None, None] > HEAD  # (1, 1, H, W): EPE on the head only
        epe = M.epe(flow_t, target, head)
        rows.append({"epe": epe.item(), "folding": M.folding(flow_t).item()})
    return rows


def mean(rows: list[dict], key: str) -> float:
    """The mean of ``key`` over ``rows``, NaN (no shared label) left out."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else float("nan")
