"""Model-level checks: SDPA vs nn.Transformer, MAPT weights, diffeomorphic fields, overfitting."""

import copy

import pytest
import torch

from air_reg import metrics, warp
from air_reg.models.components.air import AiR, AiRBranch
from air_reg.models.components.air_unet import AiRUNet
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
    net = MAPT(image_size=28, patch_sizes=[2, 4, 7], mix_weights=[0.7, 0.2, 0.1], dropout=0.0)
    assert torch.allclose(net.mix_weights, torch.tensor([0.7, 0.2, 0.1]))
    opt = torch.optim.Adam(net.parameters(), lr=5e-2)
    fixed, moving = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    for _ in range(5):
        loss = (warp(moving, net(fixed, moving)) - fixed).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = net.mix_weights
    assert (w > 0).all()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(w, torch.tensor([0.7, 0.2, 0.1]))


def test_fixed_mapt_weights_are_normalised_buffers():
    net = MAPT(image_size=28, patch_sizes=[4, 7], mix_weights=[3.0, 1.0], learn_weights=False)
    assert torch.allclose(net.mix_weights, torch.tensor([0.75, 0.25]))
    assert "fixed_weights" not in dict(net.named_parameters())
    with pytest.raises(ValueError, match="positive, one per patch size"):
        MAPT(image_size=28, patch_sizes=[4, 7], mix_weights=[1.0])


def test_diffeomorphic_integration_removes_folding_of_a_large_field():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 2, 5, 5, generator=g) * 4.0  # pixels: large, smooth
    velocity = CoarseToDense(in_size=(5, 5), out_size=(28, 28), mode="bspline")(coarse)
    plain, diffeo = metrics.folding(velocity), metrics.folding(integrate_velocity(velocity, 7))
    assert plain.mean() > 1.0  # adding the field directly folds
    assert diffeo.max() == 0.0  # its exponential does not


INTEGRATING_NETS = {  # integration_steps -> a network whose field is integrated that many times
    "air": lambda k: AiR(patch_size=2, dropout=0.0, integration_steps=k),
    "mapt": lambda k: MAPT(patch_sizes=[2, 4, 7], dropout=0.0, integration_steps=k),
    "dirnet": lambda k: DIRNet(integration_steps=k),
    "air_unet": lambda k: AiRUNet(image_size=28, integration_steps=k),
}


@pytest.mark.parametrize("name", INTEGRATING_NETS)
def test_integration_steps_make_the_flow_the_exponential_of_the_velocity(name):
    """With ``integration_steps=k`` a net returns ``integrate_velocity(v, k)`` of the velocity
    ``v`` its ``integration_steps=0`` twin (same weights) returns: folding-free, inverted by
    ``-v``. Heads drawn large (velocities up to 4 px) so the integration is visible.

    Measured (seed 0, 4 px): max |flow - v| 0.49 (dirnet) .. 2.5 px (air_unet); folding of v
    0 .. 9.4 % (air_unet), of the flow <= 0.064 %; |exp(-v) o exp(v)| / |v| (means)
    0.008 (dirnet) .. 0.103 (air_unet, whose full-resolution velocity is the roughest).
    """
    k = 7
    torch.manual_seed(0)
    plain = INTEGRATING_NETS[name](0).eval()  # eval: no dropout, BatchNorm's running stats
    heads = [m for n, m in plain.named_modules() if n.rsplit(".", 1)[-1] == "head"]
    assert heads, f"{name} has no module named head"
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(2, 1, 28, 28, generator=g), torch.rand(2, 1, 28, 28, generator=g)
    with torch.no_grad():
        for head in heads:  # the velocity is linear in the heads: rescale it to 4 px
            torch.nn.init.normal_(head.weight)
            torch.nn.init.zeros_(head.bias)
        scale = 4.0 / plain(fixed, moving).abs().max()
        for head in heads:
            head.weight.mul_(scale)
        velocity = plain(fixed, moving)
        net = INTEGRATING_NETS[name](k).eval()
        net.load_state_dict(plain.state_dict())
        flow = net(fixed, moving)
        inverse = integrate_velocity(-velocity, k)
        residual = inverse + warp(flow, inverse)  # displacement of exp(v) o exp(-v)
    assert flow.shape == (2, 2, 28, 28)
    torch.testing.assert_close(flow, integrate_velocity(velocity, k), rtol=0, atol=1e-5)
    assert (flow - velocity).abs().max() > 0.25, "integration_steps changed nothing"
    assert metrics.folding(flow).max() < 0.5, metrics.folding(flow)
    ratio = residual.norm(dim=1).mean() / velocity.norm(dim=1).mean()
    assert ratio < 0.15, ratio


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
