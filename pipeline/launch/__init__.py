"""How ranks come to exist and how they stop: the launcher's environment (`environment.py`), the stop signals
(`signals.py`), lm2's exit codes (`exit_codes.py`), the local launcher (`local.py`, `lm2 launch local`) and SLURM
(`slurm.py`: an srun task's variables, and what `launch/slurm/*.sbatch` ask of lm2).
"""
