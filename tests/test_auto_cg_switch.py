"""solver='auto''s switch to CG (a weight read outside its module) survives a discarded first proposal and a
saved-and-loaded state, and the forward check accepts a layer called several times under bf16 autocast (rounding of
the cached cast's summed gradient, not a live-parameter read)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from test_kfac_read_outside import TiedAE  # the decoder reads the encoder's weight through F.linear

torch.set_num_threads(1)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.inp(x))
            for _ in range(3):
                h = torch.tanh(self.cell(h))
            return self.out(h).float()


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def test_a_discarded_first_proposal_leaves_autos_cg_backend_whole() -> None:
    torch.manual_seed(0)
    model, x = TiedAE(), torch.randn(200, 6)
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1), log_prior=_prior, bank=bank,
        solver="auto", exact_max_dim=10,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un.propose((x[:10],), (x[10:],))  # discarded
        assert un.solver.value == "cg" and un.curvature.refresh_every == 10
        assert un.remove((x[:10],), (x[10:],), strict=False).solver == "cg"  # AttributeError 'rank' before


def test_a_layer_called_three_times_under_bf16_autocast_passes_the_forward_check() -> None:
    torch.manual_seed(0)
    model, x, y = Recurrent(), torch.randn(40, 6), torch.randint(3, (40,))
    theta = ParamSpec.flatten_module(model).detach()
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), log_prior=_prior,
        bank=theta[None] + 0.05 * torch.randn(3, theta.numel()), solver="cg",
    )  # fmt: skip
    un._check_forward((x[:5], y[:5]))  # refused before: 1.07e-3 relative > 1.2e-4
    assert un._forward_checked


def _tied(solver: str = "auto", **kw: object) -> tuple[MCMCUnlearner, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = TiedAE(), torch.randn(200, 6)
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1), log_prior=_prior, bank=bank,
        solver=solver, seed=1, exact_max_dim=10, **kw,
    )  # fmt: skip
    return un, model, x


def test_a_state_saved_after_autos_switch_continues_as_cg_in_a_fresh_auto_unlearner() -> None:
    """The state names its solver: a fresh ``auto`` unlearner (still K-FAC, its probe pending) that loads a state
    saved after the switch to CG switches too and continues as the uninterrupted run does (before: CG's
    preconditioner was handed to K-FAC's loader, dropped, and the continued bank differed by up to 7e-3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un, model, x = _tied()
        un.remove((x[:10],), (x[10:],), strict=False)
        assert un.solver.value == "cg"
        tensors, meta = un.curvature_state()
        assert meta["solver"] == "cg"
        un2, model2, _ = _tied()
        assert un2.solver.value == "kfac"
        model2.load_state_dict(model.state_dict())
        un2.bank = un.bank.clone()
        un2.load_curvature_state(tensors, meta)
        assert un2.solver.value == "cg" and un2.refresh_every == 10 and un2.recenter_every == 0
        un2.remove((x[10:20],), (x[20:],), strict=False)
        un.remove((x[10:20],), (x[20:],), strict=False)
    assert torch.equal(un.bank, un2.bank)


def test_a_state_of_another_solver_is_refused_and_nothing_is_loaded() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un, _, x = _tied("cg")
        un.remove((x[:10],), (x[10:],), strict=False)
        tensors, meta = un.curvature_state()
        other, _, _ = _tied("kfac")
    before = other.curvature_state()
    try:
        other.load_curvature_state(tensors, meta)
    except ValueError as e:
        assert "solver='cg'" in str(e) and "solver='kfac'" in str(e) and "nothing was loaded" in str(e)
    else:
        raise AssertionError("a CG state was loaded into a K-FAC unlearner")
    after = other.curvature_state()
    assert other.solver.value == "kfac" and before[1] == after[1]
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_the_request_that_switches_auto_to_cg_warns_once_naming_the_layer_and_how_to_keep_kfac() -> None:
    """The switch told only ``solver_reason`` (and K-FAC's own warning where K-FAC had been built): the request that
    switches warns once, naming the layer, that auto now uses CG, and solver='kfac' to keep K-FAC."""
    un, _, x = _tied()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un.remove((x[:10],), (x[10:],), strict=False)
        un.remove((x[10:20],), (x[20:],), strict=False)
    said = [str(w.message) for w in caught if "now uses matrix-free CG" in str(w.message)]
    assert len(said) == 1, said
    assert "'enc'" in said[0] and "solver='auto'" in said[0] and "pass solver='kfac'" in said[0]
    assert "refresh_every=10" in said[0] and "precondition_rank=20" in said[0]
    assert all(w.filename == __file__ for w in caught if "now uses matrix-free CG" in str(w.message))


def test_an_option_cg_reads_is_said_to_apply_if_auto_switches_and_does_apply_then() -> None:
    """``iter_T`` given while auto took K-FAC was warned "has no effect with solver='kfac'", and then took effect when
    the first request switched to CG: the warning says it applies if auto switches, the switch's warning says it now
    applies, and CG reads it. Where an option given for K-FAC keeps K-FAC, the plain warning stays."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un, _, x = _tied(iter_T=5, precondition_rank=4)
    said = [str(w.message) for w in caught if "has no effect with" in str(w.message)]
    assert len(said) == 2 and all("unless solver='auto' switches to CG" in m for m in said), said
    assert all("applies then" in m and "(solver='cg')" in m for m in said), said
    assert said[0].startswith("iter_T=5 has no effect with solver='kfac'"), said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un.remove((x[:10],), (x[10:],), strict=False)
    switch = [str(w.message) for w in caught if "now uses matrix-free CG" in str(w.message)]
    assert len(switch) == 1 and "iter_T=5, precondition_rank=4, given and not read by K-FAC, now apply" in switch[0]
    assert un.curvature.iter_T == 5 and un.curvature.rank == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un, _, x = _tied(iter_T=5, mc_samples=2)  # kept on K-FAC whatever the rows: no effect, as before
    said = [str(w.message) for w in caught if "has no effect with" in str(w.message)]
    assert len(said) == 1 and "switches" not in said[0] and "applies" not in said[0], said


def test_fit_on_a_plain_iterator_probes_its_first_minibatch_and_hands_it_to_the_request() -> None:
    """``fit()`` on a plain iterator built K-FAC (reading several minibatches), which the first request then discarded
    when it switched to CG. It now probes the first minibatch it reads, builds nothing once auto takes CG, and the
    next request reads that minibatch first: the iterator is read once, and the result is the one without fit."""
    import itertools

    def batches(x: torch.Tensor) -> itertools.cycle:
        return itertools.cycle([(x[i : i + 16],) for i in range(10, 200, 16)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un, _, x = _tied()
        it = batches(x)
        fit = un.fit(it, n_remaining=190)
        assert fit.solver == "cg" and not fit.curvature_kept and un.solver.value == "cg"
        got = un.remove((x[:10],), it, n_remaining=190, strict=False)
        ref, _, _ = _tied()  # the same request without fit, on the same minibatches from their start
        want = ref.remove((x[:10],), batches(x), n_remaining=190, strict=False)
    assert got.solver == want.solver == "cg"
    assert torch.equal(un.bank, ref.bank)


def test_fit_on_a_plain_iterator_that_auto_keeps_on_kfac_builds_as_solver_kfac_does() -> None:
    """The probed minibatch is the build's first (held, not read twice): the curvature is solver='kfac''s."""
    import itertools

    states = []
    for solver in ("auto", "kfac"):
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)), torch.randn(200, 6)
        bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]
        un = MCMCUnlearner(
            model, None, nll=lambda m, b: 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1), log_prior=_prior, bank=bank,
            solver=solver, seed=1, exact_max_dim=10,
        )  # fmt: skip
        it = itertools.cycle([(x[i : i + 16],) for i in range(10, 200, 16)])
        assert un.fit(it, n_remaining=190).curvature_kept and un.solver.value == "kfac"
        states.append((un.curvature_state()[0], next(it)[0]))
    (a, next_a), (b, next_b) = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(next_a, next_b)  # the iterator was read as far


def test_the_switch_warning_raised_as_an_error_changes_nothing_and_loses_no_minibatch() -> None:
    """With the switch's warning turned into an error, the call that raised leaves ``auto`` pending on K-FAC (it
    switched first, and a retry went on as CG with no warning), and ``fit()`` keeps the minibatch it read from a
    plain iterator for the next request (it was lost: that request started at the second minibatch)."""
    import itertools

    def batches(x: torch.Tensor) -> itertools.cycle:
        return itertools.cycle([(x[i : i + 16],) for i in range(10, 200, 16)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message="solver='auto' took K-FAC")
        un, _, x = _tied()
        with pytest.raises(UserWarning, match="To keep K-FAC"):
            un.propose((x[:10],), (x[10:],))
        assert un.solver.value == "kfac" and un._auto_probe is not None  # nothing changed
        it = batches(x)
        with pytest.raises(UserWarning, match="To keep K-FAC"):
            un.fit(it, n_remaining=190)
        assert un.solver.value == "kfac" and un._auto_probe is not None
        warnings.filterwarnings("ignore", message="solver='auto' took K-FAC")
        got = un.remove((x[:10],), it, n_remaining=190, strict=False)
        ref, _, _ = _tied()  # the same request without fit, on the same minibatches from their start
        want = ref.remove((x[:10],), batches(x), n_remaining=190, strict=False)
    assert got.solver == want.solver == "cg"
    assert torch.equal(un.bank, ref.bank)
