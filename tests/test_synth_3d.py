"""``data=synth`` in 3-D: volume pairs from the 2-D recipe, in the same code path."""

from __future__ import annotations

import time

import pytest
import torch
from hydra.utils import instantiate

from air_reg.data import synthetic
from air_reg.data.preprocess import Preprocessing
from air_reg.data.synth import (
    affine_after,
    bspline_fields,
    label_maps,
    make_synth_pairs,
    random_affines,
    random_deformations,
    render,
)
from air_reg.data.synth_module import SynthDataModule
from air_reg.errors import ConfigError, UserError
from air_reg.metrics import jacobian_determinant, ncc
from air_reg.models.components.spatial_transformer import warp

KEYS = {"fixed", "moving", "flow", "fixed_labels", "moving_labels"}
SIZE = (16, 24, 20)  # (D, H, W), deliberately not a cube


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def peaks(flow: torch.Tensor) -> torch.Tensor:
    return flow.square().sum(1).flatten(1).amax(1).sqrt()  # (n,) voxels


def test_volume_pairs_have_the_documented_shapes_dtypes_and_ranges():
    b = make_synth_pairs(4, SIZE, gen())
    assert set(b) == KEYS
    for k in ("fixed", "moving"):
        assert b[k].shape == (4, 1, *SIZE), k
        assert b[k].dtype == torch.float32, k
        assert b[k].amin(dim=(1, 2, 3, 4)).eq(0).all(), k  # min-max normalised per volume
        assert b[k].amax(dim=(1, 2, 3, 4)).eq(1).all(), k
    assert b["flow"].shape == (4, 3, *SIZE)
    for k in ("fixed_labels", "moving_labels"):
        assert b[k].shape == (4, 1, *SIZE), k
        assert b[k].dtype == torch.int64, k
        assert 1 <= int(b[k].min()) <= int(b[k].max()) <= 16, k
    assert all(len(m.unique()) > 1 for m in b["moving_labels"])


def test_same_seed_gives_bit_identical_volumes_and_another_seed_others():
    a, b, c = (make_synth_pairs(2, SIZE, gen(s)) for s in (1, 1, 2))
    for k in KEYS:
        assert torch.equal(a[k], b[k]), k
        assert not torch.equal(a[k], c[k]), k


def test_fixed_labels_are_the_moving_labels_warped_by_the_flow():
    b = make_synth_pairs(4, SIZE, gen(3))
    assert peaks(b["flow"]).max() > 1  # a real deformation, not only identities
    again = warp(b["moving_labels"].float(), b["flow"], mode="nearest").long()
    assert (again == b["fixed_labels"]).float().mean() >= 0.98


def test_the_flow_registers_the_volumes_too():
    """Same contrast, no blur/bias/noise/gamma, large blobs: warp(moving, flow) ~ fixed."""
    clean = {"same_contrast_p": 1.0, "blur_max": 0.0, "bias_max": 0.0, "noise_max": 0.0,
             "gamma_std": 0.0, "identity_p": 0.0, "min_px": 2.0,
             "label_scales": (2, 3)}  # fmt: skip
    b = make_synth_pairs(4, (24, 32, 28), gen(4), **clean)
    registered = ncc(warp(b["moving"], b["flow"]), b["fixed"])
    assert (registered > 0.93).all(), registered
    assert (registered > ncc(b["moving"], b["fixed"]) + 0.03).all()


def test_volume_deformations_are_folding_free_and_span_tiny_to_large():
    size = (24, 28, 32)
    flows = random_deformations(48, size, gen(5))
    assert flows.shape == (48, 3, *size)
    assert jacobian_determinant(flows).amin() > 0
    p = peaks(flows)
    moving = p[p > 0]
    assert moving.min() < 0.5  # sub-voxel pairs ...
    assert moving.max() > 0.09 * min(size)  # ... and pairs at max_fraction (or beyond: affine)
    assert (p > 1).float().mean() > 0.4


def test_smooth_part_peaks_at_the_drawn_magnitude_in_3d():
    flows = random_deformations(32, (20, 24, 28), gen(6), affine_p=0.0, identity_p=0.0)
    p = peaks(flows)
    assert p.min() >= 0.2 * 0.95
    assert p.max() <= 0.1 * 20 * 1.05
    assert jacobian_determinant(flows).amin() > 0


def test_volume_affines_rotate_in_all_three_planes_and_keep_orientation():
    a, t = random_affines(256, 3, gen(7), rotation_deg=10, scale=0.1, shear=0.05, shift_px=4)
    assert a.shape == (256, 3, 3)
    assert t.shape == (256, 3)
    assert torch.linalg.det(a).amin() > 0
    lower = a[:, [1, 2, 2], [0, 0, 1]]  # only the rotations put weight below the diagonal
    assert (lower.abs().amax(0) > 0.1).all()
    assert t.abs().max() <= 4
    assert (t.abs().amax(0) > 3).all()
    # a pure affine composed after a zero flow moves the centre by exactly t
    flow = affine_after(torch.zeros(2, 3, 5, 7, 9), a[:2], t[:2])
    assert torch.allclose(flow[:, :, 2, 3, 4], t[:2], atol=1e-5)
    assert jacobian_determinant(flow).amin() > 0


def test_2d_deformation_pieces_are_the_2d_functions_bit_for_bit():
    """The N-D velocity, affine and composition draw and compute exactly what the 2-D
    functions of air_reg.data.synthetic do (test_synth.py covers the rest of the 2-D path)."""
    assert torch.equal(
        bspline_fields(3, (20, 28), 0.5, gen(1), grid=8),
        synthetic.make_flows(3, (20, 28), 0.5, gen(1), grid=8),
    )
    mine = random_affines(5, 2, gen(2), rotation_deg=10, scale=0.1, shear=0.05, shift_px=3)
    ref = synthetic.random_affines(5, gen(2), rotation_deg=10, scale=0.1, shear=0.05, shift_px=3)
    assert all(torch.equal(x, y) for x, y in zip(mine, ref, strict=True))
    flow = torch.randn(5, 2, 12, 10, generator=gen(3))
    assert torch.equal(affine_after(flow, *mine), synthetic.affine_after(flow, *ref))


def test_label_maps_and_render_take_volumes():
    maps = label_maps(3, (12, 16, 20), gen(), num_labels=8, scales=(2,))
    assert maps.shape == (3, 1, 12, 16, 20)
    assert int(maps.min()) >= 1
    assert int(maps.max()) <= 8
    images = render(maps, gen(1))
    assert images.shape == maps.shape
    assert torch.equal(images, render(maps, gen(1)))
    assert images.min() == 0
    assert images.max() == 1


def test_bad_volume_sizes_are_refused():
    with pytest.raises(ConfigError, match="image_size"):
        SynthDataModule(image_size=[16, 16, 4])
    with pytest.raises(UserError, match="image size"):
        make_synth_pairs(1, (8, 8, 8, 8), gen())
    with pytest.raises(UserError, match="positive"):
        make_synth_pairs(1, (0, 8, 8), gen())


@pytest.mark.slow
def test_drawing_a_volume_batch_is_fast():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_synth_pairs(8, 48, gen())  # warm-up (interpolation matrices)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            make_synth_pairs(8, (48, 48, 48), gen())
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 2.0, f"8 pairs at 48^3 took {min(times):.3f} s on one thread"


# -- the data module ----------------------------------------------------------------------------
def test_datamodule_draws_volume_batches():
    dm = SynthDataModule(image_size=[12, 16, 8], batch_size=2, eval_batch_size=3,
                         pairs_per_epoch=4, num_val_pairs=5, num_test_pairs=2)  # fmt: skip
    assert dm.image_size == (12, 16, 8)
    assert dm.preprocessing == Preprocessing(normalize="minmax", sizing="resize", size=(12, 16, 8))
    train = list(dm.train_dataloader())
    assert len(train) == 2
    assert train[0]["fixed"].shape == (2, 1, 12, 16, 8)
    assert train[0]["flow"].shape == (2, 3, 12, 16, 8)
    assert not torch.equal(train[0]["fixed"], train[1]["fixed"])
    val = list(dm.val_dataloader())
    assert [len(b["fixed"]) for b in val] == [3, 2]
    assert val[0]["moving_labels"].shape == (3, 1, 12, 16, 8)
    again = SynthDataModule(image_size=[12, 16, 8], num_val_pairs=5)
    again.setup("fit")
    assert torch.equal(again.val_set["fixed"], torch.cat([b["fixed"] for b in val]))


def test_synth3d_config_composes_and_records_a_volume_preprocessing(make_cfg):
    cfg = make_cfg("train", ["data=synth3d"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, SynthDataModule)
    assert dm.image_size == (64, 64, 64)
    assert Preprocessing.of(cfg.data) == dm.preprocessing
    assert dm.preprocessing.size == (64, 64, 64)
    cfg = make_cfg("train", ["data=synth", "data.image_size=[24,32,16]"])
    assert instantiate(cfg.data).image_size == (24, 32, 16)
