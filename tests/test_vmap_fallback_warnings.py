"""torch's functorch "There is a performance drop because we have not yet implemented the batching rule for
aten::mish_backward" reached the caller 12 times on every request of a Mish network (stop 57's probe). The library
keeps exactly that warning from the caller inside its own calls and records the operations once in the report."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import VMAP_FALLBACK, quiet_vmap_fallbacks

torch.set_num_threads(1)


def _setup() -> tuple[MCMCUnlearner, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(80, 4), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Mish(), nn.Linear(8, 3)).eval()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    un = MCMCUnlearner(
        model,
        None,
        nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
    )
    return un, x, y


def test_a_mish_request_emits_no_vmap_fallback_warning() -> None:
    un, x, y = _setup()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
        second = un.remove((x[4:8], y[4:8]), (x[8:], y[8:]), strict=False)
    assert not [w for w in seen if VMAP_FALLBACK in str(w.message)], [str(w.message)[:90] for w in seen]
    assert "aten::mish_backward" in first.info["vmap_fallbacks"]  # recorded once, on the first request
    assert "vmap_fallbacks" not in second.info


def test_other_warnings_still_reach_the_caller() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_vmap_fallbacks() as ops:
            warnings.warn(VMAP_FALLBACK + "aten::foo. Please file us an issue on GitHub", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn(VMAP_FALLBACK + "aten::bar. outside the library", UserWarning, stacklevel=1)
    assert ops == {"aten::foo"}
    assert [str(w.message)[:14] for w in seen] == ["something else", VMAP_FALLBACK[:14]]


def test_a_once_per_location_warning_of_the_callers_nll_is_not_repeated() -> None:
    """Stop 57's review: the filter was a ``warnings.catch_warnings()`` block around every request, whose entry and
    exit reset Python's record of warnings already shown, so a ``UserWarning`` raised in the user's ``nll`` (shown
    once per location by the default filter) came back on every request (3, 1, 1 times over three requests; 3, 0,
    0 without the filter). Only the handler is wrapped now."""

    def nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        warnings.warn("user nll: a note shown once per location", UserWarning, stacklevel=2)
        return 0.5 * (m(b[0]).squeeze(1) - b[1]) ** 2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x, y = torch.randn(80, 5), torch.randn(80)
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    un = MCMCUnlearner(
        model, None, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    counts = []
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")
        for r in range(3):
            before = len(log)
            un.remove((x[4 * r : 4 * r + 4], y[4 * r : 4 * r + 4]), (x[4 * r + 4 :], y[4 * r + 4 :]), strict=False)
            counts.append(sum("user nll" in str(w.message) for w in log[before:]))
    assert counts[0] >= 1 and counts[1:] == [0, 0], counts


def test_two_threads_inside_leave_the_handler_as_it_was() -> None:
    """Stop 57's review: two threads inside at once (A in, B in, A out, B out) left ``warnings.showwarning`` as A's
    swallowing wrapper, so the caller never saw a fallback warning again, and B's own went out while B was inside.
    Each thread's fallbacks are collected by its own block; the handler is put back when the last one leaves."""
    import threading

    seen: list[str] = []

    def mine(message: object, *args: object, **kwargs: object) -> None:
        seen.append(str(message))

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    got: dict[str, set[str]] = {}

    def a() -> None:
        with quiet_vmap_fallbacks() as ops:
            a_in.set()
            b_in.wait()
        got["a"] = ops
        a_out.set()

    def b() -> None:
        a_in.wait()
        with quiet_vmap_fallbacks() as ops:
            b_in.set()
            a_out.wait()
            warnings.warn(VMAP_FALLBACK + "aten::b_inside. x", UserWarning, stacklevel=1)
        got["b"] = ops

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = mine
        ta, tb = threading.Thread(target=a), threading.Thread(target=b)
        ta.start()
        tb.start()
        ta.join()
        tb.join()
        assert warnings.showwarning is mine
        warnings.warn(VMAP_FALLBACK + "aten::after. x", UserWarning, stacklevel=1)  # the caller's own
    assert got == {"a": set(), "b": {"aten::b_inside"}}
    assert seen == [VMAP_FALLBACK + "aten::after. x"]
