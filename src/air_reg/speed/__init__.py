"""Speed behind one door: air-reg's optional CPU kernels, swapped into plain PyTorch models.

The models (``air_reg.models``) are plain PyTorch: ``ScaledDotProductAttention`` modules
(``F.scaled_dot_product_attention``), ``LocalMatch`` modules and ``nn.Dropout``.
``accelerate(net, ...)`` replaces those modules in place with kernel-backed ones computing the
same function; nothing else in air-reg knows about the kernels. The entry points call it with
the ``speed`` config node:

- ``speed.attention``: ``auto`` (default: air-reg's attention kernel where it is faster and
  can run: CPU float32, head size <= 8, no attention dropout; else SDPA), ``kernel`` (insist)
  or ``sdpa`` (PyTorch only). Same maths; only float32 rounding differs. With ``auto`` and
  ``kernel`` AiR-Match's local window match (``LocalMatch``) also runs on its kernel at
  inference (``speed.local_match``: 2-D, CPU float32, no gradient; else the torch ops).
- ``speed.dropout``: ``torch`` (default: PyTorch's dropout, the paper configs' random stream)
  or ``fast`` (counter-based masks in air-reg's kernel: the same distribution, another random
  stream, so seeded results change).

Instance optimisation (``air_reg.refine``) has no module to swap: its warps and penalties call
``air_reg.speed.warp``, which runs the kernels where they can (CPU float32, eager) and torch's
ops otherwise, with no setting (the same maths; ``speed.warp.torch_ops()`` forces torch's).

The kernels are built once per machine (``python -m air_reg.speed build``, or on first use),
on Linux with a C++ compiler; elsewhere the PyTorch path runs, with one notice.
``report()`` says what was chosen and which path each op took; ``run_record.json`` holds it.
"""

from __future__ import annotations

from torch import nn

from air_reg.errors import ConfigError
from air_reg.speed import kernels

ATTENTION = ("auto", "kernel", "sdpa")
DROPOUT = ("torch", "fast")


def accelerate(net: nn.Module, *, attention: str = "auto", dropout: str = "torch") -> nn.Module:
    """Swap air-reg's kernel-backed modules into ``net`` (in place; returns ``net``).

    Parameters and state-dict keys are unchanged, so checkpoints load either way.
    """
    from air_reg.models.components.attention import ScaledDotProductAttention
    from air_reg.models.components.matching import LocalMatch
    from air_reg.speed.attention import KernelAttention
    from air_reg.speed.dropout import FastDropout
    from air_reg.speed.local_match import KernelLocalMatch

    if attention not in ATTENTION:
        raise ConfigError(f"speed.attention must be one of {ATTENTION}, got {attention!r}")
    if dropout not in DROPOUT:
        raise ConfigError(f"speed.dropout must be one of {DROPOUT}, got {dropout!r}")
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child) is ScaledDotProductAttention:
                setattr(parent, name, KernelAttention.replacing(child, attention))
            elif type(child) is LocalMatch and attention != "sdpa":
                setattr(parent, name, KernelLocalMatch())
            elif dropout == "fast" and type(child) is nn.Dropout:
                prev = children[i - 1][1] if i and isinstance(parent, nn.Sequential) else None
                fuse = type(prev) is nn.ReLU  # ReLU then dropout: one pass in the kernel
                if fuse:
                    setattr(parent, children[i - 1][0], nn.Identity())
                setattr(parent, name, FastDropout(child.p, relu=fuse))
    return net


def settings_of(cfg) -> dict[str, str]:
    """``attention``/``dropout`` from a config's ``speed`` node (defaults where absent)."""
    node = (cfg.get("speed") if cfg is not None else None) or {}
    return {"attention": node.get("attention", "auto"), "dropout": node.get("dropout", "torch")}


def report(settings: dict | None = None) -> dict:
    """What runs here: the settings, whether the kernels are built (or why not), op calls."""
    settings = settings or {"attention": "auto", "dropout": "torch"}
    out: dict = {"settings": dict(settings)}
    if settings["attention"] == "sdpa" and settings["dropout"] == "torch":
        out["kernels"] = "not used"
    elif kernels.available():
        lib = kernels.library()
        out |= {"kernels": "built", "library": lib._name, "openmp": lib.openmp}
    else:
        out["kernels"] = f"unavailable, PyTorch ops instead: {kernels.failure()}"
    return out | {"calls": kernels.calls()}


__all__ = ["ATTENTION", "DROPOUT", "accelerate", "report", "settings_of"]
