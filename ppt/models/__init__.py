"""PPT models: SpUNet backbone, domain prompts and PDNorm, heads, and the Segmentor."""
from ppt.models.segmentor import Segmentor

__all__ = ["Segmentor"]
