"""Evaluation of exported Hugging Face folders: BABILong (long-context reasoning), perplexity, and the
experiment's training mixture."""

from lm2.model.config import LM2ConfigError


class EvalError(LM2ConfigError):
    """Bad evaluation input (a missing task file, an unknown length, a model folder that does not load)."""
