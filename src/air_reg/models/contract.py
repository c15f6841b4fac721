"""The registration-network contract: everything air-reg asks of a model, checked once.

A registration network is an ``nn.Module`` with

- ``forward(fixed, moving) -> flow``: ``fixed`` and ``moving`` are (B, 1, H, W) float tensors
  in [0, 1]; ``flow`` is the displacement (B, 2, H, W) in pixels on the fixed grid, channel 0
  along rows (y), channel 1 along columns (x): ``warped(p) = moving(p + flow(p))``;
- ``image_size``: the (H, W) it takes (an attribute or a property; an int means square);
- optionally ``integration_steps`` (int, default 0): > 0 when its flow is the exponential of
  a stationary velocity (scaling and squaring with that many steps). Refinement then keeps the
  result diffeomorphic;
- optionally ``accepts_any_size`` (bool, default False): True when it registers pairs of any
  size as they are (no token grid, nothing learned per position); ``register`` and the
  refinement then run it at the pair's own size instead of resizing the pair to
  ``image_size`` (which stays the size it was trained at).

Nothing else: the training system (``RegistrationModule``), ``eval``, ``register``,
refinement and ``load_model`` use only these. ``docs/extending.md`` shows a new model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from air_reg.errors import UserError


class ContractError(UserError, TypeError):
    """A network that does not provide what the contract asks for."""


def as_size(size) -> tuple[int, int]:
    """An int (square) or an (H, W) pair as a tuple of two positive ints."""
    if isinstance(size, (bool, str, bytes)):
        raise ContractError(f"an image size is an int or (H, W), got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ContractError(f"an image size is an int or (H, W), got {size!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(size):
        raise ContractError(f"an image size needs two positive integers, got {size!r}")
    return h, w


def image_size(net: nn.Module) -> tuple[int, int]:
    """The (H, W) a network takes, from its ``image_size``."""
    name = type(net).__name__
    if not hasattr(net, "image_size"):
        raise ContractError(
            f"{name} has no `image_size`: a registration network must say the (H, W) it "
            f"takes, e.g. `self.image_size = (28, 28)` in its __init__ (see "
            f"air_reg.models.contract)"
        )
    try:
        return as_size(net.image_size)
    except ContractError as err:
        raise ContractError(f"{name}.image_size: {err}") from None


def integration_steps(net: nn.Module) -> int:
    """The network's scaling-and-squaring steps (0: its flow is not a velocity's exp)."""
    steps = getattr(net, "integration_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ContractError(
            f"{type(net).__name__}.integration_steps must be an int >= 0, got {steps!r}"
        )
    return steps


def check_network(net: nn.Module, *, dry_run: bool = True) -> None:
    """Raise ``ContractError`` naming what ``net`` lacks; ``dry_run`` also runs it once on
    zeros (batch 1, eval mode, no gradients) and checks the flow's shape."""
    name = type(net).__name__
    if not isinstance(net, nn.Module):
        raise ContractError(f"a registration network must be a torch.nn.Module, got {name}")
    try:
        inspect.signature(net.forward).bind(None, None)
    except TypeError:
        raise ContractError(
            f"{name}.forward must take (fixed, moving): got {inspect.signature(net.forward)}"
        ) from None
    h, w = image_size(net)
    integration_steps(net)
    if not dry_run:
        return
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    zeros = torch.zeros(1, 1, h, w, device=device, dtype=dtype)
    was_training = net.training
    try:
        with torch.no_grad():
            flow = net.eval()(zeros, zeros)
    finally:
        net.train(was_training)
    if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != (1, 2, h, w):
        got = tuple(flow.shape) if isinstance(flow, torch.Tensor) else type(flow).__name__
        raise ContractError(
            f"{name}(fixed, moving) must return the flow (B, 2, H, W) = (1, 2, {h}, {w}) for "
            f"(1, 1, {h}, {w}) inputs, got {got}"
        )
