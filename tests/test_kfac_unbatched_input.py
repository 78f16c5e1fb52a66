"""A Linear called on an input without the batch's rows (stop 57's probe: a hypernetwork whose learned code of
shape [4] generates the first layer) gave K-FAC per-row factors for one location shared by every row (undamped
ratios -3.4 / -1.4) and nothing said so. Such a layer is now left to K-FAC's diagonal, recorded and warned once."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _banks import langevin_bank
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec

torch.set_num_threads(1)


class Hyper(nn.Module):
    def __init__(self, code_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.z = nn.Parameter(0.5 * torch.randn(code_shape))
        self.hyper = nn.Linear(4, 6 * 5 + 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hyper(self.z)
        w = h.sum(0) if h.dim() == 2 else h  # a [2, 4] code: two locations, both shared by every row
        return self.head(torch.tanh(F.linear(x, w[:30].view(5, 6), w[30:])))


@pytest.mark.parametrize("code_shape", [(4,), (1, 4), (2, 4)], ids=["vector", "one_row", "two_rows"])
def test_a_linear_on_an_unbatched_code_is_left_to_the_diagonal_and_said_once(code_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Hyper(code_shape)
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver="kfac",
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
        second = un.remove((x[4:8], y[4:8]), (x[8:], y[8:]), strict=False)
    said = [str(w.message) for w in caught if "without the batch's rows" in str(w.message)]
    assert len(said) == 1 and "'hyper'" in said[0], said
    kfac = first.info["kfac"]
    assert kfac["unbatched_input"] == ["hyper"]
    assert "without the batch's rows" in kfac["diagonal"]["hyper.weight"]
    assert "hyper" not in kfac["kronecker"] and "head" in kfac["kronecker"]
    assert second.solver == "kfac"


def test_batched_layers_are_still_factored() -> None:
    from mcmc_unlearner.kronecker import _unbatched_call

    assert not _unbatched_call("linear", torch.zeros(8, 4), 8)
    assert not _unbatched_call("linear", torch.zeros(3, 8, 4), 8)  # [T, B, d]: every location of every row
    assert not _unbatched_call("linear", torch.zeros(1, 4), 1)  # a batch of one row
    assert not _unbatched_call("conv2d", torch.zeros(8, 1, 5, 5), 8)
    assert _unbatched_call("linear", torch.zeros(4), 8)
    assert _unbatched_call("conv2d", torch.zeros(1, 5, 5), 8)


@pytest.mark.parametrize(
    ("code_shape", "removed"), [((4,), 4), ((1, 4), 1), ((2, 4), 1)], ids=["code", "one_row_request", "two_row_code"]
)
def test_solver_auto_takes_cg_for_a_layer_on_an_unbatched_code(code_shape: tuple[int, ...], removed: int) -> None:
    """A [4] code on a request of 4 rows; a [1, 4] or [2, 4] code on a request of one row, where auto's probe read
    the removed rows and one removed row made a [1, 4] code look like that row's (kept K-FAC, the layer on its
    diagonal): a probe of fewer rows is repeated to 8."""
    torch.manual_seed(0)
    model = Hyper(code_shape)
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, exact_max_dim=10,
    )  # fmt: skip
    assert un.solver.value == "kfac"
    with pytest.warns(UserWarning, match="'hyper' is called on an input without the batch's rows.*matrix-free CG"):
        report = un.remove((x[:removed], y[:removed]), (x[removed:], y[removed:]), strict=False)
    assert report.solver == "cg" and "'hyper'" in un.solver_reason


class RowLoop(nn.Module):
    """The same network on the whole batch, or looped over its rows (one call per row: every row covered)."""

    def __init__(self, loop: bool, conv: bool) -> None:
        super().__init__()
        self.loop, self.conv = loop, conv
        self.l1 = nn.Conv2d(1, 3, 3) if conv else nn.Linear(6, 8)
        self.l2 = nn.Linear(3 * 3 * 3 if conv else 8, 3)

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)).flatten(-3 if self.conv else -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.net(xi) for xi in x]) if self.loop else self.net(x)


def _ce(m: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _request(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, solver: str, removed: int = 4, bank: torch.Tensor | None = None
) -> tuple[object, list[str], torch.Tensor]:
    """One request with ``solver`` on ``bank`` (by default one around ``model``'s weights): its report, the
    unbatched-input warnings, the bank afterwards."""
    if bank is None:
        theta = ParamSpec.flatten_module(model).detach()
        bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=_ce,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver=solver,
        exact_max_dim=10,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.remove((x[:removed], y[:removed]), (x[removed:], y[removed:]), strict=False)
    said = [str(w.message) for w in caught if "without the batch's rows" in str(w.message)]
    return report, said, torch.as_tensor(un.bank).clone()


@functools.cache
def _row_loop_problem(conv: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`RowLoop`'s weights, its 40 rows and a bank sampled on them (by the batched model: the same energy).
    Starting weights plus noise are not at equilibrium: the remaining energy rose along the Linear's step (bank slope
    -5.8 against G·x 4.5) and the slope test cut it to a shift of 0.05 (stop 62)."""
    torch.manual_seed(0)
    model = RowLoop(False, conv).eval()
    x, y = torch.randn(40, *((1, 5, 5) if conv else (6,))), torch.randint(0, 3, (40,))
    prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731
    return model.state_dict(), x, y, langevin_bank(model, _ce, prior, (x, y), 6, 500)


def _row_loop_request(loop: bool, conv: bool, solver: str, removed: int = 4) -> tuple[object, list[str], torch.Tensor]:
    """One request on :class:`RowLoop` with a sampled bank: its report, the unbatched-input warnings, the bank
    afterwards."""
    weights, x, y, bank = _row_loop_problem(conv)
    torch.manual_seed(0)  # each request on the same global generator's state
    model = RowLoop(loop, conv).eval()
    model.load_state_dict(weights)
    return _request(model, x, y, solver, removed, bank.clone())


@pytest.mark.parametrize("conv", [False, True], ids=["linear_rows", "conv_images"])
@pytest.mark.parametrize("solver", ["kfac", "auto"])
def test_a_model_looping_over_its_rows_is_factored_as_the_batched_one(conv: bool, solver: str) -> None:
    """A per-row loop (``torch.stack([net(x_i) for x_i in x])``, a Conv on each ``[C, H, W]`` image) calls each
    layer once per row, covering every row: it was taken for unbatched input (solver='kfac' shift 0.2746 against
    the batched model's 0.4355, warned; 'auto' switched to CG, 0.0814; on the test's bank then, starting weights plus
    noise)."""
    batched, said_batched, bank_batched = _row_loop_request(False, conv, solver)
    looped, said_looped, bank_looped = _row_loop_request(True, conv, solver)
    assert said_batched == [] and said_looped == []
    assert batched.solver == looped.solver == "kfac"
    kfac = looped.info["kfac"]
    assert "unbatched_input" not in kfac and sorted(kfac["kronecker"]) == ["l1", "l2"]
    assert looped.shift_norm == pytest.approx(batched.shift_norm, rel=1e-4)
    assert looped.shift_norm > 0.1  # (0.62 for the Linear on the sampled bank: a shift to compare)
    assert torch.allclose(bank_looped, bank_batched, rtol=1e-4, atol=1e-6)


def test_a_looping_model_keeps_kfac_on_a_one_row_request() -> None:
    """The repeated probe does not take a per-row loop for unbatched input either."""
    report, said, _ = _row_loop_request(True, False, "auto", removed=1)
    assert said == [] and report.solver == "kfac"


class Routed(nn.Module):
    """Rows routed to two experts by a feature's sign: each expert is called on a subset of the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0] > 0
        h = x.new_zeros(x.shape[0], 8)
        h = h.index_put((m.nonzero().flatten(),), self.a(x[m]))
        h = h.index_put(((~m).nonzero().flatten(),), self.b(x[~m]))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("solver", ["kfac", "auto"])
def test_experts_called_on_a_subset_of_the_rows_are_still_factored(solver: str) -> None:
    """Each expert covers fewer rows than the batch, as a shared code does, but its input moves with the rows
    (:func:`~mcmc_unlearner.kronecker._fixed_inputs`): counting alone left both to the diagonal (shift 0.7983
    against 0.7464) and auto took CG (0.1496)."""
    torch.manual_seed(0)
    model = Routed().eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    report, said, _ = _request(model, x, y, solver)
    assert not said
    kfac = report.info["kfac"]
    assert report.solver == "kfac" and "unbatched_input" not in kfac
    assert sorted(kfac["kronecker"]) == ["a", "b", "head"]


class RowsAndCode(nn.Module):
    """One Linear applied to the rows and to a learned code in the same forward (in either order): its calls cover
    every row and one more location, so counting rows took it for a batched layer."""

    def __init__(self, code_first: bool) -> None:
        super().__init__()
        self.code_first = code_first
        self.z = nn.Parameter(torch.randn(6))
        self.lin = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.code_first:
            code = self.lin(self.z)
            return self.lin(x) + code
        return self.lin(x) + self.lin(self.z)


def _rows_and_code_request(code_first: bool, solver: str) -> tuple[object, list[str], MCMCUnlearner]:
    """A Gaussian regression on :class:`RowsAndCode`, one request: its report, the unbatched-input warnings, the
    unlearner."""
    torch.manual_seed(0)
    model = RowsAndCode(code_first).eval()
    x = torch.randn(60, 6)
    y = x[:, 0] + 0.1 * torch.randn(60)
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver=solver,
        exact_max_dim=5,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
    said = [str(w.message) for w in caught if "without the batch's rows" in str(w.message)]
    return report, said, un


@pytest.mark.parametrize("code_first", [False, True], ids=["rows_first", "code_first"])
def test_a_linear_on_the_rows_and_on_a_code_in_one_forward_is_left_to_the_diagonal(code_first: bool) -> None:
    """Stop 58's probe: its calls covered the rows, so it was factored, the code's location (its output gradient
    summed over every row) mixed into the rows' factors: K-FAC's xᵀKx on this Gaussian regression 2.8 relative off
    the dense GGN, unflagged (1.6e-7 without the code's call). Now it goes to the diagonal, warned once."""
    report, said, _ = _rows_and_code_request(code_first, "kfac")
    kfac = report.info["kfac"]
    assert kfac["unbatched_input"] == ["lin"]
    assert "lin" not in kfac["kronecker"]
    assert "without the batch's rows" in kfac["diagonal"]["lin.weight"]
    assert len(said) == 1 and "'lin'" in said[0], said


@pytest.mark.parametrize("code_first", [False, True], ids=["rows_first", "code_first"])
def test_solver_auto_takes_cg_for_a_linear_on_the_rows_and_on_a_code(code_first: bool) -> None:
    report, said, un = _rows_and_code_request(code_first, "auto")
    assert report.solver == "cg" and "'lin'" in un.solver_reason
    assert len(said) == 1 and "matrix-free CG" in said[0], said


def test_the_same_linear_without_the_code_call_is_still_factored() -> None:
    """The control: the rows alone (a one-output linear regression, whose Kronecker block is its GGN, 1.6e-7 off)
    keep K-FAC."""

    class RowsOnly(RowsAndCode):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + 0.0 * self.z.sum()

    torch.manual_seed(0)
    model = RowsOnly(False).eval()
    x = torch.randn(60, 6)
    y = x[:, 0] + 0.1 * torch.randn(60)
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver="auto",
        exact_max_dim=5,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
    assert not [w for w in caught if "without the batch's rows" in str(w.message)]
    assert report.solver == "kfac" and "lin" in report.info["kfac"]["kronecker"]


class RowsAndSelected(nn.Module):
    """A Linear applied to the rows and again to the rows a feature selects (``refine``), or an expert reached by
    the rows a feature selects (``expert``): with no row selected, a call on an empty ``[0, 6]`` input."""

    def __init__(self, expert: bool) -> None:
        super().__init__()
        self.expert = expert
        self.lin, self.other, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0] > 100.0  # no row of these batches
        at = m.nonzero().flatten()
        if self.expert:
            h = self.other(x).index_put((at,), self.lin(x[m]))
        else:
            h = self.lin(x).index_add(0, at, self.lin(x[m]))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("expert", [False, True], ids=["rows_and_empty", "empty_expert"])
@pytest.mark.parametrize("solver", ["kfac", "auto"])
def test_a_call_on_an_empty_selection_is_no_shared_code(expert: bool, solver: str) -> None:
    """An empty input has no location, let alone one every row shares, and stays empty with the rows reversed: the
    layer on the rows and on an empty selection was left to the diagonal ('shape [0, 6] ... one location shared by
    every row', warned) and auto took CG; so was an expert no row reached. Both are factored."""
    torch.manual_seed(0)
    model = RowsAndSelected(expert).eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    report, said, _ = _request(model, x, y, solver)
    assert said == []
    kfac = report.info["kfac"]
    assert report.solver == "kfac" and "unbatched_input" not in kfac
    assert "lin" in kfac["kronecker"]


class RowsAndPrototypes(nn.Module):
    """One Linear applied to the rows and to ``k`` learned prototypes (a code of ``k`` locations, each shared by
    every row), one output."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(k, 6))
        self.lin = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.lin(self.z).mean(0)


@pytest.mark.parametrize("k", [4, 16])
def test_a_linear_on_the_rows_and_on_as_many_codes_as_rows_is_left_to_the_diagonal(k: int) -> None:
    """16 prototypes and a minibatch of 8 rows: the prototypes' call covers 16 locations, no fewer than the rows,
    so it was taken for a call on the rows and factored (K-FAC's vᵀKv 0.53 relative off the dense GGN's, unflagged);
    4 prototypes were caught. Both now: their input is not the rows (:func:`_off_rows_call`) and stays with the
    rows reversed."""
    from mcmc_unlearner.kronecker import KroneckerCurvature

    torch.manual_seed(0)
    model = RowsAndPrototypes(k).eval()
    x = torch.randn(8, 6)
    theta = ParamSpec.flatten_module(model).detach()[None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kfac = KroneckerCurvature.build(
            model, theta, [(x, x[:, 0])], 100, nll=lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2
        )
    assert kfac.info["unbatched_input"] == ["lin"], [str(w.message) for w in caught]
    assert "lin" not in kfac.info["kronecker"]
    assert "without the batch's rows (shape [" + f"{k}, 6]" in kfac.info["diagonal"]["lin.weight"]


def test_off_rows_calls() -> None:
    from mcmc_unlearner.kronecker import _off_rows_call

    assert not _off_rows_call("linear", torch.zeros(8, 4), 8)
    assert not _off_rows_call("linear", torch.zeros(8, 3, 4), 8)  # [B, T, d]
    assert not _off_rows_call("linear", torch.zeros(3, 8, 4), 8)  # [T, B, d]
    assert not _off_rows_call("conv2d", torch.zeros(8, 1, 5, 5), 8)
    assert _off_rows_call("linear", torch.zeros(16, 4), 8)  # 16 codes (or flattened locations: reversal decides)
    assert _off_rows_call("conv2d", torch.zeros(16, 1, 5, 5), 8)
    assert _off_rows_call("linear", torch.zeros(4), 8)
