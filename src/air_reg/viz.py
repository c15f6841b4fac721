"""Figures of registered pairs: fixed | moving | warped | deformation grid | |warped - fixed|."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from air_reg.utils import write_with

COLUMNS = ("fixed", "moving", "warped", "deformation", "|warped - fixed|")


def draw_grid(ax, flow: torch.Tensor, step: int = 4, **line_kw) -> None:
    """Draw the fixed grid's lines, every ``step`` pixels, moved by ``flow`` (2, H, W) pixels."""
    flow = flow.detach().cpu().float()
    h, w = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = ys + flow[0], xs + flow[1]  # (H, W): where each fixed pixel samples the moving image
    style = {"color": "tab:blue", "linewidth": 0.8} | line_kw
    for i in range(0, h, step):  # lines of constant row
        ax.plot(x[i], y[i], **style)
    for j in range(0, w, step):  # lines of constant column
        ax.plot(x[:, j], y[:, j], **style)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)  # image convention: row 0 at the top
    ax.set_aspect("equal")


def pair_figure(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    warped: torch.Tensor,
    flow: torch.Tensor,
    path: str | Path,
    titles: list[str] | None = None,
    max_rows: int = 8,
    step: int | None = None,
) -> Path:
    """Save one row per pair (at most ``max_rows``); ``titles`` label the rows (e.g. names).

    Images are (B, 1, H, W) in [0, 1], ``flow`` (B, 2, H, W) in pixels; ``step`` is the grid
    spacing in pixels (default: about 14 lines across). Volumes (B, 1, D, H, W) with flows
    (B, 3, D, H, W) show their middle slice along the first axis and the in-plane motion.
    """
    if fixed.ndim == 5:
        fixed, moving, warped, flow = middle_slice(fixed, moving, warped, flow)
    n = min(len(fixed), max_rows)
    h, w = fixed.shape[-2:]
    step = step or max(1, round(max(h, w) / 14))
    fig = Figure(figsize=(2.2 * len(COLUMNS), 2.2 * n + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(COLUMNS), squeeze=False)
    to_np = lambda t: t.detach().cpu().float()[0].numpy()  # noqa: E731  (1, H, W) -> (H, W)
    for r in range(n):
        images = [fixed[r], moving[r], warped[r], None, (warped[r] - fixed[r]).abs()]
        for c, (ax, image) in enumerate(zip(axes[r], images, strict=True)):
            if image is None:
                draw_grid(ax, flow[r], step)
            else:
                cmap = "magma" if c == 4 else "gray"
                ax.imshow(to_np(image), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=9)
        if titles is not None:
            axes[r, 0].set_ylabel(titles[r], fontsize=8)
    suffix = Path(path).suffix.lstrip(".") or "png"
    write_with(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=100))
    return Path(path)


def middle_slice(fixed, moving, warped, flow) -> tuple[torch.Tensor, ...]:
    """The images' middle slice along the first spatial axis and the flow's in-plane part
    there (its components along the last two axes)."""
    k = fixed.shape[2] // 2
    return fixed[:, :, k], moving[:, :, k], warped[:, :, k], flow[:, 1:, k]


@torch.no_grad()
def method_figure(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    flows: dict[str, torch.Tensor],
    path: str | Path,
    max_rows: int = 6,
) -> Path:
    """Fig. 3 layout: fixed | moving, then warped and deformation grid for each method."""
    from air_reg.models.components.spatial_transformer import warp

    n = min(len(fixed), max_rows)
    h, w = fixed.shape[-2:]
    step = max(1, round(max(h, w) / 14))
    cols = 2 + 2 * len(flows)
    fig = Figure(figsize=(1.6 * cols, 1.6 * n + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    titles = ["fixed", "moving"] + [t for name in flows for t in (name, f"{name} grid")]
    for r in range(n):
        panels = [fixed[r], moving[r]]
        for flow in flows.values():
            panels += [warp(moving[r : r + 1], flow[r : r + 1])[0], flow[r]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            if c >= 2 and c % 2 == 1:
                draw_grid(ax, panel, step, linewidth=0.5)
            else:
                ax.imshow(panel[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)
