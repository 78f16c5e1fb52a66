"""The experiments' settings and command-line options (``demo``, ``bnn``), in a module that imports no torch.

``mcmc-unlearner demo`` and ``bnn`` parse and check their options here, so that a bad choice, number or device
name, an unknown unlearner option or a value the library refuses (by its own check,
:func:`mcmc_unlearner.options.check_option`), or a data set whose files are missing, is refused at once (0.2 s)
instead of after loading torch and the experiment (2 s and more); :mod:`~mcmc_unlearner.experiments.gmm` and
:mod:`~mcmc_unlearner.experiments.bnn` run them and re-export these names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..options import ModelFacts, check_combinations, check_option, shown_value
from .report import SEED_LIMIT, out_folder_arg, seed_arg

__all__ = [
    "ARCHITECTURE_NAMES",
    "BNN_DESCRIPTION",
    "DEFAULT_ARCH",
    "DEVICES",
    "OPTIONAL_METHODS",
    "PRESETS",
    "QUICK",
    "BNNConfig",
    "RefusalPolicy",
    "config_from_args",
    "device_problem",
    "network_facts",
    "register",
    "run_network",
]

#: The ``--arch`` names: :data:`mcmc_unlearner.models.bnn.ARCHITECTURES`' keys (listed here without torch).
ARCHITECTURE_NAMES = ("digits_net", "lenet5", "mlp", "small_cnn")
#: ``--arch``'s default per data set (:data:`mcmc_unlearner.image_data.DATASETS`).
DEFAULT_ARCH = {
    "digits": "digits_net",
    "mnist": "lenet5",
    "fashion-mnist": "lenet5",
    "cifar10": "small_cnn",
    "cifar100": "small_cnn",
}
#: ``bnn --help``'s description: the first line of :mod:`mcmc_unlearner.experiments.bnn`'s docstring.
BNN_DESCRIPTION = (
    "Bayesian neural networks on image data: the paper's class-removal protocol, baselines and evaluation."
)

#: Methods whose runs can be switched on and off (``--methods``); ``origin`` and the retrains always run.
OPTIONAL_METHODS = ("unlearn", "paper", "finetune", "langevin", "importance")


class RefusalPolicy(str, Enum):
    """What the experiment does with a request the unlearner refuses (it always records it and goes on).

    ``skip``: the points are removed from the data anyway and the posterior is left unshifted.
    ``sgld``: the same, then the live chain takes ``repair_steps`` sampler steps on the remaining data (the
    stored bank is left as it is).
    """

    SKIP = "skip"
    SGLD = "sgld"


@dataclass
class BNNConfig:
    """Settings of one BNN unlearning experiment (defaults: the digits run).

    Attributes:
        dataset: Data set name (see :func:`mcmc_unlearner.image_data.load_dataset`).
        arch: Architecture (``None``: ``digits_net`` for digits, ``lenet5`` for (Fashion-)MNIST,
            ``small_cnn`` for CIFAR).
        remove_class: Class whose training points are removed.
        remove_count: ``"all"`` or how many points of that class (a seeded random subset).
        max_requests: If positive, at most this many requests (a seeded subset of the class of
            ``max_requests·request_size`` points; for reduced validation runs).
        sampler: ``"sgld"`` or ``"sghmc"`` (friction 0.9).
        request_size: Points per deletion request.
        seed: Seed of everything random (initial weights, chains, subsets).
        device: Torch device.
        data_dir, download: Where image files live / fetch them with torchvision.
        pretrain: Data set to pre-train the shared initial weights on (``None``: random initial weights), or
            ``"self"``: every chain first runs the pre-training optimiser on its *own* training data (origin: all
            data; retrain: the remaining data) from the shared random initial weights, so no retrain chain ever
            sees a removed point.
        pretrain_fallback: What to do when the ``pretrain`` data set's files are missing: ``None`` fails;
            ``"heldout"`` pre-trains the shared initial weights on a seeded half of the test set, which then leaves
            the evaluation; ``"self"`` pre-trains each chain on its own data; ``"none"`` keeps random weights (each
            with a note).
        pretrain_steps, pretrain_lr, pretrain_momentum: SGD pre-training (paper: 2,000, 0.1, 0.9).
        explore_steps, explore_lr: Plain SGD on the mean loss ``F/n`` before sampling.
        sample_steps, sample_lr: Sampler steps and ``lr`` of the step size ``(lr/n)·t^-0.5005``.
        batch_size: Minibatch size.
        bank_size: Stored samples, thinned evenly from the sampling phase.
        prior_std: Prior standard deviation.
        retrain_chains: Independent retrain chains (at least 2: their pairwise spread is the noise floor).
        methods: Methods to run besides ``origin`` and the retrains (see :data:`OPTIONAL_METHODS`).
        solver, damping, iter_T, tol, curvature_draws, grad_draws, precondition_rank, drift_tol, check_draws,
        expectation, hessian, bank_shift, samp_T: ``unlearn``'s :class:`~mcmc_unlearner.unlearner.MCMCUnlearner`
            settings; ``None`` (the default for all) keeps the library's default, so ``unlearn`` measures what a
            user gets with ``MCMCUnlearner(model, sampler, bank=bank)``.
        unlearner_kwargs: Any other ``MCMCUnlearner`` keyword arguments (CLI: ``--unlearner-kw KEY=VALUE``); one
            of the settings above given here as well must have the same value (refused otherwise).
        init_scaling: With ``solver="lissa"``: the LiSSA scaling is ``init_scaling / n``.
        paper_iter_T, paper_samp_T, paper_init_scaling: ``paper``'s LiSSA rounds, sampler steps per expectation
            and scaling ``paper_init_scaling / n`` (``n`` counted before the request's removal, as in its code).
        langevin_steps: ``langevin``'s SGLD steps per request (``0``: ``paper_samp_T + 2·paper_iter_T``).
        on_refusal, repair_steps: :class:`RefusalPolicy` and its sampler steps.
        eval_samples: Samples per method in the final evaluation (evenly thinned; a weighted method's by
            systematic resampling of its weights, the offset seeded by ``seed``; ``0``: all).
        eval_max: At most this many points per evaluation split (seeded subset; ``0``: all). The membership
            attack's held-out points (all test points of the removed class) are never subsampled.
        eval_every: Progress snapshot every this many requests (and after the last).
        progress_max, progress_samples: Points per split and samples in a progress snapshot.
        extra_finetune_steps: If positive, also report ``unlearn+finetune``: the unlearned chain followed by
            this many sampler steps on the remaining data (samples of those steps form its bank).
        threads: Torch intra-op threads during the run (restored afterwards): a count >= 1, ``"auto"`` (one
            thread for networks under a million parameters, torch's setting above that or when ``OMP_NUM_THREADS``
            is set: :func:`mcmc_unlearner.service.deletion.auto_threads`) or ``0`` (leave torch's setting).
        save_model: Folder to save the chain trained on all data (with its bank and unlearner settings) with
            :func:`mcmc_unlearner.store.save_model`, ready for ``mcmc-unlearner forget`` (its unlearner's settings
            are checked before training, as ``unlearn``'s are).
        progress: Show tqdm progress bars.
    """

    dataset: str = "digits"
    arch: str | None = None
    remove_class: int = 0
    remove_count: str | int = "all"
    max_requests: int = 0
    sampler: str = "sgld"
    request_size: int = 64
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False
    pretrain: str | None = None
    pretrain_fallback: str | None = None
    pretrain_steps: int = 2000
    pretrain_lr: float = 0.1
    pretrain_momentum: float = 0.9
    explore_steps: int = 1000
    explore_lr: float = 0.3
    sample_steps: int = 9000
    sample_lr: float = 1.0
    batch_size: int = 128
    bank_size: int = 200
    prior_std: float = 0.1
    retrain_chains: int = 3
    methods: tuple[str, ...] = OPTIONAL_METHODS
    solver: str | None = None
    damping: float | None = None
    iter_T: int | None = None
    tol: float | None = None
    curvature_draws: int | None = None
    grad_draws: int | None = None
    precondition_rank: int | None = None
    drift_tol: float | None = None
    check_draws: int | None = None
    expectation: str | None = None
    hessian: str | None = None
    bank_shift: str | None = None
    samp_T: int | None = None
    unlearner_kwargs: dict[str, Any] = field(default_factory=dict)
    init_scaling: float = 0.05
    paper_iter_T: int = 64
    paper_samp_T: int = 1
    paper_init_scaling: float = 0.05
    langevin_steps: int = 0
    on_refusal: str = "skip"
    repair_steps: int = 64
    eval_samples: int = 0
    eval_max: int = 5000
    eval_every: int = 1
    progress_max: int = 500
    progress_samples: int = 10
    extra_finetune_steps: int = 0
    threads: int | str = 1
    progress: bool = True
    save_model: str | None = None
    notes: list[str] = field(default_factory=list)


#: The paper's protocol, shared by both presets (training schedule, removal, the ``paper`` method's settings)
#: and an evaluation sized to fit one seed in under an hour on two CPU cores.
_PAPER_PROTOCOL: dict[str, Any] = {
    "explore_lr": 0.01,
    "sample_lr": 0.01,
    "remove_class": 0,
    "remove_count": "all",
    "request_size": 64,
    "bank_size": 100,
    "paper_iter_T": 64,
    "paper_samp_T": 1,
    "eval_every": 10,
    "eval_samples": 32,
    "eval_max": 3000,
}

#: Named settings that reproduce the paper's protocols (they override the defaults, CLI flags override them).
PRESETS: dict[str, dict[str, Any]] = {
    "paper-fmnist": {
        **_PAPER_PROTOCOL,
        "dataset": "fashion-mnist",
        "arch": "lenet5",
        "pretrain": "mnist",
        "pretrain_fallback": "heldout",
        "pretrain_steps": 2000,
        "explore_steps": 1000,
        "sample_steps": 9000,
        "paper_init_scaling": 0.05,
    },
    "paper-cifar10": {
        **_PAPER_PROTOCOL,
        "dataset": "cifar10",
        "arch": "small_cnn",
        "pretrain": "cifar100",
        "pretrain_fallback": "heldout",
        "pretrain_steps": 10000,
        "explore_steps": 5000,
        "sample_steps": 15000,
        "paper_init_scaling": 0.08,
    },
}

#: ``--quick``: a reduced run to validate the pipeline (a tenth of the steps, at most 10 requests, two retrain
#: chains, small evaluation sets); applied after the preset, before explicit flags.
QUICK: dict[str, Any] = {
    "pretrain_steps": 200,
    "explore_steps": 100,
    "sample_steps": 900,
    "bank_size": 20,
    "retrain_chains": 2,
    "max_requests": 10,
    "eval_every": 5,
    "eval_samples": 10,
    "eval_max": 1000,
    "progress_max": 200,
    "progress_samples": 5,
}


#: ``unlearn``'s settings that a run may override (``None``: the library's default).
_UNLEARNER_OPTIONS = (
    "solver",
    "expectation",
    "hessian",
    "bank_shift",
    "damping",
    "iter_T",
    "tol",
    "samp_T",
    "curvature_draws",
    "precondition_rank",
    "grad_draws",
    "drift_tol",
    "check_draws",
)


#: ``(flag, least value, what the least value means)`` of whole-number settings, checked by :func:`_resolve` and
#: at parse time (the CLI flag is ``--<flag>``; the setting is ``<flag>`` with ``_`` for ``-``).
_COUNT_LIMITS: tuple[tuple[str, int, str | None], ...] = (
    ("max-requests", 0, "0: all requests"),
    ("pretrain-steps", 0, "0: no pre-training steps"),
    ("batch-size", 1, None),
    ("repair-steps", 0, "0: no repair steps, as --on-refusal skip"),
    ("langevin-steps", 0, "0: the default, paper's samp_T + 2 x iter_T"),
    ("paper-iter-T", 1, None),
    ("paper-samp-T", 1, None),
    ("eval-samples", 0, "0: all samples"),
    ("eval-max", 0, "0: all points"),
    ("eval-every", 1, None),
    ("progress-max", 0, "0: all points"),
    ("progress-samples", 1, None),
    ("extra-finetune-steps", 0, "0: no unlearn+finetune"),
)
#: Settings that must be positive finite numbers (step sizes, scalings).
_POSITIVE = ("explore-lr", "sample-lr", "init-scaling", "paper-init-scaling")
#: ``--device`` values: torch devices this experiment runs on.
DEVICES = "cpu, cuda, cuda:N (N = 0, 1, ...) or mps"


# ---------------------------------------------------------------------------------------------- bnn's options
def _count(v: str) -> str | int:
    if v == "all":
        return v
    try:
        k = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {v!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {v!r}")
    return k


def _json_or_str(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def unlearner_keyword(v: str) -> tuple[str, Any]:
    """``--unlearner-kw KEY=VALUE`` (``bnn``, ``forget``): an ``MCMCUnlearner`` keyword argument, ``VALUE`` read as
    JSON (else a string) and checked by :func:`check_kwarg`; raises ``argparse.ArgumentTypeError`` naming the
    problem."""
    key, sep, raw = v.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword argument name, got {v!r}")
    try:
        return key, check_kwarg(key, _json_or_str(raw))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _unlearner_flag(key: str, typ: type) -> Callable[[str], Any]:
    """``type=`` of the flag for the unlearner option ``key``: read as ``typ`` (else as JSON, e.g. ``auto``) and
    checked at parse time."""

    def parse(v: str) -> Any:
        value: Any = v
        if typ is not str:
            try:
                value = typ(v)
            except ValueError:
                value = _json_or_str(v)
                if typ is int and isinstance(value, float) and value.is_integer():
                    value = int(value)  # a whole-number flag written as 1e2
        try:
            return check_kwarg(key, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = key
    return parse


def device_problem(device: Any) -> str | None:
    """Why ``device`` is not one of :data:`DEVICES` (``None``: it is; whether this machine has it is checked with
    torch, when the run's settings are)."""
    m = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]{1,3}))?", device) if isinstance(device, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        return f"--device must be {DEVICES}, got {ascii(device)[:40]}"
    return None


def _device(v: str) -> str:
    """``--device``, checked at parse time: one of :data:`DEVICES` (that this machine has it: before any work)."""
    problem = device_problem(v)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return v


def _method_list(v: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in v.split(",") if x.strip())
    bad = [x for x in names if x not in OPTIONAL_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {','.join(OPTIONAL_METHODS)}")
    if not names:
        raise argparse.ArgumentTypeError(
            f"is empty; name at least one of {','.join(OPTIONAL_METHODS)} (origin and the retrain chains always run)"
        )
    return names


def _quick_help() -> str:
    """``--quick``'s help, from :data:`QUICK` itself (so that it cannot go stale)."""
    q = QUICK
    return (
        f"a reduced run to check the setup in minutes: {q['pretrain_steps']} pre-training, {q['explore_steps']} "
        f"exploration and {q['sample_steps']} sampling steps (about a tenth), a bank of {q['bank_size']} samples, "
        f"{q['retrain_chains']} retrain chains, at most {q['max_requests']} requests, and smaller evaluations "
        f"(at most {q['eval_max']} points per split, {q['eval_samples']} samples per method); applied after "
        "--preset, explicit flags override it"
    )


#: What an option left at ``None`` means, where it is not the library's default (``bnn --help``).
_NONE_MEANS: dict[str, str] = {"arch": "per data set", "pretrain": "none, random initial weights"}


def _default_help(key: str) -> str:
    """``(default X; --preset NAME: Y; --quick: Z)`` for :class:`BNNConfig`'s ``key``, from the defaults, the
    presets and :data:`QUICK` themselves (shown in ``bnn --help``)."""
    base = getattr(BNNConfig(), key)
    none = _NONE_MEANS.get(key, "the library's")
    parts = [f"default: {none}" if base is None else f"default {base}"]
    by_value: dict[str, list[str]] = {}
    for name, values in sorted(PRESETS.items()):
        if key in values and values[key] != base:
            by_value.setdefault(str(values[key]), []).append(name)
    parts += [f"--preset {' or '.join(names)}: {value}" for value, names in by_value.items()]
    if key in QUICK and QUICK[key] != base:
        parts.append(f"--quick: {QUICK[key]}")
    return "(" + "; ".join(parts) + ")"


#: ``bnn``'s advanced flags: ``(flag, what it sets)``; their types are in :func:`register_bnn`.
ADVANCED_HELP: tuple[tuple[str, str], ...] = (
    ("explore-steps", "plain SGD steps on the mean loss F/n before sampling"),
    ("explore-lr", "learning rate of those SGD steps"),
    ("sample-steps", "sampler steps of every chain"),
    ("sample-lr", "LR of the sampler's step size (LR/n) * t^-0.5005"),
    ("bank-size", "stored samples, thinned evenly from the sampling phase"),
    ("batch-size", "minibatch size of the chains"),
    ("pretrain-steps", "SGD steps of the pre-training (--pretrain)"),
    ("solver", "unlearn's MCMCUnlearner solver"),
    ("damping", "unlearn's damping"),
    ("iter-T", "unlearn's iter_T (LiSSA/CG rounds)"),
    ("curvature-draws", "unlearn's curvature_draws: stored samples for the curvature"),
    ("precondition-rank", "unlearn's precondition_rank: rank of CG's low-rank preconditioner"),
    ("grad-draws", "unlearn's grad_draws: stored samples for the removed points' gradient"),
    (
        "drift-tol",
        "unlearn's drift_tol: a reused curvature is rebuilt when its step's |actual/predicted - 1| exceeds it",
    ),
    ("check-draws", "unlearn's check_draws: stored samples of the safety check"),
    ("expectation", "unlearn's expectation: bank or chain (samp_T sampler steps)"),
    ("hessian", "unlearn's hessian: remaining or full"),
    ("bank-shift", "unlearn's bank_shift: affine, mean or sample"),
    ("init-scaling", "with --solver lissa: unlearn's LiSSA scaling INIT_SCALING/n (n: rows left after the request)"),
    ("paper-iter-T", "the paper's procedure: LiSSA rounds per request"),
    ("paper-samp-T", "the paper's procedure: sampler steps per expectation"),
    ("paper-init-scaling", "the paper's procedure: LiSSA scaling PAPER_INIT_SCALING/n (n counted before the removal)"),
    ("progress-max", "points per split in a progress snapshot (0: all)"),
    ("progress-samples", "samples per method in a progress snapshot"),
    ("extra-finetune-steps", "if > 0, also report unlearn+finetune: unlearn's chain then this many sampler steps"),
)


def register_bnn(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bnn`` subcommand."""
    from ..cli import (
        COMMAND_HELP,
        QUIET_HELP,
        add_quiet_flag,
        add_threads_flag,
        new_folder,
        positive_number,
        whole_number,
    )

    p = subparsers.add_parser(
        "bnn",
        help=COMMAND_HELP["bnn"],
        description=BNN_DESCRIPTION,
    )
    d = BNNConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the paper's settings")
    p.add_argument("--quick", action="store_true", help=_quick_help())
    p.add_argument("--dataset", default=None, help=f"data set {_default_help('dataset')}")
    p.add_argument(
        "--arch", default=None, choices=sorted(ARCHITECTURE_NAMES), help=f"architecture {_default_help('arch')}"
    )
    p.add_argument(
        "--remove-class", type=whole_number(0), default=None, help=f"class to remove (default {d.remove_class})"
    )
    p.add_argument(
        "--remove-count", type=_count, default=None, help=f"'all' or a number of points {_default_help('remove_count')}"
    )
    p.add_argument("--sampler", choices=("sgld", "sghmc"), default=None, help="SG-MCMC sampler (default sgld)")
    p.add_argument(
        "--request-size", type=whole_number(1), default=None, help=f"points per request (default {d.request_size})"
    )
    p.add_argument(
        "--pretrain",
        default=None,
        help="pre-train the initial weights on this data set, or 'self': each chain on its own training data "
        f"{_default_help('pretrain')}",
    )
    p.add_argument("--no-pretrain", action="store_true", help="random initial weights (no pre-training)")
    p.add_argument("--seed", type=seed_arg, default=None, help=f"random seed, 0 to {SEED_LIMIT - 1} (default 0)")
    p.add_argument("--device", type=_device, default=None, help=f"torch device: {DEVICES} (default cpu)")
    p.add_argument(
        "--data-dir", default=None, help="folder with the image files (the files themselves or torchvision's layout)"
    )
    p.add_argument("--download", action="store_true", default=None, help="fetch missing files with torchvision")
    p.add_argument(
        "--out", type=out_folder_arg, default=None, metavar="DIR",
        help="output folder, new or empty (default: a fresh runs/bnn-<time>); a folder holding files (another "
        "run's results, say) is refused before any work",
    )  # fmt: skip
    p.add_argument(
        "--save-model",
        type=new_folder,
        default=None,
        metavar="DIR",
        help="save the all-data chain to DIR (new/empty)",
    )
    add_quiet_flag(p, dest="no_progress", help=QUIET_HELP)
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help=argparse.SUPPRESS)  # old spelling
    p.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        help=f"comma-separated methods besides origin and the retrains (default {','.join(OPTIONAL_METHODS)})",
    )
    p.add_argument(
        "--retrain-chains",
        type=whole_number(2, "the noise floor is the spread between retrain chains"),
        default=None,
        help=f"independent retrain chains, at least 2 {_default_help('retrain_chains')}",
    )
    p.add_argument(
        "--on-refusal",
        choices=[x.value for x in RefusalPolicy],
        default=None,
        help="a refused request: skip = remove the points, leave the posterior unshifted (default); sgld = also "
        "--repair-steps sampler steps of the live chain (the stored samples, which the evaluation reads, stay as "
        "they were: the steps show only in the live chain's later requests)",
    )
    limit = {flag: whole_number(least, note) for flag, least, note in _COUNT_LIMITS}
    p.add_argument(
        "--repair-steps",
        type=limit["repair-steps"],
        default=None,
        help="sampler steps for --on-refusal sgld (default 64; 0: none)",
    )
    p.add_argument(
        "--langevin-steps",
        type=limit["langevin-steps"],
        default=None,
        help="langevin's SGLD steps per request (0, the default: samp_T + 2 x iter_T = 129, at samp_T 1 the paper's "
        "sampler steps plus Hessian-vector products per request, each counted once)",
    )
    for flag, text in (  # counts of the evaluation and the run, each with its lower limit and default
        ("eval-samples", "samples per method in the final evaluation (0: all)"),
        ("eval-max", "points per evaluation split (0: all)"),
        ("eval-every", "progress snapshot every this many requests"),
        ("max-requests", "at most this many requests (0: all)"),
    ):
        key = flag.replace("-", "_")
        p.add_argument(f"--{flag}", type=limit[flag], default=None, metavar="N", help=f"{text} {_default_help(key)}")
    p.add_argument(
        "--unlearner-kw",
        type=unlearner_keyword,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an MCMCUnlearner keyword argument for unlearn (VALUE parsed as JSON, else a string); repeatable; "
        "a key also given by its own flag (--solver, --damping, ...) or twice must have one value",
    )
    adv = p.add_argument_group(
        "advanced (shrink or tune the run)",
        # each with its help and default (stop 44's probe found them parsed but nowhere in --help; stop 57's, listed
        # by name without what they set or their defaults)
        "Each takes one value; a preset's value is overridden by the flag. The unlearner's options (solver ... "
        "bank-shift) are MCMCUnlearner's keyword arguments, as --unlearner-kw; the default keeps the library's",
    )
    types: dict[str, Any] = {
        "explore-steps": whole_number(0, "0: no exploration steps"),
        "explore-lr": positive_number,
        "sample-steps": whole_number(2),
        "sample-lr": positive_number,
        "bank-size": whole_number(2),
        "batch-size": limit["batch-size"],
        "pretrain-steps": limit["pretrain-steps"],
        "solver": str,
        "damping": float,
        "iter-T": int,
        "curvature-draws": int,
        "precondition-rank": int,
        "grad-draws": int,
        "drift-tol": float,
        "check-draws": int,
        "expectation": str,
        "hessian": str,
        "bank-shift": str,
        "init-scaling": positive_number,
        "paper-iter-T": limit["paper-iter-T"],
        "paper-samp-T": limit["paper-samp-T"],
        "paper-init-scaling": positive_number,
        "progress-max": limit["progress-max"],
        "progress-samples": limit["progress-samples"],
        "extra-finetune-steps": limit["extra-finetune-steps"],
    }
    for flag, text in ADVANCED_HELP:
        key = flag.replace("-", "_")
        typ = _unlearner_flag(key, types[flag]) if key in _UNLEARNER_OPTIONS else types[flag]
        meta = "NAME" if types[flag] is str else "X" if types[flag] in (float, positive_number) else "N"
        adv.add_argument(f"--{flag}", type=typ, default=None, metavar=meta, help=f"{text} {_default_help(key)}")
    add_threads_flag(  # default None: BNNConfig's (1: the networks here are small); 0 stays 0 (leave torch's)
        p, default=None, zero=0, default_help=f"{d.threads}: the networks here are small"
    )
    p.set_defaults(func=_bnn)


def config_from_args(args: argparse.Namespace) -> BNNConfig:
    """Defaults, then the preset, then ``--quick``, then explicit flags."""
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    if getattr(args, "quick", False):
        values.update(QUICK)
    for f in BNNConfig.__dataclass_fields__:
        v = getattr(args, f, None)
        if v is not None and f != "notes":
            values[f] = v
    if getattr(args, "unlearner_kw", None):
        given: dict[str, Any] = {}
        for key, value in args.unlearner_kw:
            if key in given and given[key] != value:  # the last one silently won
                raise ValueError(
                    f"--unlearner-kw {key}={given[key]!s} and --unlearner-kw {key}={value!s} set {key} to different "
                    "values; give it once"
                )
            given[key] = value
        values["unlearner_kwargs"] = given
        values.pop("unlearner_kw", None)
    if getattr(args, "no_pretrain", False):
        values["pretrain"] = None
    values["progress"] = not args.no_progress
    return BNNConfig(**values)


#: ``MCMCUnlearner``'s keyword arguments: its signature's, less ``model``, ``sampler`` and ``bank`` (listed here
#: without torch; a test holds them equal).
UNLEARNER_KEYWORDS = (
    "backend", "bank_shift", "carry_deficit", "check_draws", "check_rows", "check_screen", "curvature_data",
    "curvature_draws", "damping", "damping_shape", "direct_z", "drift_tol", "emptied_label", "emptied_max_row_evals",
    "energy", "exact_max_dim", "expectation", "grad_draws", "hessian", "iter_T", "likelihood", "log_prior",
    "max_damping_trials", "mc_samples", "memory_budget", "negative_curvature", "newton_gate", "newton_steps",
    "newton_target", "nll", "precondition_rank", "recenter_draws", "recenter_every", "refresh_every", "rescale_lr",
    "samp_T", "scaling", "seed", "shorten_steps", "slope_eta", "solver", "tol", "turn_draws",
)  # fmt: skip
#: Keyword arguments a run cannot set (its own seed; Python callables).
_NOT_SETTABLE = ("seed", "nll", "log_prior", "energy")


def unknown_keyword(key: str) -> str | None:
    """The refusal of ``key`` when ``MCMCUnlearner`` takes no such keyword argument (``None``: it does)."""
    if key in UNLEARNER_KEYWORDS:
        return None
    settable = sorted(k for k in UNLEARNER_KEYWORDS if k not in _NOT_SETTABLE)
    return f"MCMCUnlearner has no keyword argument {key!r}; choose from {', '.join(settable)}"


def check_kwarg(key: str, value: Any) -> Any:
    """One ``MCMCUnlearner`` keyword argument, checked without torch by the library's own check of its value
    (:func:`mcmc_unlearner.options.check_option`, the one ``MCMCUnlearner`` runs); returns it as given, a whole
    number written as a float (``iter_T=5.0``, ``exact_max_dim=1e3``) as an ``int`` where only that is accepted.

    Raises:
        ValueError: An unknown keyword, one a run cannot set, or a value ``MCMCUnlearner`` refuses (its message).
    """
    problem = unknown_keyword(key)
    if problem:
        raise ValueError(problem)
    if key == "seed":
        raise ValueError("seed is the run's --seed")
    if key in _NOT_SETTABLE:
        raise ValueError(f"{key} is a Python callable and cannot be set here")
    try:
        check_option(key, value)
    except ValueError:
        if not (isinstance(value, float) and value.is_integer()):
            raise
        try:  # a whole number written as 5.0 or 1e3, as the dedicated flags take it
            check_option(key, int(value))
        except ValueError:
            pass
        else:
            return int(value)
        raise
    return value


def unlearner_overrides(cfg: BNNConfig) -> dict[str, Any]:
    """The ``MCMCUnlearner`` keyword arguments set explicitly (everything else stays at the library default), each
    as :func:`check_kwarg` takes it (a whole number written as a float, ``iter_T=5.0``, as the ``int`` the library
    accepts: the run's unlearner gets what :func:`check_settings` checked)."""
    kw = {k: getattr(cfg, k) for k in _UNLEARNER_OPTIONS if getattr(cfg, k) is not None}
    kw.update(cfg.unlearner_kwargs)
    for key, value in kw.items():
        with contextlib.suppress(ValueError):  # a bad value stays as given: check_settings refuses it
            kw[key] = check_kwarg(key, value)
    if kw.get("solver") == "cg" and "negative_curvature" not in kw:
        kw["negative_curvature"] = "truncate"
    return kw


def settings_refused(kw: dict[str, Any], problem: Exception) -> ValueError:
    """The run's refusal of the unlearner's settings ``kw``: the library's message ``problem``, after the settings."""
    given = ", ".join(f"{k}={v!s}" for k, v in kw.items())
    return ValueError(f"the unlearner's settings ({given}): {problem}")


def network_facts(arch: str, in_shape: tuple[int, int, int], n_classes: int) -> ModelFacts | None:
    """What the unlearner reads of the network ``arch`` for images ``in_shape`` and ``n_classes`` classes
    (:func:`mcmc_unlearner.models.bnn.build_model`'s; a test holds the two equal), from the architectures' layer
    sizes without torch. ``None``: an unknown architecture, or images too small for it (``build_model`` refuses
    those).

    Its parameters are float32 Linear and Conv2d layers (the convolutions share their weights across positions)."""
    c, h, w = in_shape
    n = n_classes
    if arch == "mlp":  # flatten, fc100, fc n
        return ModelFacts(dim=(c * h * w + 1) * 100 + (100 + 1) * n, kfac_layers=2)
    if arch == "digits_net":  # conv8@3x3 (pad 1), pool, fc64, fc n
        oh, ow = h // 2, w // 2
        layers = [(c * 9 + 1) * 8, (8 * oh * ow + 1) * 64, (64 + 1) * n]
    elif arch in ("lenet5", "small_cnn"):  # valid 5x5 convolutions, each followed by a 2x2 pool
        oh, ow = (((s - 4) // 2 - 4) // 2 for s in (h, w))
        if arch == "lenet5":  # conv6, conv16, fc120, fc84, fc n
            layers = [(c * 25 + 1) * 6, (6 * 25 + 1) * 16, (16 * oh * ow + 1) * 120, (120 + 1) * 84, (84 + 1) * n]
        else:  # conv64, conv64, fc384, fc n
            layers = [(c * 25 + 1) * 64, (64 * 25 + 1) * 64, (64 * oh * ow + 1) * 384, (384 + 1) * n]
    else:
        return None
    if min(oh, ow) < 1:
        return None
    return ModelFacts(dim=sum(layers), kfac_layers=len(layers), weight_sharing=("Conv2d",))


def run_network(cfg: BNNConfig) -> ModelFacts | None:
    """:func:`network_facts` of the network ``cfg``'s run unlearns (its data set's images, from the files' headers:
    :func:`mcmc_unlearner.image_data.image_shape`); ``None`` where the run refuses the data set or architecture."""
    from ..image_data import canonical_name, image_shape

    shape = image_shape(cfg.dataset, cfg.data_dir)
    if shape is None:
        return None
    arch = cfg.arch or DEFAULT_ARCH[canonical_name(cfg.dataset)]
    return network_facts(arch, *shape)


def check_settings(cfg: BNNConfig) -> int | None:
    """``bnn``'s checks of a run's settings that need no torch, in the run's order (``bnn._resolve`` runs them
    first): then, where the run builds an unlearner (``unlearn`` in ``--methods``, or ``--save-model``, which saves
    one), the option combinations that ``MCMCUnlearner`` refuses, for the run's network
    (:func:`mcmc_unlearner.options.check_combinations` given :func:`run_network`: what ``solver='auto'`` picks for
    it, the dense solvers' memory, ``damping``/``scaling`` out of float32's range), in the run's words.

    Returns:
        The memory budget in bytes those were judged with (a percentage or the default: of the memory available
        now), which the run's unlearner is given, so that it uses the budget judged before training; ``None``
        where the run builds no unlearner.

    Raises:
        ValueError: A setting the run refuses (a combination: the library's message after the settings).
    """
    if cfg.sampler not in ("sgld", "sghmc"):
        raise ValueError(f"unknown sampler {cfg.sampler!r}; choose 'sgld' or 'sghmc'")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {shown_value(cfg.seed)}")
    if cfg.request_size < 1:
        raise ValueError("--request-size must be at least 1")
    if cfg.explore_steps < 0 or cfg.sample_steps < 2 or cfg.bank_size < 2:
        raise ValueError("need --explore-steps >= 0, --sample-steps >= 2 and --bank-size >= 2")
    if cfg.bank_size > cfg.sample_steps:  # the chains kept one sample per step, fewer than the bank the report named
        raise ValueError(
            f"--bank-size {cfg.bank_size} is more than --sample-steps {cfg.sample_steps} (one sample per step at "
            "most): "
            f"pass --bank-size {cfg.sample_steps} or fewer, or more --sample-steps"
        )
    if cfg.retrain_chains < 2:
        raise ValueError("--retrain-chains must be at least 2: the noise floor is the spread between retrain chains")
    if isinstance(cfg.remove_class, bool) or not isinstance(cfg.remove_class, int) or cfg.remove_class < 0:
        raise ValueError(f"--remove-class must be a class number >= 0, got {shown_value(cfg.remove_class)}")
    if cfg.dataset == "digits" and cfg.pretrain is None and (cfg.data_dir is not None or cfg.download):
        # scikit-learn's bundled digits need no files: --data-dir was ignored and written into metrics.json
        raise ValueError(
            "--data-dir/--download name image files, but the data set is digits (scikit-learn's bundled copy, no "
            "files): add --dataset fashion-mnist (or mnist, cifar10) to use them, or drop them"
        )
    unknown = [m for m in cfg.methods if m not in OPTIONAL_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(OPTIONAL_METHODS)}")
    if "finetune" in cfg.methods and "unlearn" not in cfg.methods:
        raise ValueError("--methods: finetune gets unlearn's wall time per request, so it needs unlearn too")
    RefusalPolicy(cfg.on_refusal)
    both = [k for k in _UNLEARNER_OPTIONS if getattr(cfg, k) is not None and k in cfg.unlearner_kwargs]
    clash = [k for k in both if cfg.unlearner_kwargs[k] != getattr(cfg, k)]
    if clash:
        # the --unlearner-kw value silently won (--solver exact --unlearner-kw solver=cg ran CG)
        k = clash[0]
        raise ValueError(
            f"--{k.replace('_', '-')} {getattr(cfg, k)!s} and --unlearner-kw {k}={cfg.unlearner_kwargs[k]!s} set "
            f"the same option ({k}) to different values; give it once"
        )
    kw = unlearner_overrides(cfg)
    for key, value in kw.items():
        kw[key] = check_kwarg(key, value)  # a bad value is refused now, not after training
    if "unlearn" not in cfg.methods and not cfg.save_model:
        return None
    budget = check_option("memory_budget", kw.get("memory_budget"))  # resolved once (what a percentage was of)
    try:
        check_combinations({**kw, "memory_budget": budget}, run_network(cfg))
    except (ValueError, MemoryError) as exc:
        raise settings_refused(kw, exc) from None
    return budget


def _bnn(args: argparse.Namespace) -> int:
    """``mcmc-unlearner bnn``: a data set whose files are missing is refused before torch is loaded, then the run
    (:func:`mcmc_unlearner.experiments.bnn._main`)."""
    cfg = config_from_args(args)
    if not cfg.download:
        from ..image_data import missing_dataset

        problem = missing_dataset(cfg.dataset, cfg.data_dir)
        if problem:
            raise FileNotFoundError(problem)
    check_settings(cfg)  # before torch (3.2 s): e.g. the library's refusal of solver=kfac with hessian=full, or of
    # bank_shift=affine where solver='auto' picks kfac for the network
    from . import bnn

    return bnn._main(args)


# ---------------------------------------------------------------------------------------------- demo's options
def thin_problem(samples: int, thin: int) -> str | None:
    """Why ``--thin`` keeps too few of ``samples`` for the demo's KL estimate (``None``: enough)."""
    if samples // thin >= 10:
        return None
    return (
        f"--thin {thin} keeps {samples // thin} of the {samples} samples; the KL estimate needs >= 10 "
        f"(--thin at most {max(samples // 10, 1)})"
    )


def _demo(args: argparse.Namespace) -> int:
    """``mcmc-unlearner demo``: a ``--thin`` that keeps too few samples is refused before torch is loaded, then
    the run (:func:`mcmc_unlearner.experiments.gmm._cmd_demo`)."""
    problem = thin_problem(args.samples, args.thin)
    if problem:
        raise ValueError(problem)
    from . import gmm

    return gmm._cmd_demo(args)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand (the paper's Gaussian-mixture experiment)."""
    from ..cli import COMMAND_HELP, QUIET_HELP, add_quiet_flag, add_threads_flag, new_folder, whole_number

    p = subparsers.add_parser(
        "demo",
        help=COMMAND_HELP["demo"],
        description=(
            "Sample a 4-component Gaussian mixture with SG-MCMC, remove 800 points with MCMC unlearning and "
            "compare against retraining, a second retrain chain (noise floor) and fine-tuning. Writes "
            "metrics.json, report.md and PNG figures."
        ),
    )
    p.add_argument("--sampler", choices=("sgld", "sghmc"), default="sgld", help="SG-MCMC sampler (default sgld)")
    p.add_argument(
        "--out", type=out_folder_arg, default=None, metavar="DIR",
        help="output folder, new or empty (default: a fresh runs/demo-<sampler>-<time>); a folder holding files "
        "(another run's results, say) is refused before any work",
    )  # fmt: skip
    p.add_argument("--seed", type=seed_arg, default=0, help=f"master seed, 0 to {SEED_LIMIT - 1} (default 0)")
    p.add_argument("--request-size", type=whole_number(1), default=4, help="points per deletion request (default 4)")
    p.add_argument(
        "--save-model",
        type=new_folder,
        default=None,
        metavar="DIR",
        help="also save the origin model to DIR (new/empty)",
    )
    p.add_argument(
        "--retrain-chains", type=whole_number(2, "a median needs several chains"), default=4, metavar="N",
        help="independent retrain chains whose median/range is the yardstick (default 4, at least 2)",
    )  # fmt: skip
    p.add_argument(
        "--newton-steps", type=whole_number(1), default=2, metavar="K",
        help="the unlearner's newton_steps: at most K damped Newton steps per request (default 2: the influence "
        "step, then one equilibrium step that zeroes the bank-averaged remaining-data gradient; 1: the library's "
        "default, the influence step alone)",
    )  # fmt: skip
    p.add_argument(
        "--grad-draws", type=whole_number(2), default=256, metavar="N",
        help="stored samples averaged for the removed points' gradient (default 256)",
    )  # fmt: skip
    p.add_argument(
        "--with-paper", action="store_true",
        help="also run the paper's procedure as its reference code does (method 'paper'; about 1 min more)",
    )  # fmt: skip
    p.add_argument("--burnin", type=whole_number(0), default=4000, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=whole_number(1), default=4000, help=argparse.SUPPRESS)
    p.add_argument(
        "--thin",
        type=whole_number(1, "1: keep every sample"),
        default=10,
        metavar="K",
        help="keep every K-th sample for the KL estimates (default 10; at least 10 samples must remain)",
    )
    add_quiet_flag(p, help=QUIET_HELP)
    add_threads_flag(p)
    p.set_defaults(func=_demo)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` and ``bnn`` subcommands."""
    register_demo(subparsers)
    register_bnn(subparsers)
