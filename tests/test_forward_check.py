"""The first request checks that ``nll`` is a function of the parameters the unlearner passes in
(``MCMCUnlearner._check_forward``): a random forward (functional dropout left on in training mode) and a forward
that reads the module's live parameters (activation checkpointing under ``torch.func.functional_call``) are refused
before any work, with the model, its gradients, buffers, the bank and the global RNG untouched. Both were accepted
with ``problems=[]`` (stop 55's probe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import Likelihood, detect_likelihood, empirical_fallback_message


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=self.training))


class Checkpointed(nn.Module):
    def __init__(self, use: bool = True) -> None:
        super().__init__()
        self.use = use
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(checkpoint(self.block, h, use_reentrant=False) if self.use else self.block(h))


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _setup(model: nn.Module):
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(3, (60,))
    bank = []
    for _ in range(4):
        bank.append({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items() if k != "use"})
    return x, y, bank


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        None if p.grad is None else p.grad.clone() for p in model.parameters()
    ]


@pytest.mark.parametrize("case", ["dropout", "checkpoint"])
def test_a_random_or_live_parameter_forward_is_refused_before_any_work(case: str) -> None:
    torch.manual_seed(0)
    model = FunctionalDropout().train() if case == "dropout" else Checkpointed()
    x, y, bank = _setup(model)
    model.zero_grad()
    _nll(model, (x, y)).sum().backward()  # the caller's gradients: left as they are
    state, grads = _state(model)
    un = MCMCUnlearner(
        model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    flat = un.bank.clone()
    rng = torch.get_rng_state()
    match = (
        r"different values on two calls.*model\.eval\(\)" if case == "dropout" else r"checkpoint.*without checkpointing"
    )
    with pytest.raises(ValueError, match=match):
        un.remove((x[:5], y[:5]), (x[5:], y[5:]))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(un.bank, flat) and not un.history
    after, after_grads = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert all(torch.equal(g, h) for g, h in zip(grads, after_grads))
    # the same network evaluated deterministically, at its own parameters: accepted
    if case == "dropout":
        model.eval()
    else:
        model.use = False
    un = MCMCUnlearner(
        model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    un.propose((x[:5], y[:5]), (x[5:], y[5:]))
    assert un._forward_checked


def test_the_likelihood_detection_names_a_random_forward_not_the_loss() -> None:
    """K-FAC's fallback warning blamed the loss's form (and offered likelihood='categorical') for dropout noise."""
    torch.manual_seed(0)
    model = FunctionalDropout().train()
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    kind, extra = detect_likelihood(model, _nll, (x, y))
    assert kind is Likelihood.EMPIRICAL and "random" in extra["reason"], extra
    said = empirical_fallback_message(extra["reason"], (16, 3))
    assert "model.eval()" in said and "likelihood='categorical'" not in said
    assert detect_likelihood(model.eval(), _nll, (x, y))[0] is Likelihood.CATEGORICAL


class InPlaceClamp(nn.Module):
    """A weight constraint written into the forward, in place (stop 56's probe: torch's raw view error, and the
    caller's weight changed by up to 0.53)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.clamp_(-0.3, 0.3)
        return self.b(torch.tanh(self.a(x)))


class OnlineNorm(nn.Module):
    """An input normaliser that updates its running mean on every call, eval mode included (stop 56's probe:
    refused as a random forward, the buffer left changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(5))
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.mu.mul_(0.9).add_(0.1 * x.mean(0))
        return self.b(torch.tanh(self.a(x - self.mu)))


class OnlineNormReassigned(OnlineNorm):
    """:class:`OnlineNorm` updating its running mean out of place, ``self.mu = ...`` (stop 56's review: missed by
    the write check, refused as a "random forward" and the caller's buffer left changed by 0.33)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mu = 0.9 * self.mu + 0.1 * x.mean(0)
        return self.b(torch.tanh(self.a(x - self.mu)))


def _over_batch(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none") / len(b[1])


def _balanced(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none") / torch.bincount(b[1], minlength=3)[b[1]]


def _in_batch_softmax(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return -F.log_softmax(m(b[0])[:, 0], 0)


def _bank_copy(bank: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in bank]


def _same_bank(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(s[k], t[k]) for s, t in zip(a, b) for k in s)


@pytest.mark.parametrize(
    "nll, rows",
    [(_over_batch, 5), (_over_batch, 1), (_balanced, 5), (_in_batch_softmax, 5)],
    ids=["over_batch", "over_batch_one_row", "batch_class_weights", "in_batch_softmax"],
)
def test_an_nll_whose_rows_depend_on_the_batch_is_refused(nll, rows: int) -> None:
    """Per-row values divided by the batch size (stop 56's probe: accepted with problems=[], the removed rows moved
    0.09 of the way where the correct nll moved them 0.79), batch-counted class weights and an in-batch softmax give
    a row another value in another batch; one removed row is evaluated alone and doubled."""
    torch.manual_seed(0)
    model = FunctionalDropout().eval()
    x, y, bank = _setup(model)
    state, _ = _state(model)
    given = _bank_copy(bank)
    un = MCMCUnlearner(
        model, None, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"depends on the other rows of its batch.*reduction='none'"):
        un.remove((x[:rows], y[:rows]), (x[rows:], y[rows:]))
    assert torch.equal(torch.get_rng_state(), rng) and not un.history and _same_bank(bank, given)
    after, _ = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    # the same loss per row: accepted
    un = MCMCUnlearner(
        model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    un.propose((x[:rows], y[:rows]), (x[rows:], y[rows:]))
    assert un._forward_checked


class _Packed(nn.Module):
    """A packed LSTM over padded token sequences (rows independent)."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.r, self.o = nn.Embedding(20, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        p = nn.utils.rnn.pack_padded_sequence(self.e(x), lens, batch_first=True, enforce_sorted=False)
        return self.o(self.r(p)[1][0][-1])


class _Masked(nn.Module):
    """Attention with a key padding mask over padded token sequences (rows independent)."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.o = nn.Embedding(20, 16), nn.Linear(16, 3)
        self.a = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        pad = torch.arange(x.shape[1])[None] >= lens[:, None]
        h = self.e(x)
        h = self.a(h, h, h, key_padding_mask=pad)[0]
        return self.o((h * (~pad)[..., None]).sum(1) / lens[:, None])


def test_row_dependence_on_ordinary_models_is_rounding() -> None:
    """The check's measure on models whose rows are independent (an eval-mode BatchNorm, a packed LSTM, attention
    with a padding mask; float32 and float64) stays far below the tolerance it refuses at."""
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.unlearner import FORWARD_CHECK_EPS

    def seq_nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(m(b[0], b[1]), b[2], reduction="none")

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    bn(torch.randn(64, 5))  # running statistics of its own
    lens = torch.randint(2, 9, (8,))
    toks = torch.randint(1, 20, (8, 8)) * (torch.arange(8)[None] < lens[:, None])
    cases = [
        (bn, _nll, (torch.randn(8, 5), torch.randint(3, (8,)))),
        (_Packed(), seq_nll, (toks, lens, torch.randint(3, (8,)))),
        (_Masked(), seq_nll, (toks, lens, torch.randint(3, (8,)))),
    ]
    for dtype in (torch.float32, torch.float64):
        for model, nll, batch in cases:
            model = model.to(dtype).eval()
            batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
            params = dict(model.named_parameters())
            bank = [
                {k: v + 0.3 * torch.randn_like(v) if k in params else v for k, v in model.state_dict().items()}
                for _ in range(3)
            ]
            un = MCMCUnlearner(
                model, None, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
            )
            theta = un._forward_check_sample(ParamSpec.flatten_module(model))
            tol = FORWARD_CHECK_EPS * torch.finfo(dtype).eps
            for i in (0, 4, 7):
                gap = un._row_check(tuple(t[i : i + 4] for t in batch), theta, 0.0)[0]
                assert gap < tol / 50, (type(model).__name__, dtype, gap)
            # the whole first request's checks pass
            un._check_forward(batch)
            assert un._forward_checked


@pytest.mark.parametrize("case", ["clamp", "online_norm", "online_norm_reassigned"])
def test_a_forward_that_writes_into_the_model_is_refused_and_nothing_changes(case: str) -> None:
    """A forward writing into a parameter (an in-place constraint) or, in eval mode, into a buffer it reads is refused
    naming the entry; afterwards every parameter and buffer of the caller's model and the caller's bank are
    bit-identical to before (they were changed by up to 0.53 and 0.03 in stop 56's probe)."""
    torch.manual_seed(0)
    model = {"clamp": InPlaceClamp, "online_norm": OnlineNorm, "online_norm_reassigned": OnlineNormReassigned}[case]()
    model = model if case == "clamp" else model.eval()
    x, y = torch.randn(60, 5) + 1.0, torch.randint(3, (60,))
    entries = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    params = dict(model.named_parameters())
    bank = [{k: v + 0.3 * torch.randn_like(v) if k in params else v for k, v in model.state_dict().items()}]
    bank += [{k: v + 0.3 * torch.randn_like(v) if k in params else v for k, v in bank[0].items()} for _ in range(3)]
    with torch.no_grad():
        model.a.weight.copy_(bank[-1]["a.weight"])  # the live weights outside the clamp, as a chain leaves them
    state, _ = _state(model)
    given = _bank_copy(bank)
    un = MCMCUnlearner(
        model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    flat = un.bank.clone()
    name, fix = ("a.weight", "out of place") if case == "clamp" else ("mu", "only in training mode")
    with pytest.raises(ValueError, match=rf"writes into {name} in place.*{fix}"):
        un.remove((x[:5], y[:5]), (x[5:], y[5:]))
    after, _ = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert _same_bank(bank, given) and torch.equal(un.bank, flat) and not un.history
    # the caller's own tensor objects are back in the model (a reassigned buffer included)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == entries


def test_an_eval_mode_counter_buffer_the_output_ignores_passes() -> None:
    """A buffer written in eval mode that the output does not read (a call counter) is no defect: accepted."""

    class Counted(FunctionalDropout):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return super().forward(x)

    torch.manual_seed(0)
    model = Counted().eval()
    x, y = torch.randn(60, 5), torch.randint(3, (60,))
    bank = [{k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items() if k != "calls"} for _ in range(4)]
    un = MCMCUnlearner(
        model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    un._check_forward((x[:5], y[:5]))
    assert un._forward_checked


def test_rounding_of_large_regression_targets_is_not_refused() -> None:
    """A plain per-row Gaussian nll on unstandardised targets (|y| ~ 1e5, float32): the prediction rounds
    differently in a batch of 4 than alone (gaps up to 5.5e-3 relative, above the float tolerance 1.2e-4, refused on
    18 of 50 requests in stop 56's review). Not refused: the first request reports the gap in
    ``info["forward_row_gap"]``; a per-row loss divided by the batch size on the same model is still refused."""
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.unlearner import FORWARD_ROWS_REFUSE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)).eval()
    with torch.no_grad():
        model[4].weight.mul_(1e5 / 4)
        model[4].bias.fill_(1e5)
    live = ParamSpec.flatten_module(model).clone()
    bank = torch.stack([live + 1e-6 * torch.randn_like(live) for _ in range(8)])
    x = torch.randn(400, 32)
    with torch.no_grad():
        ParamSpec.assign(model, bank[0])
        y = model(x).squeeze(1) + torch.randn(400)
        ParamSpec.assign(model, live)

    def gauss(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return 0.5 * (m(b[0]).squeeze(1) - b[1]) ** 2

    def prior(m: nn.Module) -> torch.Tensor:
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    gaps = []
    for g in range(20):
        un = MCMCUnlearner(model, None, nll=gauss, log_prior=prior, bank=bank.clone())
        r = slice(4 * g, 4 * g + 4)
        gaps.append(un._row_check((x[r], y[r]), bank[0].clone(), 0.0)[0])
        un._check_nll((x[r], y[r]))
        un._check_forward((x[r], y[r]))  # not refused
        assert un._forward_checked
        said = getattr(un, "_forward_row_gap", None)
        assert (said is not None) == (gaps[-1] > 1e3 * torch.finfo(torch.float32).eps)
    assert max(gaps) > 1e3 * torch.finfo(torch.float32).eps  # the rounding this test is about shows here
    assert max(gaps) < FORWARD_ROWS_REFUSE / 1.5
    # the report says it, once
    un = MCMCUnlearner(model, None, nll=gauss, log_prior=prior, bank=bank.clone())
    g = max(range(20), key=lambda i: gaps[i])
    keep = torch.ones(400, dtype=torch.bool)
    keep[4 * g : 4 * g + 4] = False
    report = un.propose((x[4 * g : 4 * g + 4], y[4 * g : 4 * g + 4]), (x[keep], y[keep]))
    assert report.report.info["forward_row_gap"] == pytest.approx(gaps[g], rel=1e-6)
    un = MCMCUnlearner(model, None, nll=lambda m, b: gauss(m, b) / len(b[1]), log_prior=prior, bank=bank.clone())
    with pytest.raises(ValueError, match="depends on the other rows of its batch"):
        un._check_forward((x[:4], y[:4]))


@pytest.mark.parametrize("rows", [4, 1], ids=["four_rows", "one_row_doubled"])
def test_a_division_by_the_batch_size_on_well_fitted_rows_is_refused(rows: int) -> None:
    """Stop 56's second review: removed rows fitted to 2.7e-3-6.5e-3 nats gave ``nll / len(batch)`` a gap of 4.8e-3,
    below ``FORWARD_ROWS_REFUSE``, and it was accepted. Each row's value alone is the batch size (4, or 2 for one row
    doubled) times its value in the batch: refused whatever the gap's size, without the rounding hint; the same
    rows with the per-row loss pass."""
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.unlearner import FORWARD_ROWS_REFUSE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x = torch.randn(2000, 5)
    with torch.no_grad():
        model[2].weight.mul_(20.0)
        y = model(x).argmax(1)  # labels the model fits confidently
        nll = F.cross_entropy(model(x), y, reduction="none")
        pick = ((nll > 2e-3) & (nll < 1e-2)).nonzero().squeeze(1)[:rows]
    x, y = x[pick], y[pick]
    live = ParamSpec.flatten_module(model).clone()
    bank = torch.stack([live + 1e-3 * torch.randn_like(live) for _ in range(4)])

    def prior(m: nn.Module) -> torch.Tensor:
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    def over_batch(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1], reduction="none") / len(b[1])

    un = MCMCUnlearner(model, None, nll=over_batch, log_prior=prior, bank=bank.clone())
    gap = un._row_check((x, y), bank[0].clone(), 0.0)[0]
    assert 1e3 * torch.finfo(torch.float32).eps < gap < FORWARD_ROWS_REFUSE  # the size alone would accept it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"batch size times its value in the batch.*reduction='none'") as info:
        un._check_forward((x, y))
    assert "rounding" not in str(info.value) and not un._forward_checked
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    un = MCMCUnlearner(model, None, nll=_nll, log_prior=prior, bank=bank.clone())
    un._check_forward((x, y))
    assert un._forward_checked and un._forward_row_gap is None


def _large_regression(scale: float, cast: str = ""):
    """A 32-256-256-1 MLP predicting float32 targets ~``scale`` (stop 56's review), its bank, data and Gaussian nll;
    ``cast``: "inputs" (the forward casts its input to float32) or "output" (the nll returns float32 values)."""
    from mcmc_unlearner.curvature import ParamSpec

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if cast == "inputs":
                return self.net(x.float())
            return self.net(x)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.net[4].weight.mul_(scale / 4)
        model.net[4].bias.fill_(scale)
    live = ParamSpec.flatten_module(model).clone()
    bank = torch.stack([live + 1e-6 * torch.randn_like(live) for _ in range(8)])
    x = torch.randn(400, 32)
    with torch.no_grad():
        ParamSpec.assign(model, bank[0])
        y = model(x).squeeze(1) + torch.randn(400)
        ParamSpec.assign(model, live)

    def gauss(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        value = 0.5 * (m(b[0]).squeeze(1) - b[1]) ** 2
        return value.float() if cast == "output" else value

    return model, bank, x, y, gauss


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def test_float32_rounding_above_the_refusal_threshold_is_cleared_in_float64() -> None:
    """|y| ~ 1e6 in float32: the rows-alone gap reaches 0.064 (> ``FORWARD_ROWS_REFUSE``, no batch-size pattern),
    refused on 21 of 50 requests before. The test runs again in float64 (gaps ~1e-10): not refused, both gaps
    reported; a residual centred on its batch's mean (order-one gap, no pattern) and ``nll / len(batch)`` on the
    same model are still refused, with nothing changed."""
    from mcmc_unlearner.unlearner import FORWARD_ROWS_REFUSE

    model, bank, x, y, gauss = _large_regression(1e6)
    over = []
    for g in range(20):
        un = MCMCUnlearner(model, None, nll=gauss, log_prior=_prior, bank=bank.clone())
        r = slice(4 * g, 4 * g + 4)
        gap = un._row_check((x[r], y[r]), bank[0].clone(), 0.0)[0]
        if gap > FORWARD_ROWS_REFUSE:
            over.append(g)
            un._check_forward((x[r], y[r]))  # refused before the float64 test
            assert un._forward_checked and un._forward_row_gap == pytest.approx(gap, rel=1e-6)
            assert 0 <= un._forward_row_gap_float64 < 1e-6
    assert len(over) >= 3  # the rounding this test is about shows here
    # the report says both, once
    g = over[0]
    keep = torch.ones(400, dtype=torch.bool)
    keep[4 * g : 4 * g + 4] = False
    un = MCMCUnlearner(model, None, nll=gauss, log_prior=_prior, bank=bank.clone())
    report = un.propose((x[4 * g : 4 * g + 4], y[4 * g : 4 * g + 4]), (x[keep], y[keep]))
    assert report.report.info["forward_row_gap"] > FORWARD_ROWS_REFUSE
    assert report.report.info["forward_row_gap_float64"] < 1e-6

    def centred(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        r = m(b[0]).squeeze(1) - b[1]
        return 0.5 * (r - r.mean()) ** 2

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for nll, said in [(centred, "evaluated in float64 too"), (lambda m, b: gauss(m, b) / len(b[1]), "batch size")]:
        given = bank.clone()
        un = MCMCUnlearner(model, None, nll=nll, log_prior=_prior, bank=given)
        with pytest.raises(ValueError, match="depends on the other rows of its batch") as info:
            un._check_forward((x[4 * g : 4 * g + 4], y[4 * g : 4 * g + 4]))
        assert said in str(info.value) and "standardise" not in str(info.value) and not un._forward_checked
        assert torch.equal(given, bank)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("cast", ["inputs", "output"])
def test_a_model_that_cannot_run_in_float64_keeps_the_float32_verdict(cast: str) -> None:
    """A forward that casts its input to float32 (float64 weights then fail) or an nll that returns float32 values
    cannot tell rounding from a row reading its batch in float64: the float32 verdict stands (refused above
    ``FORWARD_ROWS_REFUSE``), and the message says the float64 test could not run and why; nothing changed."""
    from mcmc_unlearner.unlearner import FORWARD_ROWS_REFUSE

    model, bank, x, y, gauss = _large_regression(1e6, cast)
    un = MCMCUnlearner(model, None, nll=gauss, log_prior=_prior, bank=bank.clone())
    g = next(
        g
        for g in range(50)
        if un._row_check((x[4 * g : 4 * g + 4], y[4 * g : 4 * g + 4]), bank[0], 0.0)[0] > FORWARD_ROWS_REFUSE
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="depends on the other rows of its batch") as info:
        un._check_forward((x[4 * g : 4 * g + 4], y[4 * g : 4 * g + 4]))
    said = str(info.value)
    assert "standardise the targets" in said and "the float64 re-evaluation failed" in said
    assert ("float32 values" in said) == (cast == "output") and not un._forward_checked
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_division_by_the_batch_size_on_large_well_fitted_targets_is_refused_after_the_float64_test() -> None:
    """Stop 57's review: |y| ~ 1e6 fitted to ~5e-3 nats (float64 targets), ``nll / len(batch)``: the float32 gap is
    above ``FORWARD_ROWS_REFUSE`` without the pattern (rounding hides it), so the float64 test runs; there a row's
    value, a difference of numbers ~1e6, rounds to ~1e-9 of itself, which a float64-sized pattern tolerance (2.2e-13)
    missed, and a gap under 1e-2 was accepted (1 of 19 such requests). The pattern keeps the first test's
    tolerance: every one is refused naming the division by the batch size."""
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.unlearner import FORWARD_ROWS_REFUSE

    model, bank, x, _, _ = _large_regression(1e6)
    live = ParamSpec.flatten_module(model).clone()
    with torch.no_grad():
        ParamSpec.assign(model, bank[0])
        pred = torch.func.functional_call(model.double(), {}, (x.double(),)).squeeze(1)
        model.float()
        ParamSpec.assign(model, live)
    y = pred + 0.1 * torch.randn(400, dtype=torch.float64)  # well fitted; (pred - y) promotes to float64

    def over_batch(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return 0.5 * (m(b[0]).squeeze(1) - b[1]) ** 2 / len(b[1])

    tol = 1e3 * torch.finfo(torch.float32).eps
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = 0
    for g in range(100):
        r = slice(4 * g, 4 * g + 4)
        un = MCMCUnlearner(model, None, nll=over_batch, log_prior=_prior, bank=bank.clone())
        gap, pattern = un._row_check((x[r], y[r]), bank[0].clone(), tol)
        if gap <= FORWARD_ROWS_REFUSE or pattern:
            continue
        seen += 1
        with pytest.raises(ValueError, match="batch size times its value in the batch"):
            un._check_forward((x[r], y[r]))
        assert not un._forward_checked
    assert seen >= 5  # the case this test is about shows here
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
