"""Errors a user can cause. The command line turns them into one line and exit status 2."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad user input (a flag, a file, a data directory). The message is one complete line."""
