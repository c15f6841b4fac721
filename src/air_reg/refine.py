"""Instance optimisation ("refinement") of predicted flows, and cascaded inference.

Conventions as in ``spatial_transformer``: a flow is a (B, 2, H, W) displacement in pixels on
the fixed grid, ``warped(p) = moving(p + flow(p))``.

Defaults, chosen on 128 synthetic and 128 MNIST same-class pairs starting from the zero
flow: Adam (elementwise, so pairs stay independent; L-BFGS got stuck in worse minima on
MNIST), lr 0.5 px, 50 steps, MSE + 0.05 * Diffusion. For a diffeomorphic result use the preset of
``air_reg/conf/refinement/diffeomorphic.yaml`` (``integration_steps=4, grid=7, lr=1.0,
fold_weight=20``): a smooth B-spline velocity integrated by scaling and squaring, whereas a
full-resolution velocity still folds on ~1 % of MNIST pixels (discrete Jacobian). Even the
B-spline velocity folded a few pixels on 2 of 200 Fashion-MNIST pairs whose optimum is an
extreme compression; the ``NegativeJacobian`` penalty (``fold_weight``) removes that at no
cost in end-point error. 4 squaring steps gave the same EPE, Dice and folding as 7 on both
datasets (200 pairs each) for 40 % less time.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from air_reg.errors import ConfigError
from air_reg.losses import MSE, Diffusion, NegativeJacobian
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    integrate_velocity,
    warp,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_LR = {"adam": 0.5, "lbfgs": 1.0}  # Adam: pixels per step; L-BFGS: first line-search step


class RefineSettingsError(ConfigError, TypeError):
    """A refinement setting that ``refine`` does not take (a TypeError, as before)."""


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
    """Least-squares control grid (B, 2, g, g) whose upsampling best matches ``dense``."""
    rows, cols = torch.linalg.pinv(up.rows), torch.linalg.pinv(up.cols)  # (g, H), (g, W)
    return torch.einsum("gH,bcHW,hW->bcgh", rows, dense, cols)


def _check(steps: int, integration_steps: int, optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if steps < 0 or integration_steps < 0:
        raise ConfigError(
            f"steps, integration_steps must be >= 0, got {steps}, {integration_steps}"
        )


def refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init_flow: torch.Tensor | None = None,
    *,
    steps: int = 50,
    lr: float | None = None,
    similarity: nn.Module | None = None,
    regularizer: nn.Module | None = None,
    reg_weight: float = 0.05,
    fold_weight: float = 0.0,
    integration_steps: int = 0,
    optimizer: str = "adam",
    grid: int | None = None,
    grid_mode: str = "bspline",
    init_velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimise ``similarity + reg_weight * regularizer`` per pair; the refined flow (detached).

    ``similarity`` defaults to ``MSE()``, ``regularizer`` to ``Diffusion()`` of the dense
    displacement (as in training); ``fold_weight`` adds ``NegativeJacobian`` (a folding
    penalty, zero away from folds); ``lr=None`` is 0.5 for Adam, 1 for L-BFGS. With
    ``integration_steps > 0`` the variable is a stationary velocity (``init_velocity``, else
    an approximate log of ``init_flow``) integrated by scaling and squaring. With ``grid``
    the variable is a (grid x grid) control grid resampled by ``CoarseToDense(grid_mode)``,
    initialised by least squares.
    """
    _check(steps, integration_steps, optimizer)
    similarity = MSE() if similarity is None else similarity
    regularizer = Diffusion() if regularizer is None else regularizer
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    fold_penalty = NegativeJacobian()
    b, _, h, w = fixed.shape
    # Lightning's test/predict loops run under inference_mode, which enable_grad alone does
    # not lift; clones made inside inference_mode(False) are ordinary tensors autograd can use.
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        start = fixed.new_zeros(b, 2, h, w) if init_flow is None else init_flow.detach().clone()
        if integration_steps and init_velocity is not None:
            start = init_velocity.detach().clone()
        elif integration_steps and init_flow is not None:
            start = velocity_from_flow(start, integration_steps)
        up = None
        if grid is not None:
            up = CoarseToDense(in_size=(grid, grid), out_size=(h, w), mode=grid_mode)
            up = up.to(device=fixed.device, dtype=fixed.dtype)
            start = _fit_coarse(start, up)
        param = start.requires_grad_(True)  # (B, 2, H, W), or (B, 2, grid, grid)

        def dense_flow() -> torch.Tensor:
            field = param if up is None else up(param)
            return integrate_velocity(field, integration_steps) if integration_steps else field

        def objective() -> torch.Tensor:
            flow = dense_flow()
            loss = similarity(warp(moving, flow), fixed)
            if reg_weight:
                loss = loss + reg_weight * regularizer(flow)
            if fold_weight:
                loss = loss + fold_weight * fold_penalty(flow)
            # Our losses are batch means: B x mean = sum of per-pair means, so each pair's
            # gradient is that of its own objective, whatever the batch size.
            return b * loss

        if steps and optimizer == "adam":
            # Adam is elementwise, so the pairs are optimised fully independently.
            opt = torch.optim.Adam([param], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                objective().backward()
                opt.step()
        elif steps:
            # One L-BFGS problem over the whole batch: the objectives are independent, but the
            # line search and curvature history are shared between pairs.
            opt = torch.optim.LBFGS(
                [param], lr=lr, max_iter=steps, history_size=10, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)
        if log.isEnabledFor(logging.DEBUG):
            with torch.no_grad():
                log.debug("refined %d pairs: mean objective %.4g", b, objective().item() / b)
        with torch.no_grad():
            return dense_flow().detach()


class Refiner(nn.Module):
    """A network (or RegistrationModule) whose flow is refined per pair at inference.

    ``forward(fixed, moving)`` returns the refined flow (B, 2, H, W). The network only runs in
    eval mode without gradients, so its parameters never change. ``integration_steps=None``
    keeps the network's own (a diffeomorphic net stays diffeomorphic); ``cascade=k`` applies
    the net k times (composed) before refining. Every other keyword is one of ``refine``'s
    settings (steps, lr, similarity, regularizer, reg_weight, fold_weight, optimizer, grid,
    grid_mode), with ``refine``'s defaults.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        integration_steps: int | None = None,
        cascade: int = 1,
        similarity: nn.Module | None = None,
        regularizer: nn.Module | None = None,
        **settings,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        if integration_steps is None:
            # a RegistrationModule or TrainedModel holds its network as .net
            integration_steps = contract.integration_steps(getattr(net, "net", net))
        self.integration_steps, self.cascade = integration_steps, cascade
        self.similarity, self.regularizer = similarity, regularizer  # None: refine's defaults
        # Unknown names fail here, not at the first forward; the flows are forward's own.
        try:
            bound = inspect.signature(refine).bind_partial(**settings)
        except TypeError as err:
            params = inspect.signature(refine).parameters.values()
            known = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
            known = [n for n in known if n not in ("similarity", "regularizer", "init_velocity")]
            raise RefineSettingsError(f"refine.*: {err}; the settings are {known}") from None
        if {"fixed", "moving", "init_flow", "init_velocity"} & bound.arguments.keys():
            raise RefineSettingsError(
                f"Refiner takes refine's settings, not its inputs: {sorted(settings)}"
            )
        if cascade < 1:
            raise ConfigError(f"cascade needs k >= 1, got {cascade}")
        self.settings = settings
        bound.apply_defaults()  # refine's own defaults for what is not set
        _check(bound.arguments["steps"], integration_steps, bound.arguments["optimizer"])

    @property
    def image_size(self) -> tuple[int, int]:
        return contract.image_size(getattr(self.net, "net", self.net))

    @property
    def build_config(self) -> dict | None:
        return getattr(self.net, "build_config", None)

    def train(self, mode: bool = True) -> Refiner:
        super().train(mode)
        self.net.eval()  # no dropout: the starting flow is the deterministic prediction
        return self

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            init = cascade(self.net, fixed, moving, self.cascade)
        return refine(
            fixed,
            moving,
            init,
            similarity=self.similarity,
            regularizer=self.regularizer,
            integration_steps=self.integration_steps,
            **self.settings,
        )

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"integration_steps={self.integration_steps}, cascade={self.cascade}, {settings}"
