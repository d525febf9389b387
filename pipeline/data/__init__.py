"""The data pipeline: raw text -> sentencepiece tokens -> packed rows in MDS shards -> a per-DP-replica loader.

`tokenizer.py` trains and loads the sentencepiece model, `sources.py` reads documents, `prepare.py` packs
and writes shards with their `lm2_data.json`, `streaming.py` builds the resumable training loader and
`metadata.py` checks that shards fit a model.
"""

from lm2.model.config import LM2ConfigError


class DataError(LM2ConfigError):
    """Input data is missing, unreadable or does not fit the model; the message names the fix. A kind of
    LM2ConfigError (a ValueError), so the CLI reports both without a traceback."""
