"""K-FAC of a language model's head: ``nll`` a cross-entropy at every position (labels ``[B, L]``, logits
``[B, L, V]``) was not read as a categorical likelihood, so K-FAC took the empirical Fisher (and warned); on a tiny
tied-output LM fitting its labels, ``xᵀKx`` was 0.46 (median relative error) from the dense float64 GGN's, now 0.10
(stop 59)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature, positions_fit

V, D_MODEL, L, B = 11, 8, 5, 256


class _LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D_MODEL)
        self.mix = nn.Linear(D_MODEL, D_MODEL)
        self.head = nn.Linear(D_MODEL, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _sum_nll(m: nn.Module, b: tuple) -> torch.Tensor:
    logits = m(b[0])
    return F.cross_entropy(logits.reshape(-1, V), b[1].reshape(-1), reduction="none").reshape(b[1].shape).sum(1)


def _mean_nll(m: nn.Module, b: tuple) -> torch.Tensor:
    return _sum_nll(m, b) / b[1].shape[1]


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _LM()
    with torch.no_grad():
        model.head.weight.mul_(6.0)
        x = torch.randint(V, (B, L))
        y = model(x).argmax(-1)  # labels the model fits (as after training): the empirical Fisher is far off
    return model, x, y


def _dense_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Σ_rows Σ_positions Jᵀ (diag p − ppᵀ) J`` in float64."""
    m64 = _LM().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [n for n, _ in m64.named_parameters()]
    shapes = {n: p.shape for n, p in m64.named_parameters()}
    flat = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def logits(v: torch.Tensor) -> torch.Tensor:
        params, o = {}, 0
        for n in names:
            k = shapes[n].numel()
            params[n] = v[o : o + k].view(shapes[n])
            o += k
        return torch.func.functional_call(m64, params, (x,))

    J = torch.autograd.functional.jacobian(logits, flat).reshape(B * L, V, -1)
    p = torch.softmax(logits(flat).reshape(B * L, V), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nvd,nvw,nwe->de", J, H, J)


def _build(
    model: nn.Module, theta: torch.Tensor, batch: list, nll, likelihood: str = "auto", mc_samples: int = 64
) -> KroneckerCurvature:
    """K-FAC of ``model`` at the draws ``theta`` on the one minibatch ``batch`` (all ``B`` rows), no prior, the
    output sketch's generator seeded 0."""
    return KroneckerCurvature.build(
        model,
        theta,
        batch,
        B,
        nll=nll,
        log_prior=None,
        likelihood=likelihood,
        mc_samples=mc_samples,
        generator=torch.Generator().manual_seed(0),
    )


def _median_error(k: KroneckerCurvature, G: torch.Tensor, scale: float = 1.0) -> float:
    gen = torch.Generator().manual_seed(1)
    errs = []
    for _ in range(21):
        v = torch.randn(G.shape[0], generator=gen, dtype=torch.float64)
        want = float(v @ G @ v) * scale
        errs.append(abs(float(v.float() @ (k @ v.float())) - want) / want)
    return sorted(errs)[10]


@pytest.mark.parametrize("mc_samples", [64, 8])  # 64 >= L·V: exact; 8: sampled per position
def test_kfac_reads_a_per_position_cross_entropy_as_categorical(mc_samples: int) -> None:
    """``likelihood="auto"`` finds the categorical likelihood of a per-position cross-entropy (no fallback) and its
    ``xᵀKx`` is within 0.2 of the dense GGN's (median over 21 directions), where the empirical Fisher's is 0.46
    off: exact output Hessians (``mc_samples ≥ L·V``) or sampled per position."""
    model, x, y = _problem()
    theta = ParamSpec.flatten_module(model)[None]
    G = _dense_ggn(model, x)
    errors = {}
    for lik in ("auto", "empirical"):
        k = _build(model, theta, [(x, y)], _sum_nll, likelihood=lik, mc_samples=mc_samples)
        errors[lik] = _median_error(k, G)
        if lik == "auto":
            assert k.info["likelihood"] == "categorical", k.info
            assert not k.info.get("likelihood_fallback"), k.info
    assert errors["auto"] < 0.2, errors
    assert errors["empirical"] > 2 * errors["auto"], errors


def test_kfac_per_position_mean_is_a_scaled_categorical() -> None:
    """A mean over positions is the categorical likelihood scaled by ``1/L`` (and the curvature with it); a loss at
    the last position alone is no per-position cross-entropy."""
    model, x, y = _problem()
    assert positions_fit(model, _sum_nll, (x, y)) == {"positions": L}
    assert positions_fit(model, _mean_nll, (x, y)) == {"positions": L, "scale": 1.0 / L}

    def last(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0])[:, -1], b[1][:, -1], reduction="none")

    assert positions_fit(model, last, (x, y)) is None
    theta = ParamSpec.flatten_module(model)[None]
    k = _build(model, theta, [(x, y)], _mean_nll)
    assert k.info["likelihood"] == "categorical", k.info
    assert _median_error(k, _dense_ggn(model, x), scale=1.0 / L) < 0.2


def test_padded_positions_past_the_probe_rows_are_not_read_as_categorical() -> None:
    """Labels ``-100`` (padding, skipped by the cross-entropy) only past the first rows, which the detection probes:
    the per-position Fisher counted every position (the curvature of the unpadded labels, to the bit, with 39% of the
    positions padded); now K-FAC takes the empirical Fisher, which reads nll, and says why."""
    model, x, y = _problem()
    padded = y.clone()
    padded[8:, 3:] = -100
    assert positions_fit(model, _sum_nll, (x, padded)) == {"positions": L}  # the probe rows hold no padding
    theta = ParamSpec.flatten_module(model)[None]
    k = _build(model, theta, [(x, padded)], _sum_nll)
    assert k.info["likelihood"] == "empirical", k.info
    assert "ignore_index" in k.info["likelihood_reason"], k.info


def test_a_per_row_weight_field_is_read_with_the_positions() -> None:
    """A per-row weight field on the per-position cross-entropy (DistributedUnlearner's ``nll`` is ``w·h``, ``w =
    1/|B_global|``) was not read (the empirical Fisher); now it is the weighted categorical likelihood, the
    curvature of the unweighted one times ``w`` (the same draws)."""
    model, x, y = _problem()
    w = torch.full((B,), 1.0 / 7)

    def weighted(m: nn.Module, b: tuple) -> torch.Tensor:
        return _sum_nll(m, b[:2]) * b[2]

    assert positions_fit(model, weighted, (x, y, w)) == {"positions": L, "weights": 2}
    assert positions_fit(model, lambda m, b: _sum_nll(m, b[:2]), (x, y, w)) == {"positions": L}
    theta = ParamSpec.flatten_module(model)[None]
    quads = []
    for nll in (weighted, lambda m, b: _sum_nll(m, b[:2])):
        k = _build(model, theta, [(x, y, w)], nll, mc_samples=8)
        assert k.info["likelihood"] == "categorical", k.info
        v = torch.randn(theta.shape[1], generator=torch.Generator().manual_seed(1))
        quads.append(float(v @ (k @ v)))
    assert quads[0] == pytest.approx(quads[1] / 7, rel=1e-4), quads


def test_a_per_position_mask_field_is_not_read_as_categorical() -> None:
    """``nll`` keeps the positions a ``[B, L]`` mask field marks (padding), all kept on the probe rows: it read as
    the per-position cross-entropy and K-FAC counted the masked positions (the curvature of the unmasked batch, to
    the bit); now a per-position field that ``nll`` reads is not read as categorical (the empirical Fisher)."""
    model, x, y = _problem()

    def masked(m: nn.Module, b: tuple) -> torch.Tensor:
        ce = F.cross_entropy(m(b[0]).reshape(-1, V), b[1].reshape(-1), reduction="none").reshape(b[1].shape)
        return (ce * b[2]).sum(1)

    mask = torch.ones(B, L)
    mask[8:, 3:] = 0
    assert positions_fit(model, masked, (x, y, mask)) is None
    assert positions_fit(model, masked, (x, y, mask.bool())) is None
    unread = torch.zeros(B, L, dtype=torch.long)  # a per-position field nll does not read: still categorical
    assert positions_fit(model, lambda m, b: _sum_nll(m, b[:2]), (x, y, unread)) == {"positions": L}
    theta = ParamSpec.flatten_module(model)[None]
    k = _build(model, theta, [(x, y, mask)], masked)
    assert k.info["likelihood"] == "empirical", k.info


def test_an_explicit_categorical_likelihood_reads_the_positions_as_auto_does() -> None:
    """``likelihood="categorical"`` given explicitly took the curvature of a sum over every position: a mean over
    positions ``L`` (5) times too large (median relative error 3.87 off the dense GGN), and padded positions (label
    ``-100``) counted (the curvature of the unpadded labels, to the bit). Now it reads the positions as
    ``likelihood="auto"`` does (the same curvature, to the bit) and refuses padded labels and an nll it cannot read
    (a mask field), saying so; without ``nll`` it is the sum."""
    model, x, y = _problem()
    theta = ParamSpec.flatten_module(model)[None]
    G = _dense_ggn(model, x)
    v = torch.randn(theta.shape[1], generator=torch.Generator().manual_seed(1))

    def build(nll: object, likelihood: str, labels: torch.Tensor, *extra: torch.Tensor) -> KroneckerCurvature:
        return _build(model, theta, [(x, labels, *extra)], nll, likelihood=likelihood)

    for nll, scale in ((_sum_nll, 1.0), (_mean_nll, 1.0 / L)):
        auto, explicit = build(nll, "auto", y), build(nll, "categorical", y)
        assert explicit.info["likelihood"] == "categorical", explicit.info
        assert explicit.info["likelihood_detected"] == auto.info["likelihood_detected"], explicit.info
        assert float(v @ (explicit @ v)) == float(v @ (auto @ v))
        assert _median_error(explicit, G, scale) < 0.2
    plain = build(None, "categorical", y)
    assert float(v @ (plain @ v)) == float(v @ (build(_sum_nll, "categorical", y) @ v))
    padded = y.clone()
    padded[8:, 3:] = -100
    for nll in (_sum_nll, None):
        with pytest.raises(ValueError, match=r"labels are negative \(ignore_index positions.*Fix: give minibatches"):
            build(nll, "categorical", padded)
    mask = torch.ones(B, L)
    mask[8:, 3:] = 0

    def masked(m: nn.Module, b: tuple) -> torch.Tensor:
        ce = F.cross_entropy(m(b[0]).reshape(-1, V), b[1].reshape(-1), reduction="none").reshape(b[1].shape)
        return (ce * b[2]).sum(1)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="nll is not read as the cross-entropy at every position"):
        build(masked, "categorical", y, mask)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_ranks_agree_on_an_explicit_categorical_reading() -> None:
    """A rank whose rows hold padding refuses ``likelihood="categorical"``; the other ranks, told through ``reduce``,
    refuse too (none waits in a collective the refusing rank never reaches)."""
    model, x, y = _problem()
    theta = ParamSpec.flatten_module(model)[None]
    sent: list[torch.Tensor] = []

    def other_rank_refused(t: torch.Tensor) -> torch.Tensor:
        sent.append(t.clone())
        return t + torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=t.dtype) if len(sent) == 1 else t

    with pytest.raises(ValueError, match="another rank's rows cannot be read"):
        KroneckerCurvature.build(
            model, theta, [(x, y)], B, nll=_sum_nll, log_prior=None, likelihood="categorical", reduce=other_rank_refused
        )
    assert sent[0].tolist() == [0.0, 0.0, 1.0, 0.0]  # (the fourth: this rank's rows contradict the likelihood)


def test_a_label_smoothed_per_position_cross_entropy_is_read_as_categorical() -> None:
    """``cross_entropy(..., label_smoothing=ε)`` at every position has the plain cross-entropy's output Hessian, so
    its curvature is the plain one's (times ``1/L`` for a mean). An explicit ``likelihood="categorical"`` took it
    right for a sum until stop 60, which refused it ("nll is not read as the cross-entropy at every position") and
    ``"auto"`` took the empirical Fisher; now both read it (``ε`` fitted), the plain curvature to the bit. A
    temperature or a constant factor (another output Hessian) is still not read."""
    model, x, y = _problem()
    theta = ParamSpec.flatten_module(model)[None]
    G = _dense_ggn(model, x)
    v = torch.randn(theta.shape[1], generator=torch.Generator().manual_seed(1))

    def build(nll: object, likelihood: str) -> KroneckerCurvature:
        return _build(model, theta, [(x, y)], nll, likelihood=likelihood)

    def smoothed(over: int) -> object:
        def nll(m: nn.Module, b: tuple) -> torch.Tensor:
            out = m(b[0]).reshape(-1, V)
            ce = F.cross_entropy(out, b[1].reshape(-1), reduction="none", label_smoothing=0.1)
            return ce.reshape(b[1].shape).sum(1) / over

        return nll

    for over, plain, scale in ((1, _sum_nll, 1.0), (L, _mean_nll, 1.0 / L)):
        found = positions_fit(model, smoothed(over), (x, y))
        assert found is not None and found.pop("label_smoothing") == pytest.approx(0.1, abs=1e-5), found
        assert found == positions_fit(model, plain, (x, y))
        want = float(v @ (build(plain, "categorical") @ v))
        for likelihood in ("auto", "categorical"):
            k = build(smoothed(over), likelihood)
            assert k.info["likelihood"] == "categorical", k.info
            assert float(v @ (k @ v)) == want
            assert _median_error(k, G, scale) < 0.2

    def tempered(m: nn.Module, b: tuple) -> torch.Tensor:
        ce = F.cross_entropy(m(b[0]).reshape(-1, V) / 2.0, b[1].reshape(-1), reduction="none")
        return ce.reshape(b[1].shape).sum(1)

    def doubled(m: nn.Module, b: tuple) -> torch.Tensor:
        return 2.0 * _sum_nll(m, b)

    for nll in (doubled, lambda m, b: _sum_nll(m, b) / 2.0):
        assert positions_fit(model, nll, (x, y)) is None
        with pytest.raises(ValueError, match="nll is not read as the cross-entropy at every position"):
            build(nll, "categorical")
    assert positions_fit(model, tempered, (x, y)) is None
