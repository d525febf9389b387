"""Everything that knows about ranks, files or time: data, training, checkpoints, export, evaluation."""
