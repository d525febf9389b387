"""lm2's exit codes: what a job's end means to the launchers and to SLURM."""

EXIT_LM2_ERROR = 2
"""Every rank that stopped on an LM2Error (bad config, data or checkpoint); only rank 0 prints the error, so a job
reports it once."""

EXIT_NONFINITE = 3
"""The loss or gradient norm became NaN/inf: the run stopped without saving."""

EXIT_REQUEUE = 75
"""Every rank after a signal-triggered save (EX_TEMPFAIL); the launch scripts requeue the job on it."""
