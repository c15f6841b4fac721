"""Model-level checks: SDPA vs nn.Transformer, MAPT weights, diffeomorphic fields, overfitting."""

import copy

import pytest
import torch

from air_reg import metrics, warp
from air_reg.models.components.air import AiR, AiRBranch
from air_reg.models.components.attention import TorchTransformer, load_from_torch, use_reference
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity


@pytest.mark.parametrize("query", ["moving", "fixed"])
@pytest.mark.parametrize(("patch", "depth", "ff_dim"), [(2, 1, None), (4, 2, 2048)])
def test_sdpa_air_matches_nn_transformer_reference(query, patch, depth, ff_dim):
    kw = {
        "image_size": 28,
        "patch_size": patch,
        "depth": depth,
        "ff_dim": ff_dim,
        "dropout": 0.0,
        "attn_dropout": 0.0,
        "query": query,
    }
    ours = AiRBranch(**kw)
    torch.nn.init.normal_(ours.head.weight)  # make the output large enough to compare
    ref = use_reference(copy.deepcopy(ours))  # nn.Transformer with our weights
    assert isinstance(ref.transformer, TorchTransformer)
    back = AiRBranch(**kw).transformer
    load_from_torch(back, ref.transformer)  # and the way back gives our weights again
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            back.state_dict().values(), ours.transformer.state_dict().values(), strict=True
        )
    )
    fixed, moving = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    out, expected = ours.eval()(fixed, moving), ref.eval()(fixed, moving)
    assert out.abs().mean() > 0.1
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_mapt_weights_stay_normalised_while_training():
    torch.manual_seed(0)
    net = MAPT(image_size=28, patch_sizes=[2, 4, 7], weights=[0.7, 0.2, 0.1], dropout=0.0)
    assert torch.allclose(net.weights, torch.tensor([0.7, 0.2, 0.1]))
    opt = torch.optim.Adam(net.parameters(), lr=5e-2)
    fixed, moving = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    for _ in range(5):
        loss = (warp(moving, net(fixed, moving)) - fixed).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = net.weights
    assert (w > 0).all()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(w, torch.tensor([0.7, 0.2, 0.1]))


def test_fixed_mapt_weights_are_normalised_buffers():
    net = MAPT(image_size=28, patch_sizes=[4, 7], weights=[3.0, 1.0], learn_weights=False)
    assert torch.allclose(net.weights, torch.tensor([0.75, 0.25]))
    assert "fixed_weights" not in dict(net.named_parameters())
    with pytest.raises(ValueError, match="positive, one per patch size"):
        MAPT(image_size=28, patch_sizes=[4, 7], weights=[1.0])


def test_diffeomorphic_integration_removes_folding_of_a_large_field():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 2, 5, 5, generator=g) * 4.0  # pixels: large, smooth
    velocity = CoarseToDense(in_size=(5, 5), out_size=(28, 28), mode="bspline")(coarse)
    plain, diffeo = metrics.folding(velocity), metrics.folding(integrate_velocity(velocity, 7))
    assert plain.mean() > 1.0  # adding the field directly folds
    assert diffeo.max() == 0.0  # its exponential does not


@pytest.mark.parametrize("integration_steps", [0, 7])
def test_nets_accept_integration_steps(integration_steps):
    net = DIRNet(image_size=28, integration_steps=integration_steps)
    assert net(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)).shape == (2, 2, 28, 28)


def _mnist_batch(n=16):
    from air_reg.data import PairDataModule

    dm = PairDataModule(dataset="mnist", pairing="same_class", num_val_pairs=8, num_test_pairs=n)
    dm.setup()
    return dm.dataset.__getitems__(dm.test_pairs.tolist())


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: AiR(patch_size=2, dropout=0.0),
        lambda: MAPT(patch_sizes=[2, 4, 7], dropout=0.0),
        lambda: DIRNet(),
    ],
    ids=["air", "mapt", "dirnet"],
)
def test_each_model_overfits_one_batch(make):
    torch.manual_seed(0)
    batch = _mnist_batch()
    net = make()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    fixed, moving = batch["fixed"], batch["moving"]
    losses = []
    for _ in range(60):
        loss = (warp(moving, net(fixed, moving)) - fixed).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])
