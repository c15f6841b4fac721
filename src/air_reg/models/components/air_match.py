"""AiR-Match: attention does the matching (GMFlow-style), coarse to fine, any image size,
images or volumes.

A shared conv encoder (instance-normed, so brightness and contrast matter little) gives
features at 1/1 ... 1/2**L. At the coarsest scale a sine position encoding is added and a
small Transformer (``MatchingLayer``: self-attention in each image, cross-attention between
them) runs on both images' tokens; then each fixed token's softmax over ALL moving tokens
gives its displacement as the weighted mean of their coordinates minus its own
(``matching.global_match``): the attention weights are the match, there is no flow head.
``FlowPropagation`` optionally smooths that flow by self-attention over the fixed features.
At each finer scale in ``local_scales`` the flow is upsampled, the moving features warped
by it, and a local window match (radius ``radius``) adds a residual. The field is resized
bilinearly to the image and optionally integrated (a stationary velocity). An (H, W)
``image_size`` builds it for images, a (D, H, W) one for volumes: the same class with
``Conv3d`` layers, a 3-D sine encoding, D*H*W tokens and (2r+1)^3 windows.

Memory: the global match and the Transformer are (H/8 * W/8)^2 per image at 1/8. Above
``max_tokens`` tokens the global match (and the propagation) goes in chunks of query rows,
recomputed in the backward pass, so its scores never exceed a ``max_tokens``^2 matrix;
the Transformer uses ``scaled_dot_product_attention`` (no N x N matrix on CPU). Without
gradients on CPU the chunks hold at most ``matching.INFER_SCORES`` (2^21, 8 MB), so they stay
in the caches: one pass 1.2-1.3x faster from 384x384 up (``experiments/cascade_speed.py
--tables large``: 2 threads, 164 / 431 / 2,315 ms at 384 / 512 / 768 px a side). Measured
before those chunks (CPU, one thread, batch 1, defaults, peak RSS growth; the chunks only
lower it): inference 50 MB / 0.2 s at 256x256, 0.22 GB / 1.3 s at 512x512, 0.64 GB / 15 s at
1024x1024 (2.4 GB without chunking); training 0.22 GB at 256x256, 0.8 GB at 512x512. Time
grows as the square of the pixel count above ~512x512: about 1024x1024 is the practical top.

Volumes: a 96^3 volume has 12^3 = 1728 tokens at 1/8, so the global match is a 1728 x 1728
score matrix (12 MB in float32) per pair, like a 336x336 image; up to 128^3 (4096 tokens,
67 MB) it is one matrix, beyond that it goes in chunks (at most 64 MB of scores at a time,
time still quadratic: 256^3 is 32768 tokens, 64 times 128^3's match work). The local windows
cost (2r+1)^3 = 343 scores per voxel at r = 3 (at 1/2 of 96^3: 48^3 x 343 floats = 152 MB),
and they, not the global match, set the memory; radius 2 (125) or 1 (27) is the knob for
large volumes. Measured (CPU, one thread, batch 1, defaults, one-shot inference, peak live
memory): 0.7 s / 0.2 GB at 64^3, 1.4 s / 0.38 GB at 80^3, 2.8 s / 0.66 GB at 96^3, 4.8 s at
112^3; radius 2: 0.9 s / 0.22 GB at 80^3, 1.4 s / 0.38 GB at 96^3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.matching import (
    FlowPropagation,
    LocalMatch,
    MatchingLayer,
    global_match,
    sine_position_encoding,
)
from air_reg.models.components.spatial_transformer import (
    crop,
    integrate_velocity,
    pad_to_multiple,
    resize_flow,
    warp,
)
from air_reg.models.contract import spatial_size

MATCHINGS = ("global", "local")
SCORES = ("l2", "dot")
NORMS = ("instance", "group", "none")
PADDINGS = ("replicate", "reflect", "constant")


CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
PREALIGN_STEPS = 15  # AiRMatch.default_prealign on images


def conv_block(
    c_in: int, c_out: int, *, stride: int = 1, norm: str = "instance", ndim: int = 2
) -> nn.Sequential:
    """3x3 (3x3x3) conv (replicate padding) + norm + LeakyReLU(0.2), on ``ndim`` axes."""
    conv = CONVS[ndim](c_in, c_out, 3, stride=stride, padding=1, padding_mode="replicate")
    if norm == "none":
        return nn.Sequential(conv, nn.LeakyReLU(0.2))
    groups = c_out if norm == "instance" else math.gcd(c_out, 8)  # instance = one per channel
    return nn.Sequential(conv, nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2))


class AiRMatch(nn.Module):
    """Shared conv encoder -> Transformer + global (or local) match at 1/2**L -> local window
    matches at ``local_scales`` -> flow.

    ``channels``: encoder channels per level (level ``i`` at 1/2**i); the coarsest is the
    token dimension (divisible by ``heads`` and by 4). ``matching``: ``global`` (softmax over
    every moving token) or ``local`` (the ablation: a ``radius`` window from zero flow).
    ``score``: ``l2`` (``-|f - m|^2 / 2``: an identical feature scores highest) or ``dot``
    (GMFlow's ``f . m``), both / sqrt(C) times a ``temperature``; ``prior``: a Gaussian prior
    ``-prior * |d|^2 / 2`` on a displacement d in that scale's pixels (0 = off), so that ties
    (flat regions) resolve to zero; both per scale, learned (log space) if ``learn_scores``.
    ``layers``: ``MatchingLayer``s before the match (0 allowed). ``propagate``: GMFlow's
    self-attention propagation of the coarse flow. ``local_scales``: the finer factors (powers
    of two below 2**L) that add a window-match residual. ``max_tokens``: above this many
    coarse tokens the global match goes in chunks. ``integration_steps`` > 0: the field is a
    stationary velocity, integrated at the end (and at each finer scale before warping, so
    every level matches what the result will do). Any image size: ``register`` runs it on a
    pair at the pair's own size (``accepts_any_size``), not resized to ``image_size``; the
    rank of ``image_size`` ((H, W) or (D, H, W)) fixes whether it takes images or volumes.
    """

    accepts_any_size = True  # the contract's option: pairs at their own size
    # applied up to 6 times, the flow reduced to its robust affine fit before each further
    # pass, a pair stopping once a pass moved it less than 0.25 px on average (the contract's
    # option; load_model's and the CLI's cascade / cascade_affine / cascade_tol override it):
    # large motions 4.40 (one pass) -> 1.45 (3 passes) -> 1.15 px one-shot on the tune
    # families, small motions stopping after about 2 passes (docs/protocol.md)
    default_cascade = (6, True, 0.25)

    @property
    def default_prealign(self) -> int:
        """The contract's option: one-shot, a 15-step affine stage by mutual information first
        (kept where it moves a pixel by more than 8 px and the model's first pass agrees): on
        the tune families the same error on small motions and contrast changes, less error and
        time on large ones (docs/protocol.md, ``experiments/prealign_choice.py``); volumes:
        none (not measured)."""
        return PREALIGN_STEPS if self.ndim == 2 else 0

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        channels: Sequence[int] = (16, 32, 48, 64),
        matching: str = "global",
        score: str = "l2",
        layers: int = 1,
        heads: int = 4,
        ff_mult: int = 2,
        propagate: bool = True,
        local_scales: Sequence[int] = (4, 2),
        radius: int = 3,
        temperature: float = 1.0,
        learn_scores: bool = True,
        prior: float = 1.0,
        max_tokens: int = 4096,
        norm: str = "instance",
        integration_steps: int = 0,
        padding: str = "replicate",
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        levels = len(channels) - 1
        if levels < 1 or min(channels) < 1:
            raise ConfigError(f"model.net.channels needs >= 2 positive ints, got {channels}")
        for name, value, valid in [
            ("matching", matching, MATCHINGS),
            ("score", score, SCORES),
            ("norm", norm, NORMS),
            ("padding", padding, PADDINGS),
        ]:
            if value not in valid:
                raise ConfigError(f"model.net.{name} must be one of {valid}, got {value!r}")
        dim = channels[-1]
        if dim % heads or dim % 4:
            raise ConfigError(
                f"the coarsest channels ({dim}) must be divisible by heads ({heads}) and by 4"
            )
        n = len(spatial_size(image_size))  # 2: images, 3: volumes
        if dim < 2 * n:  # the sine encoding: >= one sin/cos pair per axis
            raise ConfigError(f"the coarsest channels ({dim}) must be >= {2 * n} for {n}-D")
        finer = [2**i for i in range(levels)]
        scales = sorted({int(s) for s in local_scales}, reverse=True)
        if any(s not in finer for s in scales):
            raise ConfigError(
                f"model.net.local_scales {list(local_scales)} must be among {finer} (powers of "
                f"two below the coarsest factor {2**levels})"
            )
        for name, value, low in [
            ("layers", layers, 0),
            ("radius", radius, 1),
            ("max_tokens", max_tokens, 1),
            ("integration_steps", integration_steps, 0),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.net.{name} must be an int >= {low}, got {value!r}")
        if not temperature > 0:
            raise ConfigError(f"model.net.temperature must be > 0, got {temperature!r}")
        if not prior >= 0:
            raise ConfigError(f"model.net.prior must be >= 0, got {prior!r}")
        self.image_size = spatial_size(image_size)  # the contract (models/contract.py)
        self.ndim = n
        self.integration_steps = integration_steps
        self.multiple, self.padding, self.matching = 2**levels, padding, matching
        self.score = score
        self.local_scales, self.radius, self.max_tokens = scales, radius, max_tokens
        self.encoder = nn.ModuleList(
            [nn.Sequential(conv_block(1, channels[0], norm=norm, ndim=n))]
        )
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            self.encoder.append(
                nn.Sequential(
                    conv_block(c_in, c_out, stride=2, norm=norm, ndim=n),
                    conv_block(c_out, c_out, norm=norm, ndim=n),
                )
            )
        self.project = nn.ModuleDict(  # matching features per scale, "8" = the tokens
            {str(s): CONVS[n](channels[s.bit_length() - 1], channels[s.bit_length() - 1], 1)
             for s in [self.multiple, *scales]}
        )  # fmt: skip
        axes = " ".join("dhw"[-n:])  # einops axes of the token grid, 2-D: "h w"
        self._to_tokens = f"b c {axes} -> b ({axes}) c"
        self._to_grid = f"b ({axes}) c -> b c {axes}"
        self.layers = nn.ModuleList(
            MatchingLayer(dim=dim, heads=heads, ff_dim=ff_mult * dim) for _ in range(layers)
        )
        self.propagation = FlowPropagation(dim=dim) if propagate else None
        self.local_match = LocalMatch()  # a module: speed.accelerate swaps in a CPU kernel
        log_t = torch.full((1 + len(scales),), math.log(temperature))  # coarse, then finer
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_scores)
        log_p = torch.full_like(log_t, math.log(prior)) if prior > 0 else None
        self.log_prior = None if log_p is None else nn.Parameter(log_p, requires_grad=learn_scores)

    def _match(self, i: int, fixed: torch.Tensor, moving: torch.Tensor, kind: str):
        """Flow (B, n, *grid) from features (B, C, *grid) with scale ``i``'s scores."""
        scale = self.log_temperature[i].exp() / math.sqrt(fixed.shape[1])
        prior = 0.0 if self.log_prior is None else self.log_prior[i].exp()
        kw = {"scale": scale, "score": self.score, "prior": prior}
        if kind == "global":
            return global_match(fixed, moving, max_tokens=self.max_tokens, **kw)
        return self.local_match(fixed, moving, radius=self.radius, **kw)

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, *, fixed_state=None
    ) -> torch.Tensor:
        """The flow (B, n, *size) in pixels; ``fixed_state``: ``encode_fixed(fixed)``, given
        when the same fixed images come again (a cascade), so they are not encoded again."""
        return self._integrate(self.velocity(fixed, moving, fixed_state=fixed_state))

    def encode_fixed(self, fixed: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features of the fixed images alone at the levels the matching reads
        (``_matched``; the contract's option): the encoder sees each image by itself (instance
        norm), so they do not depend on the moving images and a cascade computes them once,
        not once a pass."""
        features = self._encode(pad_to_multiple(fixed, self.multiple, self.padding)[0])
        return [features[i] for i in self._matched]

    @property
    def _matched(self) -> list[int]:
        """The encoder levels whose features the matching reads (coarsest, local scales)."""
        return sorted({len(self.encoder) - 1} | {s.bit_length() - 1 for s in self.local_scales})

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []  # per level, finest first: (N, C_i, *padded / 2**i)
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def velocity(
        self, fixed: torch.Tensor, moving: torch.Tensor, *, fixed_state=None
    ) -> torch.Tensor:
        """The field (B, n, *size) before the final integration (the flow itself if none)."""
        if fixed.ndim != self.ndim + 2 or moving.shape != fixed.shape:
            raise ConfigError(
                f"this AiRMatch is {self.ndim}-D (image_size {self.image_size}): it takes two "
                f"(B, 1, {', '.join('DHW'[-self.ndim :])}) tensors of one shape, got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        b, size = fixed.shape[0], tuple(fixed.shape[2:])
        if fixed_state is None:  # (2B, 1, *padded): one encoder pass for both images
            x, pads = pad_to_multiple(torch.cat([fixed, moving]), self.multiple, self.padding)
            features = self._encode(x)  # per level, finest first: (2B, C_i, *padded / 2**i)
        else:  # the moving images alone, joined to the fixed ones where matched
            x, pads = pad_to_multiple(moving, self.multiple, self.padding)
            if len(fixed_state) != len(self._matched) or len(fixed_state[0]) != b:
                raise ConfigError(
                    f"fixed_state must be encode_fixed(fixed) of these {b} fixed images"
                )
            features = self._encode(x)  # then (2B, ...) where matched, the fixed ones first
            for i, f in zip(self._matched, fixed_state, strict=True):
                features[i] = torch.cat([f, features[i]])
        padded = tuple(x.shape[2:])
        coarse = self.project[str(self.multiple)](features[-1])  # (2B, C, *grid)
        grid = dict(zip("dhw"[-self.ndim :], coarse.shape[2:], strict=True))
        coarse = coarse + sine_position_encoding(coarse.shape[1], coarse.shape[2:], coarse.device)
        tokens = rearrange(coarse, self._to_tokens)  # (2B, N, C)
        for layer in self.layers:
            tokens = layer(tokens)
        f, m = (rearrange(t, self._to_grid, **grid) for t in (tokens[:b], tokens[b:]))
        flow = self._match(0, f, m, self.matching)  # (B, n, *grid) in 1/2**L pixels
        if self.propagation is not None:
            flow = self.propagation(tokens[:b], flow, max_tokens=self.max_tokens)
        for i, s in enumerate(self.local_scales, start=1):
            feats = self.project[str(s)](features[s.bit_length() - 1])  # (2B, C_s, *padded/s)
            flow = resize_flow(flow, feats.shape[2:])  # in this scale's pixels
            shown = self._integrate(flow)  # what the flow will do, to warp by
            flow = flow + self._match(i, feats[:b], warp(feats[b:], shown), "local")
        flow = resize_flow(flow, padded)
        return crop(flow, pads, size)

    def _integrate(self, flow: torch.Tensor) -> torch.Tensor:
        if self.integration_steps:
            return integrate_velocity(flow, self.integration_steps)
        return flow
