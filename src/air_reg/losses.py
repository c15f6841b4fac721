"""Similarity losses and flow regularisers; each an ``nn.Module`` that works on any device.

Similarities take ``(warped, fixed)`` images (B, C, *spatial) and return a scalar to minimise.
Regularisers take a flow (B, D, *spatial) in pixels and return a scalar penalty. Spatial is
(H, W) or (D, H, W): every loss takes both in one code path.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from air_reg import deprecation
from air_reg.errors import ConfigError
from air_reg.metrics import jacobian_determinant, ncc
from air_reg.models.components.spatial_transformer import flow_ndim, spatial_ndim


class MSE(nn.Module):
    """Mean squared intensity difference (the paper-faithful choice)."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(warped, fixed)


class NCC(nn.Module):
    """1 - global normalised cross-correlation per pair, averaged over the batch (min 0)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return (1 - ncc(warped, fixed, eps=self.eps)).mean()


_POOLS = {2: F.avg_pool2d, 3: F.avg_pool3d}


class LocalNCC(nn.Module):
    """1 - local (windowed) squared NCC, as in VoxelMorph, averaged over pixels (min 0)."""

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ConfigError(f"window must be a positive odd integer, got {window}")
        self.window, self.eps = window, eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        c, pool = warped.shape[1], _POOLS[spatial_ndim(warped, "warped")]
        stacked = torch.cat([warped, fixed, warped * warped, fixed * fixed, warped * fixed], 1)
        # Window means of I, J, I^2, J^2, IJ in one pooling call: (B, 5C, *spatial).
        means = pool(
            stacked, self.window, stride=1, padding=self.window // 2, count_include_pad=False
        )
        mi, mj, mii, mjj, mij = means.split(c, dim=1)
        cross = mij - mi * mj
        var_i, var_j = (mii - mi * mi).clamp(min=0), (mjj - mj * mj).clamp(min=0)
        return (1 - cross * cross / (var_i * var_j + self.eps)).mean()


def _diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Forward difference along ``dim`` (one shorter there)."""
    n = x.shape[dim] - 1
    return x.narrow(dim, 1, n) - x.narrow(dim, 0, n)


def _flow_differences(flow: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of a (B, D, *spatial) flow along each spatial axis, in order."""
    return [_diff(flow, 2 + i) for i in range(flow_ndim(flow))]


def _total(terms) -> torch.Tensor:
    """Left-to-right sum (the 2-D code's order: a + b, not 0 + a + b)."""
    terms = iter(terms)
    out = next(terms)
    for t in terms:
        out = out + t
    return out


class Diffusion(nn.Module):
    """Mean squared spatial gradient of the flow (``Grad`` in VoxelMorph), pixels^2.

    ``spacing`` (mm per pixel, per axis): the gradient in physical units, i.e. component i
    differentiated along axis j weighs (spacing_i / spacing_j)^2; isotropic spacing (or None)
    gives the plain pixel form, so a 0.5 x 2 mm slice is not regularised as if square.
    """

    def __init__(self, spacing: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.spacing = None if spacing is None or len(set(spacing)) == 1 else tuple(spacing)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        diffs = _flow_differences(flow)  # along each axis: (B, D, *spatial less one there)
        if self.spacing is None:
            return _total(d.square().mean() for d in diffs)
        if len(self.spacing) != len(diffs):
            raise ConfigError(
                f"Diffusion spacing {self.spacing} has {len(self.spacing)} values for a "
                f"{len(diffs)}-D flow; give one per spatial axis"
            )
        s = torch.tensor(self.spacing, dtype=flow.dtype, device=flow.device)  # (D,)
        dims = (0, *range(2, flow.ndim))  # all but the component
        # along axis j, component i weighs (s_i / s_j)^2
        return _total(
            (d.square().mean(dims) * (s / s[j]).square()).mean() for j, d in enumerate(diffs)
        )


class BendingEnergy(nn.Module):
    """Mean squared second derivatives of the flow (penalises curvature, not affine motion)."""

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        diffs = _flow_differences(flow)
        pure = _total(_diff(d, 2 + i).square().mean() for i, d in enumerate(diffs))  # d2/dxi2
        mixed = _total(  # d2/dxi dxj, i < j, each counted twice in the Hessian's norm
            _diff(d, 2 + j).square().mean()
            for i, d in enumerate(diffs)
            for j in range(i + 1, len(diffs))
        )
        return pure + 2 * mixed


class DiffusionFold(nn.Module):
    """:class:`Diffusion` plus ``fold_weight`` x :class:`NegativeJacobian` (``fold_margin``).

    For training a network whose field may fold on hard pairs: the fold term is zero wherever
    det J keeps the margin, so ordinary pairs see plain diffusion. Scaled, as every
    regulariser, by ``model.reg_weight``. ``margin`` is the former name of ``fold_margin``
    (the shipped AiR-UNet checkpoints record it).
    """

    def __init__(
        self, fold_weight: float = 20.0, fold_margin: float = 0.05, *, margin: float | None = None
    ) -> None:
        super().__init__()
        if fold_weight < 0:
            raise ConfigError(f"fold_weight must be >= 0, got {fold_weight}")
        fold_margin = deprecation.renamed(
            "DiffusionFold", "margin", "fold_margin", margin, fold_margin
        )
        self.fold_weight = fold_weight
        self.diffusion, self.fold = Diffusion(), NegativeJacobian(fold_margin)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return self.diffusion(flow) + self.fold_weight * self.fold(flow)


class NegativeJacobian(nn.Module):
    """Mean of ``relu(fold_margin - det J)`` of p -> p + flow(p): penalises folding (det <= 0).

    Zero wherever the field keeps a margin ``fold_margin`` from folding, so it leaves ordinary
    pairs alone; it is what keeps scaling-and-squaring refinement at 0 % folding on the few
    pairs whose optimum is an extreme compression (measured in experiments/refine_benchmark.py).
    ``eps`` is the former name of ``fold_margin``.
    """

    def __init__(self, fold_margin: float = 0.05, *, eps: float | None = None) -> None:
        super().__init__()
        self.fold_margin = deprecation.renamed(
            "NegativeJacobian", "eps", "fold_margin", eps, fold_margin
        )

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fold_margin - jacobian_determinant(flow)).mean()


def _bspline3(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline weights (..., 4) of the bins floor(t) - 1 .. floor(t) + 2 at fraction
    s = t - floor(t) in [0, 1] (they sum to 1), and their derivatives in s (they sum to 0)."""
    s2, s3, r = s * s, s * s * s, 1 - s
    w = torch.stack([r * r * r, 3 * s3 - 6 * s2 + 4, -3 * s3 + 3 * s2 + 3 * s + 1, s3], -1) / 6
    dw = torch.stack([-r * r, 3 * s2 - 4 * s, -3 * s2 + 2 * s + 1, s2], -1) / 2
    return w, dw


# _bspline3's weights as cubics in s: w_k(s) = sum_p _BSPLINE3[k, p] s^p (each column sums to
# 1, 0, 0, 0: the weights sum to 1)
_BSPLINE3 = (
    torch.tensor([[1, -3, 3, -1], [4, 0, -6, 3], [1, 3, 3, -3], [0, 0, 0, 1]], dtype=torch.float64)
    / 6
)


def _entropy(p: torch.Tensor, dims) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dims)


class _ParzenMI(torch.autograd.Function):
    """Per-pair (normalised) mutual information (B,) from continuous moving bin coordinates
    ``t`` (B, N) in [1, bins - 2] and fixed Parzen weights ``wf`` (B, N, A) on the bins
    ``f`` (B, N, A) (A = 1: a box window; 4: cubic), with its gradient in ``t``. The joint
    histogram is accumulated by ``index_add_`` (4 A bins per sample), so the cost is O(N A)
    and the memory O(N A + bins^2): no (N, bins) or (N, bins, bins) tensor."""

    @staticmethod
    def forward(ctx, t, wf, f, bins: int, normalised: bool):
        b, n = t.shape
        base = t.detach().floor().clamp(1, bins - 3)
        w, dw = _bspline3(t.detach() - base)  # (B, N, 4)
        pair = torch.arange(b, device=t.device)[:, None, None] * bins * bins
        first = (pair + f * bins + base.long()[..., None] - 1)[..., None]  # (B, N, A, 1)
        index = first + torch.arange(4, device=t.device)  # (B, N, A, 4)
        weights = wf[..., None] * w[:, :, None, :]
        joint = t.new_zeros(b * bins * bins).index_add_(0, index.flatten(), weights.flatten())
        joint = joint.view(b, bins, bins) / n  # (B, fixed bin, moving bin), sums to 1
        p_m = joint.sum(1)  # (B, bins); the fixed marginal does not move with t
        h_f, h_m, h_fm = _entropy(joint.sum(2), 1), _entropy(p_m, 1), _entropy(joint, (1, 2))
        # d value / d joint[f, m], up to a constant per pair (which sum(dw) = 0 cancels)
        log_joint = joint.clamp_min(1e-30).log()
        log_m = p_m.clamp_min(1e-30).log()[:, None, :]
        if normalised:  # (H_f + H_m) / H_fm
            value = (h_f + h_m) / h_fm
            grad = (log_joint * (h_f + h_m)[:, None, None] - log_m * h_fm[:, None, None]) / (
                h_fm * h_fm
            )[:, None, None]
        else:  # H_f + H_m - H_fm = sum joint log(joint / (p_f p_m))
            value, grad = h_f + h_m - h_fm, log_joint - log_m
        ctx.save_for_backward(index, wf, dw, grad)
        ctx.n = n
        return value

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        index, wf, dw, grad = ctx.saved_tensors
        # d value / d t_i = sum_a,k wf_a dw_k(s_i) grad[f_a, base_i - 1 + k] / N: a gather
        g = (grad.flatten()[index] * dw[:, :, None, :]).sum(-1)  # (B, N, A)
        per_sample = (g * wf).sum(-1) / ctx.n  # (B, N)
        return grad_value[:, None] * per_sample, None, None, None, None


class MutualInformation(nn.Module):
    """Negative (normalised) mutual information per pair, batch mean: Mattes et al.'s
    Parzen-window MI, as ITK/ANTs' ``MattesMutualInformation`` computes it.

    For images of different contrast (T1 vs T2, CT vs MR): it rewards any consistent intensity
    mapping, not equal intensities. Each image of each pair is mapped to the bins by its own
    min and max; the warped (moving) image through a cubic B-spline Parzen window (4 bins per
    sample), the fixed one through a zero-order (box) window as in ITK (``fixed_window``
    "bspline": cubic too, 16 bins per sample). ``bins`` = 32 as in
    ANTs. ``sampling`` < 1: a regular subset of that fraction of the pixels (ANTs' "Regular").
    ``normalised`` (default): Studholme's (H_f + H_m) / H_fm, in [1, 2]; False: H_f + H_m - H_fm
    (Mattes' own, in nats). Normalised measured better on MNI152 slices (EPE 0.145 vs 0.155 px
    under a contrast change, 0.101 vs 0.129 nearly aligned); ``fixed_window="bspline"``
    better still (0.121, 0.050) at about 4x the histogram's cost. Cost O(N) per pair; the
    gradient (``_ParzenMI``) is exact, through the min/max mapping too.
    """

    def __init__(
        self,
        bins: int = 32,
        *,
        sampling: float = 1.0,
        normalised: bool = True,
        fixed_window: str = "box",
    ) -> None:
        super().__init__()
        if fixed_window not in ("box", "bspline"):
            raise ConfigError(f"fixed_window must be box or bspline, got {fixed_window!r}")
        if not isinstance(bins, int) or bins < 5:
            raise ConfigError(f"bins must be an integer >= 5 (the cubic window), got {bins}")
        if not 0 < sampling <= 1:
            raise ConfigError(f"sampling must be a fraction in (0, 1], got {sampling}")
        self.bins, self.sampling, self.normalised = bins, sampling, normalised
        self.fixed_window = fixed_window

    def mutual_information(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B,) MI (or NMI) of each pair, in nats; higher is more similar. Without autograd
        (no grad mode, or a ``warped`` that needs none): ``from_histogram(histogram(...))``."""
        if not (torch.is_grad_enabled() and warped.requires_grad):
            return self.from_histogram(self.histogram(warped, fixed)).to(warped.dtype)
        m, f = self._samples(warped), self._samples(fixed.detach())  # (B, N)
        t, s = self._bin_coordinates(m), self._bin_coordinates(f)  # (B, N) in [1, bins - 2]
        if self.fixed_window == "bspline":
            base = s.floor().clamp(1, self.bins - 3)
            wf, _ = _bspline3(s - base)  # (B, N, 4)
            f_bins = base.long()[..., None] - 1 + torch.arange(4, device=f.device)
        else:  # box: the bin the fixed intensity falls in, over the full range
            f_bins = self._box_bins(s)[..., None]  # (B, N, 1)
            wf = torch.ones_like(s)[..., None]
        return _ParzenMI.apply(t, wf, f_bins, self.bins, self.normalised)

    @torch.no_grad()
    def histogram(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B, bins, bins) float64 joint distribution (fixed bin, moving bin) of each pair: the
        one ``mutual_information`` differentiates, without autograd or a (B, N, 4) tensor. The
        window's weights are cubics in each sample's fraction s of a bin, so 4 (box) or 16
        ``bincount``s of the power sums of s (times the fixed fraction's) give the histogram,
        summed in double. A pair with a non-finite intensity: NaN."""
        m, f = self._samples(warped), self._samples(fixed)  # (B, N)
        b, bins = m.shape[0], self.bins
        size = b * bins * bins
        t, bad = self._finite_coordinates(m)
        base = t.floor().clamp_(1, bins - 3)  # moving bins base - 1 + k, k = 0..3
        s = t.sub_(base).flatten().to(torch.float64)
        first, fixed_powers, bad_fixed = self._fixed_part(f)
        first = first.add_(base.long()).flatten()  # (B N,) flat index of bins (f, base - 1)
        sums = torch.zeros(len(fixed_powers), 4, size, dtype=torch.float64, device=m.device)
        for a, x in enumerate(fixed_powers):  # x = u^a s^p (None: 1), u the fixed fraction
            for p in range(4):
                sums[a, p] = torch.bincount(first, x, minlength=size)
                x = s if x is None else x * s if x is s else x.mul_(s)  # (s itself kept)
        coef = _BSPLINE3.to(sums.device)
        fixed_coef = coef if len(fixed_powers) == 4 else coef.new_ones(1, 1)
        parts = torch.einsum("ja,kp,api->jki", fixed_coef, coef, sums)  # (J, 4, size)
        joint = torch.zeros(size, dtype=torch.float64, device=m.device)
        for j, k in itertools.product(range(len(fixed_coef)), range(4)):
            shift = j * bins + k  # first + shift < size: the tail of parts[j, k] is empty
            joint[shift:] += parts[j, k, : size - shift]
        joint = joint.clamp_(min=0).view(b, bins, bins) / m.shape[1]  # clamp: rounding, < 1e-15
        return joint.masked_fill_((bad | bad_fixed)[:, None, None], float("nan"))

    def from_histogram(self, joint: torch.Tensor) -> torch.Tensor:
        """(B,) MI (or NMI) of (B, bins, bins) joint distributions, as ``mutual_information``."""
        h_f, h_m = _entropy(joint.sum(2), 1), _entropy(joint.sum(1), 1)
        h_fm = _entropy(joint, (1, 2))
        return (h_f + h_m) / h_fm if self.normalised else h_f + h_m - h_fm

    def _samples(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) intensities of (B, C, *spatial) images: every k-th if ``sampling`` < 1."""
        x = x.flatten(1)
        return x[:, :: max(1, round(1 / self.sampling))] if self.sampling < 1 else x

    def _finite_coordinates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_bin_coordinates``'s numbers (B, N), by the same operations in place, and which
        pairs (B,) hold a non-finite intensity (their coordinates all 1: NaN has no bin)."""
        # amin and amax, not aminmax: the same values, 8x faster on (1, N) rows (torch 2.14, CPU)
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        bad = ~(lo.isfinite() & hi.isfinite()).flatten()
        t = (x - lo).div_((hi - lo).clamp_min(1e-12)).mul_(self.bins - 3).add_(1)
        if bad.any():
            t[bad] = 1
        return t, bad

    def _fixed_part(self, f: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
        """Of fixed samples (B, N): the flat index of (pair, first fixed bin, moving bin -1)
        (B, N); the powers 1 (None), u, u^2, u^3 (B N,) of their fraction u of a bin (box: 1
        only); and which pairs are non-finite (B,)."""
        s, bad = self._finite_coordinates(f)
        b, bins = f.shape[0], self.bins
        offset = torch.arange(b, device=f.device)[:, None] * bins**2 - 1
        if self.fixed_window == "bspline":
            base = s.floor().clamp_(1, bins - 3)  # fixed bins base - 1 + j, j = 0..3
            u = s.sub_(base).flatten().to(torch.float64, copy=True)
            first, powers = base.long().sub_(1).mul_(bins), [None, u, u * u, u * u * u]
        else:  # box: the bin the fixed intensity falls in, as mutual_information's
            first, powers = self._box_bins(s).mul_(bins), [None]
        return first.add_(offset), powers, bad

    def _box_bins(self, s: torch.Tensor) -> torch.Tensor:
        """The box window's bin (long, in [0, bins - 1]) of bin coordinates ``s``
        (``_bin_coordinates``): the full intensity range cut into ``bins`` equal bins."""
        return ((s - 1) / (self.bins - 3) * self.bins).long().clamp(0, self.bins - 1)

    def _bin_coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) intensities -> [1, bins - 2] by each pair's own min and max."""
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        return 1 + (x - lo) / (hi - lo).clamp_min(1e-12) * (self.bins - 3)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return -self.mutual_information(warped, fixed).mean()


class NormalisedGradientFields(nn.Module):
    """1 - mean squared cosine of the image gradients per pair, batch mean (min 0): Haber &
    Modersitzki's normalised gradient fields (NGF).

    Modality independent: it asks that edges line up, whatever their sign or contrast.
    ``eta`` sets each image's edge scale eps = eta * its RMS gradient magnitude (per pair),
    below which a gradient counts as noise; so it is invariant to scaling the intensities.
    """

    def __init__(self, eta: float = 0.2) -> None:
        super().__init__()
        if eta <= 0:
            raise ConfigError(f"eta must be > 0, got {eta}")
        self.eta = eta

    def _gradients(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Central differences along each axis on the interior (B, C, *spatial less 2), and
        the squared norm plus eps^2."""
        n = spatial_ndim(x)
        grads = []
        for i in range(n):
            inner = [slice(1, -1)] * n
            ahead, behind = list(inner), list(inner)
            ahead[i], behind[i] = slice(2, None), slice(None, -2)
            grads.append((x[(..., *ahead)] - x[(..., *behind)]) / 2)
        norm2 = _total(g * g for g in grads)
        # eps = eta x the RMS gradient (a sqrt would have an infinite slope on flat regions)
        eps2 = self.eta**2 * norm2.mean(tuple(range(1, x.ndim)), keepdim=True) + 1e-12
        return grads, norm2 + eps2

    def _misalignment(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """1 - squared cosine of the two images' gradients, per interior pixel."""
        wg, wn = self._gradients(warped)
        fg, fn = self._gradients(fixed)
        return 1 - _total(w * f for w, f in zip(wg, fg, strict=True)).square() / (wn * fn)

    def per_pair(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B,) the loss of each pair alone, in one call (the guard's)."""
        return self._misalignment(warped, fixed).flatten(1).mean(1)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self._misalignment(warped, fixed).mean()


class SoftDice(nn.Module):
    """1 - mean soft Dice over channels 1.. of (B, K + 1, *spatial) label probabilities (channel 0,
    the background, left out): label overlap, SynthMorph's contrast-free objective
    (``RegistrationModule(supervision="labels")`` warps one-hot moving labels bilinearly)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        w, f = warped[:, 1:].flatten(2), fixed[:, 1:].flatten(2)  # (B, K, N)
        inter, total = (w * f).sum(-1), w.sum(-1) + f.sum(-1)
        present = f.sum(-1) > 0  # labels absent from the fixed map do not count
        dice = (2 * inter + self.eps) / (total + self.eps)
        return 1 - dice[present].mean() if present.any() else warped.sum() * 0


class EndPointError(nn.Module):
    """Mean end-point error (pixels) of a flow against the true one: the field-supervised
    objective of pairs with known fields (``RegistrationModule(supervision="field")``)."""

    def forward(self, flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (flow - target).square().sum(1).add(1e-8).sqrt().mean()
