"""air-reg: unsupervised deformable image registration with attention (AiR, MAPT, DIRNet)."""

__version__ = "0.1.0"

from air_reg.checkpoint import CheckpointError, load_model  # noqa: E402
from air_reg.models.components.spatial_transformer import warp  # noqa: E402

__all__ = ["CheckpointError", "__version__", "load_model", "warp"]
