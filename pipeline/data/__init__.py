"""The data pipeline: raw text -> sentencepiece tokens -> packed rows in MDS shards -> a per-DP-replica loader.

`tokenizer.py` trains and loads the sentencepiece model, `sources.py` reads documents, `prepare.py` packs
and writes shards with their `lm2_data.json`, `streaming.py` builds the resumable training loader and
`metadata.py` checks that shards fit a model.
"""
