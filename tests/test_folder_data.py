"""``data=folder``: tiny generated folders of PNGs and NIfTI volumes, with label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from air_reg.data import FolderDataModule
from air_reg.images import ImageError

H, W = 20, 28  # non-square on purpose


def blob(rng: np.random.Generator, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image with a bright rectangle and its label map (0 background, 1 rect, 2 bar)."""
    image, seg = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
    image[y : y + h // 3, x : x + w // 3], seg[y : y + h // 3, x : x + w // 3] = 200, 1
    image[-3:, 2:-2], seg[-3:, 2:-2] = 90, 2
    return image, seg


def png_folder(root: Path, n: int = 10, groups: tuple[str, ...] = ("",), **kw) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        group = groups[i % len(groups)]
        image, seg = blob(rng, **kw)
        (root / group).mkdir(parents=True, exist_ok=True)
        (root / "labels" / group).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / group / f"img{i}.png")
        Image.fromarray(seg).save(root / "labels" / group / f"img{i}.png")
    return root


def nifti_folder(root: Path, depth: int = 6) -> Path:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    pairs = [blob(rng) for _ in range(depth)]
    volume = np.stack([p[0] for p in pairs], axis=-1).astype(np.float32) * 7.5  # not [0, 1]
    labels = np.stack([p[1] for p in pairs], axis=-1).astype(np.int16)
    (root / "labels").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "brain.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels" / "brain.nii.gz")
    return root


def module(root: Path, **kw) -> FolderDataModule:
    dm = FolderDataModule(path=str(root), **kw)
    dm.setup("fit")
    return dm


def test_pngs_with_labels_keep_their_non_square_size_and_travel_with_the_pairs(tmp_path):
    dm = module(png_folder(tmp_path), batch_size=4)
    assert dm.image_size == (H, W)
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == batch["fixed_labels"].shape == (4, 1, H, W)
    assert batch["fixed"].min() >= 0
    assert batch["fixed"].max() == 1  # min-max per image
    assert set(batch["moving_labels"].unique().tolist()) <= {0.0, 1.0, 2.0}
    pool = len(dm.train_pool) + len(dm.val_pool) + len(dm.test_pool)
    assert pool == 10
    assert (batch["fixed"] > 0.5).equal(batch["fixed_labels"] == 1)  # labels match their image


def test_nifti_volume_is_read_as_slices_with_its_label_volume(tmp_path):
    dm = module(nifti_folder(tmp_path), slice_range=[1, 5], train_fraction=0.5)
    data = dm._data
    assert data["names"] == [f"brain.nii.gz#{i}" for i in range(1, 5)]
    assert data["images"].shape == (4, 1, H, W)
    assert data["segs"].shape == (4, 1, H, W)
    assert float(data["images"].max()) == 1.0  # normalised although the volume is not in [0, 1]


def test_percentile_normalisation_clips_outliers(tmp_path):
    root = png_folder(tmp_path, n=4)
    arr = np.array(Image.open(root / "img0.png"))
    arr[0, 0] = 255  # one hot pixel
    Image.fromarray(arr).save(root / "img0.png")
    plain = module(root)._data["images"][0]
    clipped = module(root, normalize="percentile", percentiles=[1, 99])._data["images"][0]
    assert clipped.mean() > plain.mean()  # the outlier no longer sets the scale


@pytest.mark.parametrize("pairing", ["random", "group", "atlas"])
def test_each_pairing_draws_pairs_of_its_kind(tmp_path, pairing):
    root = png_folder(tmp_path, n=12, groups=("a", "b"))
    kw = {"atlas": "a/img0.png"} if pairing == "atlas" else {}
    dm = module(root, pairing=pairing, train_fraction=0.6, val_fraction=0.4, **kw)
    names = dm._data["names"]
    for pairs in (dm.train_pairs(0), dm.val_pairs, dm.test_pairs):
        assert len(pairs) > 0
        assert (pairs[:, 0] != pairs[:, 1]).all()
        if pairing == "group":
            assert all(names[f][0] == names[m][0] for f, m in pairs.tolist())
        if pairing == "atlas":
            assert (pairs[:, 0] == names.index("a/img0.png")).all()
    assert not set(dm.train_pool.tolist()) & set(dm.test_pool.tolist())


def test_groups_from_a_csv(tmp_path):
    root = png_folder(tmp_path / "imgs", n=8)
    csv = tmp_path / "groups.csv"
    csv.write_text("file,group\n" + "".join(f"img{i}.png,{'xy'[i % 2]}\n" for i in range(8)))
    dm = module(root, pairing="group", groups=str(csv), train_fraction=0.75)
    labels = dm.dataset.labels
    for f, m in dm.train_pairs(0).tolist():
        assert labels[f] == labels[m]


def test_explicit_pairs_from_a_csv_with_and_without_splits(tmp_path):
    root = png_folder(tmp_path / "imgs", n=6)
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "fixed,moving,split\nimg0.png,img1.png,train\nimg2.png,img3.png,train\n"
        "img4.png,img5.png,test\nimg1.png,img0.png,val\n"
    )
    dm = module(root, pairing="csv", pairs=str(csv))
    assert dm.test_pairs.tolist() == [[4, 5]]
    assert sorted(dm.train_pairs(0).tolist()) == [[0, 1], [2, 3]]
    csv.write_text(
        "fixed,moving\n" + "".join(f"img{i}.png,img{(i + 1) % 6}.png\n" for i in range(6))
    )
    dm = module(root, pairing="csv", pairs=str(csv), train_fraction=0.5, val_fraction=0)
    assert len(dm.train_pairs(0)) + len(dm.test_pairs) == 6


def test_resize_and_pad_rules_give_one_size(tmp_path):
    root = png_folder(tmp_path, n=4)
    Image.fromarray(blob(np.random.default_rng(2), 24, 30)[0]).save(root / "big.png")
    Image.fromarray(blob(np.random.default_rng(2), 24, 30)[1]).save(root / "labels" / "big.png")
    with pytest.raises(ImageError, match=r"different sizes.*data.image_size=\[H,W\].*pad_to"):
        module(root)
    assert module(root, image_size=[16, 16]).image_size == (16, 16)
    padded = module(root, pad_to=8)
    assert padded.image_size == (24, 32)
    assert set(padded._data["segs"].unique().tolist()) <= {0.0, 1.0, 2.0}  # labels stay integer


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: r.mkdir(), "no images"),
        (lambda r: (png_folder(r, n=3), (r / "bad.png").write_text("not an image")), "bad.png"),
        (lambda r: (png_folder(r, n=3), (r / "labels" / "img1.png").unlink()), "no label map"),
        (
            lambda r: (
                png_folder(r, n=3),
                Image.fromarray(np.zeros((5, 5), np.uint8)).save(r / "labels" / "img1.png"),
            ),
            "must have the same shape",
        ),
        (
            lambda r: (
                png_folder(r, n=3),
                np.save(r / "labels" / "img2.npy", np.full((H, W), 0.5)),
            ),
            "non-integer",
        ),
    ],
    ids=["empty", "unreadable", "label-missing", "label-shape", "label-not-integer"],
)
def test_bad_folders_fail_with_a_message_naming_the_problem(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    if (root / "labels" / "img2.npy").exists():
        (root / "labels" / "img2.png").unlink()
    with pytest.raises(ImageError, match=message):
        module(root)


def test_settings_that_cannot_work_are_refused_up_front(tmp_path):
    root = png_folder(tmp_path, n=4)
    with pytest.raises(ValueError, match="pairing must be one of"):
        FolderDataModule(path=str(root), pairing="same_class")
    with pytest.raises(ValueError, match="needs data.atlas"):
        FolderDataModule(path=str(root), pairing="atlas")
    with pytest.raises(ImageError, match="not one of the images"):
        module(root, pairing="atlas", atlas="nope.png")
    with pytest.raises(ImageError, match="is not a folder"):
        module(tmp_path / "missing")


def test_multi_frame_tiff_is_refused_with_the_frame_count(tmp_path):
    frames = [Image.fromarray(np.full((H, W), v, np.uint8)) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="holds 3 frames"):
        module(tmp_path, labels=None)
    assert torch.is_tensor(module(png_folder(tmp_path / "ok", n=3))._data["images"])


def test_16_bit_pngs_read_in_unit_range_with_normalize_none(tmp_path):
    """A 16-bit PNG holds 0..65535: scaled by 1/65535 as register reads it, labels unscaled."""
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = (rng.random((16, 16)) * 40000).astype(np.uint16)
        Image.fromarray(pixels).save(tmp_path / f"im{i}.png")
        Image.fromarray((pixels > 20000).astype(np.uint8) * 3).save(
            tmp_path / "labels" / f"im{i}.png"
        )
    dm = FolderDataModule(path=str(tmp_path), normalize="none", image_size=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].min() >= 0.0
    assert batch["fixed"].max() <= 40000 / 65535 + 1e-6
    assert set(batch["fixed_labels"].unique().tolist()) <= {0.0, 3.0}
