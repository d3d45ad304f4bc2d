"""Analyses of trained models: Hessian eigenvalues and trace, loss landscapes (paper Sec. 5.3).

The figures live in `agnostic_sam.analysis.plots` (the only module here importing matplotlib);
import it directly, so that `import agnostic_sam.analysis` stays light.
"""

from agnostic_sam.analysis.hessian import hessian_trace, hessian_vector_product, top_eigenvalues
from agnostic_sam.analysis.landscape import loss_line, loss_surface, random_direction
from agnostic_sam.analysis.runs import top_eigenvalue_of_run

__all__ = [
    "hessian_trace",
    "hessian_vector_product",
    "loss_line",
    "loss_surface",
    "random_direction",
    "top_eigenvalue_of_run",
    "top_eigenvalues",
]
