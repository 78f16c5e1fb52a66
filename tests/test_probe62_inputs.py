"""Data fields stop 62's probe of a new user's usages found mishandled.

*Numpy arrays*, answered with the wrong fix.
The remaining rows as a tuple of arrays ``(x.numpy(), y.numpy())`` were refused with "pass n_remaining= ... it cannot
be read from a tuple"; passing ``n_remaining=`` as told was then refused with "a remaining-data minibatch must be a
tensor ... pass its rows as one batch, e.g. (x[ids], y[ids]) or next(iter(loader))", the advice for removed rows. A
list of array minibatches likewise asked for ``n_remaining=``. Each is now refused at once naming the conversion
(``torch.from_numpy``), with the model and the samples left as they were; the same rows as tensors are accepted.

*Sparse fields* crashed with torch's "Could not run 'aten::aminmax' with arguments from the 'SparseCPU' backend"; they
are refused naming ``to_dense()``. *Rows that require grad* (features left from an attack or a feature extractor)
were accepted with the same samples, but every gradient through them held a graph back to the caller's tensor and
torch's "Converting a tensor with requires_grad=True to a scalar" warning reached the caller; they are read detached.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner
from test_emptied_label import _softmax_regression

FIX = r"torch\.from_numpy"


@pytest.fixture(scope="module")
def chain() -> tuple:
    """One sampled softmax regression for the module (its SGLD loop is most of a test's time)."""
    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = torch.arange(200) < 10
    return model, nll, log_prior, bank, (x[gone], y[gone]), (x[~gone], y[~gone])


def _setup(chain: tuple) -> tuple:
    model, nll, log_prior, bank, removed, remaining = chain
    return copy.deepcopy(model), nll, log_prior, copy.deepcopy(bank), removed, remaining


@pytest.mark.parametrize(
    ("form", "n_remaining"),
    [("tuple", None), ("tuple", 190), ("minibatch list", None), ("minibatch list", 190), ("iterator", 190)],
)
def test_remaining_numpy_arrays_are_refused_naming_the_conversion(
    chain: tuple, form: str, n_remaining: int | None
) -> None:
    model, nll, log_prior, bank, removed, (xk, yk) = _setup(chain)
    xa, ya = xk.numpy(), yk.numpy()
    if form == "tuple":
        remaining = (xa, ya)
    elif form == "minibatch list":
        remaining = [(xa[i : i + 40], ya[i : i + 40]) for i in range(0, len(ya), 40)]
    else:  # (an iterator needs n_remaining=: asked for first, rightly)
        remaining = iter([(xa[i : i + 40], ya[i : i + 40]) for i in range(0, len(ya), 40)] * 50)
    state, samples = copy.deepcopy(model.state_dict()), copy.deepcopy(bank)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(TypeError, match=f"numpy array.*{FIX}") as caught:
        un.remove(removed, remaining, n_remaining)
    assert "n_remaining" not in str(caught.value) and "next(iter(loader))" not in str(caught.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(samples, un.samples()) for k in a)


def test_removed_numpy_arrays_are_refused_naming_the_conversion(chain: tuple) -> None:
    model, nll, log_prior, bank, (xr, yr), remaining = _setup(chain)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    for removed in ((xr.numpy(), yr.numpy()), xr.numpy()):
        with pytest.raises(TypeError, match=f"numpy array.*{FIX}") as caught:
            un.remove(removed, remaining)
        assert "next(iter(loader))" not in str(caught.value)
    # the same rows as tensors: accepted, the samples moved
    report = un.remove((torch.from_numpy(xr.numpy()), torch.from_numpy(yr.numpy())), remaining)
    assert report.shift_norm > 0


@pytest.mark.parametrize("where", ["removed", "remaining", "minibatch list"])
def test_sparse_fields_are_refused_naming_to_dense(chain: tuple, where: str) -> None:
    """(A list of minibatches with a sparse field, joined as the remaining rows, failed in torch: "reshape is not
    implemented for sparse tensors"; stop 62's review.)"""
    model, nll, log_prior, bank, (xr, yr), (xk, yk) = _setup(chain)
    removed, remaining = (xr, yr), (xk, yk)
    if where == "removed":
        removed = (xr.to_sparse(), yr)
    elif where == "remaining":
        remaining = (xk.to_sparse(), yk)
    else:
        remaining = [(xk[i : i + 40].to_sparse(), yk[i : i + 40]) for i in range(0, len(yk), 40)]
    state = copy.deepcopy(model.state_dict())
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(TypeError, match=r"sparse_coo tensor.*to_dense\(\)|sparse tensors?.*to_dense\(\)"):
        un.remove(removed, remaining)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_rows_that_require_grad_are_read_detached(chain: tuple) -> None:
    model, nll, log_prior, bank, (xr, yr), (xk, yk) = _setup(chain)
    plain = MCMCUnlearner(copy.deepcopy(model), nll=nll, log_prior=log_prior, bank=bank, seed=0)
    expected = plain.propose((xr, yr), (xk, yk))
    xg, kg = xr.clone().requires_grad_(True), xk.clone().requires_grad_(True)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
        got = un.propose((xg, yr), (kg, yk))
    assert (
        torch.equal(got.bank, expected.bank)
        if isinstance(got.bank, torch.Tensor)
        else all(torch.equal(a[k], b[k]) for a, b in zip(got.bank, expected.bank) for k in a)
    )
    assert got.report.info["gradient_norm"] == expected.report.info["gradient_norm"]
    assert xg.grad is None and kg.grad is None and xg.requires_grad and kg.requires_grad


@pytest.mark.parametrize("where", ["removed", "remaining"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_of_another_float_dtype_are_refused_naming_the_cast(chain: tuple, where: str, dtype: torch.dtype) -> None:
    model, nll, log_prior, bank, (xr, yr), (xk, yk) = _setup(chain)  # a float64 model
    removed, remaining = (xr, yr), (xk, yk)
    if where == "removed":
        removed = (xr.to(dtype), yr)
    else:
        remaining = (xk.to(dtype), yk)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(
        RuntimeError, match=rf"Field\(s\) \[0\] are {dtype} where the model's parameters are torch\.float64"
    ):
        un.remove(removed, remaining)


def test_a_remaining_source_nll_cannot_read_is_refused_before_the_dense_probe(
    chain: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dense cost's probe (whose first torch.func transform imports torch's compiler stack, 1.2 s CPU in a fresh
    process) ran before a float16 remaining DataLoader was refused; the remaining minibatch is now read first."""
    from torch.utils.data import DataLoader, TensorDataset

    model, nll, log_prior, bank, removed, (xk, yk) = _setup(chain)

    def probe(self: MCMCUnlearner, *args: object) -> None:
        raise AssertionError("the dense probe ran before the remaining data was checked")

    monkeypatch.setattr(MCMCUnlearner, "_weigh_dense_build", probe)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    assert un.solver.value in ("exact", "ggn")  # auto took a dense solver: its probe is pending
    loader = DataLoader(TensorDataset(xk.half(), yk), batch_size=64, shuffle=True)
    with pytest.raises(RuntimeError, match=r"nll\(model, remaining data\) failed"):
        un.remove(removed, loader)


@pytest.mark.filterwarnings("ignore:the emptied-label check did not run")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_the_early_remaining_check_leaves_a_stateful_loader_where_it_was(chain: tuple, dtype: torch.dtype) -> None:
    """The early check before auto's dense probe peeked a loader with a state (torchdata's StatefulDataLoader) before
    the request's snapshot of that state: a refused request (float16 rows) and a discarded proposal (float64 rows)
    left it one minibatch on, where without the early check they left it as it was."""
    from test_request_messages import _StatefulLoader

    model, nll, log_prior, bank, removed, (xk, yk) = _setup(chain)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    assert un.solver.value in ("exact", "ggn") and un._dense_probe is not None  # the early check's path
    loader = _StatefulLoader(xk.to(dtype), yk)
    if dtype == torch.float16:
        with pytest.raises(RuntimeError, match=r"nll\(model, remaining data\) failed"):
            un.remove(removed, loader, n_remaining=190)
    else:
        un.propose(removed, loader, n_remaining=190)
    assert loader.state_dict() == {"pos": 0}


@pytest.mark.parametrize("error", ["missing field", "label out of range", "float labels"])
def test_the_cast_is_not_named_for_an_nll_error_of_another_kind(chain: tuple, error: str) -> None:
    """A float32 field beside a float64 model, read by an nll that casts it itself, is valid: an nll failing for
    another reason (a field it reads that is not there, a label out of range) was told to cast that field to
    float64; and float32 class labels, which cross_entropy wants as int64, were told to become float64."""
    model, nll, log_prior, bank, (xr, yr), remaining = _setup(chain)
    weight = torch.ones(len(yr), dtype=torch.float32)

    def weighted(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        return nll(m, b) * b[2 if error == "label out of range" else 3].double()

    un = MCMCUnlearner(model, nll=nll if error == "float labels" else weighted, log_prior=log_prior, bank=bank, seed=0)
    removed = {
        "missing field": (xr, yr, weight),
        "label out of range": (xr, yr + 4, weight),
        "float labels": (xr, yr.float()),
    }[error]
    with pytest.raises((IndexError, RuntimeError), match=r"nll\(model, removed data\) failed") as caught:
        un.remove(removed, remaining)
    assert "cast them" not in str(caught.value)


def test_an_nll_differentiating_through_its_rows_is_told_they_are_read_detached() -> None:
    """A physics-informed nll (the residual of u' = cos x, its derivative taken with respect to the rows) read its
    rows' requires_grad from the caller's tensor, and was accepted before the rows were read detached; it then
    failed with torch's "One of the differentiated Tensors does not require grad" alone. The message names the
    detaching and the way out, with which the same nll is accepted."""
    torch.manual_seed(0)
    x = torch.rand(60, 1, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    bank = [{k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]

    def residual(own: bool):
        def nll(m: torch.nn.Module, b: tuple) -> torch.Tensor:
            with torch.enable_grad():
                xx = b[0].detach().requires_grad_() if own else b[0]
                (du,) = torch.autograd.grad(m(xx).sum(), xx, create_graph=True)
            return 0.5 * (du - torch.cos(xx)).squeeze(-1) ** 2

        return nll

    def log_prior(m: torch.nn.Module) -> torch.Tensor:
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    xg = x.clone().requires_grad_(True)
    un = MCMCUnlearner(model, nll=residual(False), log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(RuntimeError, match=r"read detached.*b\[0\]\.detach\(\)\.requires_grad_\(\)"):
        un.propose((xg[:5],), (xg[5:],))
    un = MCMCUnlearner(model, nll=residual(True), log_prior=log_prior, bank=bank, seed=0)
    assert un.propose((xg[:5],), (xg[5:],)).report.shift_norm > 0
