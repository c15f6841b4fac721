"""AiR-Match (``model=air_match``): the matching functions on hand-made features (a known
shift is read off the attention weights), chunking, any size, the contract, gradients, the
ablation switches, self-registration at init and the composed config."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, needs_kernel
from hydra.utils import instantiate

import air_reg
from air_reg import speed
from air_reg.errors import ConfigError
from air_reg.models import contract
from air_reg.models.components import matching
from air_reg.models.components.air_match import AiRMatch
from air_reg.models.components.matching import (
    LocalMatch,
    global_match,
    local_match,
    sine_position_encoding,
    soft_attend,
)
from air_reg.models.components.spatial_transformer import identity_grid, integrate_velocity
from air_reg.speed import kernels
from air_reg.speed import local_match as kernel_local_match
from air_reg.train import train


def pair(h: int, w: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(batch, 1, h, w), torch.rand(batch, 1, h, w)


def one_hot_pair(h: int, w: int, shift: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (1, h*w, h, w): moving = the one-hot of each position, fixed = the one-hot of
    the position ``shift`` away, so fixed(p) matches moving(p + shift) exactly."""
    moving = torch.eye(h * w).reshape(1, h * w, h, w)
    grid = identity_grid((h, w)).long()
    target = (grid + torch.tensor(shift).view(2, 1, 1)).clamp_min(0)
    target[0].clamp_(max=h - 1)
    target[1].clamp_(max=w - 1)
    fixed = moving[:, :, target[0], target[1]]  # (1, h*w, h, w)
    return fixed, moving


@pytest.mark.parametrize("score", ["l2", "dot"])
@pytest.mark.parametrize("shift", [(2, -3), (-5, 4), (0, 0)])
def test_global_match_reads_a_known_shift_off_the_attention(shift, score):
    h, w = 12, 16
    fixed, moving = one_hot_pair(h, w, shift)
    flow = global_match(fixed, moving, scale=50.0, score=score)
    assert flow.shape == (1, 2, h, w)
    inside = flow[:, :, 5:-5, 5:-5]  # where p + shift is in the image
    expected = torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1).expand_as(inside)
    torch.testing.assert_close(inside, expected, atol=1e-4, rtol=0)


def test_global_match_prior_pulls_ties_to_zero():
    fixed = torch.ones(1, 4, 8, 8)  # a flat region: every candidate ties
    flat = global_match(fixed, fixed, scale=1.0)
    assert flat.abs().amax((0, 2, 3)).min() > 1, "no prior: the centroid, far from zero"
    held = global_match(fixed, fixed, scale=1.0, prior=50.0)
    assert held.abs().max() < 1e-4


@pytest.mark.parametrize("shift", [(1, -2), (-3, 3), (0, 1)])
def test_local_match_reads_a_small_shift_in_its_window(shift):
    h, w = 14, 15
    fixed, moving = one_hot_pair(h, w, shift)
    flow = local_match(fixed, moving, radius=3, scale=50.0)
    inside = flow[:, :, 4:-4, 4:-4]
    expected = torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1).expand_as(inside)
    torch.testing.assert_close(inside, expected, atol=1e-4, rtol=0)
    # a flat region (ties everywhere, replicate-padded) reads zero, also at the border
    flat = torch.ones(1, 3, h, w)
    assert local_match(flat, flat, radius=2, scale=1.0).abs().max() < 1e-6


def test_local_and_global_agree_where_the_window_holds_every_likely_candidate():
    # a strong prior leaves nothing outside radius 5 (weight < e^-90); where that window is
    # inside the image (no replicated border candidates) the two must give the same flow
    fixed, moving = torch.randn(2, 8, 16, 17), torch.randn(2, 8, 16, 17)
    local = local_match(fixed, moving, radius=5, scale=0.7, prior=5.0)
    whole = global_match(fixed, moving, scale=0.7, prior=5.0)
    inner = (..., slice(5, -5), slice(5, -5))
    torch.testing.assert_close(local[inner], whole[inner], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(local, whole, atol=1e-2), "the border differs (replicate pad)"


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_and_whole_matching_agree(grad):
    fixed = torch.randn(2, 16, 9, 13, requires_grad=grad)
    moving = torch.randn(2, 16, 9, 13)
    scale = torch.tensor(0.5, requires_grad=grad)
    whole = global_match(fixed, moving, scale=scale, prior=0.2)
    chunked = global_match(fixed, moving, scale=scale, prior=0.2, max_tokens=20)  # 3-row chunks
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    if grad:
        g_whole = torch.autograd.grad(whole.square().sum(), (fixed, scale))
        g_chunk = torch.autograd.grad(chunked.square().sum(), (fixed, scale))
        for a, b in zip(g_chunk, g_whole, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    q, k, v = torch.randn(1, 50, 4), torch.randn(1, 30, 4), torch.randn(1, 30, 3)
    torch.testing.assert_close(
        soft_attend(q, k, v, scale=0.3, max_tokens=4), soft_attend(q, k, v, scale=0.3)
    )


def test_inference_attends_in_cache_sized_chunks(monkeypatch):
    # without gradients on CPU at most INFER_SCORES scores a chunk (below max_tokens^2), the
    # same numbers; with gradients the max_tokens rule alone (the training path unchanged)
    q, k, v = torch.randn(2, 50, 4), torch.randn(2, 30, 4), torch.randn(2, 30, 3)
    with torch.no_grad():
        whole = soft_attend(q, k, v, scale=0.3)
    chunks = []
    real = matching._attend

    def counted(c, *args):
        chunks.append(c.shape[1])
        return real(c, *args)

    monkeypatch.setattr(matching, "_attend", counted)
    monkeypatch.setattr(matching, "INFER_SCORES", 300)  # 10 query rows of 30 keys a chunk
    with torch.no_grad():
        chunked = soft_attend(q, k, v, scale=0.3, max_tokens=4096)
    assert chunks == [10] * 5
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)  # row by row: the same floats
    chunks.clear()
    soft_attend(q, k, v, scale=0.3, max_tokens=4096)  # gradients on: one chunk, as before
    assert chunks == [50]


@pytest.mark.parametrize("size", [(9, 13), (5, 6, 7)])
@pytest.mark.parametrize("grad", [False, True])
def test_local_match_in_slabs_equals_the_whole(size, grad):
    # below max_scores the grid goes in slabs along its first axis (a volume's full-resolution
    # windows would otherwise hold GBs of scores): the same flow and gradients, 2-D and 3-D
    fixed = torch.randn(2, 8, *size, requires_grad=grad)
    moving = torch.randn(2, 8, *size, requires_grad=grad)
    scale = torch.tensor(0.5, requires_grad=grad)
    kw = {"radius": 2, "scale": scale, "prior": 0.3}
    whole = local_match(fixed, moving, **kw)
    per_row = 2 * size[-1] * (5 if len(size) == 2 else 5 * size[1] * 5) * 5
    slabs = local_match(fixed, moving, max_scores=2 * per_row, **kw)  # 2 rows a slab
    torch.testing.assert_close(slabs, whole, atol=1e-6, rtol=1e-6)
    if grad:
        g_whole = torch.autograd.grad(whole.square().sum(), (fixed, moving, scale))
        g_slabs = torch.autograd.grad(slabs.square().sum(), (fixed, moving, scale))
        for a, b in zip(g_slabs, g_whole, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sine_position_encoding_any_grid():
    pos = sine_position_encoding(8, (3, 5))
    assert pos.shape == (1, 8, 3, 5)
    assert torch.equal(pos[:, :4, 0, 0], pos[:, :4, 0, 4]), "rows part constant along rows"
    with pytest.raises(ConfigError, match="divisible by 4"):
        sine_position_encoding(6, (3, 5))


SWITCHES = [
    {},
    {"matching": "local"},
    {"layers": 0},
    {"layers": 2, "propagate": False},
    {"score": "dot", "prior": 0.0},
    {"local_scales": []},
    {"local_scales": [4, 2, 1], "radius": 2},
    {"integration_steps": 4},
    {"norm": "group", "learn_scores": False},
    {"channels": [8, 16, 32], "local_scales": [2]},
]


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (64, 24)])
@pytest.mark.parametrize(
    "switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default"
)
def test_every_switch_runs_at_any_size_and_meets_the_contract(switch, size):
    net = AiRMatch(image_size=size, **switch)
    contract.check_network(net)  # image_size, integration_steps, a dry run's flow shape
    assert net.image_size == size
    assert net.integration_steps == switch.get("integration_steps", 0)
    flow = net(*pair(*size, batch=3))
    assert flow.shape == (3, 2, *size)
    assert torch.isfinite(flow).all()


def test_a_size_other_than_the_built_one_runs_and_small_images_too():
    net = AiRMatch(image_size=28)
    assert net(*pair(41, 19)).shape == (2, 2, 41, 19)
    assert net(*pair(5, 7)).shape == (2, 2, 5, 7)  # one token at 1/8


def test_gradients_reach_every_parameter():
    net = AiRMatch(image_size=(24, 40), local_scales=[4, 2, 1], integration_steps=3)
    fixed, moving = pair(24, 40, batch=2)
    loss = (air_reg.warp(moving, net(fixed, moving)) - fixed).square().mean()
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient into {dead}"


def test_integration_steps_make_the_flow_the_exponential_of_the_velocity():
    net = AiRMatch(image_size=(24, 40), integration_steps=5, prior=0.0).eval()
    fixed, moving = pair(24, 40)
    with torch.no_grad():
        velocity = net.velocity(fixed, moving)
        flow = net(fixed, moving)
    torch.testing.assert_close(flow, integrate_velocity(velocity, 5), rtol=0, atol=1e-6)
    assert (flow - velocity).abs().max() > 0.01, "integration changed nothing"


@pytest.mark.parametrize("switch", [{}, {"local_scales": [4, 2, 1]}, {"channels": [8, 16, 32],
                                    "local_scales": [2], "integration_steps": 3}])  # fmt: skip
def test_the_fixed_images_encoded_once_give_the_same_flow(switch):
    net = AiRMatch(image_size=(37, 53), **switch).eval()
    fixed, moving = pair(37, 53, batch=3)
    with torch.no_grad():
        state = contract.fixed_state(net, fixed)
        assert torch.equal(net(fixed, moving, fixed_state=state), net(fixed, moving))
        picked = [x[[0, 2]] for x in state]  # a cascade's pairs still moving
        assert torch.equal(net(fixed[[0, 2]], moving[[0, 2]], fixed_state=picked),
                           net(fixed[[0, 2]], moving[[0, 2]]))  # fmt: skip
        with pytest.raises(ConfigError, match="encode_fixed"):
            net(fixed[:2], moving[:2], fixed_state=state)


def test_a_cascade_encodes_the_fixed_images_once(monkeypatch):
    from air_reg.refine.flows import apply_repeatedly

    net = AiRMatch(image_size=(32, 40)).eval()
    fixed, moving = pair(32, 40, batch=3)
    calls = []
    encode = net._encode
    monkeypatch.setattr(net, "_encode", lambda x: calls.append(len(x)) or encode(x))
    with torch.no_grad():
        once = apply_repeatedly(net, fixed, moving, 3, affine=True)
        assert calls == [3, 3, 3, 3]  # the fixed images, then the moving ones each pass
    plain = AiRMatch(image_size=(32, 40)).eval()  # as a network without the option
    plain.load_state_dict(net.state_dict())
    monkeypatch.setattr(type(plain), "encode_fixed", property(lambda self: None))
    with torch.no_grad():
        assert torch.equal(apply_repeatedly(plain, fixed, moving, 3, affine=True), once)


def test_accelerate_keeps_the_flow():
    net = AiRMatch(image_size=32, layers=2).eval()
    fixed, moving = pair(32, 32)
    with torch.no_grad():
        before = net(fixed, moving)
        speed.accelerate(net, attention="auto", dropout="fast")
        after = net(fixed, moving)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    ("shape", "radius", "score", "prior"),
    [((3, 32, 20, 52), 3, "l2", 1.0),  # rows longer than the SIMD width, an overlapping tail
     ((2, 8, 5, 7), 2, "dot", 0.0),  # rows shorter than it: pixel by pixel
     ((1, 48, 17, 16), 1, "l2", 0.4), ((2, 4, 9, 33), 3, "dot", 2.0)],
)  # fmt: skip
def test_the_local_match_kernel_is_the_torch_maths(shape, radius, score, prior):
    g = torch.Generator().manual_seed(sum(shape))
    fixed, moving = (3 * torch.randn(*shape, generator=g) for _ in range(2))
    kw = {"radius": radius, "scale": torch.tensor(0.8) / shape[1] ** 0.5, "score": score,
          "prior": prior}  # fmt: skip
    with torch.no_grad():
        expected = local_match(fixed, moving, **kw)
        got = kernel_local_match.local_match(fixed, moving, **kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert expected.abs().amax() > 0.5  # the windows do move pixels


@needs_kernel
def test_accelerate_runs_the_local_match_on_its_kernel_at_inference_only():
    net = AiRMatch(image_size=32).eval()
    assert type(net.local_match) is LocalMatch  # plain PyTorch until accelerated
    keys = set(net.state_dict())
    speed.accelerate(net, attention="auto")
    assert type(net.local_match) is kernel_local_match.KernelLocalMatch
    assert set(net.state_dict()) == keys  # checkpoints load either way
    fixed, moving = pair(32, 32)
    before = kernels.calls().get("local_match", {})
    with torch.no_grad():
        net(fixed, moving)
    net(fixed, moving).square().mean().backward()  # training: the torch ops carry the gradient
    after = kernels.calls()["local_match"]
    ran = {k: after.get(k, 0) - before.get(k, 0) for k in ("kernel", "torch")}
    assert ran == {"kernel": 2, "torch": 2}  # two finer scales, once each way
    volume = speed.accelerate(AiRMatch(image_size=(16, 16, 16)).eval())
    assert kernel_local_match.why_not(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    plain = speed.accelerate(AiRMatch(image_size=32), attention="sdpa")
    assert type(plain.local_match) is LocalMatch  # sdpa: PyTorch only
    assert type(volume.local_match) is kernel_local_match.KernelLocalMatch  # falls back per call


def test_the_displacement_comes_from_the_attention_not_a_head():
    # scaling the temperature up makes the match sharper: the flow changes with it alone
    net = AiRMatch(image_size=32).eval()
    fixed, moving = pair(32, 32)
    with torch.no_grad():
        before = net(fixed, moving)
        net.log_temperature.add_(2.0)
        after = net(fixed, moving)
    assert not torch.allclose(before, after, atol=1e-3)


def smooth_noise(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 4, size + 4, generator=g), 5, 1)


def test_self_registration_at_init_is_near_identity():
    image = smooth_noise(4, 64, seed=0)
    shifted = torch.roll(image, (4, -3), (2, 3))
    with torch.no_grad():
        net = AiRMatch(image_size=64).eval()
        same = net(image, image).norm(dim=1).mean()
        moved = net(shifted, image).norm(dim=1).mean()
        no_prior = AiRMatch(image_size=64, prior=0.0).eval()(image, image).norm(dim=1).mean()
    # untrained, measured: 0.35 px with the default prior, 2.2 px without (flat or similar
    # features tie, and a soft argmax of ties is their centroid); a 5-px shift untrained
    # gives only 0.5 px, so "much smaller than a shifted pair's" holds only after training
    assert same < 0.75, same
    assert same < 0.5 * no_prior, (same, no_prior)
    assert same < moved, (same, moved)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared machine 2 threads ran 2-5x slower
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_short_training_registers_known_warps():
    from air_reg.data.synthetic import make_flows

    torch.manual_seed(0)
    moving = smooth_noise(64, 48, seed=1)
    moving = (moving - moving.amin((2, 3), keepdim=True)) / moving.std((2, 3), keepdim=True) / 4
    flow = make_flows(64, 48, 3.0, torch.Generator().manual_seed(2))
    fixed = air_reg.warp(moving, flow)
    net = AiRMatch(image_size=48)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def errors():
        with torch.no_grad():
            pred = net.eval()(fixed[:16], moving[:16])
        net.train()
        mse = (air_reg.warp(moving[:16], pred) - fixed[:16]).square().mean()
        return mse, (pred - flow[:16]).norm(dim=1).mean()

    mse0, epe0 = errors()
    for step in range(30):  # measured: MSE 0.025 -> 0.008, EPE 1.41 -> 0.80 px
        i = torch.arange(16) + 16 * (step % 3 + 1)  # train on pairs 16..63, test on 0..15
        pred = net(fixed[i], moving[i])
        loss = (air_reg.warp(moving[i], pred) - fixed[i]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mse1, epe1 = errors()
    assert mse1 < 0.5 * mse0, (mse0, mse1)
    assert epe1 < 0.75 * epe0, (epe0, epe1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"matching": "nearest"}, "matching must be one of"),
        ({"score": "cos"}, "score must be one of"),
        ({"norm": "batch"}, "norm must be one of"),
        ({"local_scales": [8]}, "local_scales"),
        ({"local_scales": [3]}, "local_scales"),
        ({"heads": 3}, "divisible by heads"),
        ({"channels": [16, 30]}, "divisible by heads"),
        ({"channels": [16]}, "channels"),
        ({"radius": 0}, "radius"),
        ({"layers": -1}, "layers"),
        ({"integration_steps": True}, "integration_steps"),
        ({"temperature": 0.0}, "temperature"),
        ({"prior": -1.0}, "prior"),
        ({"padding": "wrap"}, "padding"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AiRMatch(**kwargs)


def test_it_builds_on_the_meta_device():
    with torch.device("meta"):
        net = AiRMatch(image_size=(33, 47))
    assert all(p.is_meta for p in net.parameters())


def test_the_config_composes_instantiates_and_runs(tmp_path):
    overrides = ["model=air_match", "data=synthetic", "data.image_size=32"]
    cfg = compose_config("train", overrides, tmp_path)
    model = instantiate(cfg.model)
    assert isinstance(model.net, AiRMatch)
    assert model.net.image_size == (32, 32)
    fixed, moving = pair(32, 32, batch=2)
    with torch.no_grad():
        flow = model(fixed, moving)
    assert flow.shape == (2, 2, 32, 32)
    assert torch.isfinite(flow).all()


@pytest.mark.slow
def test_one_epoch_of_training_and_a_load_model_round_trip(tmp_path):
    overrides = [
        "model=air_match",
        "trainer.max_epochs=1",
        "data.pairs_per_epoch=64",
        "data.num_test_pairs=32",
    ]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert {"train/loss", "val/mse", "test/mse"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    model = air_reg.load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, AiRMatch)
    assert model.image_size == (28, 28)
    with torch.no_grad():
        flow = model(*pair(28, 28, batch=3))
    assert flow.shape == (3, 2, 28, 28)
    assert torch.isfinite(flow).all()


def test_register_runs_an_any_size_network_at_the_pairs_own_size():
    from air_reg.refine import RefineSettings, Registrar
    from air_reg.register import register_batch

    torch.manual_seed(0)
    plain = Registrar(AiRMatch(image_size=32).eval())
    assert plain.accepts_any_size
    fixed, moving = torch.rand(1, 1, 40, 56), torch.rand(1, 1, 40, 56)
    ((warped, flow),) = register_batch(
        plain, [fixed], [moving], guard=False, spacings=[(1.0, 1.0)]
    )
    assert flow.shape == (1, 2, 40, 56)
    with torch.no_grad():
        assert torch.equal(flow, plain.net(fixed, moving))  # not resized to 32 x 32
    refiner = Registrar(plain.net, RefineSettings(steps=0))
    assert torch.equal(refiner.network_flow(fixed, moving), flow)
