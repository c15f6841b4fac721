"""air-reg: unsupervised deformable image registration with attention (AiR, MAPT, DIRNet)."""

from air_reg._version import __version__
from air_reg.checkpoint import CheckpointError, load_model
from air_reg.models.components.spatial_transformer import warp
from air_reg.refine import RefineSettings, Registrar

__all__ = ["CheckpointError", "RefineSettings", "Registrar", "__version__", "load_model", "warp"]
