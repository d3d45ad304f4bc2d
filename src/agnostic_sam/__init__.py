"""Agnostic Sharpness-Aware Minimization (Nguyen et al.) for PyTorch.

    from agnostic_sam import AgnosticSAM, split_batch
"""

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import SAM, AgnosticSAM, split_batch, split_sizes

__version__ = "0.1.0"

__all__ = ["AgnosticSAM", "SAM", "LossScaler", "split_batch", "split_sizes", "__version__"]
