"""The errors of the run folder: one that it cannot be used as asked, one that a checkpoint will not fit.

They sit below every room of the run folder (`run_folder.py`, `checkpoints.py`, `metrics_log.py`), which all raise
them, so that none of those rooms imports another for its errors; callers import them from `run_folder`.
"""

from __future__ import annotations


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (another run holds it, it holds someone else's files, ...)."""


class DiskSpaceError(OSError):
    """Not enough free disk space for a checkpoint."""
