"""The optimizers: AgnosticSAM (Algorithm 1 and its simpler variant), SAM/ASAM, Plain (the base
optimizer behind the same step), gradient accumulation in closures, and the batch split."""

from agnostic_sam.optim._base import PERTURBATIONS, SharpnessOptimizer
from agnostic_sam.optim.accumulation import accumulate
from agnostic_sam.optim.agnostic_sam import AgnosticSAM
from agnostic_sam.optim.plain import Plain
from agnostic_sam.optim.sam import SAM
from agnostic_sam.optim.split import split_batch, split_sizes

__all__ = [
    "PERTURBATIONS",
    "AgnosticSAM",
    "SAM",
    "Plain",
    "SharpnessOptimizer",
    "accumulate",
    "split_batch",
    "split_sizes",
]
