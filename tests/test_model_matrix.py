"""Issue 11's targets on networks the library has never seen, with the library's defaults.

Each model of ``benchmarks/model_matrix.py`` at its reduced (``--quick``) size: a plain ``nn.Sequential`` /
``nn.Module`` sampled by a hand-written SGLD loop (no library sampler, model or data class), one origin chain
on all rows, retrain chains on the remaining rows, and one request through the user-facing API only::

    un = MCMCUnlearner(model, None, nll=..., log_prior=..., bank=bank)
    report = un.remove(removed_batch, remaining_iterator, n_remaining=N)

run in a forked child process (peak memory measured there, address space capped so a blow-up fails the test
instead of the machine). Chains and requests are computed once per module run and shared by the tests of one
model; nothing is cached on disk.

The targets are the issue's: no refusal or exception; the forgotten rows' posterior-predictive NLL moves
``0.5 ≤ (unlearn − origin)/(retrain − origin) ≤ 2`` of the way to retraining; kept-data test error within
1.5 points (RMSE within 10%) of retraining; peak memory of the request under 2 GB; the user's bank untouched.
Why these tolerances hold for a retrain-quality answer (measured with ``--floor 3``, see
``docs/model-matrix.md``): with ``retrain`` = the mean of the two reference retrain chains, three
further independent retrain chains per model score fractions mlp 0.52-1.61, regression 0.98-1.00, bncnn
0.74-1.47, transformer 0.42-0.95 (hence its wider lower bound, ``FRACTION_BOUNDS``), test error within
1.48 points (mlp, bncnn) / 0.25 points (transformer) and RMSE within 4.8% (regression) of that mean.

Tests marked ``xfail(strict=True)`` fail on the library as of main 93b4d6a (the measured failure is in the
reason); they are expected to pass once the self-tuning defaults of issue 11 are tuned, and strict mode then
reports them so the marks can be removed. (On 937c34d, before the new defaults, every request here was refused
or timed out, except the regression's, which ran the dense solver and wrecked the fit.)
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("model_matrix", ROOT / "benchmarks" / "model_matrix.py")
mm = importlib.util.module_from_spec(_spec)
sys.modules["model_matrix"] = mm
_spec.loader.exec_module(mm)

torch.set_num_threads(1)

MODELS = ("mlp", "regression", "bncnn", "transformer")
RETRAINS = {"mlp": 2, "regression": 2, "bncnn": 2, "transformer": 2}
MEM_CAP_GB = 3.0  # address-space cap of the request's child: above the 2 GB target, far below the machine
TIMEOUT_S = 120.0  # a request that takes longer than this fails (the chains of a model take ~5-20 s)

_runs: dict[str, tuple[Any, Any, dict[str, Any]]] = {}


def run(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(problem, origin chain, result)`` for one model at its quick size (computed once per test session)."""
    if name not in _runs:
        problem = mm.BUILDERS[name](True, 0, "class")
        origin, retrains = mm.train_chains(problem, seed=0, retrains=RETRAINS[name])
        req = mm.run_isolated(
            lambda: mm.unlearn_request(problem, origin, mem_cap_gb=MEM_CAP_GB, epoch_steps=0, return_bank=True),
            TIMEOUT_S,
        )
        _runs[name] = (problem, origin, mm.summarize(problem, origin, retrains, req, 0))
    return _runs[name]


def result(name: str) -> dict[str, Any]:
    return run(name)[2]


def _explain(r: dict[str, Any]) -> str:
    req = r["request"]
    return f"{r['model']}: status {req.get('status')}, {mm.report_fields(req)}; {req.get('error', '')[:400]}"


#: Measured failures of the library these marks were set against (main 93b4d6a, re-measured: the same numbers as on
#: 1ed5362; from this file's own chains). Remove a mark once its test passes (strict mode reports it as XPASS): the
#: transformer's fraction passes since the damping shapes (0.005 -> 1.05: the data term damped alone); the
#: regression's fraction and kept RMSE since stop 68 (through this iterator the gate's further steps read the stream
#: sample's distinct rows, every remaining row, not n of the sample: fraction 0.497 -> 0.512, 17.0% -> 9.0% off
#: retraining's kept RMSE, the loader's numbers; the marks read "fraction 0.45" and "52.6% off" as of main 93b4d6a);
#: the BN-CNN's fraction since stop 69 (its class removed whole through this iterator: the emptied-class draw runs on
#: every remaining row, found by reading the stream, 0.03 -> 0.65, the loader's; the mark read "kfac damping 10x the
#: mean curvature: fraction 0.15 ... forgotten NLL 0.018 -> 0.79 vs 13.4, 0.06" as of main 93b4d6a).
XFAIL: dict[tuple[str, str], str] = {}

#: The forgotten rows' NLL target, per model. The issue's [0.5, 2] everywhere except the transformer, whose
#: independent retrain chains themselves score 0.42-0.95 against the mean of the two reference chains (the
#: backdoor rows' NLL after retraining hangs on the never-trained trigger embedding, a prior draw that SGLD
#: barely moves within one chain); the other models' retrain chains score inside [0.5, 2] (mlp 0.52-1.61,
#: regression 0.98-1.00, bncnn 0.74-1.47).
FRACTION_BOUNDS = {"transformer": (0.4, mm.FRACTION_RANGE[1])}


def _has_avx512() -> bool:
    """Whether the CPU has AVX-512 (Linux: ``/proc/cpuinfo``'s flags); ``True`` where that cannot be read."""
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


#: Targets missed on CPUs without AVX-512 by the same code and seeds that meet them on CPUs with it
#: (ATEN_CPU_CAPABILITY=avx2 pins torch's own kernels, not the BLAS's, whose code path follows the CPU, so the chains
#: round differently): on such a CPU the case is a non-strict expected failure (reported as XFAIL or XPASS); on
#: a CPU with AVX-512 the assertion stands as it is. Each reason is a measured miss, not a tolerance.
MACHINE_DEPENDENT: dict[tuple[str, str], str] = {
    ("bncnn", "accuracy"): "on a CPU without AVX-512 (an AMD EPYC, stop 54, main b151990): kept-class test error "
    "1.60 points from retraining's (origin 2.22, retrain chains 3.46 and 4.20, 0.74 apart; unlearn 2.22); 0.99 with "
    "the same pinned AVX2 kernels on CPUs with AVX-512 (stops 36-53)",
}


def case(name: str, target: str) -> Any:
    reason = XFAIL.get((name, target))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    if (name, target) in MACHINE_DEPENDENT and not _has_avx512():
        marks = [pytest.mark.xfail(strict=False, reason=MACHINE_DEPENDENT[name, target])]
    return pytest.param(name, id=f"{name}-{target}", marks=marks)


@pytest.mark.parametrize("name", MODELS)
def test_every_chain_is_finite(name: str) -> None:
    """A diverged origin or retrain chain voids the comparisons below: said here, by name, not as their failure."""
    r = result(name)
    assert "invalid" not in r, f"{name}: {r.get('invalid')}"


@pytest.mark.parametrize("name", [case(m, "no_failure") for m in MODELS])
def test_request_is_not_refused(name: str) -> None:
    r = result(name)
    assert r["request"]["status"] == "ok", _explain(r)


@pytest.mark.parametrize("name", [case(m, "fraction") for m in MODELS])
def test_forgotten_rows_move_toward_retraining(name: str) -> None:
    r = result(name)
    assert r["request"]["status"] == "ok", _explain(r)
    lo, hi = FRACTION_BOUNDS.get(name, mm.FRACTION_RANGE)
    frac = r["fraction"]
    assert lo <= frac <= hi, (
        f"{name}: forgotten-row NLL origin {r['origin']['nll_forgot']:.3g}, retrain "
        f"{[x['nll_forgot'] for x in r['retrain']]}, unlearn {r['unlearn']['nll_forgot']:.3g}: fraction {frac:.3g}; "
        + _explain(r)
    )


@pytest.mark.parametrize("name", [case(m, "accuracy") for m in MODELS])
def test_kept_data_accuracy_matches_retraining(name: str) -> None:
    r = result(name)
    assert r["request"]["status"] == "ok", _explain(r)
    key = r["metric"]
    tol = mm.ERROR_POINTS if key == "test_error" else mm.RMSE_REL
    assert r["accuracy_distance"] <= tol, (
        f"{name}: {key} origin {r['origin'][key]:.4g}, retrain {[x[key] for x in r['retrain']]}, "
        f"unlearn {r['unlearn'][key]:.4g}; " + _explain(r)
    )


@pytest.mark.parametrize("name", [case(m, "memory") for m in MODELS])
def test_request_memory_under_2gb(name: str) -> None:
    r = result(name)
    req = r["request"]
    assert req.get("peak_gb") is not None, "peak RSS could not be reset (/proc/self/clear_refs)"
    assert req["status"] not in ("memory-cap", "killed"), _explain(r)
    assert req["peak_gb"] < mm.MEMORY_GB, f"{name}: peak {req['peak_gb']:.2f} GB; " + _explain(r)


@pytest.mark.parametrize("name", [case(m, "user_bank") for m in MODELS])
def test_user_bank_is_not_modified(name: str) -> None:
    """The live model's parameters view the user's bank row (``vector_to_parameters(bank[-1], ...)``)."""
    r = result(name)
    assert r["request"]["user_bank_intact"], f"{name}: the request wrote into the user's bank; " + _explain(r)


LAYOUT_MODEL = "regression"


@pytest.mark.parametrize("layout", [case("list", "layout"), case("dict", "layout")])
def test_bank_layouts_give_the_same_removal(layout: str) -> None:
    """A bank given as a list of state_dicts or a dict of stacked tensors (the ``posteriors`` layout) is moved
    exactly like the same samples given as an ``[S, D]`` tensor, comes back in its own layout, and the user's
    objects are left untouched."""
    problem, origin, r = run(LAYOUT_MODEL)
    base = r["request"]
    assert base["status"] == "ok", _explain(r)
    other = mm.run_isolated(
        lambda: mm.unlearn_request(
            problem, origin, layout=layout, mem_cap_gb=MEM_CAP_GB, epoch_steps=0, return_bank=True
        ),
        TIMEOUT_S,
    )
    assert other["status"] == "ok", f"{layout}: {other.get('error')}"
    assert other["layout_preserved"], f"{layout} came back as {other['returned_layout']}"
    assert other["user_bank_intact"]
    torch.testing.assert_close(torch.from_numpy(other["bank"]), torch.from_numpy(base["bank"]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ harness
def test_harness_fraction_and_targets_from_numbers() -> None:
    """``summarize`` computes the fraction, the distances and the target flags from the chains' numbers."""
    problem = mm.BUILDERS["mlp"](True, 0, "class")
    bank = torch.zeros(3, problem.n_params())

    def chain(nll: float, err: float) -> Any:
        return mm.Chain(model=None, bank=bank, seconds=1.0, stats={"nll_forgot": nll, "test_error": err})

    req = {"status": "ok", "stats": {"nll_forgot": 4.0, "test_error": 6.0}, "peak_gb": 0.5, "user_bank_intact": True}
    r = mm.summarize(problem, chain(1.0, 5.0), [chain(7.0, 5.0), chain(5.0, 6.0)], req, 0)
    assert r["fraction"] == pytest.approx((4.0 - 1.0) / (6.0 - 1.0))
    assert r["retrain_pair_fraction"] == pytest.approx((5.0 - 1.0) / (7.0 - 1.0))
    assert r["accuracy_distance"] == pytest.approx(0.5)
    assert r["all_met"]
    req = dict(req, stats={"nll_forgot": 1.5, "test_error": 8.0}, peak_gb=2.5)
    r = mm.summarize(problem, chain(1.0, 5.0), [chain(7.0, 5.0), chain(5.0, 6.0)], req, 0)
    assert r["targets"] == {
        "no_failure": True,
        "fraction": False,
        "accuracy": False,
        "memory": False,
        "user_bank_intact": True,
    }


def test_harness_layouts_round_trip() -> None:
    """The three bank layouts a user may keep convert back to the same ``[S, D]`` matrix."""
    model = mm.bn_cnn((4, 8), 8)
    bank = torch.randn(5, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    for layout in ("tensor", "list", "dict"):
        user = mm.to_layout(bank, model, layout)
        assert torch.equal(mm.as_matrix(user, model), bank), layout
        copy = mm.clone_layout(user)
        assert mm.same_layout(copy, user)
    assert "running_mean" in "".join(mm.to_layout(bank, model, "list")[0])  # state_dicts carry BN buffers


def test_harness_sgld_samples_a_gaussian() -> None:
    """The hand-written SGLD loop samples the closed-form posterior of ``θ`` (a bias) under
    ``F(θ) = θ²/2 + Σ_i (θ − y_i)²/2``: ``N(Σy/(n+1), 1/(n+1))``, within Monte-Carlo error."""
    g = torch.Generator().manual_seed(0)
    n = 50
    y = torch.randn(n, generator=g) + 2.0
    model = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(model.weight)
    model.weight.requires_grad_(False)  # input is 0 anyway; only the bias is sampled

    def nll(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return 0.5 * (m(xb).squeeze(-1) - yb) ** 2

    lr, thin, keep = 2e-3, 5, 1000
    x = torch.zeros(n, 1)
    bank = mm.sgld_chain(
        model, nll, mm.gaussian_log_prior(1.0), x, y, lr=lr, burn_lr=lr, burn=300, keep=keep, thin=thin, batch=n, seed=0
    )
    samples = bank[:, 1]  # [weight, bias]
    prec = n + 1
    mean = float(y.sum()) / prec
    # full-batch SGLD on a quadratic is the AR(1) chain θ' = ρθ + … with ρ = 1 − ε·prec/2: stationary variance
    # 1/(prec·(1 − ε·prec/4)) (the discretisation's inflation, 2.6% here), integrated autocorrelation time
    # (1+ρ)/(1−ρ) steps for θ and (1+ρ²)/(1−ρ²) for θ²
    rho = 1 - lr * prec / 2
    var = 1 / (prec * (1 - lr * prec / 4))
    ess_mean = keep * thin * (1 - rho) / (1 + rho)
    ess_var = keep * thin * (1 - rho**2) / (1 + rho**2)
    assert abs(float(samples.mean()) - mean) < 4 * math.sqrt(var / ess_mean)
    assert abs(float(samples.var()) / var - 1) < 4 * math.sqrt(2 / ess_var)


def test_harness_memory_measurement_sees_an_allocation() -> None:
    """The child's peak-RSS reading sees a 400 MB allocation and the cap turns a larger one into a failure."""

    def fn() -> dict[str, Any]:
        if not mm.reset_peak_rss():
            return {"status": "skip"}
        rss0 = mm._status_kb("VmRSS")
        t = torch.ones(100_000_000)  # 400 MB, touched
        del t
        peak = (mm._status_kb("VmHWM") - rss0) / 2**20
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mm._status_kb("VmSize") * 1024 + mm.GB, resource.RLIM_INFINITY))
        try:
            torch.ones(400_000_000)
            capped = False
        except RuntimeError as e:
            capped = mm._is_memory_error(e)
        return {"status": "ok", "peak": peak, "capped": capped}

    out = mm.run_isolated(fn, 60)
    if out["status"] == "skip":
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert out["status"] == "ok", out
    assert 0.35 < out["peak"] < 0.6
    assert out["capped"]


def test_harness_tables_show_the_one_off_fit_cost() -> None:
    """With ``--fit`` the printed and Markdown tables carry the fit's one-off cost beside the request's."""
    import io

    problem = mm.BUILDERS["mlp"](True, 0, "class")
    bank = torch.zeros(3, problem.n_params())

    def chain(nll: float, err: float) -> Any:
        stats = {"nll_forgot": nll, "test_error": err, "error_forgot": 0.0}
        return mm.Chain(model=None, bank=bank, seconds=1.0, stats=stats)

    req = {"status": "ok", "stats": {"nll_forgot": 4.0, "test_error": 6.0, "error_forgot": 50.0}, "peak_gb": 0.5,
           "user_bank_intact": True, "seconds": 1.5, "cpu_seconds": 1.25, "epoch_seconds": 2.5,
           "epoch_cpu_seconds": 2.5, "fit_seconds": 17.5, "fit_cpu_seconds": 15.0}  # fmt: skip
    r = mm.summarize(problem, chain(1.0, 5.0), [chain(7.0, 5.0), chain(5.0, 6.0)], req, 0)
    assert r["fit_epochs"] == pytest.approx(6.0)
    buf = io.StringIO()
    mm.print_table([r], out=buf)
    head, _, row = buf.getvalue().splitlines()[:3]
    assert "fit cpu s" in head and "15.0" in row.split() and "6.00" in row.split()
    md = mm.markdown_table([r])
    assert "one-off fit" in md and "17.5 (15.0; 6.00)" in md
    plain = dict(req)
    del plain["fit_seconds"], plain["fit_cpu_seconds"]
    r = mm.summarize(problem, chain(1.0, 5.0), [chain(7.0, 5.0), chain(5.0, 6.0)], plain, 0)
    buf = io.StringIO()
    mm.print_table([r], out=buf)
    assert "fit" not in buf.getvalue().splitlines()[0] and "fit" not in mm.markdown_table([r])


def test_harness_remaining_data_forms_and_which_the_library_can_list() -> None:
    """``--remaining``: the endless iterator cannot be listed (no emptied-label check), the ``DataLoader`` over a
    ``TensorDataset`` a user passes can (the library reads its tensors, every row once), and so can the tuple; the
    loader's minibatches are the iterator's, so only the listing differs between those two."""
    from torch.utils.data import DataLoader

    from mcmc_unlearner.stream import _loader_tensors

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)
    it = mm.remaining_data(x, y, 4, 7, "iterator")
    dl = mm.remaining_data(x, y, 4, 7, "loader")
    assert isinstance(dl, DataLoader) and dl.batch_size == 4
    assert _loader_tensors(it) is None
    listed = _loader_tensors(dl)
    assert listed is not None and torch.equal(listed[0], x) and torch.equal(listed[1], y)
    for a, b in zip([next(it) for _ in range(2)], dl):  # the same shuffled minibatches, first pass
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rows = mm.remaining_data(x, y, 4, 7, "rows")
    assert rows[0] is x and rows[1] is y
    with pytest.raises(ValueError, match="iterator, loader or rows"):
        mm.remaining_data(x, y, 4, 7, "list")
