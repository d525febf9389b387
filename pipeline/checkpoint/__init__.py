"""Checkpoints, in three parts: `format.py` (what a checkpoint folder holds: the manifest, the layout it was
written at, the names), `save.py` (writing one atomically, pruning old ones), `resume.py` (finding the newest
complete one and loading it into an engine), plus `reader.py` (reading and verifying checkpoints offline: export,
`lm2 ckpt inspect` and resume's verification), plus `universal.py` (re-slicing ZeRO-1/2 checkpoints for another
layout through DeepSpeed's universal format: `lm2 ckpt universal DIR TAG`).
"""
