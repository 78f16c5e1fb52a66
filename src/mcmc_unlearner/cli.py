"""Command-line interface: ``mcmc-unlearner``.

Thin by design: each subcommand lives next to the code it drives and registers itself here through a
``register(subparsers)`` function that sets ``func`` (``args -> exit code``):

* ``demo`` — the paper's Gaussian-mixture experiment (:mod:`mcmc_unlearner.experiments.gmm`);
* ``bnn`` — Bayesian neural networks (:mod:`mcmc_unlearner.experiments.bnn`);
* ``summary`` — mean ± sd over runs of any experiment's ``metrics.json`` (:mod:`mcmc_unlearner.experiments.summary`);
* ``forget``, ``status``, ``verify`` — deletion requests against saved models (:mod:`mcmc_unlearner.deletion`).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import UnlearningError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    from . import deletion
    from .experiments import bnn, gmm, summary

    p = argparse.ArgumentParser(
        prog="mcmc-unlearner",
        description="Remove deleted training data from SG-MCMC Bayesian models without retraining.",
    )
    p.add_argument("--version", action="version", version=f"mcmc-unlearner {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (gmm, bnn, summary, deletion):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    from . import distributed

    if distributed.launched() and distributed.env_rank() != 0 and args.command in ("status", "verify"):
        return 0  # read-only commands under torchrun: rank 0 answers
    if distributed.launched() and args.command in ("demo", "bnn"):
        # the experiments are single-process: rank 0 runs them, the other ranks would only duplicate the work
        if distributed.env_rank() != 0:
            return 0
        print(f"mcmc-unlearner {args.command}: single-process experiment; running on rank 0 only", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (UnlearningError, FileNotFoundError, ValueError) as exc:
        print(f"mcmc-unlearner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mcmc-unlearner {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit(code: int) -> None:
    """Exit with ``code``; under torchrun skip interpreter finalisation, during which gloo's worker threads
    can abort the process (SIGABRT) after the command itself succeeded."""
    from . import distributed

    if distributed.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
