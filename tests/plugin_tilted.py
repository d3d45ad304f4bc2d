"""A method the package has never seen, registered from outside it (as a user's plugin would be,
through ``AGNOSTIC_SAM_PLUGINS=plugin_tilted``): SAM whose radius is ``rho * tilt``, with a setting
``tilt`` no part of the package knows, tuned by ``--tune``."""

from __future__ import annotations

from typing import Any

import torch

from agnostic_sam.methods import METHODS, Setting, register_method
from agnostic_sam.optim import SAM

NAME = "test-tilted-sam"


class TiltedSAM(SAM):
    """SAM at radius rho * tilt (so tilt=2 is SAM at twice rho, bit for bit)."""

    SETTINGS = SAM.SETTINGS + (
        Setting("tilt", float, 1.0, "factor on rho", low=0.0, grid=(0.5, 1.0, 2.0)),
    )

    def __init__(self, params: Any, base_optimizer: type = torch.optim.SGD, *,
                 rho: float = 0.05, tilt: float = 1.0, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho * tilt, **kwargs)


if NAME not in METHODS:
    register_method(NAME, TiltedSAM, description="SAM at rho * tilt (a test's plugin)",
                    tune="tilt", passes=("B", "B"))
