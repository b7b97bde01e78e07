"""User-facing errors: the CLI prints the message on one line and exits with ``exit_code``."""


class PrunequantError(Exception):
    """A mistake the user can fix; the message says what to change."""

    exit_code = 2


class RunError(PrunequantError):
    """A run that cannot go on (a busy output, a full disk, a failed solve); the message says what to do."""

    exit_code = 1


class RecipeError(PrunequantError):
    """An impossible or malformed compression recipe."""


class ModelLoadError(PrunequantError):
    """A model that cannot be found, read or is of an unsupported architecture."""


class DataError(PrunequantError):
    """Text or task data that is missing, empty, too short or malformed."""


class NumericalError(RunError):
    """A solver could not proceed (e.g. Cholesky failed even with more damping)."""
