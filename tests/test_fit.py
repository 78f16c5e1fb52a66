"""``MCMCUnlearner.fit``: a first request's one-off work (curvature, damping) done ahead of it, nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import SGLD, FitReport, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.image_data import load_dataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import run_chain


@pytest.fixture(scope="module")
def chain():
    """A small MLP on 400 digits, its bank of 20 SGLD samples and the rows."""
    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train[:400], ds.y_train[:400]
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_shape, ds.n_classes, prior_std=0.3, hidden=(16,))
    data = RemovableDataset(x, y, batch_size=100, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler)
    run_chain(model, sampler, data, un.energy, 300, len(data))
    bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=2)
    return model, bank, x, y


def _state(un: MCMCUnlearner) -> tuple:
    live = torch.cat([p.detach().flatten() for p in un.model.parameters()])
    return un.bank.clone(), live, un.generator.get_state(), torch.get_rng_state()


def test_fit_builds_exactly_the_curvature_a_request_builds_and_changes_nothing_else(chain) -> None:
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    remaining = (x[keep], y[keep])
    a = MCMCUnlearner(model, bank=bank, solver="kfac")
    before = _state(a)
    fitted = a.fit(remaining)
    for u, v in zip(before, _state(a)):
        assert torch.equal(u, v)  # samples, live parameters, the unlearner's and torch's generators
    assert isinstance(fitted, FitReport) and fitted.curvature_kept and fitted.solver == "kfac"
    assert fitted.seconds > 0 and fitted.to_dict()["curvature_kept"] is True
    # a fresh unlearner's request on the same data builds the same factors, to the bit (same draws, same rows,
    # same Monte-Carlo labels from the same generator state)
    b = MCMCUnlearner(model, bank=bank, solver="kfac")
    prop = b.propose((x[~keep], y[~keep]), remaining)
    built = prop._backend_state["_pending"][0]
    kept, want = a.curvature.kfac.state_dict()[0], built.state_dict()[0]
    assert kept.keys() == want.keys()
    for k in want:
        assert torch.equal(kept[k], want[k]), k


def test_the_request_after_fit_is_the_request_without_it(chain) -> None:
    """fit only moves the build out of the request: the same removal, the same samples, to the bit."""
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    removed, remaining = (x[~keep], y[~keep]), (x[keep], y[keep])
    fitted = MCMCUnlearner(model, bank=bank, solver="kfac")
    fitted.fit(remaining)
    after_fit = fitted.remove(removed, remaining)
    plain = MCMCUnlearner(model, bank=bank, solver="kfac")
    alone = plain.remove(removed, remaining)
    assert after_fit.info["preconditioner_reused"] is True and after_fit.info["curvature_built_by_fit"] is True
    assert alone.info["preconditioner_reused"] is False
    # the same search (from scratch, every damping shape), the same step
    assert after_fit.info["damping_history"] == alone.info["damping_history"]
    assert torch.equal(fitted.bank, plain.bank)
    # the next request reuses the curvature as after any request (no longer "built by fit")
    more = (x[keep][:10], y[keep][:10]), (x[keep][10:], y[keep][10:])
    r2 = fitted.remove(*more)
    assert r2.info["preconditioner_reused"] is True and "curvature_built_by_fit" not in r2.info


def test_fit_builds_nothing_for_the_dense_backend(chain) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="exact")
    fitted = un.fit((x, y))
    assert not fitted.curvature_kept and "fit() builds K-FAC's curvature only" in fitted.info["fit"]
    assert un.curvature.cache is None


def test_fit_through_a_dataloader_puts_its_generators_back(chain) -> None:
    model, bank, x, y = chain
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=gen)
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    g_before, rng_before = gen.get_state(), torch.get_rng_state()
    fitted = un.fit(loader)
    assert torch.equal(gen.get_state(), g_before) and torch.equal(torch.get_rng_state(), rng_before)
    assert fitted.curvature_kept and un.curvature.kfac is not None


def test_fit_without_a_bank_or_within_a_tight_budget_changes_nothing(chain) -> None:
    model, bank, x, y = chain
    with pytest.raises(ValueError, match="bank"):
        MCMCUnlearner(model, solver="kfac").fit((x, y))
    un = MCMCUnlearner(model, bank=bank, solver="kfac", memory_budget=2_000)
    with pytest.raises(MemoryError, match="memory budget"):
        un.fit((x, y))
    assert un.curvature.kfac is None and not un._fitted


def test_a_proposal_made_before_fit_is_stale_after_it(chain) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    prop = un.propose((x[:10], y[:10]), (x[10:], y[10:]))
    un.fit((x[10:], y[10:]))
    with pytest.raises(ValueError, match="stale proposal"):
        un.apply(prop)


def test_a_failed_fit_leaves_the_curvature_an_earlier_request_cached(chain, monkeypatch) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    cached, relative = un.curvature.kfac, un.control.relative
    assert cached is not None

    def broken(problem):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(un.curvature, "prepare", broken)
    with pytest.raises(RuntimeError, match="injected"):
        un.fit((x[10:], y[10:]))
    assert un.curvature.kfac is cached and un.control.relative == relative and not un._fitted


def test_a_fitted_curvature_saved_and_loaded_is_still_the_request_s_own_build(chain) -> None:
    """A service fits, checkpoints, and serves the request in another process: the loaded curvature is searched as
    fit's build (every damping shape from scratch), the same step as without the checkpoint; once a request used it,
    a saved state is a reused one."""
    model, bank, x, y = chain
    removed, remaining = _class_removal(x, y)
    fitted = MCMCUnlearner(model, bank=bank, solver="kfac")
    fitted.fit(remaining)
    tensors, meta = fitted.curvature_state()
    assert meta["built_by_fit"] is True
    loaded = MCMCUnlearner(model, bank=bank, solver="kfac")
    loaded.load_curvature_state(tensors, meta)
    after_load = loaded.remove(removed, remaining)
    plain = MCMCUnlearner(model, bank=bank, solver="kfac")
    alone = plain.remove(removed, remaining)
    assert after_load.info["curvature_built_by_fit"] is True
    assert after_load.info["damping_history"] == alone.info["damping_history"]
    assert torch.equal(loaded.bank, plain.bank)
    assert "built_by_fit" not in loaded.curvature_state()[1]  # used by a request: reused from now on
    again = MCMCUnlearner(model, bank=bank, solver="kfac")
    again.load_curvature_state(*loaded.curvature_state())
    assert not again._fitted


def _state_dicts(model, bank: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The bank as a list of state_dicts of the trainable parameters (a user's layout)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sizes = [p.numel() for p in model.parameters()]
    return [{n: t.reshape(shapes[n]) for n, t in zip(shapes, row.split(sizes))} for row in bank]


def _class_removal(x, y):
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    return (x[~keep], y[~keep]), (x[keep], y[keep])


def test_fit_on_other_data_or_at_a_replaced_bank_is_rebuilt_by_the_request(chain) -> None:
    """fit() given the data preprocessed otherwise (pixels not divided by 255), or followed by a new bank, used to be
    taken as the request's own build: the request then moved the samples a twelfth of its way, every check passed.
    Now the request builds its own curvature and gives the samples of a request without fit, to the bit; fit on all
    the data (the removed rows included, as a service fits before any request) is still used."""
    model, bank, x, y = chain
    removed, remaining = _class_removal(x, y)
    plain = MCMCUnlearner(model, bank=bank, solver="kfac")
    plain.remove(removed, remaining)
    other = MCMCUnlearner(model, bank=bank, solver="kfac")
    other.fit((remaining[0] * 255, remaining[1]))
    report = other.remove(removed, remaining)
    assert "other data" in report.info["curvature_rebuilt_after_fit"] and "curvature_built_by_fit" not in report.info
    assert torch.equal(other.bank, plain.bank)
    # a bank replaced after fit (here: its first half) drops fit's curvature
    half = bank[: bank.shape[0] // 2]
    swapped = MCMCUnlearner(model, bank=bank, solver="kfac")
    swapped.fit(remaining)
    swapped.bank = half
    assert swapped.curvature.kfac is None and not swapped._fitted
    fresh = MCMCUnlearner(model, bank=half, solver="kfac")
    assert (
        swapped.remove(removed, remaining).info["damping_history"]
        == fresh.remove(removed, remaining).info["damping_history"]
    )
    assert torch.equal(swapped.bank, fresh.bank)
    # fit on every row, the removed ones included: the same data, used
    whole = MCMCUnlearner(model, bank=bank, solver="kfac")
    whole.fit((x, y))
    used = whole.remove(removed, remaining)
    assert used.info["curvature_built_by_fit"] is True and "curvature_rebuilt_after_fit" not in used.info


def test_fit_counts_as_the_first_request_s_build_for_refresh_every(chain) -> None:
    """With refresh_every=2 the requests that rebuild are the same with fit as without it (fit replaces the first
    request's build); fit's build used to count as one use, so every rebuild came one request early and with
    refresh_every=1 the first request threw fit's curvature away."""
    model, bank, x, y = chain
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))

    def pattern(fit: bool, every: int) -> list[bool]:
        un = MCMCUnlearner(model, bank=bank, solver="kfac", refresh_every=every)
        if fit:
            un.fit((x, y))
        built = []
        for r in range(4):
            gone = order[: 10 * (r + 1)]
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[gone] = False
            rep = un.remove((x[order[10 * r : 10 * (r + 1)]], y[order[10 * r : 10 * (r + 1)]]), (x[keep], y[keep]))
            built.append(not rep.info["preconditioner_reused"] or bool(rep.info.get("curvature_built_by_fit")))
        return built

    assert pattern(False, 2) == [True, False, True, False] == pattern(True, 2)
    assert pattern(True, 1) == [True, True, True, True]


def test_fit_keeps_the_first_request_s_check_of_its_removed_rows_and_names_its_own_data(chain) -> None:
    model, bank, x, y = chain
    remaining = _class_removal(x, y)[1]
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    said = r"nll\(model, remaining data\) failed.*go to nll as the data gives them \(in fit\(\)"
    with pytest.raises(RuntimeError, match=said):
        un.fit((remaining[0].double(), remaining[1]))
    assert un.curvature.kfac is None and not un._fitted
    un.fit(remaining)
    with pytest.raises(IndexError, match="not their indices"):  # was torch's own error alone after fit
        un.remove(torch.arange(5), remaining)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        un.fit(remaining)


def test_rows_given_as_a_tuple_with_another_n_remaining_are_refused(chain) -> None:
    """A tuple is every remaining row: an n_remaining that contradicts it scaled the energy as n rows (10**6 for
    570: the samples moved 200x less, every check passed)."""
    model, bank, x, y = chain
    removed, remaining = _class_removal(x, y)
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    before = _state(un)
    for call in (lambda: un.fit(remaining, n_remaining=10**6), lambda: un.remove(removed, remaining, n_remaining=7)):
        with pytest.raises(ValueError, match=r"n_remaining=\d+ but the remaining rows given as a tuple are 380"):
            call()
    for u, v in zip(before, _state(un)):
        assert torch.equal(u, v)
    assert un.remove(removed, remaining, n_remaining=len(remaining[0])).passed  # the right count is fine


def test_each_request_adds_its_nll_rise_to_the_reported_sum(chain) -> None:
    model, bank, x, y = chain
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    un = MCMCUnlearner(model, bank=bank, solver="kfac", recenter_every=0)
    keep = torch.ones(len(x), dtype=torch.bool)
    total, var = 0.0, 0.0
    for r in range(3):
        gone = order[15 * r : 15 * (r + 1)]
        keep[gone] = False
        rep = un.remove((x[gone], y[gone]), (x[keep], y[keep]))
        total += rep.info["remaining_nll_rise"]
        var += rep.info["remaining_nll_rise_stderr"] ** 2
        assert rep.info["remaining_nll_drift"] == pytest.approx(total, abs=1e-12)
        assert rep.info["remaining_nll_drift_stderr"] == pytest.approx(var**0.5)
    assert un.curvature_state()[1]["damping_state"]["drift"][0] == pytest.approx(total, abs=1e-12)
    un.reset_curvature()
    assert un.control.drift is None


def test_a_refused_request_leaves_the_saved_curvature_state_as_it_was(chain) -> None:
    """The cached K-FAC's n was set to the refused request's remaining count and kept: a checkpoint taken after a
    refusal differed from one taken before it (stop 43's probe)."""
    from mcmc_unlearner import QualityError

    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    tensors, meta = un.curvature_state()
    un.control.max_trials, un.control.eta = 1, 0.999  # every step fails the ratio test
    with pytest.raises(QualityError):
        un.remove((x[10:30], y[10:30]), (x[30:], y[30:]))
    after, meta_after = un.curvature_state()
    assert meta_after == meta and after.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(after[k], tensors[k]), k


def test_a_bank_set_by_the_caller_is_copied_in_its_own_layout_and_starts_afresh(chain) -> None:
    """Stop 43's probe of a user's live chain: ``un.bank = buf`` kept ``buf`` by reference (a NaN written into it
    later reached the next request) and kept the layout of an earlier assignment (a float32 tensor came back as a
    list of state_dicts, or float64); and the old samples' state (the summed NLL rises, carried influence and
    damping, the corrections' anchor) was kept for the new ones: 4 requests after a continued chain's bank moved the
    removed rows 0.35 and 0.04 of the way to retraining (two seeds), 0.54 and 0.12 after ``reset_curvature()``."""
    model, bank, x, y = chain
    dicts = _state_dicts(model, bank)
    un = MCMCUnlearner(model, bank=dicts, solver="kfac")
    assert isinstance(un.samples(), list)
    for r in range(2):
        un.remove((x[10 * r : 10 * (r + 1)], y[10 * r : 10 * (r + 1)]), (x[20:], y[20:]))
    assert un.control.drift is not None and un.control.state()["relatives"] and un.curvature.kfac is not None
    buf = bank.clone()
    un.bank = buf
    assert un.bank is not buf and torch.equal(un.bank, buf)
    assert un.control.drift is None and not un.control.state()["relatives"] and un.curvature.kfac is None
    assert un._carry is None and un._anchor is None
    buf[0, 0] = float("nan")  # the caller's buffer, not the unlearner's
    assert torch.isfinite(un.bank).all()
    out = un.samples()
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32  # the layout of the value given now
    un.bank = bank.double()
    assert un.samples().dtype == torch.float64
    un.bank = bank
    assert un.samples().dtype == torch.float32
    un.collect()  # appends and keeps the layout
    assert un.samples().shape == (bank.shape[0] + 1, bank.shape[1])


def test_a_bank_set_to_none_forgets_its_layout_and_fit_reads_a_small_data_set_once(chain) -> None:
    """``bank = None`` then ``collect()`` revived the replaced bank's layout (a dict with its buffers); fit read a
    data set of fewer than 256 rows over and over, counting its rows up to eight times in the check's error."""
    model, bank, x, y = chain
    dicts = _state_dicts(model, bank)
    un = MCMCUnlearner(model, bank=dicts, solver="kfac")
    un.bank = None
    un.collect()
    assert isinstance(un.samples(), torch.Tensor) and un.samples().shape == (1, bank.shape[1])
    small = MCMCUnlearner(model, bank=bank, solver="kfac")
    small.fit((x[:10], y[:10]))
    assert small._fit_data is None  # 10 distinct rows: below the check's 16 (was 80 rows, 10 read eight times)
    more = MCMCUnlearner(model, bank=bank, solver="kfac")
    more.fit((x[:40], y[:40]))
    mean, se = more._fit_data
    from mcmc_unlearner.curvature import functionalize

    rows_f = functionalize(model, lambda m, *b: more._row_nll(m, b))
    with torch.no_grad():
        h = torch.stack([rows_f(t, x[:40], y[:40]) for t in more.bank[[0, 6, 13, 19]]]).double().mean(0)
    assert mean == pytest.approx(float(h.mean()), rel=1e-6) and se == pytest.approx(float(h.std() / 40**0.5), rel=1e-4)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_fit_checks_its_arguments_whatever_the_solver(chain, solver) -> None:
    """fit() built nothing for the dense and matrix-free backends and returned without reading its arguments: a
    negative or fractional n_remaining, a number or a bare tensor as the data, rows nll cannot read all passed. They
    are refused as with K-FAC, with its words, changing nothing; a plain iterator keeps its first minibatch."""
    model, bank, x, y = chain
    bad = [
        ((x, y), -5),
        ((x[:3], y[:3]), None),  # fine (and checked below to pass); later calls are checked all the same
        (iter([(x, y)]), 2.5),
        (42, None),
        (x, None),
        ((x.double(), y), None),
        ((x, y[:, None]), None),
    ]
    kfac = MCMCUnlearner(model, bank=bank, solver="kfac")
    un = MCMCUnlearner(model, bank=bank, solver=solver)
    before = _state(un)
    for remaining, n in bad:
        try:
            kfac.fit(remaining, n)
            want = None
        except Exception as exc:
            want = (type(exc), str(exc))
        if want is None:
            assert un.fit(remaining, n).curvature_kept is False
            continue
        with pytest.raises(want[0]) as got:
            un.fit(remaining, n)
        assert str(got.value) == want[1]
    for u, v in zip(before, _state(un)):
        assert torch.equal(u, v)
    stream = iter([(x[:50], y[:50]), (x[50:], y[50:])])
    assert un.fit(stream, n_remaining=400).curvature_kept is False
    assert torch.equal(next(stream)[0], x[:50])  # not read: the request checks the minibatch it reads


def test_drop_curvature_forgets_the_build_alone(chain) -> None:
    """``drop_curvature`` (what the deletion service calls when an override changes how the curvature is built):
    the next request builds its own, as it would without ``fit``; the damping carried from earlier requests stays
    (``reset_curvature`` forgets it too), and a proposal made before the drop is refused at apply."""
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    remaining = (x[keep], y[keep])
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    un.fit(remaining)
    control = un.control.state()
    stale = un.propose((x[~keep][:10], y[~keep][:10]), remaining)
    assert stale.report.info["preconditioner_reused"] is True  # fit's build, taken as the request's own
    un.drop_curvature()
    assert un.control.state() == control
    fresh = un.propose((x[~keep][:10], y[~keep][:10]), remaining)
    assert fresh.report.info["preconditioner_reused"] is False
    with pytest.raises(ValueError, match="stale proposal: it was made by another unlearner or before a later change"):
        un.apply(stale)
    un.apply(fresh)
