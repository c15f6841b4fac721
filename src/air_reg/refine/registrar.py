"""``Registrar``: what ``air_reg.load_model`` returns, one type for every case.

A network (or none: model-free) and, optionally, refinement settings. Without settings it is
the network itself: ``registrar(fixed, moving) == net(fixed, moving)`` at the network's trained
size (applied ``cascade`` times, after the ``prealign`` affine stage when it has one). With
settings it takes pairs of any one size (B, 1, H, W): the network runs at its trained size (the
images resized to it, ``cascade`` times, after the affine stage if the settings have one), its
flow is brought to (H, W) and ``refine`` works there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from air_reg import deprecation
from air_reg.data.preprocess import Preprocessing
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import resize_flow, warp
from air_reg.refine import optimise
from air_reg.refine.flows import affine_flow, after_affine, apply_repeatedly, compose, fit_affine
from air_reg.refine.optimise import affine_reach, prealign_affine, refine
from air_reg.refine.settings import LEGACY_DEFAULTS, RefineSettings

# On CPU a network call holds at most this many pixels (voxels): 3 pairs of 160 x 208. The
# encoder's features of a large batch leave the caches: one AiR-Match pass on 16 such pairs took
# 25.2 / 24.1 / 22.7 / 24.5 / 27.9 / 36.7 ms a pair in calls of 1 / 2 / 3 / 4 / 8 / 16 pairs, at
# 28 x 28 and 256 x 256 the best calls held 2^17 pixels too (experiments/cascade_speed.py, its
# call_sizes table; docs/speed.md, "Inference").
CPU_CALL_PIXELS = 2**17


# One-shot, the prealign stage's affine is kept for a pair only where the network's own first
# pass on the unaligned pair sees more than this much affine motion (px): mutual information
# can prefer a wrong affine on a contrast change, where the network sees little motion. Was
# 8 px (the refinement's affine_min_px) until 2026-12-07; every tune pair the stage moved
# gained from its affine, down to 5.0 px seen, and the held-out contrast pairs it misread were
# seen at 1.0 and 4.1 px (docs/protocol.md, "Pre-alignment"; experiments/prealign_choice.py).
PREALIGN_AGREE_PX = 4.5


# One-shot, an any-size network on 2-D images whose long side exceeds this (px) first registers
# the pair shrunk to it (its affine stage and cascade there), then at full size from that flow.
# The networks were trained at 128 x 128 on motions of up to about 10 % of the side: on larger
# images the same motion is more pixels and tokens than they learned to match in one pass
# (docs/protocol.md, "Coarse first"; experiments/coarse_choice.py). None: no coarse stage.
COARSE_SIDE: int | None = 256
# ... and keeps that coarse flow only where its affine fit moves a pixel by more than this (px,
# at full size); the other pairs are registered at full size alone, as without the stage. On
# the tune families at 320 x 416 and 480 x 624 the coarse flows of nearly aligned pairs and
# contrast changes reached at most 2.4 px, of large motions at least 8.3.
COARSE_MIN_PX = 4.5


def coarse_size(size: tuple[int, ...]) -> tuple[int, ...] | None:
    """The size a pair of ``size`` is first registered at (``COARSE_SIDE``), its short side kept
    at ``PREALIGN_MIN_SIDE`` or more so that the affine stage still runs there; None when that
    shrinks it by less than a quarter (or for volumes, not measured)."""
    if COARSE_SIDE is None or len(size) != 2:
        return None
    scale = max(COARSE_SIDE / max(size), optimise.PREALIGN_MIN_SIDE / min(size))
    return tuple(round(n * scale) for n in size) if scale <= 0.75 else None


def pairs_per_call(images: torch.Tensor) -> int:
    """How many pairs of ``images`` (B, 1, *spatial) a network call takes: all of them on a
    GPU, on CPU as many as fit in ``CPU_CALL_PIXELS`` (at least one)."""
    if images.device.type != "cpu":
        return max(1, len(images))
    return max(1, CPU_CALL_PIXELS // math.prod(images.shape[2:]))


class Registrar(nn.Module):
    """A network's flow, refined per pair at the images' own size when ``settings`` is given.

    ``net``: a registration network (``air_reg.models.contract``; a ``RegistrationModule``
    also works), or None for model-free registration, which needs ``settings`` with
    ``steps`` (the default preset's affine stage alone is not a registration).
    ``settings.integration_steps=None`` takes the network's own (a diffeomorphic net stays
    diffeomorphic). ``cascade=k`` applies the net k times, composed; ``cascade_affine``
    reduces the flow to its affine fit before each further pass, and ``cascade_tol`` (px)
    stops a pair's passes once one moved it less (``apply_repeatedly``). ``prealign`` > 0:
    one-shot, the network sees the moving image after an affine stage of that many Adam steps
    by mutual information (``prealign_affine``), its flow composed with it. ``build_config``: the
    checkpoint's record (model and data configs, versions). A refining registrar keeps its
    network in eval mode without gradients: the starting flow is the deterministic prediction
    and the parameters never change.
    """

    def __init__(
        self,
        net: nn.Module | None,
        settings: RefineSettings | None = None,
        *,
        cascade: int = 1,
        cascade_affine: bool = False,
        cascade_tol: float = 0.0,
        prealign: int = 0,
        build_config: dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(net, Registrar):  # a plain one: its network and record
            if net.settings is not None:
                raise ConfigError("a Registrar that refines cannot be refined again")
            build_config = build_config if build_config is not None else net.build_config
            net = net.net
        if cascade < 1:
            raise ConfigError(f"cascade needs k >= 1, got {cascade}")
        if settings is not None and not isinstance(settings, RefineSettings):
            raise ConfigError(f"settings must be a RefineSettings, got {type(settings).__name__}")
        if net is None and (settings is None or not settings.steps):
            raise ConfigError(
                "model-free registration (no network) with refine_steps=0 would return the "
                "identity; set refine_steps (e.g. refine_steps=50)"
            )
        if settings is not None and settings.integration_steps is None:
            own = 0 if net is None else contract.integration_steps(_inner(net))
            settings = settings.replace(integration_steps=own)
        self.net, self.settings, self.cascade = net, settings, cascade
        self.cascade_affine = bool(cascade_affine)
        if not cascade_tol >= 0:
            raise ConfigError(f"cascade_tol must be >= 0 px, got {cascade_tol}")
        self.cascade_tol = float(cascade_tol)
        if isinstance(prealign, bool) or not isinstance(prealign, int) or prealign < 0:
            raise ConfigError(f"prealign is a number of Adam steps >= 0 (e.g. prealign=15; 0: "
                              f"none), got {prealign!r}")  # fmt: skip
        self.prealign = prealign
        self.build_config = build_config
        if settings is not None and net is not None:
            net.eval()

    @property
    def accepts_any_size(self) -> bool:
        """True when it refines, or its network takes any size (the contract's option):
        ``register`` then passes the images at their own size."""
        return self.settings is not None or self.net_takes_any_size

    @property
    def net_takes_any_size(self) -> bool:
        return self.net is not None and bool(getattr(_inner(self.net), "accepts_any_size", False))

    @property
    def guard_similarity(self) -> str:
        """What the one-shot guard (``register``) judges "no worse than doing nothing" by:
        ``mi`` for a network trained on pairs of different contrast (``data=synth``: its
        correct flows may raise the MSE of such a pair; measured on the contrast family, the
        MSE guard threw away 3 of 6 right flows), else ``mse`` (with the MI check beside it)."""
        data = (self.build_config or {}).get("data") or {}
        return "mi" if float(data.get("same_contrast_p", 1.0)) < 1.0 else "mse"

    @property
    def image_size(self) -> tuple[int, ...] | None:
        """The network's trained size; None without a network (any size)."""
        return None if self.net is None else contract.image_size(_inner(self.net))

    @property
    def integration_steps(self) -> int:
        """Squaring steps of the flows it returns (the refinement's, else the network's)."""
        if self.settings is not None:
            return self.settings.integration_steps
        return contract.integration_steps(_inner(self.net))

    def train(self, mode: bool = True) -> Registrar:
        super().train(mode)
        if self.settings is not None and self.net is not None:
            self.net.eval()  # no dropout: the starting flow is the deterministic prediction
        return self

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        *,
        spacing: tuple[float, ...] | None = None,
        init_flow: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The flow (B, 2, H, W). When it refines: ``spacing`` (mm per pixel, per axis) makes
        the regularisation physical, and ``init_flow`` (B, 2, H, W) replaces the network's
        flow as the start (e.g. an ANTs field read by ``air_reg.fields.read_field``)."""
        if self.settings is None:  # the network alone, at its trained size
            if spacing is not None or init_flow is not None:
                raise ConfigError(
                    "spacing and init_flow act on the refinement: load the model with "
                    "refine_steps (e.g. refine_steps=50)"
                )
            return self._coarse_first(fixed, moving, self._cascade)
        start = (
            init_flow
            if init_flow is not None
            else None
            if self.net is None
            else (self.network_flow)
        )
        return refine(fixed, moving, start, self.settings, spacing=spacing)

    def one_shot(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """What the network registers alone, for pairs of any size: ``network_flow`` after
        the ``prealign`` affine stage (at the images' size, where it moves a pair), composed
        with it; on images larger than ``COARSE_SIDE`` all that first on the pair shrunk to it
        (``_coarse_first``). ``register`` runs this when it does not refine (through ``forward``
        for an any-size network)."""
        return self._coarse_first(fixed, moving, self.network_flow)

    def _coarse_first(self, fixed: torch.Tensor, moving: torch.Tensor, run) -> torch.Tensor:
        """``_prealigned`` (the affine stage, then ``run``), for an any-size network on images
        larger than ``COARSE_SIDE`` first at ``coarse_size``: where that flow, brought back to
        full size, moves a pixel by more than ``COARSE_MIN_PX`` (its affine fit), the moving
        image is warped by it and ``run`` again at full size, the two composed; the other
        pairs are registered at full size alone."""
        size = tuple(fixed.shape[2:])
        small = coarse_size(size) if self.net_takes_any_size else None
        if small is None:
            return self._prealigned(fixed, moving, run)
        coarse = self._prealigned(resize(fixed, small), resize(moving, small), run)
        coarse = resize_flow(coarse, size)
        moves = affine_reach(fit_affine(coarse), size) > COARSE_MIN_PX
        flow = torch.empty_like(coarse)
        if not moves.all():
            flow[~moves] = self._prealigned(fixed[~moves], moving[~moves], run)
        if moves.any():
            start = coarse[moves]
            flow[moves] = compose(start, run(fixed[moves], warp(moving[moves], start)))
        return flow

    def _prealigned(self, fixed: torch.Tensor, moving: torch.Tensor, run) -> torch.Tensor:
        """``run(fixed, moving)`` after the ``prealign`` stage, its flow composed with it. The
        stage's affine is kept for a pair only where the network sees a large motion too: the
        affine fit of its own first pass on the unaligned pair moves a pixel by more than
        ``PREALIGN_AGREE_PX`` (mutual information alone can prefer a wrong affine on a contrast
        change, where the network sees little motion: docs/protocol.md, "Pre-alignment").
        The other pairs go on from that first pass."""
        theta = prealign_affine(fixed, moving, self.prealign) if self.prealign else None
        if theta is None:
            return run(fixed, moving)
        size = tuple(fixed.shape[2:])
        first = run(fixed, moving, passes=1)  # the network's view of the unaligned pairs
        keep = (affine_reach(theta, size) > 0) & (
            affine_reach(fit_affine(first), size) > PREALIGN_AGREE_PX
        )
        flow = torch.empty_like(first)
        if not keep.all():
            flow[~keep] = run(fixed[~keep], moving[~keep], first=first[~keep])
        if keep.any():
            theta = theta[keep]
            aligned = warp(moving[keep], affine_flow(theta, size))
            flow[keep] = after_affine(run(fixed[keep], aligned), theta)
        return flow

    def _cascade(self, fixed, moving, passes: int | None = None, first=None) -> torch.Tensor:
        """``apply_repeatedly`` on at most ``pairs_per_call`` pairs a call, concatenated."""
        step, flows = pairs_per_call(fixed), []
        for i in range(0, len(fixed), step):
            part = slice(i, i + step)
            flows.append(apply_repeatedly(
                self.net, fixed[part], moving[part], passes or self.cascade, self.cascade_affine,
                self.cascade_tol, None if first is None else first[part],
            ))  # fmt: skip
        return flows[0] if len(flows) == 1 else torch.cat(flows)

    def network_flow(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        passes: int | None = None,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's flow for pairs of any size: the images brought to its trained size
        as it was trained (resized, or padded for a ``data.pad_to`` network: the recorded
        ``Preprocessing``), run ``cascade`` (or ``passes``) times (composed), the flow brought
        back to the images' (H, W). ``first``: a first pass already run here (``passes=1``),
        reused where the network runs at the images' size."""
        size, prep = self.image_size, Preprocessing.of_model(self)
        if self.net_takes_any_size:
            size = tuple(fixed.shape[2:])  # no resizing: the pair as it is
        if first is not None and tuple(fixed.shape[2:]) != tuple(size):
            first = None  # on the network's grid it would need resizing back: run it again
        with torch.no_grad():
            flow = self._cascade(prep.to_model(fixed, size), prep.to_model(moving, size), passes,
                                 first)  # fmt: skip
        return prep.from_model(flow, tuple(fixed.shape[2:]))

    def extra_repr(self) -> str:
        return (f"cascade={self.cascade}, cascade_affine={self.cascade_affine}, "
                f"cascade_tol={self.cascade_tol}, prealign={self.prealign}, "
                f"settings={self.settings}")  # fmt: skip


def _inner(net: nn.Module) -> nn.Module:
    return getattr(net, "net", net)  # a RegistrationModule holds its network as .net


class _RefinerType(type(nn.Module)):
    """``isinstance(x, Refiner)``: any ``Registrar`` that refines (what Refiner was)."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, Registrar) and obj.settings is not None


class Refiner(Registrar, metaclass=_RefinerType):
    """Deprecated: ``Registrar(net, RefineSettings(...), cascade=k)``. Keywords apply to
    ``LEGACY_DEFAULTS`` (refine's former keyword defaults); ``integration_steps=None`` (the
    default) keeps the network's."""

    def __init__(
        self, net: nn.Module | None, *, integration_steps: int | None = None, cascade: int = 1,
        **settings,
    ) -> None:  # fmt: skip
        deprecation.warn(
            "air_reg.refine.Refiner is deprecated; use Registrar(net, RefineSettings(...), "
            "cascade=k) or air_reg.load_model(path, refine_steps=N)"
        )
        if {"fixed", "moving", "init_flow", "init_velocity", "affine"} & settings.keys():
            raise ConfigError(
                f"Refiner takes refine's settings, not its inputs: {sorted(settings)}"
            )
        settings = LEGACY_DEFAULTS.replace(integration_steps=integration_steps, **settings)
        super().__init__(net, settings, cascade=cascade)
