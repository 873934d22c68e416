"""The evaluation's one error type: bad input (model path, data source, flags), said before any work.

Its own room, below every evaluation module, because each of them (images, models, latent config, teacher) refuses
bad input with it and `evaluate` lets it through to the command line as a one-line message.
"""


class EvaluationError(ValueError):
    """Bad evaluation input (model path, data source, flags); the message names the offending value."""
