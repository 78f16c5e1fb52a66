"""An option given as a huge integer (``damping=10**400``) is refused with a short message that names the option and
what it takes, the value shown by its size: the message printed all 401 digits, and past 4,300 digits Python's own
limit on int-to-str conversion raised its ValueError ("Exceeds the limit ...") in place of the refusal (review)."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.errors import InvalidRequestError
from mcmc_unlearner.experiments.options import check_kwarg
from mcmc_unlearner.options import ModelFacts, check_combinations, check_option
from mcmc_unlearner.samplers import SGLD
from mcmc_unlearner.service.requests import check_settings

HUGE = {"10**400": 10**400, "-10**400": -(10**400), "10**5000": 10**5000}
SIZE = {"10**400": "an integer of 401 digits (1.00e+400)", "-10**400": "an integer of 401 digits (-1.00e+400)"}
SIZE["10**5000"] = "an integer of 5001 digits (1.00e+5000)"
#: each option with the words its refusal says it takes (for the negative value where the positive one is valid)
REFUSED = {
    "damping": ("damping must be 'auto' or a finite number >= 0", ("10**400", "-10**400", "10**5000")),
    "scaling": ("scaling must be 'auto' or a finite number > 0", ("10**400", "-10**400", "10**5000")),
    "tol": ("tol must be a number in (0, 1)", ("10**400", "-10**400", "10**5000")),
    "check_rows": ("check_rows must be an integer >= 1", ("-10**400",)),
    "max_damping_trials": ("max_damping_trials must be an integer >= 1", ("-10**400",)),
    "seed": ("seed must be an integer (a 64-bit generator seed)", ("10**400", "-10**400", "10**5000")),
    "solver": ("solver must be one of", ("10**400", "10**5000")),
    "memory_budget": ("memory_budget must be a positive, finite number of bytes", ("-10**400",)),
}


def _model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    bank = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(3)]

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    return model, nll, bank


def _short(message: str, words: str, size: str) -> None:
    assert message.startswith(words) and message.endswith(f"got {size}"), message
    assert len(message) < 300 and "Exceeds the limit" not in message, message


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_a_huge_integer_option_is_refused_by_its_size(key: str) -> None:
    """Through the constructor, the torch-free option checks (one value, a combination) and the experiments' keyword
    check; the model is left as it was."""
    words, values = REFUSED[key]
    model, nll, bank = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in values:
        options = {"seed": 0, key: HUGE[name]}
        with pytest.raises(ValueError) as caught:
            MCMCUnlearner(model, nll=nll, bank=bank, **options)
        _short(str(caught.value), words, SIZE[name])
        with pytest.raises(ValueError) as caught:
            check_option(key, HUGE[name])
        _short(str(caught.value), words, SIZE[name])
        if key in ("damping", "scaling", "solver", "memory_budget"):  # what the command line's check of a
            # combination reads, before torch (on an 8-parameter model)
            with pytest.raises(ValueError) as caught:
                check_combinations({"solver": "cg", key: HUGE[name]}, ModelFacts(dim=8))
            _short(str(caught.value), words, SIZE[name])
        if key != "seed":  # a run's seed is its --seed
            with pytest.raises(ValueError) as caught:
                check_kwarg(key, HUGE[name])
            _short(str(caught.value), words, SIZE[name])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_warning_and_the_solver_choice_show_a_huge_option_by_its_size() -> None:
    """A huge value that is valid but unused is warned about by its size (``iter_T`` with the exact solver), and
    ``solver='auto'``'s reason names a huge ``exact_max_dim`` the same way."""
    model, nll, bank = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MCMCUnlearner(model, nll=nll, bank=bank, seed=0, solver="exact", iter_T=10**5000)
    said = [str(w.message) for w in caught if "iter_T=" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"iter_T={SIZE['10**5000']} has no effect"), said
    assert len(said[0]) < 300
    un = MCMCUnlearner(model, nll=nll, bank=bank, seed=0, exact_max_dim=10**5000)
    assert un.solver_reason == f"8 parameters <= exact_max_dim {SIZE['10**5000']}", un.solver_reason


@pytest.mark.parametrize(
    "key, words",
    [
        ("damping", "--damping must be finite"),
        ("tol", "--tol must be finite"),
        ("iter_T", "--iter-T must be between 0 and 1000000"),
        ("curvature_draws", "--curvature-draws must be between 1 and 100000"),
        ("solver", "--solver must be one of auto, lissa, cg, exact, ggn, lowrank, kfac"),
    ],
)
def test_the_deletion_services_settings_show_a_huge_integer_by_its_size(key: str, words: str) -> None:
    """The saved-model service's per-request settings (``forget(..., settings)``): the same, and a Fraction too
    large to print is named by its type."""
    for name in ("10**400", "10**5000"):
        with pytest.raises(InvalidRequestError) as caught:
            check_settings({key: HUGE[name]}, interface="cli")  # the flags' spelling (Python's: the keyword)
        message = str(caught.value)
        assert message.startswith(f"{words}, got {SIZE[name]}") and len(message) < 300, message
    with pytest.raises(InvalidRequestError, match="too large to show"):
        check_settings({key: Fraction(10**5000, 3)})


def test_a_samplers_huge_step_size_is_refused_by_its_size() -> None:
    """``SGLD(lr=10**400)`` raised OverflowError from ``math.isfinite`` (an int too large for a float)."""
    for name in ("10**400", "10**5000"):
        with pytest.raises(ValueError) as caught:
            SGLD(nn.Linear(2, 1).parameters(), lr=HUGE[name])
        _short(str(caught.value), "SGLD: lr must be positive and finite", SIZE[name])


def test_shown_value_keeps_short_values_and_cuts_long_ones() -> None:
    """Values up to 30 digits are shown as they are (a 64-bit seed's 2**64 too); a long repr is cut with its
    length; the size of an integer is exact at the powers of ten, where a float's log10 rounds, and its value is
    rounded to three significant digits, not cut."""
    from mcmc_unlearner.options import shown_value

    assert shown_value(2**64) == "18446744073709551616" and shown_value("auto") == "'auto'"
    assert shown_value(10**30 - 1) == "9" * 30
    assert shown_value(10**30) == "an integer of 31 digits (1.00e+30)"
    for d in (31, 308, 309, 4300, 4301, 9999):
        assert shown_value(10 ** (d - 1)).startswith(f"an integer of {d} digits (1.00e+{d - 1})")
        # rounded, not cut: 10**d - 1 is 1.00e+d to three digits (it read 9.99e+{d-1})
        assert shown_value(10**d - 1) == f"an integer of {d} digits (1.00e+{d})"
        assert shown_value(-(10**d - 1)) == f"an integer of {d} digits (-1.00e+{d})"
    # three significant digits, rounded half up: below, at and above the half
    assert shown_value(1234 * 10**30) == "an integer of 34 digits (1.23e+33)"
    assert shown_value(1235 * 10**30) == "an integer of 34 digits (1.24e+33)"
    assert shown_value(1234999 * 10**27) == "an integer of 34 digits (1.23e+33)"
    assert shown_value(9985 * 10**30 - 1) == "an integer of 34 digits (9.98e+33)"
    assert shown_value(9985 * 10**30) == "an integer of 34 digits (9.99e+33)"
    assert shown_value(9995 * 10**30) == "an integer of 34 digits (1.00e+34)"
    long = shown_value("x" * 500)
    assert len(long) < 120 and long.endswith("... (502 characters)")
