"""Prepare the 2-D brain MRI data of the brain experiment from files inside PyPI wheels.

    python -m air_reg.data.brain                       # -> data/brain_mni152/
    python -m air_reg.data.brain --out /tmp/brain      # elsewhere (then AIR_REG_BRAIN=...)

Needs the ``brain`` extra (``pip install "air-reg[brain]"``: nilearn). Nothing is downloaded:
the images come from nilearn's wheel (the MNI152 2009a symmetric T1 template and its
grey/white-matter probability maps, 197 x 233 x 189 voxels of 1 mm, values 0..255,
skull-stripped) and matplotlib's wheel (one sagittal MRI slice, ``s1045.ima.gz``).
The output is deterministic (same files, same bytes, for the same nilearn data files):

    <out>/slices/zNNN.npy          axial slice NNN (voxel index along z; MNI z = NNN - 72 mm),
                                   np.rot90(t1[:, :, NNN]): 233 x 197, anterior at the top,
                                   float32 in [0, 1] (t1 / 255: one scale for every slice)
    <out>/slices/labels/zNNN.png   its label map, uint8: 0 background/CSF, 1 grey, 2 white
                                   matter (argmax of 1 - gm - wm, gm, wm; 0 where t1 == 0)
    <out>/slices/pairs.csv         fixed,moving,split,dz: slices 2..6 apart, both directions;
                                   split by blocks of 10 consecutive slices (block b: test if
                                   b % 5 == 2, val if b % 10 == 5, else train), a pair only
                                   within one split: train and test slices never meet
    <out>/extra/s1045.npy (.png)   matplotlib's 256 x 256 sagittal head slice (big-endian
                                   uint16, values 0..215) in [0, 1]: a second real image,
                                   never used for training
    <out>/meta.json                sources (sha256), slice range, counts
    <out>/.gitignore               "*": the folder is regenerated, never committed

Train on it with ``python -m air_reg.train experiment=brain_mapt`` (or ``brain_dirnet``,
``brain_air_unet``, ``brain_voxelmorph``);
the configs read ``data.path=${AIR_REG_BRAIN:-data/brain_mni152}/slices`` with
``data.normalize=none`` (the slices are already on one [0, 1] scale). A figure of a few slices
with their label overlays goes to experiments/results/brain/slices.png when run from a source
checkout (``--figure PATH``; ``--figure ''``: none).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from air_reg.errors import DataError, UserError

MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MNI_SHAPE = (197, 233, 189)
MPL_SLICE = "s1045.ima.gz"
BLOCK = 10  # consecutive slices per split block
PAIR_GAPS = range(2, 7)  # |z_fixed - z_moving| in 2..6
LABELS = {0: "background/CSF", 1: "grey matter", 2: "white matter"}
COMMAND = "python -m air_reg.data.brain"
FIGURE = Path("experiments/results/brain/slices.png")  # in a source checkout, run from its root


class MissingExtraError(UserError, ImportError):
    """An optional package the brain data builder needs is not installed."""


def nilearn_files() -> dict[str, Path]:
    """The template's T1, GM and WM files inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError:
        raise MissingExtraError(
            f"{COMMAND} needs nilearn's bundled MNI152 template: pip install 'air-reg[brain]'"
        ) from None
    folder = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    files = {k: folder / MNI.format(k) for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise MissingExtraError(
            f"nilearn {nilearn.__version__} lacks {', '.join(missing)}; "
            f"pip install --upgrade nilearn"
        )
    return files


def matplotlib_file() -> Path:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(
            f"{COMMAND} needs matplotlib's sample MRI slice: pip install matplotlib"
        ) from None
    path = Path(os.path.dirname(matplotlib.__file__)) / "mpl-data" / "sample_data" / MPL_SLICE
    if not path.is_file():
        raise DataError(f"{path} is missing; pip install --force-reinstall matplotlib")
    return path


def read_volume(path: Path) -> np.ndarray:
    try:
        import nibabel
    except ImportError:
        raise MissingExtraError(
            f"{COMMAND} reads NIfTI with nibabel: pip install nibabel (nilearn needs it)"
        ) from None
    volume = np.asanyarray(nibabel.load(path).dataobj)
    if volume.shape != MNI_SHAPE:
        raise DataError(f"{path}: expected shape {MNI_SHAPE}, got {volume.shape}")
    return volume.astype(np.float32)


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` as a 233 x 197 image, anterior at the top."""
    return np.ascontiguousarray(np.rot90(volume[:, :, z]))


def label_map(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background/CSF, 1 GM, 2 WM: argmax of (1 - gm - wm, gm, wm); 0 where t1 == 0."""
    p_gm, p_wm = gm / 255.0, wm / 255.0
    labels = np.argmax(np.stack([1.0 - p_gm - p_wm, p_gm, p_wm]), axis=0).astype(np.uint8)
    labels[t1 <= 0] = 0
    return labels


def brain_range(wm: np.ndarray, min_wm_percent: float) -> tuple[int, int]:
    """[first, last] z where white matter (probability >= 0.5) covers > min_wm_percent %."""
    cover = (wm >= 127.5).mean(axis=(0, 1)) * 100
    keep = np.flatnonzero(cover > min_wm_percent)
    if len(keep) == 0:
        raise DataError(f"no slice has more than {min_wm_percent} % white matter")
    return int(keep[0]), int(keep[-1])


def block_split(index: int) -> str:
    """The split of the slice at position ``index`` of the kept range (module docstring)."""
    block = index // BLOCK
    if block % 5 == 2:
        return "test"
    if block % 10 == 5:
        return "val"
    return "train"


def pairs_of(zs: list[int], splits: dict[int, str]) -> list[tuple[int, int, str]]:
    """(fixed z, moving z, split) for slices PAIR_GAPS apart within one split, both orders."""
    out = []
    for zf in zs:
        for zm in zs:
            if abs(zf - zm) in PAIR_GAPS and splits[zf] == splits[zm]:
                out.append((zf, zm, splits[zf]))
    return out


def read_mpl_slice(path: Path) -> np.ndarray:
    """matplotlib's 256 x 256 head slice: big-endian uint16 (values 0..215; read as little-
    endian every value would be 256 times larger, the same picture), scaled to [0, 1]."""
    with gzip.open(path) as fh:
        raw = np.frombuffer(fh.read(), dtype=">u2")
    if raw.size != 256 * 256:
        raise DataError(f"{path}: expected 256 x 256 uint16 pixels, got {raw.size} values")
    image = raw.reshape(256, 256).astype(np.float32)
    return image / image.max()


def save_png16(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)


def save_png8(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(labels.astype(np.uint8), mode="L").save(path, optimize=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def figure(path: Path, t1, labels, zs, splits, extra) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    # the middle slice of blocks 1 (train), 2 (test), 5 (val) and 9 (train)
    picks = [zs[min(len(zs) - 1, b * BLOCK + BLOCK // 2)] for b in (1, 2, 5, 9)]
    colours = ListedColormap([(0, 0, 0, 0), (1.0, 0.55, 0.0, 0.4), (0.1, 0.6, 1.0, 0.4)])
    n = len(picks) + 1
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.4))
    for col, z in enumerate(picks):
        for row in (0, 1):
            axes[row, col].imshow(axial(t1, z), cmap="gray", vmin=0, vmax=255)
        axes[1, col].imshow(labels[z], cmap=colours, vmin=0, vmax=2, interpolation="nearest")
        axes[0, col].set_title(f"z={z} (MNI {z - 72:+d}) {splits[z]}", fontsize=7)
    axes[0, -1].imshow(extra, cmap="gray", vmin=0, vmax=1)
    axes[0, -1].set_title("extra/s1045 (held out)", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(
        "MNI152 2009a axial slices (233 x 197); labels: grey matter orange, white matter blue",
        fontsize=7,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/brain_mni152", help="output folder")
    ap.add_argument(
        "--min-wm-percent",
        type=float,
        default=2.0,
        help="keep slices where white matter (p >= 0.5) covers more than this %% of pixels",
    )
    ap.add_argument(
        "--figure",
        default=None,
        help=f"figure of a few slices with label overlays ('' = none; default {FIGURE} when "
        "that folder exists: a source checkout)",
    )
    args = ap.parse_args(argv)
    if args.figure is None:
        args.figure = str(FIGURE) if FIGURE.parent.is_dir() else ""

    files = nilearn_files()
    mpl = matplotlib_file()
    t1, gm, wm = (read_volume(files[k]) for k in ("t1", "gm", "wm"))
    first, last = brain_range(wm, args.min_wm_percent)
    zs = list(range(first, last + 1))
    splits = {z: block_split(i) for i, z in enumerate(zs)}

    out = Path(args.out)
    img_dir, lab_dir, extra_dir = out / "slices", out / "slices" / "labels", out / "extra"
    for d in (img_dir, lab_dir, extra_dir):
        d.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text(f"# regenerated by {COMMAND}\n*\n")
    stale = {p.name for p in img_dir.glob("z*.npy")} - {f"z{z:03d}.npy" for z in zs}
    for name in sorted(stale):  # an earlier run with another range
        (img_dir / name).unlink()
        (lab_dir / name.replace(".npy", ".png")).unlink(missing_ok=True)

    labels = {}
    for z in zs:
        image = axial(t1, z)
        labels[z] = label_map(image, axial(gm, z), axial(wm, z))
        np.save(img_dir / f"z{z:03d}.npy", (image / 255.0).astype(np.float32))
        save_png8(lab_dir / f"z{z:03d}.png", labels[z])

    pairs = pairs_of(zs, splits)
    with open(img_dir / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["fixed", "moving", "split", "dz"])
        for zf, zm, split in pairs:
            w.writerow([f"z{zf:03d}.npy", f"z{zm:03d}.npy", split, zm - zf])

    extra = read_mpl_slice(mpl)
    np.save(extra_dir / "s1045.npy", extra)
    save_png16(extra_dir / "s1045.png", extra)

    slice_counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    pair_counts = {s: sum(p[2] == s for p in pairs) for s in ("train", "val", "test")}
    blocks = {}
    for i, z in enumerate(zs):
        blocks.setdefault(i // BLOCK, [z, z, splits[z]])[1] = z
    label_frac = np.mean([np.bincount(labels[z].ravel(), minlength=3) for z in zs], axis=0)
    label_frac = label_frac / label_frac.sum()
    meta = {
        "sources": {
            **{f"nilearn/{p.name}": sha256(p) for p in files.values()},
            f"matplotlib/{mpl.name}": sha256(mpl),
        },
        "slice_axis": "z (axial), image = np.rot90(volume[:, :, z]), anterior at the top",
        "z_range": [first, last],
        "mni_z_mm": [first - 72, last - 72],
        "min_wm_percent": args.min_wm_percent,
        "image_shape": list(labels[first].shape),
        "labels": LABELS,
        "label_fractions": [round(float(f), 4) for f in label_frac],
        "block": BLOCK,
        "blocks": [
            {"block": b, "z": [lo, hi], "split": s} for b, (lo, hi, s) in sorted(blocks.items())
        ],
        "slices": slice_counts,
        "pairs": pair_counts,
        "pair_gaps": [min(PAIR_GAPS), max(PAIR_GAPS)],
        "extra": {"file": "extra/s1045.npy", "shape": list(extra.shape), "view": "sagittal"},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.figure:
        figure(Path(args.figure), t1, labels, zs, splits, extra)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    h, w = labels[first].shape
    print(
        f"{out}/: {len(zs)} axial slices z={first}..{last} (MNI {first - 72:+d}..{last - 72:+d})"
    )
    print(f"  {h} x {w} float32 .npy in [0, 1] + label PNGs")
    print(
        "  slices: "
        + ", ".join(f"{n} {s}" for s, n in slice_counts.items())
        + f"; blocks of {BLOCK}: "
        + " ".join(f"{lo}-{hi}:{s[:2]}" for _, (lo, hi, s) in sorted(blocks.items()))
    )
    print(
        f"  pairs ({min(PAIR_GAPS)}..{max(PAIR_GAPS)} slices apart, both directions): "
        + ", ".join(f"{n} {s}" for s, n in pair_counts.items())
        + f" -> {img_dir / 'pairs.csv'}"
    )
    print(
        "  labels (mean fraction of pixels): "
        + ", ".join(f"{LABELS[k]} {label_frac[k]:.3f}" for k in LABELS)
    )
    print(f"  extra/s1045.npy: {extra.shape[0]} x {extra.shape[1]} sagittal slice (held out)")
    print(f"  {size / 2**20:.1f} MiB on disk (git-ignored by {out / '.gitignore'})")
    if args.figure:
        print(f"  figure: {args.figure}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
