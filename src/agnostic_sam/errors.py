"""Errors a user or the run itself can cause. The command line turns each into one line:
`UsageError` exits with status 2 (bad input), `TrainingDiverged` with status 3 (a failed run)."""

__all__ = ["UsageError", "TrainingDiverged", "EXIT_USAGE", "EXIT_DIVERGED"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(Exception):
    """Bad user input (a flag, a file, a data directory). The message is one complete line."""


class TrainingDiverged(Exception):
    """The training loss went non-finite (or every fp16 step of an epoch was skipped): the run
    failed. The last good checkpoint is kept and result.json says so. One complete line."""
