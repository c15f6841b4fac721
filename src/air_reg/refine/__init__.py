"""Instance optimisation ("refinement") of flows at the images' own size.

- ``settings``: ``RefineSettings``, every setting in one frozen dataclass, read from a preset
  file (``air_reg/conf/refinement/<name>.yaml``) or a composed ``cfg.refine``;
- ``optimise``: ``refine(fixed, moving, init_flow, settings)``, its affine stage and the guard
  ``keep_if_better`` (never less similar than doing nothing; ``register`` uses it too);
- ``flows``: composition, ``apply_repeatedly`` (the CLI's ``cascade``), pyramids, grids;
- ``registrar``: ``Registrar``, what ``air_reg.load_model`` returns (a network, or none, and
  optionally the refinement).

The settings ``register``, ``eval`` and ``load_model(path, refine_steps=N)`` use live in one
file, ``air_reg/conf/refinement/<preset>.yaml``, chosen and measured as ``docs/protocol.md``
says. Former names (``Refiner``, ``cascade``, ``load_preset``, ``SETTINGS``) still work, with a
``DeprecationWarning``.
"""

from __future__ import annotations

from air_reg import deprecation
from air_reg.models.components.spatial_transformer import resize_flow
from air_reg.refine.flows import (
    AUTO_POINTS,
    affine_flow,
    after_affine,
    apply_repeatedly,
    auto_spacing,
    compose,
    control_grid,
    field_size,
    fit_coarse,
    pyramid,
    velocity_from_flow,
)
from air_reg.refine.optimise import (
    AFFINE_LR,
    GUARD_TOL,
    SIMILARITIES,
    estimate_affine,
    keep_if_better,
    per_pair,
    refine,
    similarity_module,
)
from air_reg.refine.registrar import Refiner, Registrar
from air_reg.refine.settings import (
    DEFAULT_LR,
    DEFAULT_PRESET,
    LEGACY_DEFAULTS,
    OPTIMIZERS,
    PRESET_DIR,
    RefineSettings,
    RefineSettingsError,
)

__all__ = [
    "AFFINE_LR", "AUTO_POINTS", "DEFAULT_LR", "DEFAULT_PRESET", "GUARD_TOL", "LEGACY_DEFAULTS",
    "OPTIMIZERS", "PRESET_DIR", "SIMILARITIES", "RefineSettings", "RefineSettingsError",
    "Refiner", "Registrar", "affine_flow", "after_affine", "apply_repeatedly", "auto_spacing",
    "compose", "control_grid", "estimate_affine", "field_size", "fit_coarse", "keep_if_better",
    "per_pair", "pyramid", "refine", "resize_flow", "similarity_module", "velocity_from_flow",
]  # fmt: skip


def _cascade(net, fixed, moving, k):
    """Deprecated name of ``apply_repeatedly`` (``cascade`` is also the CLI's int setting)."""
    return apply_repeatedly(net, fixed, moving, k)


def _load_preset(name: str = DEFAULT_PRESET) -> dict:
    """Deprecated: ``RefineSettings.preset(name)``; its settings as a dict."""
    return RefineSettings.preset(name).as_dict()


_DEPRECATED = {  # former name: (what it is now, the new spelling)
    "cascade": (lambda: _cascade, "apply_repeatedly"),
    "load_preset": (lambda: _load_preset, "RefineSettings.preset(name)"),
    "SETTINGS": (lambda: [n for n in RefineSettings.names() if n != "regularizer"],
                 "RefineSettings.names()"),
    "_similarity": (lambda: similarity_module, "similarity_module"),
    "_after_affine": (lambda: after_affine, "after_affine"),
    "_fit_coarse": (lambda: fit_coarse, "fit_coarse"),
}  # fmt: skip


def __getattr__(name: str):
    if name in _DEPRECATED:
        value, new = _DEPRECATED[name]
        deprecation.warn(f"air_reg.refine.{name} is deprecated; use air_reg.refine.{new}")
        return value()
    raise AttributeError(f"module 'air_reg.refine' has no attribute {name!r}")
