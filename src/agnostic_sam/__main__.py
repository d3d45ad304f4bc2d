"""`python -m agnostic_sam` runs the command line (also under torchrun)."""

import sys

from agnostic_sam.cli import main

sys.exit(main())
