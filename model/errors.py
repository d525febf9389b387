"""lm2's errors: one base class, one subclass per kind of failure a user must tell apart.

They live in model/ because model/ must not import pipeline/, while both raise them. Every message names the
problem and the fix; `lm2` prints it on one line (no traceback) and exits with code 2.
"""


class LM2Error(Exception):
    """Something the user can fix: the message says what and how."""


class ConfigError(LM2Error, ValueError):
    """A configuration value is invalid, or does not fit the world size; the message names the field."""


class DataError(LM2Error):
    """Input data is missing, unreadable or does not fit the model."""


class CheckpointError(LM2Error):
    """A checkpoint cannot be used: incomplete, corrupt, or written for another model or layout."""


class ExportError(LM2Error):
    """A checkpoint or Hugging Face folder cannot be converted."""


class EvalError(LM2Error):
    """Bad evaluation input (a missing task file, an unknown length, a model folder that does not load)."""
