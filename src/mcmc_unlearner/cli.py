"""Command-line interface: ``mcmc-unlearner``."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcmc-unlearner",
        description="Remove deleted training data from SG-MCMC Bayesian models without retraining.",
    )
    p.add_argument("--version", action="version", version=f"mcmc-unlearner {__version__}")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
