"""``data=synth``: seeded label maps, deformations, rendering, pairs and their data module."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from air_reg.data import synth, synth_module
from air_reg.data.preprocess import Preprocessing
from air_reg.data.synth import (
    label_maps,
    make_synth_pairs,
    random_deformations,
    render,
)
from air_reg.data.synth_module import SynthDataModule
from air_reg.errors import ConfigError
from air_reg.metrics import jacobian_determinant, ncc
from air_reg.models.components.spatial_transformer import warp

KEYS = {"fixed", "moving", "flow", "fixed_labels", "moving_labels"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def peaks(flow: torch.Tensor) -> torch.Tensor:
    return flow.square().sum(1).flatten(1).amax(1).sqrt()  # (n,) pixels


def label_means(images: torch.Tensor, labels: torch.Tensor, k: int = 16) -> torch.Tensor:
    """(n, k + 1) mean intensity of each label in (n, 1, H, W) images; NaN for labels with
    fewer than 20 pixels (absent, or a sliver whose mean is all edge)."""
    index, values = labels.flatten(1), images.flatten(1)
    sums = torch.zeros(len(images), k + 1).scatter_add_(1, index, values)
    counts = torch.zeros(len(images), k + 1).scatter_add_(1, index, torch.ones_like(values))
    return torch.where(counts >= 20, sums / counts.clamp_min(1), torch.nan)


# -- the pure functions ------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_pairs_and_another_seed_others():
    a, b = make_synth_pairs(4, 48, gen(1)), make_synth_pairs(4, 48, gen(1))
    c = make_synth_pairs(4, 48, gen(2))
    assert set(a) == KEYS
    for k in KEYS:
        assert torch.equal(a[k], b[k]), k
    for k in ("fixed", "moving", "flow", "moving_labels"):
        assert not torch.equal(a[k], c[k]), k


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (40, 24)])
def test_pairs_have_the_documented_shapes_dtypes_and_ranges(size):
    b = make_synth_pairs(6, size, gen())
    for k in ("fixed", "moving"):
        assert b[k].shape == (6, 1, *size), k
        assert b[k].dtype == torch.float32, k
        assert b[k].amin(dim=(1, 2, 3)).eq(0).all(), k  # min-max normalised, per image
        assert b[k].amax(dim=(1, 2, 3)).eq(1).all(), k
    assert b["flow"].shape == (6, 2, *size)
    assert b["flow"].dtype == torch.float32
    for k in ("fixed_labels", "moving_labels"):
        assert b[k].shape == (6, 1, *size), k
        assert b[k].dtype == torch.int64, k
        assert int(b[k].min()) >= 1
        assert int(b[k].max()) <= 16
    assert all(len(m.unique()) > 1 for m in b["moving_labels"])


def test_label_maps_go_from_large_blobs_to_small_ones():
    maps = label_maps(64, (64, 80), gen(), num_labels=16, scales=(2, 12))
    assert maps.shape == (64, 1, 64, 80)
    assert maps.dtype == torch.int64
    counts = torch.tensor([len(m.unique()) for m in maps])
    # boundary pixels per image: few for large blobs, many for small ones
    edges = (maps[..., 1:, :] != maps[..., :-1, :]).flatten(1).float().mean(1)
    assert counts.min() >= 2
    assert counts.max() >= 12
    assert edges.max() > 3 * edges.min()


def test_fixed_labels_are_the_moving_labels_warped_by_the_flow():
    b = make_synth_pairs(8, (64, 96), gen(3))
    again = warp(b["moving_labels"].float(), b["flow"], mode="nearest").long()
    assert (again == b["fixed_labels"]).float().mean() >= 0.98


def test_the_flow_registers_the_images_too():
    """Same contrast, no blur/bias/noise/gamma: warp(moving, flow) matches fixed, up to edges."""
    clean = {"same_contrast_p": 1.0, "blur_max": 0.0, "bias_max": 0.0, "noise_max": 0.0,
             "gamma_std": 0.0, "identity_p": 0.0, "min_px": 3.0}  # fmt: skip
    b = make_synth_pairs(16, 64, gen(4), **clean)
    registered = ncc(warp(b["moving"], b["flow"]), b["fixed"])
    assert (registered > 0.93).all(), registered
    assert (registered > ncc(b["moving"], b["fixed"])).all()


@pytest.mark.parametrize("size", [(96, 128), (48, 48)])
def test_deformations_are_folding_free_and_span_tiny_to_large(size):
    flows = random_deformations(256, size, gen(5))
    assert flows.shape == (256, 2, *size)
    assert jacobian_determinant(flows).amin() > 0
    p = peaks(flows)
    moving = p[p > 0]
    assert moving.min() < 0.5  # sub-pixel pairs ...
    assert moving.max() > 0.09 * min(size)  # ... and pairs at max_fraction (or beyond: affine)
    assert (p > 1).float().mean() > 0.4  # log-uniform: not all tiny


def test_smooth_part_peaks_at_the_drawn_magnitude():
    flows = random_deformations(128, (64, 96), gen(6), affine_p=0.0, identity_p=0.0)
    p = peaks(flows)
    assert p.min() >= 0.2 * 0.95
    assert p.max() <= 0.1 * 64 * 1.05
    assert jacobian_determinant(flows).amin() > 0


def test_identity_fraction_gives_exactly_zero_flows():
    assert random_deformations(16, 32, gen(), identity_p=1.0).eq(0).all()
    assert (peaks(random_deformations(64, 32, gen(), identity_p=0.0)) > 0).all()
    zero = (peaks(random_deformations(400, 32, gen(7))) == 0).sum()
    assert 5 <= zero <= 40  # identity_p = 0.05 of 400


def test_fixed_and_moving_get_independent_contrasts_unless_shared():
    """Per-label mean intensities: uncorrelated (even inverted) across independent contrasts,
    strongly correlated when the moving image shares the fixed one's."""

    def correlations(same_contrast_p: float) -> torch.Tensor:
        b = make_synth_pairs(32, 64, gen(8), same_contrast_p=same_contrast_p, label_scales=(3,))
        fixed = label_means(b["fixed"], b["fixed_labels"])
        moving = label_means(b["moving"], b["moving_labels"])
        out = []
        for f, m in zip(fixed, moving, strict=True):
            both = ~(f.isnan() | m.isnan())
            out.append(torch.corrcoef(torch.stack([f[both], m[both]]))[0, 1])
        return torch.stack(out)

    independent, shared = correlations(0.0), correlations(1.0)
    assert independent.nanmedian() < 0.5
    assert (independent < 0).any()
    assert shared.nanmedian() > 0.8


def test_render_draws_images_in_unit_range_and_is_seeded():
    labels = label_maps(4, (40, 56), gen())
    a, b = render(labels, gen(1)), render(labels, gen(1))
    assert a.shape == (4, 1, 40, 56)
    assert torch.equal(a, b)
    assert a.min() == 0
    assert a.max() == 1
    assert not torch.equal(a, render(labels, gen(2)))


def test_bad_settings_are_refused_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="num_labels"):
        make_synth_pairs(2, 32, gen(), num_lables=8)
    with pytest.raises(ConfigError, match="same_contrast_p"):
        make_synth_pairs(2, 32, gen(), same_contrast_p=1.5)
    with pytest.raises(ConfigError, match="image_size"):
        SynthDataModule(image_size=4)


def test_generating_a_batch_is_fast():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_synth_pairs(8, 128, gen())  # warm-up (interpolation matrices)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            make_synth_pairs(8, 128, gen())
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.25, f"8 pairs at 128 x 128 took {min(times):.3f} s on one thread"


# -- the data module ----------------------------------------------------------------------------
def small(**kwargs) -> SynthDataModule:
    return SynthDataModule(**({"image_size": [24, 32], "batch_size": 4, "eval_batch_size": 8,
                               "pairs_per_epoch": 16, "num_val_pairs": 12, "num_test_pairs": 10}
                              | kwargs))  # fmt: skip


def test_datamodule_batches_carry_the_pairs_keys():
    dm = small()
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 4
    assert set(train[0]) == KEYS
    assert train[0]["fixed"].shape == (4, 1, 24, 32)
    val = list(dm.val_dataloader())
    assert [len(b["fixed"]) for b in val] == [8, 4]
    assert set(val[0]) == KEYS
    assert val[0]["fixed_labels"].dtype == torch.int64
    assert dm.file_checksums() == {}


def test_validation_and_test_pairs_are_fixed_sets_of_their_own():
    a, b = small(), small(num_val_pairs=20)
    a.setup(), b.setup()
    for k in KEYS:
        assert torch.equal(a.val_set[k], b.val_set[k][:12]), k  # the first 12 of a larger set
    assert not torch.equal(a.val_set["fixed"][:10], a.test_set["fixed"])
    first_train = next(iter(a.train_dataloader()))
    assert not torch.equal(first_train["fixed"], a.val_set["fixed"][:4])
    assert not torch.equal(a.val_set["fixed"], small(seed=1).pairs(synth_module.VAL, 12)["fixed"])


def test_training_stream_is_a_function_of_seed_epoch_and_index():
    dm = small()
    loader = dm.train_dataloader()
    epoch0 = [b["fixed"] for b in loader]
    loader.sampler.set_epoch(1)
    epoch1 = [b["fixed"] for b in loader]
    assert not torch.equal(epoch0[0], epoch1[0])
    assert not torch.equal(epoch0[0], epoch0[1])
    again = small().train_dataloader()
    again.sampler.set_epoch(1)
    assert all(torch.equal(x["fixed"], y) for x, y in zip(again, epoch1, strict=True))


def test_ranks_draw_disjoint_training_batches(monkeypatch):
    sampler = synth_module.RankBatches(5, even=True)
    keys = []
    for rank in (0, 1):
        monkeypatch.setattr(synth_module, "_rank_and_world", lambda r=rank: (r, 2))
        keys.append([i for _, i in sampler])
    assert keys == [[0, 2], [1, 3]]  # cut to a multiple of the world size: equal steps


class Recorder(L.LightningModule):
    """Records a checksum of every training batch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, float(batch["fixed"].sum())))
        return (self.w - batch["fixed"].mean()).square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_advances_the_stream_each_epoch_and_replays_it(tmp_path):
    def run() -> list[tuple[int, float]]:
        model = Recorder()
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(model, datamodule=small(pairs_per_epoch=8))
        return model.seen

    first = run()
    assert [e for e, _ in first] == [0, 0, 1, 1]
    assert len({s for _, s in first}) == 4  # four different batches
    assert run() == first


def test_train_config_with_data_synth_composes_and_instantiates(make_cfg):
    cfg = make_cfg("train", ["data=synth"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, SynthDataModule)
    assert dm.image_size == (128, 128) == tuple(instantiate(cfg.model).image_size)
    # what register reads a file with, from the record the checkpoint keeps: min-max, resized
    assert Preprocessing.of(cfg.data) == dm.preprocessing
    assert dm.preprocessing == Preprocessing(normalize="minmax", sizing="resize", size=(128, 128))
    assert dm.settings == synth.SynthSettings()  # the YAML repeats the code's defaults


@pytest.mark.slow
def test_trains_and_evaluates_end_to_end(make_cfg, tmp_path):
    from air_reg.eval import evaluate
    from air_reg.train import train

    cfg = make_cfg("train", ["data=synth", "model=dirnet", "data.image_size=[32,48]",
                             "trainer.max_epochs=1", "data.pairs_per_epoch=32",
                             "data.num_val_pairs=16", "data.num_test_pairs=16"])  # fmt: skip
    metrics = train(cfg)
    assert {"val/epe", "val/dice_labels", "test/epe", "test/dice_labels", "test/hd95"} <= set(
        metrics
    )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    summary = evaluate(make_cfg("eval", [f"ckpt_path={ckpt}", "num_pairs=16"]))
    assert summary["identity"]["dice_labels"]["n"] == 16
    assert summary["identity"]["epe"]["mean"] > 0.5
