"""Agnostic Sharpness-Aware Minimization (Nguyen et al.) for PyTorch.

    from agnostic_sam import AgnosticSAM, split_batch
"""

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import SAM, AgnosticSAM, Plain, accumulate, split_batch, split_sizes

__version__ = "0.2.0"

__all__ = [
    "AgnosticSAM", "SAM", "Plain", "LossScaler", "accumulate", "split_batch", "split_sizes",
    "__version__",
]
