"""Errors raised on bad user input. Each says what was received, what is allowed, and how to fix it.

Every class also inherits ``ValueError`` so callers that catch ``ValueError`` keep working. The CLI prints
``LinearizeError`` as one line and exits non-zero (no traceback).
"""


class LinearizeError(ValueError):
    """Base class for user-facing errors."""


class UnsupportedArchitectureError(LinearizeError):
    """The model's ``model_type`` has no adapter."""


class ConfigError(LinearizeError):
    """A recipe or option is invalid."""


class DataError(LinearizeError):
    """Calibration or training data is missing, empty or unusable."""


class ModelLoadError(LinearizeError):
    """A model id, folder or GGUF file could not be loaded."""
