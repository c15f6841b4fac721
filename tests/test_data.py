"""Data: idx reading, the 80/20 split, pairing modes, per-epoch redraws and rank sharding."""

import gzip

import pytest
import torch

from air_reg.data import PairDataModule, SyntheticDataModule
from air_reg.data import pairs as pairs_mod
from air_reg.data.idx import FILES, load_dataset, read_idx
from air_reg.models.components.spatial_transformer import warp


@pytest.fixture(scope="module")
def mnist():
    dm = PairDataModule(dataset="mnist", num_val_pairs=200, num_test_pairs=300)
    dm.setup()
    return dm


def test_mnist_loads_all_70000_images_in_unit_range(mnist):
    images = mnist.dataset.images
    assert images.shape == (70_000, 1, 28, 28)
    assert images.dtype == torch.float32
    assert images.min() == 0
    assert images.max() == 1


def test_split_is_80_20_and_disjoint(mnist):
    n_train = len(mnist.train_pool) + len(mnist.val_pool)
    assert n_train == 56_000
    assert len(mnist.test_pool) == 14_000
    pools = [set(p.tolist()) for p in (mnist.train_pool, mnist.val_pool, mnist.test_pool)]
    assert sum(map(len, pools)) == len(set().union(*pools)) == 70_000


def test_test_pairs_stay_inside_the_test_pool_and_are_fixed(mnist):
    test = set(mnist.test_pool.tolist())
    assert set(mnist.test_pairs.flatten().tolist()) <= test
    again = PairDataModule(dataset="mnist", num_val_pairs=200, num_test_pairs=300)
    again.setup()
    assert torch.equal(again.test_pairs, mnist.test_pairs)


def test_training_pairs_are_redrawn_per_epoch_deterministically(mnist):
    e0, e1 = mnist.train_pairs(0), mnist.train_pairs(1)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, mnist.train_pairs(0))
    assert set(e0.flatten().tolist()) <= set(mnist.train_pool.tolist())
    assert len(e0) == mnist.hparams.pairs_per_epoch or len(e0) == len(mnist.train_pool)


def test_same_class_pairing_pairs_equal_labels():
    dm = PairDataModule(dataset="mnist", pairing="same_class", num_val_pairs=50)
    dm.setup()
    pairs = dm.train_pairs(0)
    labels = dm.dataset.labels
    assert torch.equal(labels[pairs[:, 0]], labels[pairs[:, 1]])


@pytest.mark.parametrize("pairing", ["random", "same_class"])
def test_no_image_is_paired_with_itself(pairing):
    # 6 images in 2 classes: without the redraw a third of same-class draws would be self-pairs
    pool, labels = torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(0)
    pairs = pairs_mod.draw_pairs(pool, labels, 600, pairing, g)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert set(pairs[:, 0].tolist()) == set(range(6))
    if pairing == "same_class":
        assert torch.equal(labels[pairs[:, 0]], labels[pairs[:, 1]])


def test_batches_are_dicts_of_batched_tensors(mnist):
    batch = next(iter(mnist.train_dataloader()))
    assert set(batch) == {"fixed", "moving", "fixed_class", "moving_class"}
    assert batch["fixed"].shape == (64, 1, 28, 28)
    assert batch["moving_class"].shape == (64,)


def test_resize_to_64():
    dm = PairDataModule(dataset="fashion", image_size=64, num_val_pairs=10, num_test_pairs=10)
    dm.setup()
    assert dm.dataset.images.shape[-2:] == (64, 64)
    assert dm.dataset.images.min() >= 0
    assert dm.dataset.images.max() <= 1


def test_ranks_get_disjoint_pairs(monkeypatch):
    pairs = torch.arange(40).reshape(20, 2)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(pairs_mod, "_rank_and_world", lambda r=rank: (r, 3))
        sampler = pairs_mod.PairSampler(lambda _e: pairs, even=True)
        seen.append(list(sampler))
    assert {len(s) for s in seen} == {6}  # 20 // 3, cut so that every rank steps equally
    flat = [p for s in seen for p in s]
    assert len(flat) == len(set(flat))


def test_missing_files_error_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"put train-images-idx3-ubyte.gz.*in .*MNIST/raw"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_truncated_idx_file_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        with gzip.open(raw / name, "wb") as fh:
            fh.write(bytes([0, 0, 8, 1, 0, 0, 0, 10, 1, 2]))  # header promises 10 bytes
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        read_idx(raw / FILES[1])


def test_synthetic_pairs_carry_their_exact_ground_truth():
    dm = SyntheticDataModule(num_images=64, batch_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"fixed", "moving", "flow"}
    assert torch.allclose(warp(batch["moving"], batch["flow"]), batch["fixed"], atol=1e-6)
    assert batch["flow"].abs().max() > 0.5
