"""The error a weights file, config or checkpoint raises when it is not what it claims: one line naming the file or key.

Its own room at the bottom, because both formats.py (files) and checkpoint_keys.py (key names) raise it, and the
model, config and presets modules catch it.
"""


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded or written as asked; the message names the path and problem."""
