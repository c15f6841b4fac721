"""Real 2-D brain MRI at its own size: air-reg (one-shot, refined, model-free) vs ANTs SyN and
SimpleITK Demons on the same pairs, in the same run.

    python experiments/brain_data.py     # once: data/brain_mni152/ from nilearn's wheel
    python experiments/brain_mri.py --train 00:00:05:00   # the networks first (5 min each)
    python experiments/brain_mri.py      # -> experiments/results/brain/
    python experiments/brain_mri.py --split val --out /tmp/brain_val   # how settings were chosen

Two kinds of held-out pairs at 233 x 197 (the slices' own size), none seen in training:
- real pairs: axial slices 2..6 apart (``pairs.csv``, split ``test``), scored by label Dice
  (grey and white matter), HD95, MSE and folding;
- known deformations: each test slice (and matplotlib's 256 x 256 head slice, never used for
  tuning) warped by a smooth random diffeomorphism of two kinds (a B-spline velocity and a
  Gaussian-smoothed one), scored by the end-point error on the head (where fixed > 0.02).
air-reg's rows go through ``air_reg.register.register`` -- the code of ``python -m
air_reg.register`` -- on folders of .npy pairs, its time being the computation it reports
(batched, pairs of one size at once); the peers are timed around their calls, pair by pair.
Writes table.md, results.csv, per_pair.csv and brain.png; the load average is logged.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from air_reg import metrics as M
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.config import compose_config
from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity, warp
from air_reg.register import register
from air_reg.train import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AIR_REG_BRAIN", REPO / "data" / "brain_mni152"))
WEIGHTS = REPO / "experiments" / "results" / "brain" / "weights"
log = logging.getLogger("brain_mri")
NETS = ("brain_mapt", "brain_dirnet", "brain_air_unet", "brain_voxelmorph")  # experiment=
HEAD = 0.02  # EPE is averaged where the fixed image is above this (the head, not the air)
MAX_PX = 6.0  # largest displacement of the known deformations
# The peers' settings, chosen on the validation split (docs/protocol.md, "Brain MRI").
DEMONS = {"iterations": 100, "smoothing_sigma": 1.5}
SYN = {}  # air_reg.classical.ants_syn's defaults (SYN_DEFAULTS)


# -- data ----------------------------------------------------------------------------------
def load_split(split: str) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    """The (fixed, moving) slice names of ``split`` and every slice they use."""
    folder = DATA / "slices"
    if not (folder / "pairs.csv").is_file():
        raise SystemExit(f"no {folder}/pairs.csv: run `python experiments/brain_data.py` first")
    with open(folder / "pairs.csv") as fh:
        pairs = [(r["fixed"], r["moving"]) for r in csv.DictReader(fh) if r["split"] == split]
    names = sorted({n for p in pairs for n in p})
    return pairs, {n: np.load(folder / n).astype(np.float32) for n in names}


def labels_of(name: str) -> np.ndarray:
    """The slice's label map (H, W): 0 background/CSF, 1 grey, 2 white matter."""
    return np.asarray(Image.open(DATA / "slices" / "labels" / f"{Path(name).stem}.png"))


def known_flow(kind: str, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A smooth random diffeomorphism (1, 2, H, W), its largest displacement MAX_PX."""
    h, w = size
    if kind == "bspline":  # a 4 x 4 cubic B-spline velocity (the kind tuned on)
        coarse = torch.randn(1, 2, 4, 4, generator=g)
        velocity = CoarseToDense(in_size=(4, 4), out_size=size, mode="bspline")(coarse)
    else:  # white noise smoothed by a Gaussian of 12 px: another family, never tuned on
        noise = torch.randn(1, 2, h, w, generator=g)
        sigma = 12.0
        r = torch.arange(-3 * int(sigma), 3 * int(sigma) + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (r / sigma) ** 2)
        k = k / k.sum()
        pad = len(k) // 2
        velocity = F.conv2d(F.pad(noise, (0, 0, pad, pad), mode="reflect"),
                            k.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)  # fmt: skip
        velocity = F.conv2d(F.pad(velocity, (pad, pad, 0, 0), mode="reflect"),
                            k.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)  # fmt: skip
    flow = integrate_velocity(velocity, 7)
    return flow * (MAX_PX / flow.norm(dim=1).amax())


def extra_image() -> np.ndarray:
    return np.load(DATA / "extra" / "s1045.npy").astype(np.float32)


def train_networks(budget: str) -> None:
    """Train the ``NETS`` (``experiment=brain_*``) one after the other for ``budget`` each;
    ship each best checkpoint (by val/mse) to ``WEIGHTS``."""
    from reproduce import ship  # experiments/ is on the path when this script runs

    for net in NETS:
        run = REPO / "experiments" / "results" / "brain" / "runs" / net
        shutil.rmtree(run, ignore_errors=True)
        cfg = compose_config("train", [f"experiment={net}", f"trainer.max_time={budget}",
                                       "trainer.enable_progress_bar=false",
                                       "callbacks.image_grid=null"], run)  # fmt: skip
        tic = time.time()
        metrics = train(cfg)
        best = sorted((run / "checkpoints").glob("epoch_*.ckpt"))
        WEIGHTS.mkdir(parents=True, exist_ok=True)
        ship(best[-1] if best else run / "checkpoints" / "last.ckpt", WEIGHTS / f"{net}.ckpt")
        tested = {k: round(v, 5) for k, v in metrics.items() if k.startswith("test/")}
        log.info("%s: %.0f s, test %s", net, time.time() - tic, tested)


# -- methods -------------------------------------------------------------------------------
def ours(name: str, overrides: list[str]):
    """A method running ``air_reg.register`` on folders of pairs; returns (flows, seconds)."""

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
    def run(fixed: list[np.ndarray], moving: list[np.ndarray]):
        flows, seconds = [], 0.0
        for f, m in zip(fixed, moving, strict=True):
            ft, mt = torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None]
            tic = time.perf_counter()
            flows.append(fn(ft, mt, **settings)[0].numpy())
            seconds += time.perf_counter() - tic
        return flows, seconds

    return run


def methods(steps: int, overrides: list[str], which: list[str]) -> dict:
    """The rows: identity, the brain networks one-shot and refined, model-free refinement
    (``overrides``: register settings of the refined rows), ANTs SyN and Demons."""
    found = {"identity": peer(lambda f, m: torch.zeros(1, 2, *f.shape[-2:]))}
    refined = [f"refine_steps={steps}", *overrides]
    for net in NETS if "nets" in which else ():
        ckpt = WEIGHTS / f"{net}.ckpt"
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
    rows = []
    for flow, target, f in zip(flows, targets, fixed, strict=True):
        err = (torch.from_numpy(flow) - target[0]).norm(dim=0)  # (H, W)
        head = torch.from_numpy(f) > HEAD
        rows.append({"epe": err[head].mean().item(),
                     "folding": M.folding(torch.from_numpy(flow)[None]).item()})  # fmt: skip
    return rows


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else float("nan")


# -- the run -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--steps", type=int, default=60, help="refine_steps of our rows")
    parser.add_argument("--seeds", type=int, default=2, help="known deformations per slice")
    parser.add_argument("--limit", type=int, default=None, help="first N pairs/slices (smoke)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="register overrides for our refined rows, e.g. refine.lr=0.5",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["nets", "peers"],
        help="rows beside model-free refinement: nets, peers",
    )
    parser.add_argument(
        "--train",
        metavar="DD:HH:MM:SS",
        default=None,
        help="first train the four networks (NETS) for this budget each (00:00:05:00)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "brain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("air_reg").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.train:
        train_networks(args.train)
    load = os.getloadavg()[0]
    log.info("load average %.2f at start, %d cores", load, os.cpu_count())

    pairs, slices = load_split(args.split)
    if args.limit:
        pairs = pairs[: args.limit]
        slices = {n: slices[n] for n in sorted({n for p in pairs for n in p})}
    fixed = [slices[f] for f, _ in pairs]
    moving = [slices[m] for _, m in pairs]
    f_labels = [labels_of(f) for f, _ in pairs]
    m_labels = [labels_of(m) for _, m in pairs]
    known = {}  # set name -> (fixed, moving, targets)
    g = torch.Generator().manual_seed(0)
    sources = {"MNI152": [slices[n] for n in sorted(slices)]}
    if args.split == "test":
        sources["matplotlib s1045"] = [extra_image()] * 4
    for kind in ("bspline", "gaussian"):
        for src, images in sources.items():
            ks = [
                (img, known_flow(kind, img.shape, g)) for img in images for _ in range(args.seeds)
            ]
            moved = [warp(torch.from_numpy(img)[None, None], t)[0, 0].numpy() for img, t in ks]
            known[f"{src}, {kind}"] = (moved, [img for img, _ in ks], [t for _, t in ks])
    log.info("%d real pairs, known sets %s", len(pairs), {k: len(v[0]) for k, v in known.items()})

    results, per_pair = {}, []
    for name, run in methods(args.steps, args.set, args.only).items():
        res = {}
        flows, seconds = run(fixed, moving)
        rows = score_real(flows, fixed, moving, f_labels, m_labels)
        res["real"] = {k: mean(rows, k) for k in rows[0]} | {"ms": 1000 * seconds / len(flows)}
        per_pair += [{"method": name, "set": "real", "pair": i, **r} for i, r in enumerate(rows)]
        first_flows = flows[:1]
        for set_name, (kf, km, targets) in known.items():
            flows, seconds = run(kf, km)
            rows = score_known(flows, targets, kf)
            res[set_name] = {k: mean(rows, k) for k in rows[0]} | {
                "ms": 1000 * seconds / len(flows)
            }
            per_pair += [{"method": name, "set": set_name, "pair": i, **r}
                         for i, r in enumerate(rows)]  # fmt: skip
        res["example"] = first_flows[0]
        results[name] = res
        log.info("%s: %s", name, {k: v for k, v in res.items() if k != "example"})

    write_tables(args.out, results, known, len(pairs), load, args)
    with open(args.out / "per_pair.csv", "w", newline="") as fh:
        keys = list(dict.fromkeys(k for r in per_pair for k in r))
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(per_pair)
    figure(args.out / "brain.png", fixed[0], moving[0], results)
    log.info("wrote %s (load average %.2f at the end)", args.out, os.getloadavg()[0])


def write_tables(out: Path, results: dict, known: dict, n_real: int, load: float, args) -> None:
    names = list(results)
    lines = [
        f"# Brain MRI at 233 x 197 ({args.split} split), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python experiments/brain_mri.py --split {args.split} --steps {args.steps} "
        f"--seeds {args.seeds}`; {os.cpu_count()} CPU cores, load average {load:.2f} at "
        "start. ms/pair: air-reg's rows are the computation `register` reports (batched); "
        "the peers' their calls, pair by pair.",
        "",
        f"## Real pairs (slices 2..6 apart, {n_real} pairs): label Dice, HD95 (px), folding (%)",
        "",
        "| method | Dice GM | Dice WM | Dice (mean) | HD95 | MSE | folding % | ms/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results[n]["real"]
        lines.append(
            f"| {n} | {r['dice_gm']:.4f} | {r['dice_wm']:.4f} | {r['dice']:.4f} | "
            f"{r['hd95']:.3f} | {r['mse']:.5f} | {r['folding']:.3f} | {r['ms']:.1f} |"
        )
    lines += ["", "## Known smooth deformations (max 6 px): end-point error on the head (px)", ""]
    sets = list(known)
    lines.append("| method | " + " | ".join(f"EPE {s} ({len(known[s][0])})" for s in sets)
                 + " | folding % (max) | ms/pair |")  # fmt: skip
    lines.append("|---" * (len(sets) + 3) + "|")
    for n in names:
        r = results[n]
        fold = max(r[s]["folding"] for s in sets)
        ms = sum(r[s]["ms"] for s in sets) / len(sets)
        lines.append(f"| {n} | " + " | ".join(f"{r[s]['epe']:.4f}" for s in sets)
                     + f" | {fold:.3f} | {ms:.1f} |")  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "set", "metric", "value"])
        for n in names:
            for s, r in results[n].items():
                if s != "example":
                    writer.writerows([n, s, k, f"{v:.6g}"] for k, v in r.items())
    print("\n".join(lines))


def figure(path: Path, fixed: np.ndarray, moving: np.ndarray, results: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [n for n in results if n != "identity"]
    fig = Figure(figsize=(2.2 * (len(shown) + 2), 5.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(shown) + 2)
    m_t = torch.from_numpy(moving)[None, None]
    axes[0, 0].imshow(fixed, cmap="gray")
    axes[0, 0].set_title("fixed", fontsize=8)
    axes[0, 1].imshow(moving, cmap="gray")
    axes[0, 1].set_title("moving", fontsize=8)
    axes[1, 1].imshow(np.abs(moving - fixed), cmap="magma", vmin=0, vmax=0.5)
    axes[1, 1].set_title("|moving - fixed|", fontsize=8)
    for j, n in enumerate(shown, start=2):
        flow = torch.from_numpy(results[n]["example"])[None]
        warped = warp(m_t, flow)[0, 0].numpy()
        axes[0, j].imshow(warped, cmap="gray")
        axes[0, j].set_title(n, fontsize=7)
        axes[1, j].imshow(np.abs(warped - fixed), cmap="magma", vmin=0, vmax=0.5)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
