"""Instance optimisation ("refinement") of flows at the images' own size, and cascades.

Conventions as in ``spatial_transformer``: a flow is a (B, 2, H, W) displacement in pixels on
the fixed grid, ``warped(p) = moving(p + flow(p))``.

``refine`` optimises ``similarity + reg_weight * Diffusion (+ fold_weight * NegativeJacobian)``
per pair (Adam is elementwise, so pairs stay independent), at the size of the images it is
given: over a pyramid of ``levels`` halvings (coarsest side >= ``min_size``), on a cubic
B-spline control grid ``spacing`` pixels apart, optionally diffeomorphic (a stationary velocity
integrated by scaling and squaring) and after an optional affine stage. ``Refiner`` runs a
network at its trained size first (or no network: model-free registration), brings its flow to
the images' size and refines it there. It never returns a flow whose similarity is worse than
doing nothing (``guard``).

The settings ``register``, ``eval`` and ``load_model(path, refine_steps=N)`` use live in one
file, ``air_reg/conf/refinement/<preset>.yaml`` (``preset``), chosen and measured as
``docs/protocol.md`` says. On 28 x 28 digits the default preset is the former one exactly: one
level, a 7 x 7 grid (spacing 4 px), 4 squaring steps, ``fold_weight`` 20.
"""

from __future__ import annotations

import inspect
import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from air_reg.config import CONFIG_DIR
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.losses import MSE, NCC, Diffusion, LocalNCC, MutualInformation
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    identity_grid,
    integrate_velocity,
    resize_flow,
    warp,
)
from air_reg.speed import warp as fast

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_LR = {"adam": 0.5, "lbfgs": 1.0}  # Adam: pixels per step; L-BFGS: first line-search step
SIMILARITIES = {"mse": MSE, "ncc": NCC, "lncc": LocalNCC, "mi": MutualInformation}
PRESET_DIR = Path(CONFIG_DIR) / "refinement"
DEFAULT_PRESET = "default"
AFFINE_LR = (0.01, 0.5)  # Adam steps of the affine stage: matrix entries, translation (px)
GUARD_TOL = 1e-6  # similarity rise below which a result is not "worse than doing nothing"
AUTO_POINTS = 24  # spacing=auto: control points along the short side, at most


class RefineSettingsError(ConfigError, TypeError):
    """A refinement setting that ``refine`` does not take (a TypeError, as before)."""


def load_preset(name: str = DEFAULT_PRESET) -> dict:
    """``refine``'s settings in a preset file (its ``refine:`` block; ``refine_steps`` and
    ``cascade`` are the entry points' own switches)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no refinement preset {name!r}; choose one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path))["refine"]


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of warping by ``first`` and then warping the result by ``second``."""
    # m1(q) = moving(q + f1(q)); warped(p) = m1(p + f2(p)) = moving(p + f2(p) + f1(p + f2(p))).
    # So total(p) = f2(p) + f1(p + f2(p)), i.e. phi_1 o phi_2 with phi_i(p) = p + f_i(p): the
    # field estimated LAST acts on the coordinates first. (f1(p) + f2(p + f1(p)) would be
    # phi_2 o phi_1, the forward-warp order.) Border padding extrapolates f1 outside.
    return second + warp(first, second)


def cascade(net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, k: int) -> torch.Tensor:
    """Apply ``net`` ``k`` times to the progressively warped moving image; composed flow."""
    if k < 1:
        raise ConfigError(f"cascade needs k >= 1, got {k}")
    total = net(fixed, moving)  # (B, 2, H, W)
    for _ in range(k - 1):
        # Resample the ORIGINAL moving image with the composed field: one interpolation, so
        # no blur accumulates over the cascade.
        step = net(fixed, warp(moving, total))
        total = compose(total, step)
    return total


def pyramid(size: tuple[int, int], levels: int, min_size: int = 16) -> list[tuple[int, int]]:
    """Level sizes, coarsest first: ``size`` halved up to ``levels - 1`` times, sides >= min."""
    h, w = size
    sizes = [(h, w)]
    for k in range(1, levels):
        coarse = (round(h / 2**k), round(w / 2**k))
        if min(coarse) < min_size:
            break
        sizes.append(coarse)
    return sizes[::-1]


def velocity_from_flow(flow: torch.Tensor, steps: int, iters: int = 8) -> torch.Tensor:
    """Approximate log of a flow: v with ``integrate_velocity(v, steps) ~ flow``, per pair."""
    velocity = flow.clone()  # first order: exp(v) = v + O(v dv)
    best, best_err = velocity, flow.new_full((flow.shape[0],), float("inf"))
    for _ in range(iters):
        residual = flow - integrate_velocity(velocity, steps)  # (B, 2, H, W)
        err = residual.square().flatten(1).mean(1)  # (B,)
        # The fixed point only contracts for moderate fields: keep each pair's best iterate.
        better = err < best_err
        best = torch.where(better[:, None, None, None], velocity, best)
        best_err = torch.where(better, err, best_err)
        velocity = velocity + residual
    return best


def _fit_coarse(dense: torch.Tensor, up: CoarseToDense) -> torch.Tensor:
    """Least-squares control grid (B, 2, gh, gw) whose upsampling best matches ``dense``."""
    rows, cols = torch.linalg.pinv(up.rows), torch.linalg.pinv(up.cols)  # (gh, H), (gw, W)
    return torch.einsum("gH,bcHW,hW->bcgh", rows, dense, cols)


def field_size(size: tuple[int, int], stride: int, min_size: int = 16) -> tuple[int, int]:
    """The grid the field is computed on at a level of ``size``: ``stride`` times coarser,
    unless that makes a side shorter than ``min_size``."""
    if stride < 1:
        raise ConfigError(f"refine.field_stride must be >= 1, got {stride}")
    coarse = tuple(math.ceil(n / stride) for n in size)
    return coarse if stride > 1 and min(coarse) >= min_size else tuple(size)


def control_grid(size: tuple[int, int], grid: int | None, spacing) -> tuple[int, int] | None:
    """(gh, gw) control points: ``grid`` x ``grid``, or ``spacing`` pixels apart (``"auto"``:
    ``auto_spacing``); neither: None (one value per pixel)."""
    if grid is not None and spacing is not None:
        raise ConfigError("give refine.grid (control points) or refine.spacing (px), not both")
    if grid is not None:
        return (int(grid), int(grid))
    if spacing == "auto":
        spacing = auto_spacing(size)
    if spacing is not None:
        if isinstance(spacing, str) or spacing <= 0:
            raise ConfigError(f"refine.spacing must be > 0 pixels or auto, got {spacing!r}")
        return tuple(max(2, math.ceil(n / spacing)) for n in size)
    return None


def auto_spacing(size: tuple[int, int]) -> float:
    """4 px, or wider on large images: at most ``AUTO_POINTS`` control points along the short
    side (7 x 7 on 28 x 28 digits, spacing 8.2 px on 233 x 197 slices)."""
    return max(4.0, min(size) / AUTO_POINTS)


def affine_flow(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Displacement of ``p -> p + (A - I)(p - c) + t``, (B, 2, H, W), from ``theta`` (B, 2, 3)
    = [A | t] in pixels (rows, cols) about the image centre ``c``."""
    h, w = size
    p = identity_grid(size, device=theta.device, dtype=theta.dtype)  # (2, H, W)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], device=theta.device, dtype=theta.dtype)
    q = p - centre[:, None, None]
    eye = torch.eye(2, device=theta.device, dtype=theta.dtype)
    return torch.einsum("bij,jhw->bihw", theta[:, :, :2] - eye, q) + theta[:, :, 2, None, None]


def _after_affine(flow: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """compose(affine, flow) in closed form: flow(p) + (A - I)(p + flow(p) - c) + t."""
    if theta is None:
        return flow
    h, w = flow.shape[-2:]
    eye = torch.eye(2, device=theta.device, dtype=theta.dtype)
    return (
        affine_flow(theta, (h, w))
        + flow
        + torch.einsum("bij,bjhw->bihw", theta[:, :, :2] - eye, flow)
    )


def _similarity(similarity) -> nn.Module:
    if similarity is None:
        return MSE()
    if isinstance(similarity, str):
        if similarity not in SIMILARITIES:
            raise ConfigError(
                f"unknown similarity {similarity!r}; choose one of {sorted(SIMILARITIES)} "
                f"(mi for images of different contrast)"
            )
        return SIMILARITIES[similarity]()
    return similarity


def per_pair(similarity: nn.Module, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """(B,) similarity of each pair alone (our similarities are batch means)."""
    return torch.stack(
        [similarity(warped[i : i + 1], fixed[i : i + 1]) for i in range(len(fixed))]
    )


@torch.no_grad()
def keep_if_better(
    flow: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, similarity=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guard: ``flow`` for each pair it leaves more similar (by ``GUARD_TOL``) than the
    unregistered images, the identity for the others; and which pairs got the identity (B,)."""
    similarity = _similarity(similarity)
    after = per_pair(similarity, warp(moving, flow), fixed)
    worse = after > per_pair(similarity, moving, fixed) - GUARD_TOL  # the identity is simpler
    return torch.where(worse[:, None, None, None], 0.0, flow), worse


def _check(steps: int, integration_steps: int, optimizer: str, levels: int = 1) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if steps < 0 or integration_steps < 0:
        raise ConfigError(
            f"steps, integration_steps must be >= 0, got {steps}, {integration_steps}"
        )
    if levels < 1:
        raise ConfigError(f"refine.levels must be >= 1 (1 = no pyramid), got {levels}")


def _upsampler(shape, size, mode: str, like: torch.Tensor) -> CoarseToDense | None:
    if shape is None:
        return None
    return CoarseToDense(in_size=shape, out_size=size, mode=mode).to(like)


class _Adam:
    """``torch.optim.Adam``'s update (betas 0.9, 0.999, eps 1e-8, bias-corrected) of one
    tensor, without the optimiser machinery: its first use imports ``torch._dynamo`` (1.3 s
    here) and its step costs more than a coarse level's whole objective."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, param: torch.Tensor) -> None:
        self.param, self.t = param, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        (b1, b2), grad = self.betas, self.param.grad
        self.t += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - b1**self.t))
        self.param.grad = None


def _optimise(param, loss, steps: int, optimizer: str, lr: float, adam=None, decay=1.0):
    """``steps`` of ``optimizer`` on ``loss()``; the Adam state carries over between levels.
    Adam's step size goes from ``lr`` down to ``decay * lr`` over the steps (cosine)."""
    if steps and optimizer == "adam":
        # Adam is elementwise, so the pairs are optimised fully independently.
        adam = adam or _Adam(param)
        for i in range(steps):
            t = i / max(steps - 1, 1)
            loss().backward()
            adam.step(lr * (decay + (1 - decay) * 0.5 * (1 + math.cos(math.pi * t))))
    elif steps:
        # One L-BFGS problem over the whole batch: the objectives are independent, but the
        # line search and curvature history are shared between pairs.
        lbfgs = torch.optim.LBFGS(
            [param], lr=lr, max_iter=steps, history_size=10, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            lbfgs.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            return value

        lbfgs.step(closure)
    return adam


def estimate_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    steps: int = 100,
    similarity=None,
    levels: int = 3,
    min_size: int = 16,
) -> torch.Tensor:
    """Affine pre-alignment ``theta`` (B, 2, 3) per pair (see ``affine_flow``), coarse to fine."""
    similarity = _similarity(similarity)
    b = fixed.shape[0]
    size = tuple(fixed.shape[-2:])
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        eye = torch.eye(2, 3, device=fixed.device, dtype=fixed.dtype)
        matrix = eye[:, :2].expand(b, 2, 2).clone().requires_grad_(True)
        shift = fixed.new_zeros(b, 2, 1).requires_grad_(True)
        opt = torch.optim.Adam([{"params": [matrix], "lr": AFFINE_LR[0]},
                                {"params": [shift], "lr": AFFINE_LR[1]}])  # fmt: skip
        sizes = pyramid(size, levels, min_size)
        for i, level_size in enumerate(sizes):
            f, m = resize(fixed, level_size), resize(moving, level_size)
            scale = torch.tensor(
                [level_size[0] / size[0], level_size[1] / size[1]], dtype=f.dtype, device=f.device
            )
            for _ in range(steps * (len(sizes) - i)):
                opt.zero_grad(set_to_none=True)
                theta = torch.cat([matrix, shift * scale[:, None]], 2)  # t in level pixels
                loss = similarity(warp(m, affine_flow(theta, level_size)), f)
                (b * loss).backward()
                opt.step()
        return torch.cat([matrix, shift], 2).detach()


def refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init_flow: torch.Tensor | None = None,
    *,
    steps: int = 50,
    lr: float | None = None,
    similarity: nn.Module | str | None = None,
    regularizer: nn.Module | None = None,
    reg_weight: float = 0.05,
    fold_weight: float = 0.0,
    fold_margin: float = 0.05,
    integration_steps: int = 0,
    optimizer: str = "adam",
    grid: int | None = None,
    spacing: float | None = None,
    grid_mode: str = "bspline",
    levels: int = 1,
    min_size: int = 16,
    affine_steps: int = 0,
    affine: torch.Tensor | None = None,
    guard: bool = False,
    field_stride: int = 1,
    lr_decay: float = 1.0,
    init_velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimise ``similarity + reg_weight * regularizer`` per pair; the refined flow (detached).

    ``similarity``: a module or ``"mse"`` (default), ``"ncc"``, ``"lncc"``, ``"mi"``;
    ``regularizer`` defaults to ``Diffusion()`` of the dense displacement (as in training);
    ``fold_weight`` adds ``NegativeJacobian(fold_margin)`` (zero where det J > the margin);
    ``lr=None`` is 0.5 for
    Adam, 1 for L-BFGS. With ``integration_steps > 0`` the variable is a stationary velocity
    (``init_velocity``, else an approximate log of ``init_flow``) integrated by scaling and
    squaring. The variable is a cubic B-spline control grid ``spacing`` pixels apart (or
    ``grid`` x ``grid`` points; neither: one value per pixel), initialised by least squares.
    ``levels > 1``: coarse to fine over a pyramid of halvings, ``steps * (1 + k)`` steps at the
    level ``k`` halvings down (the last, full-size level gets ``steps``). ``affine_steps > 0``:
    an affine stage first (``estimate_affine``), or a given ``affine`` (B, 2, 3) that the
    deformable flow is composed with. ``guard``: start each pair from the identity (or the
    affine) where ``init_flow`` is less similar than that, and return the identity for a pair
    whose result is less similar than the unregistered images (never worse than doing nothing).
    ``field_stride`` s > 1: the velocity, its integration and the penalties live on a grid s
    times coarser than each level (where its sides stay >= ``min_size``) while optimising,
    bilinearly resampled to warp the image: the field is smooth at the control spacing, and
    each step is ~s**2 less work; the result is integrated at full size.
    ``lr_decay``: Adam's step size falls from ``lr`` to ``lr_decay * lr`` within each level.
    """
    _check(steps, integration_steps, optimizer, levels)
    similarity = _similarity(similarity)
    regularizer = Diffusion() if regularizer is None else regularizer
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    b, _, h, w = fixed.shape
    shape = control_grid((h, w), grid, spacing)
    # Lightning's test/predict loops run under inference_mode, which enable_grad alone does
    # not lift; clones made inside inference_mode(False) are ordinary tensors autograd can use.
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        if affine is None and affine_steps:
            affine = estimate_affine(fixed, moving, steps=affine_steps, similarity=similarity,
                                     levels=levels, min_size=min_size)  # fmt: skip
        affine = None if affine is None else affine.detach().clone()
        start = fixed.new_zeros(b, 2, h, w) if init_flow is None else init_flow.detach().clone()
        if guard and init_flow is not None:  # a worse start than the identity: the identity
            with torch.no_grad():
                base = _after_affine(torch.zeros_like(start), affine)
                s_init = per_pair(similarity, warp(moving, _after_affine(start, affine)), fixed)
                s_base = per_pair(similarity, warp(moving, base), fixed)
            start = torch.where((s_init < s_base)[:, None, None, None], start, 0.0)
        if integration_steps and init_velocity is not None:
            start = init_velocity.detach().clone()
        elif integration_steps and init_flow is not None:
            start = velocity_from_flow(start, integration_steps)
        if shape is not None:
            up = CoarseToDense(in_size=shape, out_size=(h, w), mode=grid_mode).to(start)
            start = _fit_coarse(start, up)
        param = start.requires_grad_(True)  # (B, 2, H, W), or (B, 2, gh, gw)

        def dense_flow(size: tuple[int, int], up: CoarseToDense | None, extra: int = 0):
            """The flow on a ``size`` grid, in that grid's pixels (``extra`` squarings more)."""
            if up is not None:
                field = up(param)
            else:  # one value per pixel: resampled like a flow, without its rescaling
                field = F.interpolate(param, size=size, mode="bilinear", align_corners=False,
                                      antialias=True) if size != (h, w) else param  # fmt: skip
            scale = torch.tensor([size[0] / h, size[1] / w], dtype=field.dtype,
                                 device=field.device)  # fmt: skip
            if size != (h, w):  # full-size pixels -> this grid's pixels
                field = field * scale.view(1, 2, 1, 1)
            squarings = integration_steps + extra if integration_steps else 0
            flow = fast.integrate(field, squarings) if squarings else field
            if affine is not None:
                level = torch.cat([affine[:, :, :2], affine[:, :, 2:] * scale[:, None]], 2)
                flow = _after_affine(flow, level)
            return flow

        def objective(f, m, size, up) -> torch.Tensor:
            coarse = dense_flow(field_size(size, field_stride, min_size), up)
            loss = similarity(fast.upwarp(m, coarse), f)
            loss = loss + fast.penalty(coarse, reg_weight, fold_weight, fold_margin, regularizer)
            # Our losses are batch means: B x mean = sum of per-pair means, so each pair's
            # gradient is that of its own objective, whatever the batch size.
            return b * loss

        sizes, opt = pyramid((h, w), levels, min_size), None
        for i, size in enumerate(sizes):
            f, m = resize(fixed, size), resize(moving, size)
            up = _upsampler(shape, field_size(size, field_stride, min_size), grid_mode, param)
            loss = partial(objective, f, m, size, up)
            opt = _optimise(param, loss, steps * (len(sizes) - i), optimizer, lr, opt, lr_decay)
        with torch.no_grad():
            # The result is integrated at full size (a bilinearly resampled coarse flow can
            # fold between its nodes where the coarse one does not), with as many more
            # squarings as the field grid is halvings coarser: the same step per grid cell
            # as while optimising. More would integrate a different, more compressive map
            # than the one the fold penalty saw (a test pair of the brain slices folded).
            coarse = field_size((h, w), field_stride, min_size)
            extra = max(0, round(math.log2(h / coarse[0]))) if integration_steps else 0
            flow = dense_flow((h, w), _upsampler(shape, (h, w), grid_mode, param),
                              extra).detach()  # fmt: skip
            if guard:
                flow, worse = keep_if_better(flow, fixed, moving, similarity)
                if worse.any():
                    log.info("refine: %d of %d pair(s) ended less similar than unregistered: "
                             "identity returned for them", int(worse.sum()), b)  # fmt: skip
            return flow


class Refiner(nn.Module):
    """A network's flow refined per pair at the images' own size; or no network at all.

    ``forward(fixed, moving)`` takes pairs of any one size (B, 1, H, W): the network runs at its
    trained size (the images resized to it, the flow brought back), then ``refine`` works at
    (H, W). ``net=None`` is model-free registration (from the identity, or the affine stage).
    The network only runs in eval mode without gradients, so its parameters never change.
    ``integration_steps=None`` keeps the network's own (a diffeomorphic net stays
    diffeomorphic); ``cascade=k`` applies the net k times (composed) before refining; with
    ``affine_steps`` the affine stage comes first and the network sees the aligned image. Every
    other keyword is one of ``refine``'s settings, with ``refine``'s defaults.
    """

    accepts_any_size = True  # register passes the images at their own size

    def __init__(
        self,
        net: nn.Module | None,
        *,
        integration_steps: int | None = None,
        cascade: int = 1,
        similarity: nn.Module | str | None = None,
        regularizer: nn.Module | None = None,
        **settings,
    ) -> None:
        super().__init__()
        self.net = None if net is None else net.eval()
        if integration_steps is None:
            # a RegistrationModule or TrainedModel holds its network as .net
            integration_steps = 0 if net is None else contract.integration_steps(_inner(net))
        self.integration_steps, self.cascade = integration_steps, cascade
        self.similarity = _similarity(similarity)
        self.regularizer = regularizer  # None: refine's default
        # Unknown names fail here, not at the first forward; the flows are forward's own.
        try:
            bound = inspect.signature(refine).bind_partial(**settings)
        except TypeError as err:
            raise RefineSettingsError(f"refine.*: {err}; the settings are {SETTINGS}") from None
        if {"fixed", "moving", "init_flow", "init_velocity", "affine"} & bound.arguments.keys():
            raise RefineSettingsError(
                f"Refiner takes refine's settings, not its inputs: {sorted(settings)}"
            )
        if cascade < 1:
            raise ConfigError(f"cascade needs k >= 1, got {cascade}")
        self.settings = settings
        bound.apply_defaults()  # refine's own defaults for what is not set
        args = bound.arguments
        _check(args["steps"], integration_steps, args["optimizer"], args["levels"])
        control_grid((64, 64), args["grid"], args["spacing"])  # grid and spacing agree
        if net is None and not args["steps"] and not args["affine_steps"]:
            raise ConfigError(
                "model-free registration (no network) with refine_steps=0 would return the "
                "identity; set refine_steps (e.g. refine_steps=50)"
            )

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The network's trained size; None without a network (any size)."""
        return None if self.net is None else contract.image_size(_inner(self.net))

    @property
    def build_config(self) -> dict | None:
        return getattr(self.net, "build_config", None)

    def train(self, mode: bool = True) -> Refiner:
        super().train(mode)
        if self.net is not None:
            self.net.eval()  # no dropout: the starting flow is the deterministic prediction
        return self

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        levels, min_size = self.settings.get("levels", 1), self.settings.get("min_size", 16)
        theta = None
        if self.settings.get("affine_steps"):
            theta = estimate_affine(fixed, moving, steps=self.settings["affine_steps"],
                                    similarity=self.similarity, levels=levels,
                                    min_size=min_size)  # fmt: skip
        init = None
        if self.net is not None:
            aligned = (
                moving if theta is None else warp(moving, affine_flow(theta, moving.shape[-2:]))
            )
            size = tuple(self.image_size)
            with torch.no_grad():
                init = cascade(self.net, resize(fixed, size), resize(aligned, size), self.cascade)
            init = resize_flow(init, tuple(fixed.shape[-2:]))
        settings = {k: v for k, v in self.settings.items() if k != "affine_steps"}
        return refine(
            fixed,
            moving,
            init,
            similarity=self.similarity,
            regularizer=self.regularizer,
            integration_steps=self.integration_steps,
            affine=theta,
            **settings,
        )

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"integration_steps={self.integration_steps}, cascade={self.cascade}, {settings}"


def _inner(net: nn.Module) -> nn.Module:
    return getattr(net, "net", net)


SETTINGS = [
    p.name
    for p in inspect.signature(refine).parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.name not in ("regularizer", "init_velocity", "affine")
]
