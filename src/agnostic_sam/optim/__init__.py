"""The optimizers: AgnosticSAM (Algorithm 1 and its simpler variant), SAM/ASAM, and the batch split."""

from agnostic_sam.optim.agnostic_sam import AgnosticSAM
from agnostic_sam.optim.sam import SAM
from agnostic_sam.optim.split import split_batch, split_sizes

__all__ = ["AgnosticSAM", "SAM", "split_batch", "split_sizes"]
