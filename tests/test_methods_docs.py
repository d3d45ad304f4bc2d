"""The method tables in docs/methods.md and the README are the registry's, not retyped."""

from __future__ import annotations

import re
from pathlib import Path

from agnostic_sam.methods.docs import methods_page, readme_table

ROOT = Path(__file__).resolve().parents[1]
_README = re.compile(r"<!-- methods table:[^\n]*-->\n(.*?)<!-- end of methods table -->", re.S)


def test_docs_methods_md_is_generated_from_the_registry() -> None:
    assert (ROOT / "docs" / "methods.md").read_text() == methods_page(), (
        "regenerate: python -m agnostic_sam.methods.docs > docs/methods.md")


def test_the_readme_table_is_the_registrys() -> None:
    found = _README.search((ROOT / "README.md").read_text())
    assert found is not None and found.group(1) == readme_table(), (
        "regenerate the README's methods table: agnostic_sam.methods.docs.readme_table()")
