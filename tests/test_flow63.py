"""Usage flows stop 63's flows probe found mishandled (a user's own networks, many calls on one unlearner).

*A model switched to training mode between calls.* The unlearner refuses a model in training mode with active dropout
(or batch statistics) when it is built, but a user continuing the chain (``model.train()``) and sending the next
request without ``model.eval()`` had every pass of that request drop units at random: random rows were accepted with
``problems=[]``, and a class's last rows were refused blaming the ``nll``'s form. Each request and ``fit()`` now check
the mode again, naming the layers and ``model.eval()``.

*A model converted or frozen between calls* (``model.float()``, ``requires_grad_(False)`` on a layer) crashed the
next request with torch's "mat1 and mat2 must have the same dtype" or "split_with_sizes expects split_sizes to sum
exactly to ...": the samples and state are in the old dtype and layout. It is refused naming what changed and the way
back.

*An edited or damaged checkpoint* (``curvature_state()`` saved by the user, then ``load_curvature_state``) was loaded
with NaN in the carried influence (every later request refused, "the shifted parameters are not finite"), with K-FAC
factors of other shapes (torch's "mat1 and mat2 shapes cannot be multiplied" at the next request), with a factor's
eigenbasis missing (used as a diagonal), with part of the corrections' anchor (dropped without a word), a negative
eigenvalue or a NaN damping; a missing factor or a damping state of the wrong type raised a bare ``KeyError`` or
``AttributeError``. Each is refused at the load, naming the entry, with nothing loaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import InvalidRequestError
from test_probe62_inputs import chain  # noqa: F401 (a fixture)


def _with_dropout(chain: tuple) -> tuple:  # noqa: F811
    """The softmax regression behind a Dropout layer (eval mode: the same likelihood), its bank renamed to match."""
    model, nll, log_prior, bank, removed, remaining = chain
    net = nn.Sequential(nn.Dropout(0.3), copy.deepcopy(model)).eval()
    return net, nll, log_prior, [{f"1.{k}": v.clone() for k, v in s.items()} for s in bank], removed, remaining


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(s[k], t[k]) for s, t in zip(a, b) for k in s)


def _split(removed: tuple, remaining: tuple) -> tuple:
    """Two requests: the first five removed rows, then the other five (the remaining rows as the second sees them)."""
    (xr, yr), (xk, yk) = removed, remaining
    first, second = (xr[:5], yr[:5]), (xr[5:], yr[5:])
    return first, (torch.cat([xr[5:], xk]), torch.cat([yr[5:], yk])), second, remaining


def test_a_model_switched_to_training_mode_between_requests_is_refused(chain: tuple) -> None:  # noqa: F811
    net, nll, log_prior, bank, removed, remaining = _with_dropout(chain)
    first, after_first, second, after_second = _split(removed, remaining)
    ref = MCMCUnlearner(copy.deepcopy(net), nll=nll, log_prior=log_prior, bank=bank, seed=0)
    ref.remove(first, after_first)
    ref.remove(second, after_second)

    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.remove(first, after_first)
    kept = un.samples()
    net.train()  # the user continued the chain and forgot model.eval()
    said = r"propose\(\): the model is in training mode with Dropout.*model\.eval"
    with pytest.raises(InvalidRequestError, match=said):
        un.remove(second, after_second)
    assert net.training and _same(kept, un.samples())
    net.eval()
    un.remove(second, after_second)
    assert _same(ref.samples(), un.samples())  # the refusal changed nothing the next request reads


def test_fit_on_a_model_switched_to_training_mode_is_refused(chain: tuple) -> None:  # noqa: F811
    net, nll, log_prior, bank, _, remaining = _with_dropout(chain)
    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    net.train()
    with pytest.raises(InvalidRequestError, match=r"fit\(\): the model is in training mode with Dropout.*model\.eval"):
        un.fit(remaining)
    tensors, _ = un.curvature_state()
    assert not any(k.startswith("kfac/") for k in tensors)  # nothing built


def _one_request_in(chain: tuple) -> tuple:  # noqa: F811
    """A reference unlearner that ran both of :func:`_split`'s requests, and one on a copy of the model that ran the
    first: ``(ref, net, un, second, after_second)``."""
    model, nll, log_prior, bank, removed, remaining = chain
    first, after_first, second, after_second = _split(removed, remaining)
    ref = MCMCUnlearner(copy.deepcopy(model), nll=nll, log_prior=log_prior, bank=bank, seed=0)
    ref.remove(first, after_first)
    ref.remove(second, after_second)
    net = copy.deepcopy(model)
    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.remove(first, after_first)
    return ref, net, un, second, after_second


@pytest.mark.parametrize(
    ("change", "undo", "said"),
    [
        (lambda m: m.float(), lambda m: m.double(), r"parameters are float32, but .* float64 model.*model\.double\(\)"),
        (  # one parameter converted: failed inside nll, blaming the removed rows
            lambda m: setattr(m.bias, "data", m.bias.data.float()),
            lambda m: setattr(m.bias, "data", m.bias.data.double()),
            r"parameters are float32 \(bias\), but .* float64 model",
        ),
        (
            lambda m: m.bias.requires_grad_(False),
            lambda m: m.bias.requires_grad_(True),
            r"trainable parameters changed .*no longer trainable or gone: bias.*requires_grad_\(True\)",
        ),
    ],
    ids=["float", "one parameter float", "frozen"],
)
def test_a_model_converted_or_frozen_between_requests_is_refused(chain: tuple, change, undo, said: str) -> None:  # noqa: F811
    ref, net, un, second, after_second = _one_request_in(chain)
    kept = un.samples()
    change(net)
    with pytest.raises(InvalidRequestError, match=f"propose\\(\\): .*{said}.*nothing was changed"):
        un.remove(second, after_second)
    with pytest.raises(InvalidRequestError, match=f"fit\\(\\): .*{said}"):
        un.fit(after_second)
    assert _same(kept, un.samples())
    undo(net)
    un.remove(second, after_second)
    assert _same(ref.samples(), un.samples())


def test_a_model_moved_to_another_device_between_requests_is_refused(chain: tuple) -> None:  # noqa: F811
    """A model moved since the unlearner was built (here to ``meta``, the device torch has on every machine) failed
    inside ``nll`` ("Tensor on device meta is not on the expected device cpu!"); each request, ``forget()`` and
    ``fit()`` now refuse it before any work, naming both devices."""
    ref, net, un, second, after_second = _one_request_in(chain)
    _, _, _, _, removed, remaining = chain
    kept, weights, drawn = un.samples(), copy.deepcopy(net.state_dict()), un.generator.get_state()
    data = RemovableDataset(torch.cat([removed[0], remaining[0]]), torch.cat([removed[1], remaining[1]]), batch_size=40)
    index = copy.deepcopy(data.state_dict())
    net.to("meta")
    said = r"the model's parameters are on meta, but the unlearner was built with them on cpu .*"
    said += r"model\.to\('cpu'\) moves it back"
    with pytest.raises(InvalidRequestError, match=f"^propose\\(\\): {said}.*nothing was changed"):
        un.remove(second, after_second)
    with pytest.raises(InvalidRequestError, match=f"^forget\\(\\): {said}"):
        un.forget([5, 6], data)
    with pytest.raises(InvalidRequestError, match=f"^fit\\(\\): {said}"):
        un.fit(after_second)
    assert _same(kept, un.samples()) and torch.equal(un.generator.get_state(), drawn)
    assert all(torch.equal(a, b) for a, b in zip(data.state_dict().values(), index.values()) if torch.is_tensor(a))
    assert data.state_dict().keys() == index.keys() and len(data) == 200
    net.to_empty(device="cpu").load_state_dict(weights)
    un.remove(second, after_second)
    assert _same(ref.samples(), un.samples())


def test_a_model_built_on_several_devices_is_told_to_move_each_parameter_back() -> None:
    """A model whose parameters were on several devices when the unlearner was built (here ``cpu`` and ``meta``),
    then moved to one: the refusal advised ``model.to('cpu')``, which moves the parameters built on ``meta`` too. It
    names each moved parameter's own device; moved back so, the model is accepted."""
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    net[1].to("meta")
    un = MCMCUnlearner(net, nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), solver="cg")
    weights = copy.deepcopy(net[0].state_dict())
    net.to("meta")
    said = r"on meta \(0\.weight, 0\.bias\), but .* built with them on cpu .*its parameters were on cpu/meta: move "
    said += r"each back to its own device, 0\.weight to cpu, 0\.bias to cpu; model\.to\(\) puts every one on one device"
    with pytest.raises(InvalidRequestError, match=f"^propose\\(\\): the model's parameters are {said}") as refused:
        un._check_model_unchanged("propose()")
    assert "model.to('cpu') moves it back" not in str(refused.value)
    net[0].to_empty(device="cpu").load_state_dict(weights)
    un._check_model_unchanged("propose()")  # as built: accepted


@pytest.mark.parametrize("change", ["to meta", "float"])
def test_apply_refuses_a_model_moved_or_converted_since_propose(chain: tuple, change: str) -> None:  # noqa: F811
    """A proposal applied to a model moved since ``propose()`` failed inside ``apply()`` with torch's "aten::equal:
    attempted to run this operator with Meta tensors"; one converted was refused as "stale" (float64 -> float32
    rounds its values) or, converted without rounding (a float32 model's ``.double()``), committed into it.
    ``apply()`` refuses both as ``propose()`` does, nothing changed; put back, the proposal applies."""
    ref, net, un, second, after_second = _one_request_in(chain)
    kept, weights, drawn, version = un.samples(), copy.deepcopy(net.state_dict()), un.generator.get_state(), un._version
    prop = un.propose(second, after_second)
    net.to("meta") if change == "to meta" else net.float()
    said = "are on meta, but the unlearner was built with them on cpu" if change == "to meta" else "are float32"
    with pytest.raises(InvalidRequestError, match=f"^apply\\(\\): the model's parameters {said}.*nothing was changed"):
        un.apply(prop)
    assert _same(kept, un.samples()) and torch.equal(un.generator.get_state(), drawn) and un._version == version
    if change == "to meta":
        net.to_empty(device="cpu")
    net.double().load_state_dict(weights)
    un.apply(prop)
    assert _same(ref.samples(), un.samples())


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CORRUPT = {
    "nan factor": (
        lambda t, m: ({**t, "kfac/block0.lA": _nan(t["kfac/block0.lA"])}, m),
        r"'kfac/block0\.lA' holds NaN",
    ),
    "nan carry": (
        lambda t, m: ({**t, "carry": torch.full_like(t["kfac/prior"], float("nan"))}, m),
        r"'carry' holds NaN",
    ),
    "factor missing": (
        lambda t, m: ({k: v for k, v in t.items() if k != "kfac/block0.QA"}, m),
        r"lacks 'block0\.QA'",
    ),
    "factor reshaped": (lambda t, m: ({**t, "kfac/block0.lG": t["kfac/block0.lG"][:-1]}, m), r"'block0\.lG' has shape"),
    "negative eigenvalue": (
        lambda t, m: ({**t, "kfac/block0.lA": -1 - t["kfac/block0.lA"]}, m),
        r"'block0\.lA' holds a negative eigenvalue",
    ),
    "part of the anchor": (
        lambda t, m: ({k: v for k, v in t.items() if k != "recenter_pair"}, m),
        r"part of the corrections' anchor .*without recenter_pair",
    ),
    "nan damping": (
        lambda t, m: (t, {**m, "damping_state": {**m["damping_state"], "relatives": {"data": float("nan")}}}),
        r"'damping_state' is",
    ),
    "damping state not a dict": (lambda t, m: (t, {**m, "damping_state": "x"}), r"'damping_state' is 'x'"),
    "count not a count": (
        lambda t, m: (t, {**m, "rows_at_samples": "abc"}),
        r"'rows_at_samples' is 'abc', not a count",
    ),
    "factors without their metadata": (
        lambda t, m: (t, {k: v for k, v in m.items() if k != "kfac"}),
        r"factors \(kfac/\.\.\.\) without their metadata",
    ),
    # the K-FAC metadata from_state_dict reads (a bare KeyError, or its error, after the load had begun)
    "a block's locations missing": (
        lambda t, m: (t, _block0(m, lambda b: {k: v for k, v in b.items() if k != "locations"})),
        r"block 0 metadata lacks .*locations",
    ),
    "a layer of another model": (
        lambda t, m: (t, _block0(m, lambda b: {**b, "weight": "encoder.weight"})),
        r"refers to parameter 'encoder\.weight', which the model lacks",
    ),
    # loaded before (a kind none of the build's; int() truncated a hand-edited 4.5 to the layer's size)
    "a kind no layer has": (
        lambda t, m: (t, _block0(m, lambda b: {**b, "kind": "dense"})),
        r"has kind 'dense', not one of",
    ),
    "a fractional in_dim": (
        lambda t, m: (t, _block0(m, lambda b: {**b, "in_dim": b["in_dim"] + 0.5})),
        r"has in_dim \d+\.5, not a whole positive number",
    ),
    "a textual out_dim": (
        lambda t, m: (t, _block0(m, lambda b: {**b, "out_dim": str(b["out_dim"])})),
        r"has out_dim '\d+', not a whole positive number",
    ),
    "no count of rows": (
        lambda t, m: (t, {**m, "kfac": {k: v for k, v in m["kfac"].items() if k != "n"}}),
        r"metadata lacks its 'n' or 'dim'",
    ),
}


def _block0(meta: dict, edit) -> dict:
    """``meta`` with its first K-FAC block's metadata edited."""
    blocks = meta["kfac"]["blocks"]
    return {**meta, "kfac": {**meta["kfac"], "blocks": [edit(blocks[0]), *blocks[1:]]}}


@pytest.fixture(scope="module")
def checkpoint(chain: tuple) -> tuple:  # noqa: F811
    """A K-FAC state after one request, and the samples the next request gives from it."""
    model, nll, log_prior, bank, removed, remaining = chain
    first, after_first, second, after_second = _split(removed, remaining)
    options = dict(nll=nll, log_prior=log_prior, seed=0, solver="kfac")
    saved = MCMCUnlearner(copy.deepcopy(model), bank=bank, **options)
    saved.remove(first, after_first)
    tensors, meta = saved.curvature_state()
    ref = MCMCUnlearner(copy.deepcopy(model), bank=saved.samples(), **options)
    ref.load_curvature_state(tensors, meta)
    ref.remove(second, after_second)
    return model, options, saved.samples(), tensors, meta, (second, after_second), ref.samples()


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_checkpoint_is_refused_at_the_load_and_nothing_is_loaded(checkpoint: tuple, case: str) -> None:
    model, options, samples, tensors, meta, (second, after_second), expected = checkpoint
    un = MCMCUnlearner(copy.deepcopy(model), bank=samples, **options)
    un.load_curvature_state(tensors, meta)
    edit, said = CORRUPT[case]
    with pytest.raises(ValueError, match=f"load_curvature_state: .*{said}.*nothing was loaded"):
        un.load_curvature_state(*edit(tensors, copy.deepcopy(meta)))
    un.remove(second, after_second)  # as if the refused load had not been tried
    assert _same(expected, un.samples())


def test_a_corrupt_kfac_state_leaves_an_auto_unlearner_on_its_own_solver(checkpoint: tuple) -> None:
    """solver='auto' takes a loaded state's solver (K-FAC) before loading its factors: a state whose K-FAC metadata
    was damaged switched the unlearner from its dense pick to K-FAC, then raised a bare ``KeyError``."""
    model, options, samples, tensors, meta, _, _ = checkpoint
    un = MCMCUnlearner(copy.deepcopy(model), bank=samples, **{**options, "solver": "auto"})
    solver, probe = un.solver, copy.deepcopy(un._dense_probe)
    assert probe is not None  # (the dense pick, its cost not weighed yet: what a K-FAC state settles)
    edit, said = CORRUPT["a block's locations missing"]
    with pytest.raises(ValueError, match=f"load_curvature_state: .*{said}.*nothing was loaded"):
        un.load_curvature_state(*edit(tensors, copy.deepcopy(meta)))
    assert un.solver is solver and un._dense_probe == probe
    un.load_curvature_state(tensors, meta)  # the state as saved: the switch, then the factors
    assert un.solver.value == "kfac"


def test_a_factor_psd_up_to_rounding_is_loaded(checkpoint: tuple) -> None:
    """An eigenvalue negative by rounding is not damage: loaded, and the next request runs as from the same state
    with that eigenvalue 0. The size: torch's eigh of 200 random singular PSD factors 5-600 wide (rank a third) gave
    eigenvalues down to -0.15·n·eps·max|λ| in float32, -0.064 in float64 (stop 63's review); the build clamps its
    own at 0, a factor decomposed elsewhere does not."""
    model, options, samples, tensors, meta, (second, after_second), _ = checkpoint
    lam = tensors["kfac/block0.lA"]
    k = int(lam.argmin())
    rounding = -0.15 * lam.numel() * torch.finfo(lam.dtype).eps * float(lam.abs().max())
    runs = []
    for value in (0.0, rounding):
        edited = lam.clone()
        edited[k] = value
        un = MCMCUnlearner(copy.deepcopy(model), bank=samples, **options)
        un.load_curvature_state({**tensors, "kfac/block0.lA": edited}, meta)
        un.remove(second, after_second)
        runs.append(un.samples())
    assert all(torch.allclose(a[n], b[n], rtol=1e-9, atol=1e-12) for a, b in zip(*runs) for n in a)


def test_a_state_of_another_solver_leaves_auto_s_pending_weighing(checkpoint: tuple) -> None:
    """A state refused as another solver's left solver='auto''s dense pick with its cost never weighed (the
    pending weighing was dropped before the refusal), though nothing was loaded."""
    model, options, samples, tensors, meta, _, _ = checkpoint
    un = MCMCUnlearner(copy.deepcopy(model), bank=samples, **{**options, "solver": "auto"})
    solver, probe = un.solver, copy.deepcopy(un._dense_probe)
    assert probe is not None and solver.value in ("exact", "ggn")
    other = "exact" if solver.value == "ggn" else "ggn"
    with pytest.raises(ValueError, match=f"saved by solver='{other}'.*nothing was loaded"):
        un.load_curvature_state(tensors, {**meta, "solver": other})
    assert un.solver is solver and un._dense_probe == probe


def test_a_fit_s_data_record_of_the_wrong_type_is_refused_before_loading(checkpoint: tuple) -> None:
    model, options, samples, tensors, meta, _, _ = checkpoint
    un = MCMCUnlearner(copy.deepcopy(model), bank=samples, **options)
    with pytest.raises(ValueError, match=r"'fit_data_nll' is \['x', 1\].*nothing was loaded"):
        un.load_curvature_state(tensors, {**meta, "built_by_fit": True, "fit_data_nll": ["x", 1]})
    assert not any(k.startswith("kfac/") for k in un.curvature_state()[0])


@pytest.mark.parametrize(
    "edit",
    [
        lambda t, m: (t, {**m, "precond_c": "x"}),  # float()'s error, after the load had begun
        lambda t, m: ({k: v for k, v in t.items() if k != "precond_lam"}, m),  # a bare KeyError
        lambda t, m: ({**t, "precond_lam": t["precond_lam"][:-1]}, m),  # loaded: the next request's size error
    ],
    ids=["precond_c not a number", "precond_lam missing", "precond_lam short"],
)
def test_a_corrupt_cg_preconditioner_is_refused_at_the_load(chain: tuple, edit) -> None:  # noqa: F811
    model, nll, log_prior, bank, removed, remaining = chain
    first, after_first, second, after_second = _split(removed, remaining)
    options = dict(nll=nll, log_prior=log_prior, seed=0, solver="cg", precondition_rank=3)
    saved = MCMCUnlearner(copy.deepcopy(model), bank=bank, **options)
    saved.remove(first, after_first)
    tensors, meta = saved.curvature_state()
    assert "precond_U" in tensors
    un = MCMCUnlearner(copy.deepcopy(model), bank=saved.samples(), **options)
    with pytest.raises(ValueError, match=r"load_curvature_state: CG's preconditioner does not fit.*nothing was loaded"):
        un.load_curvature_state(*edit(tensors, meta))
    assert not un.curvature_state()[0].keys() & {"precond_U", "carry"}
    un.load_curvature_state(tensors, meta)
    un.remove(second, after_second)
