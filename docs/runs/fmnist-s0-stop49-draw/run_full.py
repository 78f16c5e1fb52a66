"""Stop 49's diagnostic: ``mcmc-unlearner`` with the emptied-class draw's row-evaluation cap raised to 2**24.

Usage: ``OMP_NUM_THREADS=1 python run_full.py bnn --preset paper-fmnist --data-dir DIR --seed 0 --methods unlearn``.
"""

import sys

import mcmc_unlearner.emptied as emptied
from mcmc_unlearner.cli import main

# since stop 65 the default of MCMCUnlearner(emptied_max_row_evals=), read when mcmc_unlearner.unlearner is first
# imported (after this line: the CLI imports it lazily); `--unlearner-kw emptied_max_row_evals=16777216` does the same
emptied.RESAMPLE_MAX_ROW_EVALS = 2**24
sys.exit(main(sys.argv[1:]))
