"""Flow algebra of the refinement: composition, a network applied repeatedly, pyramids,
control grids, affine fields and an approximate log of a flow.

Conventions as in ``spatial_transformer``: a flow is a (B, D, *spatial) displacement in pixels
(voxels) on the fixed grid, channel i along spatial axis i, ``warped(p) = moving(p + flow(p))``;
D = 2 or 3, one code path for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    identity_grid,
    integrate_velocity,
    warp,
)

AUTO_POINTS = 24  # spacing=auto: control points along the short side, at most


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of warping by ``first`` and then warping the result by ``second``."""
    # m1(q) = moving(q + f1(q)); warped(p) = m1(p + f2(p)) = moving(p + f2(p) + f1(p + f2(p))).
    # So total(p) = f2(p) + f1(p + f2(p)), i.e. phi_1 o phi_2 with phi_i(p) = p + f_i(p): the
    # field estimated LAST acts on the coordinates first. (f1(p) + f2(p + f1(p)) would be
    # phi_2 o phi_1, the forward-warp order.) Border padding extrapolates f1 outside.
    return second + warp(first, second)


def apply_repeatedly(
    net: nn.Module,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    times: int,
    affine: bool = False,
    tol: float = 0.0,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``net`` ``times`` times to the progressively warped moving image (the CLI's
    ``cascade``); the composed flow (B, D, *spatial). ``affine`` (``cascade_affine``): before
    each further pass the flow so far is reduced to its robust affine fit (``fit_affine``), so
    the next pass starts from a global alignment, not from the previous pass's local errors.
    ``tol`` (``cascade_tol``, px): a pair's passes stop once one changed its flow by less than
    this on average (``times`` is then the most); 0: always ``times`` passes. ``first``: the
    first pass's flow when it was already computed (it is not run again)."""
    if times < 1:
        raise ConfigError(f"cascade needs k >= 1, got {times}")
    if not tol >= 0:
        raise ConfigError(f"cascade_tol must be >= 0 px, got {tol}")
    # the fixed images' own work done once, not once a pass (the contract's encode_fixed)
    state = contract.fixed_state(net, fixed) if times > 1 else None
    if first is None:
        total = net(fixed, moving, **({} if state is None else {"fixed_state": state}))
    else:
        total = first
    active = torch.ones(len(total), dtype=torch.bool, device=total.device)  # with tol > 0
    for _ in range(times - 1):
        pick = active if tol > 0 else slice(None)  # the pairs still moving
        now = total[pick]
        start = affine_flow(fit_affine(now), tuple(now.shape[2:])) if affine else now
        # Resample the ORIGINAL moving image with the composed field: one interpolation, so
        # no blur accumulates over the cascade.
        kw = {} if state is None else {"fixed_state": [x[pick] for x in state]}
        step = net(fixed[pick], warp(moving[pick], start), **kw)
        new = compose(start, step)
        if tol <= 0:
            total = new
            continue
        moved = (new - now).norm(dim=1).flatten(1).mean(1)  # px, per pair
        total = total.index_put((active,), new)
        active = active.index_put((active,), moved >= tol)
        if not active.any():
            break
    return total


FIT_POINTS = 65536  # fit_affine: at most about this many pixels (a regular subgrid beyond)
FIT_FLOOR = 0.5  # px: residuals below this weigh as much as this one (IRLS)


def fit_affine(flow: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """``theta`` (B, D, D + 1) whose ``affine_flow`` is closest to ``flow`` (B, D, *spatial):
    least squares, then ``iterations`` reweightings by 1 / max(residual, ``FIT_FLOOR``) (an
    L1-like fit: a region the flow gets wrong, e.g. where the target left the image, moves it
    little). On at most about ``FIT_POINTS`` pixels (a regular subgrid of larger images)."""
    d, size = flow.shape[1], tuple(flow.shape[2:])
    stride = max(1, math.ceil((math.prod(size) / FIT_POINTS) ** (1 / d)))
    sub = flow[(..., *[slice(None, None, stride)] * d)].double()  # (B, D, *sub)
    centre = torch.tensor([(n - 1) / 2 for n in size], dtype=sub.dtype, device=sub.device)
    q = identity_grid(tuple(sub.shape[2:]), device=sub.device, dtype=sub.dtype) * stride
    q = (q.flatten(1) - centre[:, None]).T  # (N, D) about the image centre
    x = torch.cat([q, torch.ones_like(q[:, :1])], 1)  # (N, D + 1)
    y = sub.flatten(2).transpose(1, 2)  # (B, N, D)

    def solve(weight: torch.Tensor) -> torch.Tensor:  # (B, N, 1) -> (B, D + 1, D)
        xtw = (x * weight).transpose(1, 2)  # (B, D + 1, N)
        return torch.linalg.solve(xtw @ x, xtw @ y)

    solution = solve(torch.ones_like(y[..., :1]))
    for _ in range(iterations):  # reweighted by the last fit's residuals
        solution = solve(1 / (x @ solution - y).norm(dim=2, keepdim=True).clamp_min(FIT_FLOOR))
    eye = torch.eye(d, dtype=sub.dtype, device=sub.device)
    theta = torch.cat([solution[:, :d].transpose(1, 2) + eye, solution[:, d:].transpose(1, 2)], 2)
    return theta.to(flow.dtype)


def pyramid(size: tuple[int, ...], levels: int, min_size: int = 16) -> list[tuple[int, ...]]:
    """Level sizes, coarsest first: ``size`` halved up to ``levels - 1`` times, sides >= min."""
    sizes = [tuple(size)]
    for k in range(1, levels):
        coarse = tuple(round(n / 2**k) for n in size)
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
        best = torch.where(better.view(-1, *[1] * (flow.ndim - 1)), velocity, best)
        best_err = torch.where(better, err, best_err)
        velocity = velocity + residual
    return best


def fit_coarse(dense: torch.Tensor, up: CoarseToDense) -> torch.Tensor:
    """Least-squares control grid (B, D, *grid) whose upsampling best matches ``dense``."""
    pinvs = [torch.linalg.pinv(m) for m in up.matrices]  # (grid side, size side) per axis
    low, full = "dhw"[-len(pinvs) :], "DHW"[-len(pinvs) :]
    mats = [f"{lo}{u}" for lo, u in zip(low, full, strict=True)]
    # 2-D: "hH,bcHW,wW->bchw"; 3-D: "dD,bcDHW,hH,wW->bcdhw"
    return torch.einsum(f"{mats[0]},bc{full},{','.join(mats[1:])}->bc{low}", pinvs[0], dense,
                        *pinvs[1:])  # fmt: skip


def field_size(size: tuple[int, ...], stride: int, min_size: int = 16) -> tuple[int, ...]:
    """The grid the field is computed on at a level of ``size``: ``stride`` times coarser, or
    where that makes a side shorter than ``min_size``, the stride halved until it does not
    (down to the level's own size)."""
    if stride < 1:
        raise ConfigError(f"refine.field_stride must be >= 1, got {stride}")
    while stride > 1:
        coarse = tuple(math.ceil(n / stride) for n in size)
        if min(coarse) >= min_size:
            return coarse
        stride //= 2
    return tuple(size)


def auto_stride(size: tuple[int, ...], grid: int | None, spacing) -> int:
    """``field_stride: auto``: the largest power of two that leaves at least 2 field points a
    control spacing (in pixels of the finest axis, as ``control_grid``'s): 8.2 px on 233 x 197
    slices: 4; 6.7 px on 160 x 208: 2; 21 px on 512 x 512: 8; 4 px on 28 x 28 digits: 2; 1
    without a control grid (a value per pixel). An opt-in: better on the tune sets
    (``experiments/stride_choice.py``), worse on the held-out brain slices, so the default
    preset keeps 2 (docs/protocol.md, "Native-size refinement")."""
    if grid is not None:
        px = min(size) / int(grid)
    elif spacing == "auto":
        px = auto_spacing(size)
    elif spacing is not None:
        px = float(spacing)
    else:
        return 1
    stride = 1
    while 4 * stride <= px:
        stride *= 2
    return stride


def control_grid(
    size: tuple[int, ...], grid: int | None, spacing, pixel_spacing=None
) -> tuple[int, ...] | None:
    """Control points per axis: ``grid`` along every axis, or ``spacing`` pixels apart (``"auto"``:
    ``auto_spacing``); neither: None (one value per pixel). ``pixel_spacing`` (mm per pixel,
    per axis, anisotropic): the control points are as far apart in millimetres along every
    axis, ``spacing`` pixels along the finest one."""
    if grid is not None and spacing is not None:
        raise ConfigError("give refine.grid (control points) or refine.spacing (px), not both")
    if grid is not None:
        return (int(grid),) * len(size)
    if spacing == "auto":
        spacing = auto_spacing(size)
    if spacing is not None:
        if isinstance(spacing, str) or spacing <= 0:
            raise ConfigError(f"refine.spacing must be > 0 pixels or auto, got {spacing!r}")
        mm = pixel_spacing or (1.0,) * len(size)
        fine = min(mm)
        return tuple(
            max(2, math.ceil(n * m / (spacing * fine))) for n, m in zip(size, mm, strict=True)
        )
    return None


def auto_spacing(size: tuple[int, ...]) -> float:
    """4 px, or wider on large images: at most ``AUTO_POINTS`` control points along the short
    side (7 x 7 on 28 x 28 digits, spacing 8.2 px on 233 x 197 slices)."""
    return max(4.0, min(size) / AUTO_POINTS)


def affine_flow(theta: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Displacement of ``p -> p + (A - I)(p - c) + t``, (B, D, *size), from ``theta``
    (B, D, D + 1) = [A | t] in pixels (array axes) about the image centre ``c``."""
    d = len(size)
    p = identity_grid(size, device=theta.device, dtype=theta.dtype)  # (D, *size)
    centre = torch.tensor([(n - 1) / 2 for n in size], device=theta.device, dtype=theta.dtype)
    q = p - centre.view(d, *[1] * d)
    eye = torch.eye(d, device=theta.device, dtype=theta.dtype)
    shift = theta[:, :, d].reshape(*theta.shape[:2], *[1] * d)
    return torch.einsum("bij,j...->bi...", theta[:, :, :d] - eye, q) + shift


def after_affine(flow: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """compose(affine, flow) in closed form: flow(p) + (A - I)(p + flow(p) - c) + t."""
    if theta is None:
        return flow
    d = flow.ndim - 2
    eye = torch.eye(d, device=theta.device, dtype=theta.dtype)
    return (
        affine_flow(theta, tuple(flow.shape[2:]))
        + flow
        + torch.einsum("bij,bj...->bi...", theta[:, :, :d] - eye, flow)
    )
