"""Every registered method through the conformance suite (`agnostic_sam.conformance`), with no
per-method test code: a new registration gets every check by being registered."""

from __future__ import annotations

import pytest

from agnostic_sam.conformance import CHECKS
from agnostic_sam.methods import list_methods


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", list_methods())
def test_conformance(name: str, check: str) -> None:
    CHECKS[check](name)
