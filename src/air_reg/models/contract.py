"""The registration-network contract: everything air-reg asks of a model, checked once.

A registration network is an ``nn.Module`` with

- ``forward(fixed, moving) -> flow``: ``fixed`` and ``moving`` are (B, 1, H, W) images or
  (B, 1, D, H, W) volumes, float in [0, 1]; ``flow`` is the displacement (B, 2, H, W) or
  (B, 3, D, H, W) in pixels (voxels) on the fixed grid, channel i along spatial axis i (2-D:
  channel 0 along rows (y), channel 1 along columns (x)): ``warped(p) = moving(p + flow(p))``;
- ``image_size``: the (H, W) or (D, H, W) it takes (an attribute or a property; an int means
  square 2-D);
- optionally ``integration_steps`` (int, default 0): > 0 when its flow is the exponential of
  a stationary velocity (scaling and squaring with that many steps). Refinement then keeps the
  result diffeomorphic;
- optionally ``accepts_any_size`` (bool, default False): True when it registers pairs of any
  size as they are (no token grid, nothing learned per position); ``register`` and the
  refinement then run it at the pair's own size instead of resizing the pair to
  ``image_size`` (which stays the size it was trained at);
- optionally ``default_cascade`` ((int, bool) or (int, bool, float), default (1, False, 0.0)):
  how ``load_model`` and the CLI apply it when ``cascade`` / ``cascade_affine`` /
  ``cascade_tol`` are not given (``default_cascade``);
- optionally ``default_prealign`` (int >= 0, default 0): Adam steps of an affine stage by
  mutual information run before the network when it registers one-shot, kept where the
  network's own first pass sees a large motion too (``Registrar``; ``load_model``'s and the
  CLI's ``prealign`` override it; a refining registrar has its own, ``refine.affine_steps``);
- optionally ``encode_fixed(fixed) -> state`` with ``forward(fixed, moving, fixed_state=state)``:
  when part of its work sees the fixed images alone, ``state`` (a list of tensors, each
  (B, ...), one row a pair) holds it, and a cascade does that work once, not once a pass
  (``fixed_state``); the flow must be the one ``forward(fixed, moving)`` gives.

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


SIZE_NAMES = {2: "(H, W)", 3: "(D, H, W)"}


def as_size(size, ndim: int | None = 2) -> tuple[int, ...]:
    """An image size as a tuple of positive ints: ``ndim=2`` (the default) an int (square) or
    (H, W); ``ndim=3`` an int (cube) or (D, H, W); ``ndim=None`` either rank (an int: square
    2-D)."""
    if ndim not in (2, 3, None):
        raise ValueError(f"ndim must be 2, 3 or None, got {ndim!r}")
    shapes = " or ".join(SIZE_NAMES[n] for n in ((2, 3) if ndim is None else (ndim,)))
    if isinstance(size, (bool, str, bytes)):
        raise ContractError(f"an image size is an int or {shapes}, got {size!r}")
    if isinstance(size, int):
        size = (size,) * (ndim or 2)
    try:
        sides = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ContractError(f"an image size is an int or {shapes}, got {size!r}") from None
    if len(sides) not in ((2, 3) if ndim is None else (ndim,)):
        raise ContractError(f"an image size is an int or {shapes}, got {size!r}")
    if min(sides) < 1 or sides != tuple(size):
        count = {2: "two", 3: "three"}[len(sides)]
        raise ContractError(f"an image size needs {count} positive integers, got {size!r}")
    return sides


def spatial_size(size) -> tuple[int, ...]:
    """An int (square), (H, W) or (D, H, W) as a tuple of 2 or 3 positive ints."""
    return as_size(size, ndim=None)


def image_size(net: nn.Module) -> tuple[int, ...]:
    """The (H, W) or (D, H, W) a network takes, from its ``image_size``."""
    name = type(net).__name__
    if not hasattr(net, "image_size"):
        raise ContractError(
            f"{name} has no `image_size`: a registration network must say the (H, W) or "
            f"(D, H, W) it takes, e.g. `self.image_size = (28, 28)` in its __init__ (see "
            f"air_reg.models.contract)"
        )
    try:
        return spatial_size(net.image_size)
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


def default_cascade(net: nn.Module | None) -> tuple[int, bool, float]:
    """(passes, affine between passes, tol) a network asks to be applied with (its optional
    ``default_cascade``, a 2-tuple meaning tol 0; (1, False, 0.0) otherwise and without a
    network). ``tol`` (px): a pair's passes stop once one moved it less (``apply_repeatedly``)."""
    passes, affine, *rest = getattr(net, "default_cascade", (1, False))
    tol = float(rest[0]) if rest else 0.0
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ContractError(f"{type(net).__name__}.default_cascade passes must be an int >= 1")
    if len(rest) > 1 or not tol >= 0:
        raise ContractError(
            f"{type(net).__name__}.default_cascade must be (passes, affine) or (passes, affine, "
            f"tol >= 0 px), got {net.default_cascade!r}"
        )
    return passes, bool(affine), tol


def default_prealign(net: nn.Module | None) -> int:
    """Adam steps of the mutual-information affine stage a network asks to run before it,
    one-shot (its optional ``default_prealign``; 0 otherwise and without a network)."""
    steps = getattr(net, "default_prealign", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ContractError(
            f"{type(net).__name__}.default_prealign must be an int >= 0, got {steps!r}"
        )
    return steps


def fixed_state(net: nn.Module, fixed: torch.Tensor) -> list[torch.Tensor] | None:
    """``net.encode_fixed(fixed)`` where the network offers it (the contract's option), else
    None."""
    encode = getattr(net, "encode_fixed", None)
    return None if encode is None else list(encode(fixed))


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
    size = image_size(net)
    integration_steps(net)
    if not dry_run:
        return
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    zeros = torch.zeros(1, 1, *size, device=device, dtype=dtype)
    was_training = net.training
    try:
        with torch.no_grad():
            flow = net.eval()(zeros, zeros)
    finally:
        net.train(was_training)
    expected = (1, len(size), *size)
    if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != expected:
        got = tuple(flow.shape) if isinstance(flow, torch.Tensor) else type(flow).__name__
        axes = "H, W" if len(size) == 2 else "D, H, W"
        raise ContractError(
            f"{name}(fixed, moving) must return the flow (B, {len(size)}, {axes}) = "
            f"{expected} for {(1, 1, *size)} inputs, got {got}"
        )
