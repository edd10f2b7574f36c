"""Entry points: training, evaluation, export and SLURM launches.

Importing the package sets libgomp's wait policy before anything loads torch (libgomp reads
it once, when torch loads it): OMP_WAIT_POLICY=PASSIVE unless the environment sets one. With
libgomp's default, a thread that reaches the end of a parallel region spins for its partner;
on cores shared with other processes (another session's jobs, which `nice` does not reach
across sessions) the partner is often descheduled. Beside two `nice -n 19` busy loops the tiny
CPU run kept 0.26x of its speed alone with libgomp's default and 0.74x passive
(bench/results/train_contention_*.json; as low as 0.03x in longer runs). On an idle machine
passive waiting cost up to a quarter of the tiny run's speed: set OMP_WAIT_POLICY=ACTIVE on
dedicated CPU nodes.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
