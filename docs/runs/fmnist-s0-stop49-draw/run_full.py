"""Stop 49's diagnostic: ``mcmc-unlearner`` with the emptied-class draw's row-evaluation cap raised to 2**24.

Usage: ``OMP_NUM_THREADS=1 python run_full.py bnn --preset paper-fmnist --data-dir DIR --seed 0 --methods unlearn``.
"""

import sys

import mcmc_unlearner.emptied as emptied
from mcmc_unlearner.cli import main

emptied.RESAMPLE_MAX_ROW_EVALS = 2**24  # read at call time by resample_label_rows
sys.exit(main(sys.argv[1:]))
