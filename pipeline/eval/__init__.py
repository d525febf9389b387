"""Evaluation of exported Hugging Face folders: BABILong (long-context reasoning), perplexity, and the
experiment's training mixture."""

from lm2.model.errors import LM2Error


class EvalError(LM2Error):
    """Bad evaluation input (a missing task file, an unknown length, a model folder that does not load)."""
