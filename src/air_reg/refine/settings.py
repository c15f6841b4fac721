"""Refinement settings as one object: ``RefineSettings``, a frozen dataclass loaded from a
preset file (``air_reg/conf/refinement/<name>.yaml``) or from a Hydra-composed ``cfg.refine``
through the same ``from_config``, checked when it is made.

The dataclass defaults are the ``default`` preset (a test pins them to the file). ``steps`` is
the CLI's ``refine_steps`` (the preset's ``refine_steps: 0`` is the switch that leaves the
refinement off, so the entry points build no settings then); the network's ``cascade`` count
is not a refinement setting (it applies before the refinement, and without it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from air_reg.config import CONFIG_DIR
from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import INTERPOLATIONS
from air_reg.refine.flows import auto_stride

PRESET_DIR = Path(CONFIG_DIR) / "refinement"
DEFAULT_PRESET = "default"
OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_LR = {"adam": 0.5, "lbfgs": 1.0}  # Adam: pixels per step; L-BFGS: first line-search step
SIMILARITY_NAMES = ("mse", "ncc", "lncc", "mi", "ngf")  # air_reg.refine.optimise.SIMILARITIES
# reg_weight "auto": the diffusion weight that goes with each similarity's scale (MSE of [0, 1]
# images is ~1e-3..1e-2, normalised MI ~1..2). MSE's was chosen on the brain MRI validation
# slices, MI's on the tune split of the 2-D families (docs/protocol.md); the others take MSE's.
REG_WEIGHTS = {"mse": 0.002, "mi": 2.0}
DEFAULT_REG_WEIGHT = REG_WEIGHTS["mse"]
NOT_IN_PRESET = ("steps", "regularizer")  # the CLI's refine_steps; a module, not a YAML value


class RefineSettingsError(ConfigError, TypeError):
    """A refinement setting that does not exist (a TypeError, as an unknown keyword is)."""


@dataclass(frozen=True)
class RefineSettings:
    """Every setting of ``air_reg.refine.refine``, with the ``default`` preset's values.

    ``RefineSettings(steps=60)``, ``RefineSettings.preset("diffeomorphic")``,
    ``RefineSettings.from_config(cfg.refine, steps=cfg.refine_steps)`` and
    ``settings.replace(lr=0.2)`` all check every value; an unknown name is one
    ``RefineSettingsError`` line that lists the valid names.
    """

    steps: int = 50  # Adam steps at full size (level k halvings down gets steps * (1 + k))
    similarity: str | nn.Module = "mse"  # mse | ncc | lncc | mi | ngf or a module (warped, fixed)
    levels: int = 3  # pyramid of halvings, coarse to fine
    min_size: int = 16  # coarsest side of a level, and of the field grid
    spacing: float | str | None = "auto"  # control points this many px apart, or auto
    grid: int | None = None  # or grid x grid control points (not with spacing); neither: per px
    grid_mode: str = "bspline"  # how the control grid is made dense
    field_stride: int | str = 2  # the field on a grid this many times coarser while optimising;
    # auto: the coarsest keeping 2 field points a control spacing (flows.auto_stride)
    integration_steps: int | None = 4  # > 0: a velocity, scaling and squaring; None: the net's
    optimizer: str = "adam"  # adam (pairs independent) | lbfgs (one problem per batch)
    lr: float | None = 0.5  # None: 0.5 for Adam, 1 for L-BFGS
    lr_decay: float = 0.1  # Adam's step falls from lr to lr_decay * lr within each level
    reg_weight: float | str = "auto"  # of the regularizer (diffusion); auto: the similarity's
    fold_weight: float = 20.0  # weight of NegativeJacobian(fold_margin): 0 away from folds
    fold_margin: float = 0.05  # det J below which a pixel counts as (nearly) folded
    affine_steps: int = 30  # > 0: an affine stage first, the network (if any) after it
    guard: bool = True  # never less similar than the unregistered images
    regularizer: nn.Module | None = None  # None: Diffusion(), the one the kernels compute
    affine_min_px: float = 8.0  # the affine stage's result kept for a pair only if it moves
    # some pixel by more than this, after its coarsest level and at the end (0: always): large
    # motions get it; nearly aligned pairs stop after that level and run as without one
    affine_max_voxels: int | None = 262144  # the affine stage's finest level: the images
    # halved until at most this many pixels (None: their own size); 512 x 512 stays whole

    def __new__(cls, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown or len(args) > len(cls.names()):
            raise RefineSettingsError(
                f"unknown refinement setting(s) {', '.join(map(repr, unknown)) or args}; "
                f"the settings are {', '.join(cls.names())}"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.similarity is None:  # refine's former spelling of the default
            object.__setattr__(self, "similarity", "mse")
        for name in ("steps", "affine_steps"):
            _check(self, name, _is_int(getattr(self, name), 0), "an integer >= 0")
        for name in ("levels", "min_size"):
            _check(self, name, _is_int(getattr(self, name), 1), "an integer >= 1")
        _check(self, "field_stride", self.field_stride == "auto" or _is_int(self.field_stride, 1),
               "an integer >= 1 or auto")  # fmt: skip
        _check(
            self,
            "integration_steps",
            self.integration_steps is None or _is_int(self.integration_steps, 0),
            "an integer >= 0 (or null: the network's own)",
        )
        _check(self, "optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        _check(self, "grid_mode", self.grid_mode in INTERPOLATIONS, f"one of {INTERPOLATIONS}")
        _check(
            self,
            "similarity",
            self.similarity in SIMILARITY_NAMES or isinstance(self.similarity, nn.Module),
            f"one of {SIMILARITY_NAMES} (mi or ngf for images of different contrast) or a module",
        )
        _check(self, "grid", self.grid is None or _is_int(self.grid, 2), "an integer >= 2 or null")
        _check(
            self,
            "spacing",
            self.spacing in (None, "auto") or (_is_number(self.spacing) and self.spacing > 0),
            "> 0 pixels, auto or null",
        )
        if self.grid is not None and self.spacing is not None:
            raise ConfigError(
                f"give refine.grid (control points) or refine.spacing (px), not both; got "
                f"grid={self.grid!r}, spacing={self.spacing!r} (set the other to null)"
            )
        _check(self, "lr", self.lr is None or (_is_number(self.lr) and self.lr > 0), "> 0 or null")
        for name in ("lr_decay", "fold_weight"):
            value = getattr(self, name)
            _check(self, name, _is_number(value) and value >= 0, ">= 0")
        _check(self, "reg_weight", self.reg_weight == "auto" or (
            _is_number(self.reg_weight) and self.reg_weight >= 0), ">= 0 or auto")  # fmt: skip
        _check(self, "fold_margin", _is_number(self.fold_margin), "a number")
        _check(self, "affine_min_px", _is_number(self.affine_min_px) and self.affine_min_px >= 0,
               ">= 0 pixels")  # fmt: skip
        _check(self, "affine_max_voxels", self.affine_max_voxels is None or (
            _is_int(self.affine_max_voxels, 1)),
            "an int >= 1 or null")  # fmt: skip
        _check(self, "guard", isinstance(self.guard, bool), "true or false")
        _check(
            self,
            "regularizer",
            self.regularizer is None or isinstance(self.regularizer, nn.Module),
            "a module or null",
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, block: Mapping | DictConfig | None = None, **overrides) -> RefineSettings:
        """The settings of a ``refine:`` block (a preset's, or the composed ``cfg.refine``),
        with ``overrides``; a setting the block leaves out keeps its default."""
        if isinstance(block, DictConfig):
            block = OmegaConf.to_container(block, resolve=True)
        return cls(**(dict(block or {}) | overrides))

    @classmethod
    def preset(cls, name: str = DEFAULT_PRESET, **overrides) -> RefineSettings:
        """The settings of ``air_reg/conf/refinement/<name>.yaml``, with ``overrides``."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"no refinement preset {name!r}; choose one of {known}")
        return cls.from_config(OmegaConf.load(path).refine, **overrides)

    def replace(self, **changes) -> RefineSettings:
        """A copy with ``changes``, checked like a new one."""
        return dataclasses.replace(self, **changes)

    @property
    def regularisation_weight(self) -> float:
        """``reg_weight``, or for ``auto`` the one that goes with the similarity
        (``REG_WEIGHTS``: 0.002 for MSE, 2 for mutual information; MSE's for the others)."""
        if self.reg_weight != "auto":
            return float(self.reg_weight)
        name = self.similarity if isinstance(self.similarity, str) else None
        return REG_WEIGHTS.get(name, DEFAULT_REG_WEIGHT)

    def stride_for(self, size: tuple[int, ...]) -> int:
        """``field_stride`` for images of ``size``, ``auto`` resolved (``flows.auto_stride``)."""
        if self.field_stride != "auto":
            return int(self.field_stride)
        return auto_stride(size, self.grid, self.spacing)

    @property
    def step_size(self) -> float:
        """``lr``, or the optimizer's default step when it is None."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def as_dict(self) -> dict:
        """The settings a preset file can hold (no ``steps``, no ``regularizer``)."""
        return {n: getattr(self, n) for n in self.names() if n not in NOT_IN_PRESET}


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(settings: RefineSettings, name: str, ok: bool, valid: str) -> None:
    if not ok:
        raise ConfigError(f"refine.{name} must be {valid}, got {getattr(settings, name)!r}")


# What refine(**keywords) and Refiner(**keywords) meant before RefineSettings: one level, one
# value per pixel, reg_weight 0.05, no fold penalty, no guard (their deprecated keyword path).
LEGACY_DEFAULTS = RefineSettings(
    levels=1, spacing=None, field_stride=1, integration_steps=0, lr=None, lr_decay=1.0,
    reg_weight=0.05, fold_weight=0.0, guard=False,
)  # fmt: skip
