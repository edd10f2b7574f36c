"""Entry points: training, evaluation, export and SLURM launches."""
