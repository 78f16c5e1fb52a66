"""K-FAC factors a Linear/Conv layer from its forward hooks, which see the module's calls only: a weight also read
outside its module (a tied autoencoder's decoder ``F.linear(h, enc.weight.t())``) was factored from the encoder's
use alone (stop 54's probe: undamped trial predicted -1.0e4, measured +1.6e8, damping at its cap, nothing said why).
The build now counts, structurally, how often the first forward's autograd graph reads each factored layer's
parameters against the module calls its hook saw; a layer read more often goes to the diagonal block, its reason
naming the layer and "read outside its module". Ordinary networks keep every block they had."""

import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature, Likelihood, _graph_uses

torch.set_num_threads(1)


class TiedAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.dec_b = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_b)


class Autocast(nn.Module):
    """``inner`` under CPU bf16 autocast (which casts a leaf weight once and reuses the cast)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x).float()


class Recurrent(nn.Module):
    """One Linear called three times: three reads, three calls, still factored."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h))
        return self.out(h)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x.view(x.shape[0], 2, 3))
        h = self.ln(h + self.mha(h, h, h)[0])
        return self.out(h.mean(1))


class SwappedDecoder(nn.Module):
    """The decoder is a module run by ``torch.func.functional_call`` with the encoder's weight transposed: the
    decoder's own hook sees other tensors (left to the diagonal as before), the encoder's weight is read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 4), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        return torch.func.functional_call(self.dec, {"weight": self.enc.weight.t(), "bias": self.dec.bias}, (h,))


def _mse(m: nn.Module, b: tuple) -> torch.Tensor:
    return 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1)


def _ce(m: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _build(model: nn.Module, x: torch.Tensor, nll, **kw) -> KroneckerCurvature:
    torch.manual_seed(1)
    y = torch.randint(0, 3, (x.shape[0],))
    theta = ParamSpec.flatten_module(model).detach()
    thetas = theta[None] + 0.05 * torch.randn(3, theta.numel())
    return KroneckerCurvature.build(model, thetas, [(x, y)], n=100, nll=nll, log_prior=_prior, **kw)


def test_a_tied_autoencoders_encoder_read_by_its_decoder_goes_to_the_diagonal_with_the_reason() -> None:
    torch.manual_seed(0)
    K = _build(TiedAE(), torch.randn(32, 6), _mse)
    assert K.info["kronecker"] == {}  # main: {"enc": ...}, the block built from the encoder's call alone
    assert K.info["read_outside_module"] == ["enc"]
    for p in ("enc.weight", "enc.bias"):
        why = K.info["diagonal"][p]
        assert "Linear 'enc'" in why and "read outside its module" in why, why
        assert "reads its parameters 2 times, its module was called 1" in why, why
    assert set(K.info["diagonal"]) == {"enc.weight", "enc.bias", "dec_b"}


def test_the_reuse_is_found_under_bf16_autocast_and_through_a_functional_call() -> None:
    torch.manual_seed(0)
    K = _build(Autocast(TiedAE()), torch.randn(32, 6), _mse)
    assert K.info["read_outside_module"] == ["inner.enc"]
    torch.manual_seed(0)
    K = _build(SwappedDecoder(), torch.randn(32, 6), _mse)
    assert K.info["read_outside_module"] == ["enc"]
    assert "read outside its module" in K.info["diagonal"]["enc.weight"]
    assert "functional_call" in K.info["diagonal"]["dec.weight"]  # the decoder's own reason, as before


def test_ordinary_networks_keep_every_block_and_nothing_is_called_read_outside() -> None:
    torch.manual_seed(0)
    cases = [
        (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (6,), {"0", "2"}),
        (
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
                nn.Flatten(),
                nn.Linear(4 * 36, 3),
            ),
            (1, 6, 6),
            {"0", "2", "4"},
        ),
        (nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval(), (6,), {"0", "3"}),
        (nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)), (6,), {"0", "3"}),
        (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), (1, 6), {"0", "3"}),
        (Recurrent(), (6,), {"inp", "cell", "out"}),
        (Autocast(Recurrent()), (6,), {"inner.inp", "inner.cell", "inner.out"}),
        (Autocast(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))), (6,), {"inner.0", "inner.2"}),
        (Attention(), (6,), {"emb", "out"}),  # out_proj runs through F.linear inside MHA: diagonal, as before
    ]
    for model, shape, blocks in cases:
        K = _build(model, torch.randn(32, *shape), _ce)
        assert set(K.info["kronecker"]) == blocks, (type(model).__name__, sorted(K.info["kronecker"]))
        assert "read_outside_module" not in K.info
        assert not any("read outside" in why for why in K.info["diagonal"].values())
    assert "forward hook did not fire" in K.info["diagonal"]["mha.out_proj.weight"]


def test_graph_uses_counts_calls_through_views_and_a_shared_autocast_cast() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    params = dict(lin.named_parameters())
    x = torch.randn(5, 4)
    assert _graph_uses(lin(lin(lin(x))).sum(), params) == {"weight": 3, "bias": 3}
    assert _graph_uses(lin(x.view(5, 1, 4)).sum(), params) == {"weight": 1, "bias": 1}  # a 3-D input (views)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one cached cast read by both calls counts twice
        out = F.linear(lin(x), lin.weight.t())
    assert _graph_uses(out.float().sum(), params) == {"weight": 2, "bias": 1}
    assert _graph_uses(lin(x).detach().sum(), params) == {"weight": 0, "bias": 0}  # no graph: no reads


def test_ranks_agree_when_another_rank_found_the_reuse() -> None:
    """Under ``reduce`` the flags are summed over ranks first: a layer another rank flagged leaves this rank's
    blocks too (every rank the same blocks, so their later all-reduces match)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    voted: list[torch.Tensor] = []
    agreed: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def other_rank_flags_layer_2(t: torch.Tensor) -> torch.Tensor:
        if not voted:  # the very first reduce: the likelihood this rank's rows identify (one flag per Likelihood)
            voted.append(t.clone())
            return t
        if not agreed:  # the first reduce (stop 58): two flags per candidate layer, on a shared code and called
            agreed.append(t.clone())
            return t
        if not seen:  # then: one flag per factored layer read outside its module
            seen.append(t.clone())
            return t + torch.tensor([0.0, 1.0], dtype=t.dtype)
        return t

    K = _build(model, torch.randn(32, 6), _ce, reduce=other_rank_flags_layer_2)
    assert voted[0].tolist() == [float(k is Likelihood.CATEGORICAL) for k in Likelihood]
    assert agreed[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # no layer on a shared code, both called
    assert seen[0].tolist() == [0.0, 0.0]  # nothing read outside on this rank
    assert set(K.info["kronecker"]) == {"0"}
    assert "another rank" in K.info["diagonal"]["2.weight"]


def test_a_request_on_a_tied_autoencoder_warns_once_naming_the_layer_and_solver_cg() -> None:
    import warnings

    from mcmc_unlearner import MCMCUnlearner

    torch.manual_seed(0)
    model = TiedAE()
    x, y = torch.rand(80, 6), torch.zeros(80, dtype=torch.long)
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.01 * torch.randn(8, theta.numel())
    un = MCMCUnlearner(model, None, nll=_mse, log_prior=_prior, bank=bank, solver="kfac")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.remove((x[:5], y[:5]), (x[5:], y[5:]), strict=False)
    said = [str(w.message) for w in caught if "read outside their modules" in str(w.message)]
    assert len(said) == 1 and "'enc'" in said[0] and "solver='cg'" in said[0], said
    assert report.info["kfac"]["read_outside_module"] == ["enc"]
    assert "read outside its module" in report.info["kfac"]["diagonal"]["enc.weight"]


def _auto(model: nn.Module, **kw):
    from mcmc_unlearner import MCMCUnlearner

    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.01 * torch.randn(8, theta.numel())
    return MCMCUnlearner(model, None, nll=_mse, log_prior=_prior, bank=bank, exact_max_dim=10, **kw)


def test_solver_auto_takes_cg_for_a_weight_read_outside_its_module_on_the_first_request() -> None:
    """Measured on a tied autoencoder on digits (docs/curvature.md): K-FAC 0.01-0.04 of the way to retraining,
    CG 0.27-0.63: auto takes CG, with CG's defaults, where the first request's rows show such a read."""
    torch.manual_seed(0)
    x, y = torch.rand(80, 6), torch.zeros(80, dtype=torch.long)
    un = _auto(TiedAE())
    assert un.solver.value == "kfac" and un.recenter_every > 0  # at construction: no rows seen yet
    report = un.remove((x[:5], y[:5]), (x[5:], y[5:]), strict=False)
    assert report.solver == "cg" and un.solver.value == "cg"
    assert "'enc'" in un.solver_reason and "read outside their modules" in un.solver_reason
    assert report.info["solver_reason"] == un.solver_reason
    assert (un.curvature_draws, un.refresh_every, un.precondition_rank, un.recenter_every) == (16, 10, 20, 0)


def test_solver_auto_keeps_kfac_for_an_ordinary_network_and_for_kfac_options_given() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(80, 6), torch.zeros(80, dtype=torch.long)
    un = _auto(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)))
    report = un.remove((x[:5], y[:5]), (x[5:], y[5:]), strict=False)
    assert report.solver == "kfac" and un.solver.value == "kfac"
    un = _auto(TiedAE(), mc_samples=2)  # an option given for K-FAC: kept (the request warns, naming cg)
    report = un.remove((x[:5], y[:5]), (x[5:], y[5:]), strict=False)
    assert report.solver == "kfac"


def test_fit_probes_first_and_builds_nothing_ahead_for_cg() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.rand(80, 6), torch.zeros(80, dtype=torch.long)
    un = _auto(TiedAE())
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(x[5:], y[5:]), batch_size=16, shuffle=True, generator=gen)
    fit = un.fit(data)
    assert fit.solver == "cg" and not fit.curvature_kept
    assert un.remove((x[:5], y[:5]), data, strict=False).solver == "cg"
