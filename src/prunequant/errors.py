"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PrunequantError(Exception):
    """A mistake the user can fix; the message says what to change."""


class RecipeError(PrunequantError):
    """An impossible or malformed compression recipe."""


class ModelLoadError(PrunequantError):
    """A model that cannot be found, read or is of an unsupported architecture."""


class DataError(PrunequantError):
    """Text or task data that is missing, empty, too short or malformed."""


class NumericalError(PrunequantError):
    """A solver could not proceed (e.g. Cholesky failed even with more damping)."""
