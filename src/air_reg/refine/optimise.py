"""``refine``: instance optimisation of flows per pair at the images' own size; the affine
stage (``estimate_affine``) and the guard (``keep_if_better``) it uses.

``refine`` optimises ``similarity + reg_weight * regularizer (+ fold_weight *
NegativeJacobian(fold_margin))`` per pair (Adam is elementwise, so pairs stay independent) over
a pyramid of ``levels`` halvings, on a cubic B-spline control grid, optionally diffeomorphic (a
stationary velocity integrated by scaling and squaring), after an optional affine stage: all as
``RefineSettings`` says.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from air_reg import deprecation
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.losses import (
    MSE,
    NCC,
    Diffusion,
    LocalNCC,
    MutualInformation,
    NormalisedGradientFields,
)
from air_reg.models.components.spatial_transformer import CoarseToDense, resample, warp
from air_reg.refine.flows import (
    affine_flow,
    after_affine,
    control_grid,
    field_size,
    fit_coarse,
    pyramid,
    velocity_from_flow,
)
from air_reg.refine.settings import LEGACY_DEFAULTS, RefineSettings
from air_reg.speed import refine_loop
from air_reg.speed import warp as warp_ops

log = logging.getLogger(__name__)

SIMILARITIES = {
    "mse": MSE,
    "ncc": NCC,
    "lncc": LocalNCC,
    "mi": MutualInformation,  # Parzen-window (Mattes) normalised MI, 32 bins, all pixels
    "ngf": NormalisedGradientFields,
}
AFFINE_LR = (0.01, 0.5)  # Adam steps of the affine stage: matrix entries, translation (px)
# The affine stage's finest level has at most this many pixels: its 12 numbers need no 1 mm
# detail (the deformable stage after it works at full size). 512 x 512 images stay whole.
AFFINE_MAX_VOXELS = 2**18
GUARD_TOL = 1e-6  # similarity rise below which a result is not "worse than doing nothing"
MI_GUARD_TOL = 0.005  # nats of mutual information a kept result may lose (of ~1-3 at best)
# NGF loss rise above which a result gets the identity (its edges line up worse than before):
# chosen on the tune / validation pairs by experiments/guard_choice.py (docs/protocol.md)
NGF_GUARD_TOL = 0.005
# prealign_affine leaves images with a shorter side alone. On the tune families (54 pairs a
# size, experiments/prealign_choice.py) the one-shot model's large-motion error fell by 14 % at
# 160 x 208 with no pair worse, by 0.5-2 % at 96 x 128 and 64 x 80 with one pair each more than
# 0.5 px worse; at 64 x 80 a held-out contrast pair was moved 10.7 px the wrong way by the MI
# affine alone (neither MI nor the edges, NGF, told it from a right move)
PREALIGN_MIN_SIDE = 128
# init_flow may be a function of (fixed, moving after the affine stage): a network's flow.
InitFlow = torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def similarity_module(similarity) -> nn.Module:
    """A similarity module from its name (``RefineSettings.similarity``) or itself."""
    if similarity is None:
        return MSE()
    if isinstance(similarity, str):
        if similarity not in SIMILARITIES:
            raise ConfigError(
                f"unknown similarity {similarity!r}; choose one of {sorted(SIMILARITIES)} "
                f"(mi or ngf for images of different contrast)"
            )
        return SIMILARITIES[similarity]()
    return similarity


def per_pair(similarity: nn.Module, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """(B,) similarity of each pair alone (our similarities are batch means); MI's, MSE's and
    NGF's in one call (MI without autograd under no_grad: ``MutualInformation.histogram``),
    the others a call a pair."""
    if type(similarity) is MutualInformation:
        return -similarity.mutual_information(warped, fixed)
    if type(similarity) is MSE:
        return (warped - fixed).square().flatten(1).mean(1)
    if type(similarity) is NormalisedGradientFields:
        return similarity.per_pair(warped, fixed)
    return torch.stack(
        [similarity(warped[i : i + 1], fixed[i : i + 1]) for i in range(len(fixed))]
    )


@torch.no_grad()
def keep_if_better(
    flow: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, similarity=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guard: ``flow`` for each pair it leaves more similar (by ``GUARD_TOL``) than the
    unregistered images AND with no less mutual information (by ``MI_GUARD_TOL``) AND, unless
    ``similarity`` is MI or NGF, with edges no less aligned (the NGF loss up by at most
    ``NGF_GUARD_TOL``); the identity for the others; and which pairs got the identity (B,).

    The first test uses ``similarity`` (the refinement's own; default MSE); the other two are
    valid across contrasts: MSE "improves" a pair of different contrast by distorting it
    (measured: 0.9 px -> 12 px error), MI catches most of those and NGF the ones whose
    distortion raised MI too, so such a pair is never made worse silently (a warning names the
    fix). A NaN result counts as worse.
    """
    similarity = similarity_module(similarity)
    warped = warp(moving, flow)
    # after and before in one batch: each measure is per pair, so the same values in half the
    # calls (a call's overhead is most of its cost on small images)
    both, fixed2 = torch.cat([warped, moving]), torch.cat([fixed, fixed])
    mi = MutualInformation(normalised=False)  # in nats, as MI_GUARD_TOL
    joints = mi.histogram(both, fixed2).chunk(2)  # after, before

    def values(measure: MutualInformation) -> list[torch.Tensor]:
        return [measure.from_histogram(j).to(warped.dtype) for j in joints]

    keys = ("bins", "sampling", "fixed_window")
    if type(similarity) is MutualInformation and all(
        getattr(similarity, k) == getattr(mi, k) for k in keys
    ):  # refine's MI: the same histograms, as NMI (or MI)
        after, before = (-v for v in values(similarity))
    else:
        after, before = per_pair(similarity, both, fixed2).chunk(2)
    mi_after, mi_before = values(mi)
    worse, lost, _ = guard_rejects(after, before, mi_after, mi_before)
    _warn_refused(lost, similarity, "less mutual information")
    reject = worse | lost
    blind = isinstance(similarity, MutualInformation | NormalisedGradientFields)
    if not blind and not reject.all():
        ngf = NormalisedGradientFields()  # contrast-blind: a third, edge rule
        ngf_after, ngf_before = per_pair(ngf, both, fixed2).chunk(2)
        rise = ngf_after - ngf_before
        edges = guard_rejects(after, before, mi_after, mi_before, rise)[2]
        _warn_refused(edges, similarity, "edges less aligned (NGF)")
        reject = reject | edges
    return torch.where(reject.view(-1, *[1] * (flow.ndim - 1)), 0.0, flow), reject


def _warn_refused(refused: torch.Tensor, similarity, why: str) -> None:
    """The guard's warning for pairs (B,) a contrast-blind rule refused, naming the fix."""
    if refused.any():
        log.warning(
            "guard: %d of %d pair(s) more similar by %s but with %s than unregistered (a "
            "contrast change?): identity returned for them; refine with refine.similarity=mi",
            int(refused.sum()),
            len(refused),
            type(similarity).__name__,
            why,
        )


def guard_rejects(
    after: torch.Tensor,
    before: torch.Tensor,
    mi_after: torch.Tensor,
    mi_before: torch.Tensor,
    ngf_rise: torch.Tensor | None = None,
    ngf_tol: float = NGF_GUARD_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guard's three rules on per-pair measures (B,): ``worse`` (the similarity, lower is
    better, not improved by ``GUARD_TOL``, or NaN: the identity is simpler), ``lost`` (mutual
    information down by more than ``MI_GUARD_TOL`` nats) and ``edges`` (the NGF loss up by more
    than ``ngf_tol``; none without ``ngf_rise``): each a pair the ones before it kept. A pair
    any of them names gets the identity (``keep_if_better``)."""
    worse = (after > before - GUARD_TOL) | after.isnan()
    lost = (mi_after < mi_before - MI_GUARD_TOL) & ~worse
    edges = torch.zeros_like(worse) if ngf_rise is None else (ngf_rise > ngf_tol) & ~(worse | lost)
    return worse, lost, edges


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
    max_voxels: int | None = AFFINE_MAX_VOXELS,
    min_px: float = 0.0,
) -> torch.Tensor:
    """Affine pre-alignment ``theta`` (B, D, D + 1) per pair (see ``affine_flow``), coarse to
    fine; 2-D or 3-D. The pyramid starts from the images halved until they have at most
    ``max_voxels`` pixels (``_affine_top``; None: from their own size). ``min_px`` > 0: a pair
    whose affine after the coarsest level moves no pixel by more than ``min_px`` gets the
    identity, and the finer levels are skipped when no pair is left (nearly aligned pairs then
    cost one coarse level). Volumes take one torch thread on an oversubscribed machine
    (``_one_thread_if_busy``)."""
    similarity = similarity_module(similarity)
    b = fixed.shape[0]
    size = tuple(fixed.shape[2:])
    nd = len(size)
    sizes = pyramid(_affine_top(size, max_voxels, min_size), levels, min_size)
    if nd == 2 and refine_loop.supports(similarity) and refine_loop.available(fixed, moving):
        return _fused_affine(fixed, moving, sizes, steps, similarity, min_px)
    busy = _one_thread_if_busy() if nd == 3 else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), busy:
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        eye = torch.eye(nd, nd + 1, device=fixed.device, dtype=fixed.dtype)
        matrix = eye[:, :nd].expand(b, nd, nd).clone().requires_grad_(True)
        shift = fixed.new_zeros(b, nd, 1).requires_grad_(True)
        opt = torch.optim.Adam([{"params": [matrix], "lr": AFFINE_LR[0]},
                                {"params": [shift], "lr": AFFINE_LR[1]}])  # fmt: skip
        alive = None
        for i, level_size in enumerate(sizes):
            f, m = resize(fixed, level_size), resize(moving, level_size)
            scale = torch.tensor([n / full for n, full in zip(level_size, size, strict=True)],
                                 dtype=f.dtype, device=f.device)  # fmt: skip
            for _ in range(steps * (len(sizes) - i)):
                opt.zero_grad(set_to_none=True)
                theta = torch.cat([matrix, shift * scale[:, None]], 2)  # t in level pixels
                loss = similarity(warp(m, affine_flow(theta, level_size)), f)
                (b * loss).backward()
                opt.step()
            if i == 0 and min_px:
                alive = affine_reach(torch.cat([matrix, shift], 2).detach(), size) > min_px
                if not alive.any():
                    break
        return only_where(torch.cat([matrix, shift], 2).detach(), alive)


def prealign_affine(fixed: torch.Tensor, moving: torch.Tensor, steps: int) -> torch.Tensor | None:
    """A one-shot network's pre-alignment (``Registrar``'s ``prealign``): the default preset's
    affine stage (``RefineSettings()``: its pyramid, its ``affine_min_px`` gate) with ``steps``
    Adam steps by mutual information (another contrast's intensities do not pull it; it can
    still prefer a wrong affine there: ``Registrar`` asks the network to agree). ``theta``
    (B, D, D + 1) with the identity for pairs it moves by at most ``affine_min_px``; None when
    no pair keeps one, and for images whose short side is under ``PREALIGN_MIN_SIDE`` px."""
    if min(fixed.shape[2:]) < PREALIGN_MIN_SIDE:
        return None
    with torch.inference_mode(False), torch.no_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        return affine_stage(fixed, moving, RefineSettings(affine_steps=steps), "mi")


def affine_stage(fixed, moving, s: RefineSettings, similarity) -> torch.Tensor | None:
    """The settings' affine stage (``estimate_affine`` with ``s``'s steps, pyramid and gate):
    ``theta`` (B, D, D + 1), the identity for pairs it moves by at most ``affine_min_px``;
    None when no pair keeps one."""
    theta = estimate_affine(fixed, moving, steps=s.affine_steps, similarity=similarity,
                            levels=s.levels, min_size=s.min_size,
                            max_voxels=s.affine_max_voxels, min_px=s.affine_min_px)  # fmt: skip
    return _large_enough(theta, tuple(fixed.shape[2:]), s.affine_min_px)


def _fused_affine(fixed, moving, sizes, steps: int, similarity, min_px: float) -> torch.Tensor:
    """``estimate_affine``'s loop on 2-D float32 CPU images for MSE or MI, each level in one C++
    call (``refine_loop.adam_affine_level``): the same maths and Adam, no autograd."""
    b, full = fixed.shape[0], tuple(fixed.shape[2:])
    matrix = torch.eye(2, dtype=fixed.dtype).expand(b, 2, 2).contiguous()
    shift = fixed.new_zeros(b, 2)
    m, v, t, alive = fixed.new_zeros(b, 6), fixed.new_zeros(b, 6), 0, None
    with torch.no_grad():
        for i, level_size in enumerate(sizes):
            f, mv = resize(fixed, level_size), resize(moving, level_size)
            scale = tuple(n / whole for n, whole in zip(level_size, full, strict=True))
            t = refine_loop.adam_affine_level(matrix, shift, m, v, t, f, mv, scale=scale,
                                              steps=steps * (len(sizes) - i), lr=AFFINE_LR,
                                              similarity=similarity)  # fmt: skip
            if i == 0 and min_px:
                alive = affine_reach(torch.cat([matrix, shift[:, :, None]], 2), full) > min_px
                if not alive.any():
                    break
    return only_where(torch.cat([matrix, shift[:, :, None]], 2), alive)


def affine_reach(theta: torch.Tensor, size) -> torch.Tensor:
    """(B,) the largest displacement (px) of each pair's affine ``theta`` over the image:
    ``affine_flow``'s largest norm, which (a convex function of the position) is at a corner
    pixel, so only the 2**D corners are computed."""
    nd = len(size)
    half = torch.tensor([(n - 1) / 2 for n in size], dtype=theta.dtype, device=theta.device)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=theta.dtype)] * nd)
    corners = signs.view(-1, nd).to(theta.device) * half  # (2**D, D), about the centre
    eye = torch.eye(nd, dtype=theta.dtype, device=theta.device)
    moved = corners @ (theta[:, :, :nd] - eye).transpose(1, 2) + theta[:, None, :, nd]
    return moved.norm(dim=2).amax(1)


def only_where(theta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``theta`` (B, D, D + 1) where ``keep`` (B,) (None: everywhere), the identity elsewhere."""
    if keep is None:
        return theta
    nd = theta.shape[1]
    eye = torch.eye(nd, nd + 1, dtype=theta.dtype, device=theta.device).expand_as(theta)
    return torch.where(keep[:, None, None], theta, eye)


def _affine_top(size: tuple[int, ...], max_voxels: int | None, min_size: int) -> tuple[int, ...]:
    """The affine stage's finest level: the finest of ``pyramid``'s halvings of ``size`` with
    at most ``max_voxels`` pixels (no side below ``min_size``: else the coarsest)."""
    finest_first = pyramid(size, 64, min_size)[::-1]
    fits = (s for s in finest_first if max_voxels is None or math.prod(s) <= max_voxels)
    return next(fits, finest_first[-1])


@contextlib.contextmanager
def _one_thread_if_busy():
    """One torch thread within the block where more tasks want to run than there are cores
    (``refine_loop._oversubscribed``): each small op of the affine stage meets its threads at
    a barrier, which then waits for a descheduled one. Measured on a 1 mm pair (levels of at
    most 139 k voxels) at load 4 on 2 cores: 2.2 s with one thread, 18.7 s with two."""
    before = torch.get_num_threads()
    if before > 1 and refine_loop._oversubscribed():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init_flow: InitFlow = None,
    settings: RefineSettings | None = None,
    *,
    affine: torch.Tensor | None = None,
    init_velocity: torch.Tensor | None = None,
    spacing: tuple[float, ...] | None = None,
    **legacy,
) -> torch.Tensor:
    """The flow (B, 2, H, W), detached, that ``settings`` (default: ``RefineSettings()``, the
    default preset) find for each pair of (B, 1, H, W) images, at their own size.

    The affine stage lives here alone: a given ``affine`` (B, 2, 3), else ``estimate_affine``
    when ``settings.affine_steps > 0``; the deformable flow is composed with it. ``init_flow``
    is the starting flow, or a function of (fixed, moving after the affine stage) that gives
    it (a network: ``Registrar``). With ``integration_steps > 0`` the variable is a stationary
    velocity (``init_velocity``, else an approximate log of the start). ``guard``: a start less
    similar than the identity (or the affine) is replaced by it, and a pair whose result is
    less similar than the unregistered images gets the identity (``keep_if_better``).
    ``field_stride`` s > 1: the field, its integration and the penalties live on a grid s
    times coarser than each level while optimising (~s**2 less work); the result is
    integrated at full size. ``spacing`` (mm per pixel, per axis; the batch shares it): an
    anisotropic one makes the diffusion and the control grid physical (``Diffusion(spacing)``,
    ``control_grid``). Keywords (``steps=20, lr=0.5``) are deprecated: they apply to
    ``LEGACY_DEFAULTS``, the former keyword defaults.
    """
    if legacy:
        deprecation.warn(
            f"refine(..., {', '.join(f'{k}=' for k in legacy)}) is deprecated; pass "
            f"refine(fixed, moving, init_flow, RefineSettings(...)) (air_reg.refine)"
        )
        settings = (settings or LEGACY_DEFAULTS).replace(**legacy)
    s = RefineSettings() if settings is None else settings
    if not isinstance(s, RefineSettings):
        raise ConfigError(
            f"refine's settings are a RefineSettings, got {type(s).__name__}; e.g. "
            f"RefineSettings.from_config(block) for a dict of settings"
        )
    similarity = similarity_module(s.similarity)
    if spacing is not None and len(set(spacing)) == 1:
        spacing = None  # isotropic: the pixel form is the physical one
    regularizer = Diffusion(spacing) if s.regularizer is None else s.regularizer
    squarings, lr = s.integration_steps or 0, s.step_size
    b, full = fixed.shape[0], tuple(fixed.shape[2:])  # (H, W) or (D, H, W)
    nd = len(full)
    shape = control_grid(full, s.grid, s.spacing, spacing)
    stride = s.stride_for(full)
    # Lightning's test/predict loops run under inference_mode, which enable_grad alone does
    # not lift; clones made inside inference_mode(False) are ordinary tensors autograd can use.
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        if affine is None and s.affine_steps:
            affine = affine_stage(fixed, moving, s, similarity)
        affine = None if affine is None else affine.detach().clone()
        if callable(init_flow):  # a network sees the moving image after the affine stage
            with torch.no_grad():
                aligned = moving if affine is None else warp(moving, affine_flow(affine, full))
                init_flow = init_flow(fixed, aligned)
        start = fixed.new_zeros(b, nd, *full) if init_flow is None else init_flow.detach().clone()
        if s.guard and init_flow is not None:  # a worse start than the identity: the identity
            with torch.no_grad():
                base = after_affine(torch.zeros_like(start), affine)
                s_init = per_pair(similarity, warp(moving, after_affine(start, affine)), fixed)
                s_base = per_pair(similarity, warp(moving, base), fixed)
            start = torch.where((s_init < s_base).view(-1, *[1] * (nd + 1)), start, 0.0)
        if squarings and init_velocity is not None:
            start = init_velocity.detach().clone()
        elif squarings and init_flow is not None:
            start = velocity_from_flow(start, squarings)
        if shape is not None and init_flow is None and init_velocity is None:
            start = start.new_zeros(b, nd, *shape)  # the identity's control grid: no fit
        elif shape is not None:
            up = CoarseToDense(in_size=shape, out_size=full, mode=s.grid_mode).to(start)
            start = fit_coarse(start, up)
        param = start.requires_grad_(True)  # (B, D, *full), or (B, D, *control grid)

        def dense_flow(size: tuple[int, ...], up: CoarseToDense | None, extra: int = 0):
            """The flow on a ``size`` grid, in that grid's pixels (``extra`` squarings more)."""
            if up is not None:
                field = up(param)
            else:  # one value per pixel: resampled like a flow, without its rescaling
                field = resample(param, size, antialias=True) if size != full else param
            scale = torch.tensor([n / f for n, f in zip(size, full, strict=True)],
                                 dtype=field.dtype, device=field.device)  # fmt: skip
            if size != full:  # full-size pixels -> this grid's pixels
                field = field * scale.view(1, nd, *[1] * nd)
            n = squarings + extra if squarings else 0
            flow = warp_ops.integrate(field, n) if n else field
            if affine is not None:
                level = torch.cat([affine[:, :, :nd], affine[:, :, nd:] * scale[:, None]], 2)
                flow = after_affine(flow, level)
            return flow

        def objective(f, m, size, up) -> torch.Tensor:
            coarse = dense_flow(field_size(size, stride, s.min_size), up)
            loss = similarity(warp_ops.warp_by_coarse_flow(m, coarse), f)
            loss = loss + warp_ops.penalty(
                coarse, s.regularisation_weight, s.fold_weight, s.fold_margin, regularizer
            )
            # Our losses are batch means: B x mean = sum of per-pair means, so each pair's
            # gradient is that of its own objective, whatever the batch size.
            return b * loss

        # The fused level loop computes this objective (MSE or all-pixel MI, pixel diffusion)
        # and Adam exactly.
        fused = (shape is not None and s.optimizer == "adam" and refine_loop.supports(similarity)
                 and type(regularizer) is Diffusion and regularizer.spacing is None
                 and refine_loop.available(param, fixed))  # fmt: skip
        sizes, opt = pyramid(full, s.levels, s.min_size), None
        for i, size in enumerate(sizes):
            f, m = resize(fixed, size), resize(moving, size)
            grid = field_size(size, stride, s.min_size)
            up = _upsampler(shape, grid, s.grid_mode, param)
            steps = s.steps * (len(sizes) - i)
            if fused and refine_loop.supports(similarity, nd) and steps and min(grid) >= 2:
                opt = _fused_level(param, opt, f, m, up, full, affine, squarings, s, steps,
                                   similarity)  # fmt: skip
                continue
            loss = partial(objective, f, m, size, up)
            opt = _optimise(param, loss, steps, s.optimizer, lr, opt, s.lr_decay)
        with torch.no_grad():
            # The result is integrated at full size (a bilinearly resampled coarse flow can
            # fold between its nodes where the coarse one does not), with as many more
            # squarings as the field grid is halvings coarser: the same step per grid cell
            # as while optimising. More would integrate a different, more compressive map
            # than the one the fold penalty saw (a test pair of the brain slices folded).
            coarse = field_size(full, stride, s.min_size)
            extra = max(0, round(math.log2(full[0] / coarse[0]))) if squarings else 0
            flow = dense_flow(full, _upsampler(shape, full, s.grid_mode, param),
                              extra).detach()  # fmt: skip
            if s.guard:
                flow, worse = keep_if_better(flow, fixed, moving, similarity)
                if worse.any():
                    log.info("refine: %d of %d pair(s) ended less similar than unregistered: "
                             "identity returned for them", int(worse.sum()), b)  # fmt: skip
            return flow


def _fused_level(param, adam, f, m, up, full, affine, squarings, s, steps, similarity) -> _Adam:
    """``_optimise(param, objective, steps, "adam", ...)`` for refine's similarity (MSE or MI,
    ``refine_loop.supports``) + pixel diffusion objective at one level, in one C++ call
    (``speed.refine_loop``); same Adam state. 2-D or 3-D."""
    adam = adam or _Adam(param)
    grid = up.out_size
    nd = len(grid)
    scale = torch.tensor([g / n for g, n in zip(grid, full, strict=True)], dtype=param.dtype)
    field = matrix = None
    if affine is not None:  # dense_flow's level affine, in field-grid pixels
        level = torch.cat([affine[:, :, :nd], affine[:, :, nd:] * scale[:, None]], 2)
        field, matrix = affine_flow(level, grid), level[:, :, :nd] - torch.eye(nd).to(level)
    mats = up.matrices  # (field side, grid side) per axis
    if tuple(param.shape[2:]) == grid and up.mode != "bspline":  # up() is the identity
        mats = [torch.eye(n).to(x) for n, x in zip(grid, mats, strict=True)]
    *slices, rows, cols = mats
    adam.t = refine_loop.adam_level(
        param, adam.m, adam.v, adam.t, f, m, rows=rows, cols=cols,
        slices=slices[0] if slices else None, scale=tuple(float(x) for x in scale),
        squarings=squarings, steps=steps, lr=s.step_size, decay=s.lr_decay,
        reg_weight=s.regularisation_weight, fold_weight=s.fold_weight,
        fold_margin=s.fold_margin, affine=field, matrix=matrix, similarity=similarity,
    )  # fmt: skip
    return adam


def _large_enough(theta: torch.Tensor, size, min_px: float) -> torch.Tensor | None:
    """``theta`` (B, 2, 3) where its largest displacement over the image exceeds ``min_px``,
    the identity elsewhere; None when no pair keeps its affine (the deformable stage then runs
    exactly as without one)."""
    if not min_px:
        return theta
    keep = affine_reach(theta, size) > min_px
    return only_where(theta, keep) if keep.any() else None


def _upsampler(shape, size, mode: str, like: torch.Tensor) -> CoarseToDense | None:
    if shape is None:
        return None
    return CoarseToDense(in_size=shape, out_size=size, mode=mode).to(like)
