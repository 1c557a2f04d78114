"""The one error type of model resolution and loading, shared by the modules that do it."""


class ModelSourceError(ValueError):
    """A model reference could not be resolved or a weight file could not be used; the message
    names the problem (and the file) and the fix."""
