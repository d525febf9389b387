"""Checkpoints, in three parts: `format.py` (what a checkpoint folder holds: the manifest, the layout it was
written at, the names), `save.py` (writing one atomically, pruning old ones), `resume.py` (finding and verifying
the newest complete one, and how to load it), plus `universal.py` (re-slicing ZeRO-1/2 checkpoints for another
layout through DeepSpeed's universal format: `python -m lm2.pipeline.checkpoint.universal DIR TAG`).
"""
