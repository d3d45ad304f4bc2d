"""The optimizers: AgnosticSAM (Algorithm 1 and its simpler variant), SAM/ASAM, Plain (the base
optimizer behind the same step), the sharpness-aware family (GSAM, Friendly-SAM, LookSAM, ESAM,
momentum-SAM, RWP, Lookbehind-SAM, VaSSO, WSAM, the authors' ASAM), gradient accumulation in
closures, and the batch split. `agnostic_sam.methods` registers each under its name."""

from agnostic_sam.optim._base import PERTURBATIONS, SharpnessOptimizer
from agnostic_sam.optim.accumulation import accumulate
from agnostic_sam.optim.agnostic_sam import AgnosticSAM
from agnostic_sam.optim.asam import KwonASAM
from agnostic_sam.optim.esam import ESAM
from agnostic_sam.optim.friendly_sam import FriendlySAM
from agnostic_sam.optim.gsam import GSAM
from agnostic_sam.optim.lookbehind_sam import LookbehindSAM
from agnostic_sam.optim.looksam import LookSAM
from agnostic_sam.optim.momentum_sam import MomentumSAM
from agnostic_sam.optim.plain import Plain
from agnostic_sam.optim.rwp import RWP
from agnostic_sam.optim.sam import SAM
from agnostic_sam.optim.split import split_batch, split_sizes
from agnostic_sam.optim.vasso import VaSSO
from agnostic_sam.optim.wsam import WSAM

__all__ = [
    "ESAM",
    "GSAM",
    "PERTURBATIONS",
    "RWP",
    "SAM",
    "WSAM",
    "AgnosticSAM",
    "FriendlySAM",
    "KwonASAM",
    "LookSAM",
    "LookbehindSAM",
    "MomentumSAM",
    "Plain",
    "SharpnessOptimizer",
    "VaSSO",
    "accumulate",
    "split_batch",
    "split_sizes",
]
