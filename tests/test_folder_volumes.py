"""``data=folder`` with ``volumes=whole``: NIfTI volumes read whole, with their label volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from air_reg.data import FolderDataModule
from air_reg.data.preprocess import Preprocessing
from air_reg.errors import ConfigError
from air_reg.images import ImageError

nib = pytest.importorskip("nibabel")
SHAPE = (10, 12, 14)  # (D, H, W) as stored (NIfTI X, Y, Z); no two sides equal on purpose


def box(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A float volume (not in [0, 1]) with a bright box and a dimmer slab, and its labels
    (0 background, 1 box, 2 slab)."""
    d, h, w = shape
    volume, labels = np.zeros(shape, np.float32), np.zeros(shape, np.int16)
    z, y, x = (int(rng.integers(1, n // 2)) for n in shape)
    cut = (slice(z, z + d // 3), slice(y, y + h // 3), slice(x, x + w // 3))
    volume[cut], labels[cut] = 300.0, 1
    volume[:, -2:, 1:-1], labels[:, -2:, 1:-1] = 120.0, 2
    return volume, labels


def volume_folder(root: Path, n: int = 6, shapes=None) -> Path:
    rng = np.random.default_rng(0)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        volume, labels = box(rng, (shapes or [SHAPE])[i % len(shapes or [SHAPE])])
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / f"vol{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels" / f"vol{i}.nii.gz")
    return root


def module(root: Path, **kw) -> FolderDataModule:
    dm = FolderDataModule(path=str(root), **kw)
    dm.setup("fit")
    return dm


def test_volumes_are_read_whole_with_their_labels_and_batched_5d(tmp_path):
    dm = module(volume_folder(tmp_path), volumes="whole", batch_size=2, train_fraction=0.7)
    assert dm.image_size == SHAPE
    assert dm._data["names"] == [f"vol{i}.nii.gz" for i in range(6)]
    images = dm._data["images"]
    assert images.shape == (6, 1, *SHAPE)
    assert images.amax(dim=(1, 2, 3, 4)).eq(1).all()  # min-max normalised per volume
    assert images.amin(dim=(1, 2, 3, 4)).eq(0).all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == batch["moving"].shape == (2, 1, *SHAPE)
    assert batch["fixed_labels"].shape == batch["moving_labels"].shape == (2, 1, *SHAPE)
    assert (batch["fixed"] > 0.7).equal(batch["fixed_labels"] == 1)  # labels match their volume
    assert (batch["moving"] > 0.7).equal(batch["moving_labels"] == 1)
    assert not torch.equal(batch["fixed"], batch["moving"])
    assert len(dm.file_checksums()) == 12  # volumes and label volumes


def test_the_default_still_reads_volumes_as_slices(tmp_path):
    dm = module(volume_folder(tmp_path, n=2), train_fraction=0.5)
    assert dm.image_size == SHAPE[:2]
    assert dm._data["names"][:2] == ["vol0.nii.gz#0", "vol0.nii.gz#1"]
    assert dm._data["images"].shape == (2 * SHAPE[2], 1, *SHAPE[:2])
    assert dm._data["segs"].shape == (2 * SHAPE[2], 1, *SHAPE[:2])


def test_volumes_are_resized_or_padded_to_one_size(tmp_path):
    root = volume_folder(tmp_path, shapes=[SHAPE, (9, 16, 12)])
    with pytest.raises(ImageError, match=r"10x12x14.*9x16x12.*image_size=\[D,H,W\].*pad_to"):
        module(root, volumes="whole")
    resized = module(root, volumes="whole", image_size=[8, 12, 10])
    assert resized.image_size == (8, 12, 10)
    assert set(resized._data["segs"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest
    assert resized._data["images"].min() >= 0
    assert resized._data["images"].max() <= 1
    assert module(root, volumes="whole", image_size=8).image_size == (8, 8, 8)  # an int: a cube
    padded = module(root, volumes="whole", pad_to=4)
    assert padded.image_size == (12, 16, 16)
    segs, first = padded._data["segs"][0, 0], nib.load(root / "labels" / "vol0.nii.gz")
    assert torch.equal(segs[1:11, 2:14, 1:15], torch.from_numpy(first.get_fdata()).float())
    assert segs.sum() == segs[1:11, 2:14, 1:15].sum()  # centred; the padding is background
    assert padded.preprocessing == Preprocessing(normalize="minmax", sizing="pad", pad_to=4)


def test_atlas_pairing_names_a_whole_volume(tmp_path):
    dm = module(volume_folder(tmp_path), volumes="whole", pairing="atlas", atlas="vol3.nii.gz")
    assert dm.atlas == 3
    assert (dm.val_pairs[:, 0] == 3).all()
    assert 3 not in dm.train_pool.tolist()


def test_a_2d_image_among_whole_volumes_is_refused(tmp_path):
    root = volume_folder(tmp_path, n=3)
    Image.fromarray(np.zeros(SHAPE[:2], np.uint8)).save(root / "slice.png")
    Image.fromarray(np.zeros(SHAPE[:2], np.uint8)).save(root / "labels" / "slice.png")
    with pytest.raises(ImageError, match=r"slice.png is a 2-D image.*volumes=whole"):
        module(root, volumes="whole")
    assert len(module(root)._data["names"]) == 3 * SHAPE[2] + 1  # slices mode mixes as before


def test_a_label_volume_of_another_shape_is_refused(tmp_path):
    root = volume_folder(tmp_path, n=3)
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 13), np.int16), np.eye(4)),
             root / "labels" / "vol1.nii.gz")  # fmt: skip
    with pytest.raises(ImageError, match="must have the same shape"):
        module(root, volumes="whole")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"volumes": "cube"}, "data.volumes must be one of"),
        ({"volumes": "whole", "image_size": [8, 8]}, r"needs \[D,H,W\]"),
        ({"image_size": [8, 8, 8]}, r"needs \[H,W\]"),
        ({"volumes": "whole", "slice_range": [0, 4]}, "slice_range"),
    ],
    ids=["unknown-mode", "2d-size-for-volumes", "3d-size-for-slices", "slice-range"],
)
def test_settings_that_cannot_work_with_volumes_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        FolderDataModule(path=str(tmp_path), **settings)


def test_folder_config_with_whole_volumes_records_a_volume_preprocessing(make_cfg, tmp_path):
    root = volume_folder(tmp_path / "vols", n=4)
    cfg = make_cfg("train", ["data=folder", f"data.path={root}", "data.volumes=whole",
                             "data.image_size=[8,8,8]"])  # fmt: skip
    dm = instantiate(cfg.data)
    assert dm.image_size == (8, 8, 8)
    assert Preprocessing.of(cfg.data) == dm.preprocessing
    assert dm.preprocessing.size == (8, 8, 8)


def test_preprocessing_pads_crops_and_resizes_volumes():
    prep = Preprocessing(sizing="pad", pad_to=4)
    x = torch.rand(2, 1, 5, 6, 7)
    padded = prep.to_model(x, (8, 8, 8))
    assert padded.shape == (2, 1, 8, 8, 8)
    assert torch.equal(padded[..., 1:6, 1:7, 0:7], x)  # centred, the odd voxel at the end
    flow = torch.rand(2, 3, 8, 8, 8)
    assert torch.equal(prep.from_model(flow, (5, 6, 7)), flow[..., 1:6, 1:7, 0:7])
    with pytest.raises(ImageError, match="5x6x7, larger than the 4x8x8"):
        prep.to_model(x, (4, 8, 8))
    resize = Preprocessing(sizing="resize", size=(4, 3, 14))
    out = resize.to_model(x, (4, 3, 14))
    assert out.shape == (2, 1, 4, 3, 14)
    assert out.min() >= 0
    assert out.max() <= 1
    labels = resize.to_model(torch.randint(0, 3, (2, 1, 5, 6, 7)).float(), (4, 3, 14), True)
    assert set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.slow  # ~10 s on 2 cores
def test_train_and_eval_on_a_folder_of_volumes(make_cfg, tmp_path):
    # the README's command on a folder of NIfTI volumes with label volumes: train, then eval
    # from the checkpoint alone (the folder and its preprocessing come from its record)
    from air_reg.eval import evaluate
    from air_reg.train import train

    root = volume_folder(tmp_path / "vols", n=10)  # 8 to train (2 of them to validate), 2 to test
    cfg = make_cfg("train", ["data=folder", f"data.path={root}", "data.volumes=whole",
                             "data.val_fraction=0.25",
                             "data.image_size=[16,16,16]", "model=air_match",
                             "data.pairs_per_epoch=4", "trainer.max_epochs=1"])  # fmt: skip
    metrics = train(cfg)
    assert {"test/mse", "test/dice_labels", "test/folding"} <= set(metrics)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    summary = evaluate(make_cfg("eval", [f"ckpt_path={ckpt}", "num_pairs=2"]))
    assert summary["model"]["dice_labels"]["mean"] > 0  # the labels travelled with the pairs
    assert summary["identity"]["mse"]["mean"] > 0
