"""Bring your own samples and data: bank layouts, no writes into the caller's tensors, plain iterators."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from _banks import langevin_bank
from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.bank import to_flat
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.errors import InvalidRequestError


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 3, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5]) > 0).long()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5, generator=g)
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(12, theta.numel(), generator=g)
    return model, x, y, bank


def _nll(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")


def _log_prior(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _layouts(model, bank):
    spec = ParamSpec.of(model)
    rows = [spec.unflatten(r) for r in bank]
    state_dicts = [{k: v.clone() for k, v in r.items()} for r in rows]
    stacked = {name: torch.stack([r[name] for r in rows]).clone() for name in spec.names}
    return {"flat": bank.clone(), "state_dicts": state_dicts, "stacked": stacked, "vectors": list(bank.clone())}


def test_every_bank_layout_gives_the_same_shift_returned_in_its_own_layout() -> None:
    model, x, y, bank = _problem()
    out = {}
    for kind, given in _layouts(model, bank).items():
        keep = {k: v.clone() for k, v in given.items()} if kind == "stacked" else None
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=given)
        un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        out[kind] = un.samples()
        flat_back, _ = to_flat(out[kind], ParamSpec.of(model))
        assert torch.equal(flat_back, un.bank)
        assert type(out[kind]) is type(given)
        if kind == "stacked":  # the caller's tensors are not written
            assert all(torch.equal(keep[k], given[k]) for k in keep)
    ref = out["flat"]
    assert not torch.equal(ref, bank)  # something moved
    assert torch.equal(to_flat(out["state_dicts"], ParamSpec.of(model))[0], ref)
    assert torch.equal(to_flat(out["stacked"], ParamSpec.of(model))[0], ref)
    assert torch.equal(torch.stack(out["vectors"]), ref)  # a list of [D] vectors comes back as one


def test_a_tuple_of_samples_comes_back_as_a_list_as_documented() -> None:
    """A bank given as a tuple (of ``[D]`` vectors or of state_dicts) comes back from ``samples()`` as a list, as the
    layout code returns every sequence of samples; ``samples()``'s docstring said "in the layout they were given in"
    without saying so (a probe's tuple of vectors came back as a list)."""
    model, x, y, bank = _problem()
    layouts = _layouts(model, bank)
    ref = None
    for kind in ("vectors", "state_dicts"):
        given = tuple(layouts[kind])
        before = to_flat(list(given), ParamSpec.of(model))[0]
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=given)
        un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        out = un.samples()
        assert type(out) is list and len(out) == len(given)
        moved = to_flat(out, ParamSpec.of(model))[0]
        assert torch.equal(moved, un.bank) and not torch.equal(moved, before)
        assert torch.equal(to_flat(list(given), ParamSpec.of(model))[0], before)  # the caller's samples unchanged
        ref = moved if ref is None else ref
        assert torch.equal(moved, ref)  # the same shift in either layout
    doc = MCMCUnlearner.samples.__doc__
    assert "list" in doc and "tuple" in doc  # what the docstring promises is what comes back


def test_a_tensor_bank_comes_back_in_its_own_dtype_not_the_models() -> None:
    model, x, y, bank = _problem(4)
    for given_dtype, model_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        m = copy.deepcopy(model).to(model_dtype)
        for given in (bank.to(given_dtype), list(bank.to(given_dtype))):
            un = MCMCUnlearner(m, nll=_nll, log_prior=_log_prior, bank=given)
            assert un.bank.dtype == model_dtype  # computed in the model's dtype
            un.forget([0, 1, 2], RemovableDataset(x.to(model_dtype), y, batch_size=40, seed=0))
            out = un.samples()
            rows = out if isinstance(out, list) else list(out)
            assert all(r.dtype == given_dtype for r in rows)  # returned in the caller's
            torch.testing.assert_close(torch.stack(rows), un.bank.to(given_dtype), rtol=0, atol=0)


def test_a_model_loaded_from_a_bank_row_does_not_write_into_the_callers_bank() -> None:
    model, x, y, bank = _problem(1)
    vector_to_parameters(bank[-1], model.parameters())  # the parameters now alias bank[-1]
    original = bank.clone()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    report = un.forget([5, 6, 7], RemovableDataset(x, y, batch_size=40, seed=0))
    assert report.passed and report.shift_norm > 0
    assert torch.equal(bank, original)  # the user's stored samples are untouched
    assert not torch.equal(parameters_to_vector(model.parameters()), original[-1])  # the live chain moved


def test_a_model_sharing_a_samples_storage_or_pointed_at_a_row_later_does_not_write_into_it() -> None:
    # stop 47's probe: only parameters that were views of a larger tensor when the unlearner was built got their own
    # storage; a state_dict loaded with assign=True (the parameters ARE the caller's tensors) and a model pointed at
    # a bank row after building had that sample overwritten by each request
    model, x, y, bank = _problem(4)
    samples = []
    for row in bank:
        vector_to_parameters(row, model.parameters())
        samples.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(samples[-1], assign=True)
    before = copy.deepcopy(samples)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=samples)
    data = RemovableDataset(x, y, batch_size=40, seed=0)
    assert un.forget([5, 6, 7], data).passed
    assert all(torch.equal(a[k], b[k]) for a, b in zip(samples, before) for k in a)

    model2, _, _, bank2 = _problem(4)
    original = bank2.clone()
    un2 = MCMCUnlearner(model2, nll=_nll, log_prior=_log_prior, bank=bank2)
    vector_to_parameters(bank2[-1], model2.parameters())  # after building
    assert un2.forget([5, 6, 7], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert torch.equal(bank2, original)
    assert not torch.equal(parameters_to_vector(model2.parameters()), original[-1])  # the live chain moved


def _point_model_at(model: nn.Module, sample) -> None:
    """Load one returned sample into ``model`` the way a user resumes a chain from it, sharing its tensors."""
    if isinstance(sample, torch.Tensor):
        vector_to_parameters(sample, model.parameters())  # views of the returned row
    else:
        model.load_state_dict(sample, assign=True)  # the parameters ARE the returned tensors (or views of them)


def test_the_next_request_does_not_write_into_samples_the_model_was_loaded_from() -> None:
    # stop 57's probe: only the storages of the bank as given were protected; a model loaded with
    # model.load_state_dict(un.samples()[-1], assign=True) had that returned sample changed by up to 0.017 by the
    # next request (apply() wrote the live chain's new state into it); in every layout, through remove and through
    # propose + apply
    model, x, y, bank = _problem(6)
    for kind, given in _layouts(model, bank).items():
        for via_propose in (False, True):
            m = copy.deepcopy(model)
            un = MCMCUnlearner(m, nll=_nll, log_prior=_log_prior, bank=given)
            data = RemovableDataset(x, y, batch_size=40, seed=0)
            assert un.forget([0, 1, 2], data).passed
            got = un.samples()
            kept = copy.deepcopy(got)
            last = {k: v[-1] for k, v in got.items()} if kind == "stacked" else got[-1]
            _point_model_at(m, last)
            start = parameters_to_vector(m.parameters()).detach().clone()
            if via_propose:
                batch = data.get([3, 4, 5])
                data.remove([3, 4, 5])
                un.apply(un.propose(batch, data))
            else:
                assert un.forget([3, 4, 5], data).passed
            flat_got, _ = to_flat(got, ParamSpec.of(m))
            flat_kept, _ = to_flat(kept, ParamSpec.of(m))
            assert torch.equal(flat_got, flat_kept), (kind, via_propose)  # the returned samples are untouched
            assert not torch.equal(parameters_to_vector(m.parameters()), start)  # the live chain moved


def test_an_earlier_bank_stays_protected_and_freed_samples_are_forgotten() -> None:
    # a bank replaced by another is still the caller's: a model loaded from it is not written into; samples the
    # caller dropped are forgotten (weak references), so calling samples() in a loop does not grow the set
    model, x, y, bank = _problem(7)
    first = _layouts(model, bank)["state_dicts"]
    before = copy.deepcopy(first)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=first)
    un.bank = [{k: v + 0.01 for k, v in sd.items()} for sd in first]
    model.load_state_dict(first[-1], assign=True)
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, before) for k in a)
    held = len(un._caller_storages)
    for _ in range(5):
        un.samples()  # dropped at once
    un.samples()
    assert len(un._caller_storages) <= held + len(first) * len(first[0])  # at most one call's tensors more
    again = copy.deepcopy(un)  # a copy starts with no references (its model holds copies), and frees none twice
    assert len(again._caller_storages) == 0
    del again


_SECOND_TENSOR = {  # another tensor object (another storage) over a numpy array's memory
    "from_numpy": torch.from_numpy,
    "as_tensor": torch.as_tensor,
    "dlpack": torch.from_dlpack,
    "frombuffer": lambda a: torch.frombuffer(a, dtype=torch.float32).view(a.shape),
}


@pytest.mark.parametrize("how", sorted(_SECOND_TENSOR))
@pytest.mark.parametrize("drop_given", [False, True])
def test_a_bank_the_model_reaches_through_a_second_tensor_over_the_same_memory_is_not_written(
    how: str, drop_given: bool
) -> None:
    # review of stop 57: the bank as state_dicts of torch.from_numpy(arr), the model loaded (assign=True) from the
    # same arrays through a second tensor: the protection compared storage objects, not memory, and the request
    # changed the caller's arrays by 0.0066 (the data-pointer check before it protected them)
    model, x, y, bank = _problem(6)
    spec = ParamSpec.of(model)
    arrays = [{k: v.clone().numpy() for k, v in spec.unflatten(r).items()} for r in bank]
    kept = copy.deepcopy(arrays)
    given = [{k: torch.from_numpy(a) for k, a in sd.items()} for sd in arrays]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=given)
    if drop_given:  # the caller keeps only the numpy arrays: their memory is still the bank's
        del given
    model.load_state_dict({k: _SECOND_TENSOR[how](a) for k, a in arrays[-1].items()}, assign=True)
    assert all(p.data_ptr() == arrays[-1][k].ctypes.data for k, p in model.named_parameters())  # aliased
    start = parameters_to_vector(model.parameters()).detach().clone()
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert all((a[k] == b[k]).all() for a, b in zip(arrays, kept) for k in a)  # the caller's arrays untouched
    assert not torch.equal(parameters_to_vector(model.parameters()), start)  # the live chain moved


def test_parameters_on_pieces_of_a_numpy_bank_given_inline_are_not_written() -> None:
    # review of stop 57: the bank one numpy [S, D] array given as torch.from_numpy(arr) (a tensor the caller does
    # not keep), the model loaded from from_numpy pieces of its last row: each piece a storage of its own starting
    # inside the bank's memory; neither the data-pointer check nor the storage identity one saw it (changed 0.0066)
    model, x, y, bank = _problem(6)
    arr = bank.clone().numpy()
    kept = arr.copy()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=torch.from_numpy(arr))
    pieces, at = {}, 0
    for k, p in model.named_parameters():
        pieces[k] = torch.from_numpy(arr[-1, at : at + p.numel()].reshape(p.shape))
        at += p.numel()
    model.load_state_dict(pieces, assign=True)
    start = parameters_to_vector(model.parameters()).detach().clone()
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert (arr == kept).all()
    assert not torch.equal(parameters_to_vector(model.parameters()), start)


def test_protection_is_by_memory_while_it_lives_and_only_the_last_banks_outside_memory_outlives_it() -> None:
    from mcmc_unlearner.unlearner import _Protected

    arr = torch.arange(24.0).numpy()
    prot = _Protected()
    prot.add(torch.from_numpy(arr)[4:8])  # dropped at once: a returned sample the caller did not keep
    assert not prot.overlaps(torch.from_numpy(arr).untyped_storage())  # freed: forgotten, not mistaken
    assert len(prot) == 0
    held = torch.from_numpy(arr)
    prot.add(held)
    assert prot.overlaps(torch.from_numpy(arr[10:12]).untyped_storage())  # a piece of it, through a new storage
    assert not prot.overlaps(torch.from_numpy(arr.copy()).untyped_storage())  # other memory
    del held
    assert not prot.overlaps(torch.from_numpy(arr).untyped_storage())
    prot.add(torch.from_numpy(arr), bank=True)  # a bank given inline: numpy's memory outlives the tensor
    assert prot.overlaps(torch.from_numpy(arr[23:]).untyped_storage())
    prot.add(torch.zeros(3), bank=True)  # another bank replaces it: the freed one is forgotten
    assert not prot.overlaps(torch.from_numpy(arr).untyped_storage())
    assert len(prot) == 0


def test_a_refused_bank_leaves_the_kept_samples_layout() -> None:
    # stop 47's probe: the refused value's layout was set before the non-finite check, so the kept samples came
    # back as a tensor (or with the refused state_dicts' buffers)
    model, _, _, bank = _problem(5)
    samples = [{"0.weight": r[:12].view(4, 3), "0.bias": r[12:16], "2.weight": r[16:24].view(2, 4),
                "2.bias": r[24:]} for r in bank]  # fmt: skip
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=samples)
    bad = bank.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        un.bank = bad
    out = un.samples()
    assert isinstance(out, list) and isinstance(out[0], dict)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out, samples) for k in a)


def test_bank_layout_errors_name_the_problem() -> None:
    model, *_ = _problem()
    spec = ParamSpec.of(model)
    with pytest.raises(ValueError, match=r"shape \[S, 26\]"):
        to_flat(torch.zeros(3, 5), spec)
    with pytest.raises(ValueError, match="lacks the model's parameter"):
        to_flat([{"weight": torch.zeros(2)}], spec)
    with pytest.raises(ValueError, match="list of state_dicts"):
        to_flat("samples.pt", spec)

    class SamplerState:  # a sampler's state object (posteriors' SGLDState) holding the stacked parameters
        def __init__(self) -> None:
            self.params = {"weight": torch.zeros(2)}

    with pytest.raises(ValueError, match=r"got SamplerState \(it has a \.params attribute: pass that"):
        to_flat(SamplerState(), spec)


def test_plain_iterators_and_dataloaders_work_and_size_errors_are_clear() -> None:
    model, x, y, bank = _problem(2)
    keep = torch.ones(240, dtype=torch.bool)
    keep[:6] = False
    removed = (x[:6], y[:6])
    loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=40, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    report = un.remove(removed, loader)  # n read from the DataLoader's data set; it restarts when exhausted
    assert report.n_remaining == 234 and report.passed
    un2 = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(ValueError, match="n_remaining"):
        un2.remove(removed, iter(loader))
    batches = iter([(x[keep][:40], y[keep][:40])])
    with pytest.raises(ValueError, match="ran out"):
        un2.remove(removed, batches, n_remaining=234)
    for empty in ([], DataLoader(TensorDataset(x[keep], y[keep]), batch_size=512, drop_last=True)):
        with pytest.raises(ValueError, match="yields no minibatches"):  # was a bare StopIteration
            un2.remove(removed, empty, n_remaining=234)


def test_the_remaining_rows_as_a_tuple_are_read_as_a_removable_dataset_and_common_mistakes_get_the_fix() -> None:
    model, x, y, bank = _problem(3)
    keep = torch.ones(240, dtype=torch.bool)
    keep[:6] = False
    removed = (x[:6], y[:6])
    banks = []
    for remaining in ((x[keep], y[keep]), RemovableDataset(x[keep], y[keep], batch_size=128, seed=0)):
        un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
        report = un.remove(removed, remaining)  # the rows themselves: n read from them, every row listable
        assert report.passed and report.n_remaining == 234
        banks.append(un.bank)
    assert torch.equal(banks[0], banks[1])
    # tensors of one shape stay what they always were: one-field minibatches (a density model's data), not fields
    from mcmc_unlearner.stream import _Stream

    batches = _Stream((x[:40], x[40:80]), 80)
    assert torch.equal(next(batches)[0], x[:40]) and torch.equal(next(batches)[0], x[40:80])
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(TypeError, match=r"TensorDataset \(a dataset, not minibatches\): pass DataLoader\(dataset"):
        un.remove(removed, TensorDataset(x[keep], y[keep]))
    with pytest.raises(TypeError, match=r"got DataLoader: pass its rows as one batch, e\.g\. \(x\[ids\], y\[ids\]\)"):
        un.remove(DataLoader(TensorDataset(*removed), batch_size=6), (x[keep], y[keep]))
    with pytest.raises(ValueError, match=r"got rows \[3, None\] \(a single row keeps its row dimension: x\[i:i\+1\]"):
        un.remove((x[0], y[0]), (x[keep], y[keep]))
    assert torch.equal(un.bank, bank)  # every refusal left the bank as it was
    with pytest.raises(ValueError, match=r"no stored samples to average over \(bank=None\) and no sampler"):
        MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior).remove(removed, (x[keep], y[keep]))


def test_full_curvature_data_falls_back_cleanly_for_plain_iterators() -> None:
    model, x, y, bank = _problem(3)
    loader = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=30)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank, curvature_data="full")
    report = un.remove((x[:10], y[:10]), loader)
    assert "has no remaining()" in report.info["curvature_data"] and report.passed


def _frozen_problem():
    model, x, y, bank = _problem(4)
    model[0].requires_grad_(False)  # a frozen feature layer: only the head is sampled
    head = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = parameters_to_vector(model.parameters()).detach()
    n_frozen = sum(p.numel() for p in model[0].parameters())
    full = theta.repeat(len(bank), 1)
    full[:, n_frozen:] = bank[:, n_frozen:]  # the user's rows: parameters_to_vector(model.parameters())

    def log_prior(m):
        return -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n in head)

    return model, x, y, full, n_frozen, log_prior


def test_a_bank_of_every_parameter_on_a_model_with_frozen_layers_is_accepted_and_returned_in_its_width() -> None:
    model, x, y, full, n_frozen, log_prior = _frozen_problem()
    frozen_before = [p.detach().clone() for p in model[0].parameters()]
    outs = {}
    for kind, given in {"all": full.clone(), "trainable": full[:, n_frozen:].clone()}.items():
        un = MCMCUnlearner(model, nll=_nll, log_prior=log_prior, bank=given)
        report = un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        assert report.passed and report.shift_norm > 0
        outs[kind] = un.samples()
    assert outs["all"].shape == full.shape and outs["trainable"].shape == (len(full), full.shape[1] - n_frozen)
    assert torch.equal(outs["all"][:, n_frozen:], outs["trainable"])  # the same removal either way
    assert torch.equal(outs["all"][:, :n_frozen], full[:, :n_frozen])  # frozen columns returned unchanged
    assert not torch.equal(outs["all"][:, n_frozen:], full[:, n_frozen:])
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, model[0].parameters()))


def test_a_bank_whose_frozen_columns_differ_from_the_model_is_refused() -> None:
    model, _, _, full, _, log_prior = _frozen_problem()
    full[3, 0] += 0.1  # this sample had another value of a frozen weight: it was sampled, not frozen
    with pytest.raises(ValueError, match=r"in 1 of 12 samples the 16 frozen ones .* make the sampled parameters"):
        MCMCUnlearner(model, nll=_nll, log_prior=log_prior, bank=full)
    with pytest.raises(ValueError, match=r"\[S, 10\] .* or \[S, 26\] \(every parameter"):
        MCMCUnlearner(model, nll=_nll, log_prior=log_prior, bank=full[:, 1:])


def test_a_log_prior_that_cannot_see_the_parameters_passed_in_is_refused_before_any_work() -> None:
    model, x, y, bank = _problem(5)
    before = parameters_to_vector(model.parameters()).detach().clone()
    captured = list(model.parameters())
    bad = {
        # plain tensors report requires_grad=False inside functional_call: this prior would be 0 there
        "requires_grad filter": (lambda m: -0.5 * sum((p**2).sum() for p in m.parameters() if p.requires_grad)),
        # parameter objects captured beforehand keep the model's values whatever sample is passed in
        "captured parameters": (lambda m: -0.5 * sum((p**2).sum() for p in captured)),
    }
    for why, prior in bad.items():
        with pytest.raises(ValueError, match=r"log_prior gives .* select by name"):
            MCMCUnlearner(model, nll=_nll, log_prior=prior, bank=bank)
        assert torch.equal(parameters_to_vector(model.parameters()), before), why  # restored exactly
    with pytest.raises(TypeError, match=r"scalar tensor .* log_prior=None"):
        MCMCUnlearner(model, nll=_nll, log_prior=lambda m: 0.0, bank=bank)
    with pytest.raises(ValueError, match="is nan"):
        MCMCUnlearner(model, nll=_nll, log_prior=lambda m: _log_prior(m) * float("nan"), bank=bank)
    diverged, _, _, _ = _problem(5)
    with torch.no_grad():
        diverged[0].weight[0, 0] = float("nan")  # a sample of a chain that diverged, loaded into the model
    with pytest.raises(ValueError, match=r"1 non-finite values .* load a finite sample"):
        MCMCUnlearner(diverged, nll=_nll, log_prior=_log_prior, bank=bank)
    # the fix the message names: select by name; here every parameter is trainable, so it is _log_prior itself
    names = {n for n, p in model.named_parameters() if p.requires_grad}

    def by_name_prior(m):
        return -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n in names)

    by_name = MCMCUnlearner(model, nll=_nll, bank=bank, log_prior=by_name_prior)
    plain = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    for un in (by_name, plain):
        un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0))
    assert torch.equal(by_name.bank, plain.bank)


def test_an_nll_that_reduces_over_the_batch_or_fails_on_the_request_is_refused_with_the_fix() -> None:
    model, x, y, bank = _problem(6)
    keep = torch.ones(240, dtype=torch.bool)
    keep[:6] = False
    loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=40, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    state = copy.deepcopy(model.state_dict())

    def mean_nll(m, b):  # reduction="mean": every energy and gradient would be off by the batch size
        return nn.functional.cross_entropy(m(b[0]), b[1])

    un = MCMCUnlearner(model, nll=mean_nll, log_prior=_log_prior, bank=bank)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"one value per row \(shape \[6\].* got \[\]: .*reduction='none'"):
        un.remove((x[:6], y[:6]), loader)
    assert torch.equal(un.bank, bank) and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(RuntimeError, match=r"nll\(model, removed data\) failed: .*not their indices.*forget\(ids"):
        un.remove(torch.arange(6), loader)  # indices where the rows' data belong
    assert torch.equal(un.bank, bank)
    report = un.remove((x[:6], y[:6]), loader)  # the same unlearner then serves a proper request
    assert report.passed and report.shift_norm > 0


@pytest.mark.parametrize("remaining_as", ["rows", "iterator"])
def test_a_multi_output_nll_left_unsummed_is_told_to_sum_its_outputs(remaining_as) -> None:
    """A 3-output regression's ``mse_loss(out, y, reduction="none")`` gives ``[B, 3]``; the refusal told the user to
    compute it "without reducing over the batch (e.g. reduction='none')", what the nll already did (stop 70's unseen
    networks). It now names the sum over the outputs, and the summed nll serves the same request."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(240, 4, generator=g)
    y = torch.stack([x[:, 0], x[:, 1] * x[:, 2], torch.tanh(x[:, 3])], 1) + 0.3 * torch.randn(240, 3, generator=g)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(12, theta.numel(), generator=g)
    state = copy.deepcopy(model.state_dict())

    def remaining():
        if remaining_as == "rows":
            return x[6:], y[6:]
        return iter([(x[6 + i : 46 + i], y[6 + i : 46 + i]) for i in range(0, 160, 40)] * 10)

    def unsummed(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1], reduction="none")

    un = MCMCUnlearner(model, nll=unsummed, log_prior=_log_prior, bank=bank)
    with pytest.raises(ValueError, match=r"got \[6, 3\]: it gives several values per row: sum .*\.sum\(-1\)") as e:
        un.remove((x[:6], y[:6]), remaining(), n_remaining=234)
    assert "without reducing over the batch" not in str(e.value)
    assert torch.equal(un.bank, bank)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    un = MCMCUnlearner(model, nll=lambda m, b: unsummed(m, b).sum(-1), log_prior=_log_prior, bank=bank)
    report = un.remove((x[:6], y[:6]), remaining(), n_remaining=234, strict=False)
    assert report.shift_norm > 0


def test_batches_that_are_dicts_or_hold_non_tensors_are_refused_with_the_fix() -> None:
    model, x, y, bank = _problem(7)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    good = [(x[6:46], y[6:46])] * 10
    with pytest.raises(TypeError, match=r"the removed data is a dict \(keys 'x', 'y'\).*tuples of tensors"):
        un.remove({"x": x[:6], "y": y[:6]}, good, n_remaining=234)
    dicts = [{"x": x[6:46], "y": y[6:46]}] * 10
    with pytest.raises(
        TypeError,
        match=r"a remaining-data minibatch is a dict .*\[\(b\['x'\], b\['y'\]\) for b in loader\].*n_remaining",
    ):
        un.remove((x[:6], y[:6]), dicts, n_remaining=234)
    advised = [(b["x"], b["y"]) for b in dicts]  # what the message says to pass, as it says to pass it
    assert un.propose((x[:6], y[:6]), advised, n_remaining=234).report.passed
    with pytest.raises(TypeError, match="field 1 is a list"):
        un.remove((x[:6], y[:6].tolist()), good, n_remaining=234)
    with pytest.raises(ValueError, match=r"share their first \(row\) dimension, got rows \[6, 5\]"):
        un.remove((x[:6], y[:5]), good, n_remaining=234)
    assert torch.equal(un.bank, bank)


def test_a_submodule_registered_under_two_names_keeps_its_own_parameters() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b_again = self.b  # the same layer applied twice, registered under a second name

        def forward(self, x):
            return self.c(torch.tanh(self.b_again(torch.tanh(self.b(torch.tanh(self.a(x)))))))

    _, x, y, _ = _problem(8)
    torch.manual_seed(8)
    model = Twice()
    own = list(model.parameters())
    theta = parameters_to_vector(own).detach()
    bank = theta + 0.05 * torch.randn(12, theta.numel())
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)  # the log_prior check passes
    report = un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
    assert report.passed and report.shift_norm > 0
    # torch's functional_call leaves the tensors passed in registered on such a submodule; the model must still
    # compute with the parameters it owns (those a user's optimizer or sampler holds), now the live chain's state
    assert all(a is b for a, b in zip(own, model.parameters()))
    assert model.b.weight is own[2] and model.b_again.weight is own[2]
    with torch.no_grad():
        own[2].add_(1.0)  # moving an owned parameter moves the output
        moved = model(x[:5])
        own[2].sub_(1.0)
    assert not torch.allclose(moved, model(x[:5]))
    assert not torch.equal(parameters_to_vector(model.parameters()).detach(), theta)  # the live chain moved


def test_a_model_in_training_mode_with_batchnorm_is_refused_before_anything_changes() -> None:
    _, x, y, _ = _problem(9)
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    model.train()
    state = copy.deepcopy(model.state_dict())
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    with pytest.raises(ValueError, match=r"training mode with BatchNorm1d layers.*model\.eval\(\)"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    # nothing ran: not even BatchNorm's batch counter moved (a forward in training mode would have)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state if "running" in k or "num_batches" in k)


@pytest.mark.parametrize("kind", ["dropout", "attention"])
def test_a_model_in_training_mode_with_dropout_is_refused_before_anything_changes(kind: str) -> None:
    _, x, y, _ = _problem(10)
    torch.manual_seed(10)
    if kind == "dropout":
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))
        match = r"training mode with Dropout layers.*model\.eval\(\)"
    else:  # attention's own dropout (no Dropout module)
        model = _Attend(dropout=0.1)
        match = r"training mode with MultiheadAttention layers.*model\.eval\(\)"
    model.train()
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    assert torch.equal(torch.get_rng_state(), rng)  # refused before any forward pass drew a mask
    assert torch.equal(parameters_to_vector(model.parameters()), theta) and model.training
    model.eval()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    # in eval mode it is accepted and unlearns (the attention model through torch's default fused kernel, which
    # has no double backward: the unlearner evaluates attention on the math kernel)
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    if kind == "dropout":  # a probability of 0 drops nothing: accepted in training mode
        model[2].p = 0.0
        MCMCUnlearner(model.train(), nll=_nll, log_prior=_log_prior, bank=bank)


class _Attend(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(1, 4), nn.MultiheadAttention(4, 1, dropout=dropout), nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x.unsqueeze(-1)).transpose(0, 1)  # [3 tokens, batch, 4]
        return self.out(self.att(h, h, h, need_weights=False)[0].mean(0))


def test_tied_weights_come_back_moved_under_every_name_the_state_dict_lists() -> None:
    class Tied(nn.Module):  # a decoder sharing its weight with the encoder, as in tied-embedding language models
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.mid = nn.Linear(4, 3, bias=False), nn.Linear(4, 4)
            self.dec = nn.Linear(4, 3)
            self.dec.weight = self.enc.weight  # one parameter, two names in state_dict()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            return self.dec(torch.tanh(self.mid(torch.tanh(x @ self.enc.weight))))

    _, x, _, _ = _problem(9)
    y = x.argmax(1)
    torch.manual_seed(9)
    model = Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):  # near a mode of the posterior, as a sampler's states are
        opt.zero_grad()
        (_nll(model, (x, y)).sum() - _log_prior(model)).backward()
        opt.step()
    states = []
    for s in range(12):  # samples kept as a user keeps them: state_dict copies (both names of the shared weight)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.calls.fill_(s)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert {"enc.weight", "dec.weight", "calls"} <= set(states[0])
    stacked = {k: torch.stack([sd[k] for sd in states]) for k in states[0]}
    banks = {}
    for kind, given in (("state_dicts", states), ("stacked", stacked)):
        with pytest.warns(UserWarning, match=r"\['calls'\]"):  # the buffer differs between samples: said
            un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=given)
        un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        out = un.samples()
        rows = out if kind == "state_dicts" else [{k: v[i] for k, v in out.items()} for i in range(12)]
        assert list(rows[0]) == list(states[0])  # every entry, in the caller's order
        for i, sd in enumerate(rows):
            assert torch.equal(sd["dec.weight"], sd["enc.weight"])  # the second name holds the moved value too
            assert float(sd["calls"]) == i  # the buffer carried along, sample by sample
            probe = copy.deepcopy(model)
            probe.load_state_dict(sd)  # loading a returned sample gives the moved parameters (not the old tie)
            assert torch.equal(parameters_to_vector(probe.parameters()), un.bank[i])
        assert not torch.equal(rows[0]["enc.weight"], states[0]["enc.weight"])  # the shared weight moved
        banks[kind] = un.bank
    assert torch.equal(banks["state_dicts"], banks["stacked"])
    bad = [dict(sd) for sd in states]
    bad[3]["dec.weight"] = bad[3]["dec.weight"] + 1.0
    with pytest.raises(ValueError, match=r"state_dict 3 holds different values under 'enc.weight' and 'dec.weight'"):
        MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bad)


class _MathAttend(_Attend):
    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return super().forward(x)


@pytest.mark.parametrize("solver", ["exact", "kfac", "cg"])
def test_attention_on_torchs_default_fused_kernel_unlearns_as_on_the_math_kernel(solver: str) -> None:
    # nn.MultiheadAttention's default CPU kernel has no double backward and no forward-mode derivative: the
    # removal crashed in the curvature or the safety check; the unlearner now evaluates attention on the math kernel
    _, x, y, _ = _problem(11)
    torch.manual_seed(11)
    fused = _Attend(dropout=0.0).eval()
    opt = torch.optim.Adam(fused.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        (_nll(fused, (x, y)).sum() - _log_prior(fused)).backward()
        opt.step()
    theta = parameters_to_vector(fused.parameters()).detach()
    bank = theta + 0.02 * torch.randn(8, theta.numel(), generator=torch.Generator().manual_seed(11))
    math_model = _MathAttend(dropout=0.0).eval()
    math_model.load_state_dict(fused.state_dict())
    banks = []
    for model in (fused, math_model):
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank, solver=solver)
        report = un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        assert report.passed and report.shift_norm > 0
        banks.append(un.bank)
    torch.testing.assert_close(banks[0], banks[1], rtol=1e-4, atol=1e-6)  # the same function, the same removal


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_spectral_normalisation_in_training_mode_is_refused_before_its_buffers_move(style: str) -> None:
    from torch.nn.utils import spectral_norm
    from torch.nn.utils.parametrizations import spectral_norm as spectral_norm_parametrization

    _, x, y, _ = _problem(12)
    torch.manual_seed(12)
    wrap = spectral_norm_parametrization if style == "parametrization" else spectral_norm
    model = nn.Sequential(wrap(nn.Linear(3, 8)), nn.Tanh(), nn.Linear(8, 2)).train()
    state = copy.deepcopy(model.state_dict())  # the power iteration's vectors are buffers
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    with pytest.raises(ValueError, match=r"training mode with spectral normalisation.*model\.eval\(\)"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no forward pass ran
    model.eval()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    assert buffers and all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())  # eval: fixed


def test_an_embedding_that_renormalises_its_weight_in_place_is_refused_with_the_fix() -> None:
    class Bag(nn.Module):
        def __init__(self, max_norm: float | None) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4, max_norm=max_norm), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.emb((x.abs() * 3).long().clamp(max=9)).mean(1))

    torch.manual_seed(13)
    model = Bag(max_norm=1.0)
    weight = model.emb.weight.detach().clone()
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    with pytest.raises(ValueError, match=r"emb \(Embedding, max_norm=1.0\) rescales its weight in place.*=None"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    assert torch.equal(model.emb.weight, weight)  # not renormalised by a forward pass
    model.emb.weight.requires_grad_(False)  # frozen: nothing of it is sampled or moved, accepted
    MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank[:, weight.numel() :])


def test_a_trainable_embedding_bag_is_refused_with_an_equivalent_that_unlearns() -> None:
    # EmbeddingBag has neither a double backward nor a forward-mode derivative: the safety check crashed inside the
    # request (NotImplementedError from torch); now refused when the unlearner is built, naming the equivalent
    class Bagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.out = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.bag((x.abs() * 3).long().clamp(max=9))))

    class Embedded(Bagged):  # the fix the message names: Embedding, then the mean over each bag
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.Embedding(10, 4)

        def forward(self, x):
            return self.out(torch.tanh(self.bag((x.abs() * 3).long().clamp(max=9)).mean(1)))

    _, x, y, _ = _problem(14)
    torch.manual_seed(14)
    bagged = Bagged()
    theta = parameters_to_vector(bagged.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    with pytest.raises(ValueError, match=r"bag \(EmbeddingBag\) has no second derivative.*emb\(tokens\)\.mean\(1\)"):
        MCMCUnlearner(bagged, nll=_nll, log_prior=_log_prior, bank=bank)
    embedded = Embedded()
    embedded.load_state_dict(bagged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(embedded(x), bagged(x))  # the same function, the same parameters
    un = MCMCUnlearner(embedded, nll=_nll, log_prior=_log_prior, bank=bank)
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    bagged.bag.weight.requires_grad_(False)  # frozen: only the linear layer is sampled, accepted and unlearned
    un = MCMCUnlearner(bagged, nll=_nll, log_prior=_log_prior, bank=bank[:, 40:])
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    # with a padding_idx the bag leaves the padding out of its mean, and emb(t).mean(1) is another function: the
    # message's equivalent for that case is (stop 45's probe)
    padded = nn.EmbeddingBag(10, 4, mode="mean", padding_idx=0)
    with pytest.raises(ValueError, match=r"with a padding_idx.*\(t != pad\)\.sum\(1, keepdim=True\)") as said:
        MCMCUnlearner(padded, nll=_nll, log_prior=_log_prior, bank=torch.randn(3, 40))
    assert "(emb(t) * (t != pad)[..., None]).sum(1) / (t != pad).sum(1, keepdim=True)" in str(said.value)
    emb, t = nn.Embedding(10, 4, padding_idx=0), torch.tensor([[1, 2, 0, 0], [3, 0, 4, 5]])
    emb.load_state_dict(padded.state_dict())
    pad = 0
    torch.testing.assert_close((emb(t) * (t != pad)[..., None]).sum(1) / (t != pad).sum(1, keepdim=True), padded(t))


def test_an_nll_of_shape_b_by_1_is_read_as_one_value_per_row_by_every_backend() -> None:
    # mse_loss(out, y, reduction="none") on [B, 1] outputs: K-FAC's likelihood probe refused it ("shape [8], got
    # (8, 1)", the probe's rows, not the user's) after the request had started; now read as [B] everywhere
    g = torch.Generator().manual_seed(15)
    x = torch.randn(200, 3, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-0.5], [0.3]]))  # [B, 1]
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=g)

    def column(m, b):
        return 0.5 * nn.functional.mse_loss(m(b[0]), b[1], reduction="none") / 0.1**2  # [B, 1]

    def rows(m, b):
        return column(m, b).sum(1)  # [B]

    for solver in ("kfac", "exact"):
        banks = []
        for nll in (column, rows):
            un = MCMCUnlearner(copy.deepcopy(model), nll=nll, log_prior=_log_prior, bank=bank, solver=solver)
            report = un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=50, seed=0))
            assert report.passed
            banks.append(un.bank)
        if solver == "kfac":
            assert report.info["kfac"]["likelihood"] == "gaussian"
        torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=0)


def test_a_request_removing_a_large_share_of_the_data_is_warned_about() -> None:
    import warnings

    model, x, y, _ = _problem(16)
    # a sampled bank: the starting weights plus noise are not at equilibrium, the remaining energy rose along the
    # 40-row request's step (bank slope -2.8 against G·x 0.58) and the slope test rightly refused it (stop 62)
    bank = langevin_bank(model, _nll, _log_prior, (x, y), 12, 500)
    for ids, warned in ((list(range(40)), False), (list(range(60)), True)):  # 40 / 240 = 17%, 60 / 240 = 25%
        un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = un.forget(ids, RemovableDataset(x, y, batch_size=40, seed=0))
        said = [str(w.message) for w in caught if "of the data" in str(w.message)]
        assert bool(said) == warned, said
        assert report.info["removed_share"] == pytest.approx(len(ids) / 240)
        if warned:
            assert "removes 25% of the data (60 of 240 rows)" in said[0] and "Retrain" in said[0]
            assert caught[0].filename == __file__  # attributed to the caller's line


def test_a_sequence_that_removes_most_of_the_rows_the_samples_were_drawn_on_is_warned_about_once() -> None:
    """Stop 44's endurance probe: 300 small requests removed 90% of a digits MLP's rows, every one passing, and the
    samples ended 1.4 times retraining's move away; no single request was large enough to be warned about."""
    import warnings

    model, x, y, bank = _problem(16)

    def run(un: MCMCUnlearner, requests: range) -> list[tuple[int, list[str], float]]:
        out = []
        for r in requests:  # requests of 20 of the 240 rows
            keep = torch.arange(20 * (r + 1), 240)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = un.remove(
                    (x[20 * r : 20 * (r + 1)], y[20 * r : 20 * (r + 1)]), (x[keep], y[keep]), strict=False
                )
            said = [str(w.message) for w in caught if "the samples were drawn on" in str(w.message)]
            # no request up to the 8th is large (20/120 of what is left at most); the 9th is (20/80)
            assert bool([w for w in caught if "of the data (" in str(w.message)]) == (r == 8)
            out.append((r, said, report.info["removed_since_samples"]))
        return out

    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    first = run(un, range(5))
    assert [s for _, s, _ in first] == [[]] * 5
    assert [g for _, _, g in first] == pytest.approx([20 * (r + 1) / 240 for r in range(5)])
    # the count is part of the checkpointed state: a new process continues it
    tensors, meta = un.curvature_state()
    assert meta["rows_at_samples"] == 240
    again = MCMCUnlearner(copy.deepcopy(un.model), nll=_nll, log_prior=_log_prior, bank=un.bank)
    again.load_curvature_state(tensors, meta)
    later = run(again, range(5, 8))
    assert [bool(s) for _, s, _ in later] == [False, True, False]  # 6/12 = 50% is not over; 7/12 is, said once
    said = later[1][1][0]
    assert "58.3% of the rows the samples were drawn on" in said and "(140 of 240" in said and "new bank" in said
    assert later[2][2] == pytest.approx(160 / 240)
    # new samples restart the count (setting the bank is what the message advises): 20 of 80, no longer 180 of 240
    again.bank = again.bank.clone()
    # written as null, not left out: the deletion service merges a commit's state into the last one's, and a repair's
    # new bank kept the old start (stop 45's probe)
    old_meta = meta
    merged = {**old_meta, **again.curvature_state()[1]}
    assert merged["rows_at_samples"] is None and merged["cumulative_warned"] is False
    _, said, gone = run(again, range(8, 9))[0]
    assert not said and gone == pytest.approx(20 / 80)


def test_rows_removed_outside_requests_count_toward_the_sequence_warning() -> None:
    """Rows removed between requests (a data set edited by hand, an experiment's refusal policy) count: the next
    request after which more than half is gone warns, also when none of the requests alone crossed the line, and it
    warns again until such a request is applied (stop 45's review: 90% gone and no warning)."""
    import warnings

    model, x, y, bank = _problem(16)
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    data = RemovableDataset(x, y, batch_size=40, seed=0)

    def request(ids: list[int], apply: bool = True) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if apply:
                report = un.forget(ids, data, strict=False)
                assert report.info["removed_since_samples"] == pytest.approx(1 - len(data) / 240)
            else:
                un.propose((x[ids], y[ids]), data, len(data) - len(ids))
        return [str(w.message) for w in caught if "the samples were drawn on" in str(w.message)]

    assert request([0, 1, 2, 3]) == []  # 4 of 240
    data.remove(list(range(10, 130)))  # outside any request: 124 of 240 gone now
    assert len(request([4, 5], apply=False)) == 1  # 126 of 240: warned, not applied
    said = request([4, 5])  # warned again, and applied
    assert len(said) == 1 and "(126 of 240, counted from the first request since the bank was set" in said[0]
    assert request([6, 7]) == []  # once one was applied: no more


def test_a_request_leaves_buffers_a_training_mode_forward_updates_as_they_were() -> None:
    class Counting(nn.Module):  # counts its forward passes in training mode, as some models count steps
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            if self.training:
                self.calls += 1
            return self.body(x)

    _, x, y, _ = _problem(17)
    torch.manual_seed(17)
    model = Counting()
    model.calls.fill_(793)
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    proposal = un.propose(tuple(t[:3] for t in (x, y)), RemovableDataset(x[3:], y[3:], batch_size=40, seed=0))
    assert int(model.calls) == 793  # propose changes nothing, buffers included
    before = parameters_to_vector(model.parameters()).detach().clone()
    un.apply(proposal)
    assert int(model.calls) == 793  # the request's own evaluations are not the model's forward passes
    assert not torch.equal(parameters_to_vector(model.parameters()), before)  # the live chain moved


def test_samples_of_a_data_parallel_wrappers_state_dict_are_read_and_returned_under_its_names() -> None:
    model, x, y, bank = _problem(18)
    wrapped = nn.DataParallel(copy.deepcopy(model))  # on the CPU it calls the module; its state_dict says "module."
    plain = _layouts(model, bank)["state_dicts"]
    prefixed = [{"module." + k: v.clone() for k, v in sd.items()} for sd in plain]
    assert set(prefixed[0]) == set(wrapped.state_dict())
    banks = {}
    for name, given in (("plain", plain), ("prefixed", prefixed)):
        un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=given)
        un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0))
        banks[name] = un.bank
        if name == "prefixed":
            out = un.samples()
            assert list(out[0]) == list(prefixed[0])  # the wrapper's names back
            wrapped.load_state_dict(out[-1])
            assert torch.equal(parameters_to_vector(wrapped.parameters()), un.bank[-1])
    assert torch.equal(banks["plain"], banks["prefixed"])
    with pytest.raises(ValueError, match=r"without the model's 'module\.' prefix.*model\.module"):
        MCMCUnlearner(nn.DataParallel(copy.deepcopy(model)), nll=_nll, log_prior=_log_prior, bank=plain)


def test_a_bank_of_one_sample_reports_its_monte_carlo_error_as_not_estimable() -> None:
    # and says what it leaves out (accepted without a word until stop 61), once per unlearner
    model, x, y, bank = _problem(20)
    errors, told = [], []
    for S in (1, 2):
        un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank[:S])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports = [un.forget([i], RemovableDataset(x, y, batch_size=40, seed=0)) for i in (0, 1)]
        errors.append(reports[0].shift_stderr)
        told.append([str(w.message) for w in caught if "the bank holds one sample" in str(w.message)])
        assert all(("one_sample_bank" in r.info) == (S == 1) for r in reports)
    assert math.isnan(errors[0])  # was 0.0: "no Monte-Carlo error" from one sample
    assert math.isfinite(errors[1]) and errors[1] > 0
    assert len(told[0]) == 1 and "Store more samples" in told[0][0] and not told[1]


@pytest.mark.parametrize("persistent", [True, False])
def test_a_sparse_buffer_such_as_a_graphs_adjacency_is_carried_not_compared(persistent: bool) -> None:
    # torch.equal has no sparse kernel: building the unlearner (the buffer-variation warning) and every request
    # (restoring the buffers) crashed with NotImplementedError on a graph network's sparse adjacency
    g = torch.Generator().manual_seed(22)
    nodes = 60
    edges = torch.randint(nodes, (2, 240), generator=g)
    adjacency = torch.sparse_coo_tensor(edges, torch.ones(240), (nodes, nodes), check_invariants=True).coalesce()

    class Graph(nn.Module):
        def __init__(self, adj: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("adj", adj, persistent=persistent)
            self.register_buffer("features", torch.randn(nodes, 3, generator=g))
            self.lin, self.out = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, idx):
            h = torch.tanh(self.lin(self.features))
            h = self.adj @ h if self.adj.is_sparse else self.adj.mm(h)
            return self.out(h)[idx]

    sparse, dense = Graph(adjacency), Graph(adjacency.to_dense())
    dense.load_state_dict(sparse.state_dict() if not persistent else {**sparse.state_dict(), "adj": dense.adj})
    idx = torch.arange(nodes)
    y = (sparse.features[:, 0] > 0).long()
    theta = parameters_to_vector(sparse.parameters()).detach()
    rows = theta + 0.05 * torch.randn(6, theta.numel(), generator=g)
    banks = {}
    for name, model in (("sparse", sparse), ("dense", dense)):
        spec = ParamSpec.of(model)
        bank = [{**{k: v.clone() for k, v in model.state_dict().items()}, **spec.unflatten(r)} for r in rows]
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
        assert un.forget([0, 1, 2], RemovableDataset(idx, y, batch_size=20, seed=0)).passed
        banks[name] = un.bank
        assert model.adj.is_sparse == (name == "sparse")  # the buffer is left as it was
    torch.testing.assert_close(banks["sparse"], banks["dense"], rtol=1e-4, atol=1e-6)


def test_a_flat_bank_flattened_in_another_order_than_the_models_parameters_is_warned_about() -> None:
    # optree's tree_ravel (posteriors) orders the columns by sorted name (0.bias before 0.weight): same width, so
    # the bank was read as other parameters entirely without a word (a fitted MLP's sample: NLL 2.48 against 0.002)
    import warnings

    torch.manual_seed(23)
    x = torch.randn(400, 20)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        _nll(model, (x, y)).mean().backward()
        opt.step()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    samples = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(20)]
    in_order = torch.stack([torch.cat([sd[k].reshape(-1) for k in base]) for sd in samples])
    sorted_names = torch.stack([torch.cat([sd[k].reshape(-1) for k in sorted(base)]) for sd in samples])
    for bank, warned in ((in_order, False), (list(in_order), False), (sorted_names, True)):
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            un.propose((x[:8], y[:8]), (x[8:], y[8:]))
        said = [str(w.message) for w in caught if "fit the remaining data far worse" in str(w.message)]
        assert bool(said) == warned, said
        if warned:
            assert "named_parameters" in said[0] and "dict of stacked tensors" in said[0]


def test_a_tree_ravel_bank_is_warned_about_when_the_model_keeps_its_initialisation() -> None:
    """``posteriors`` is functional: the model keeps its initial parameters, which fit no better than a mis-ordered
    bank (a conjugate regression: NLL 31.6 per row for the bank, about 10 at the initialisation, under the 10x
    threshold), so the request went through with damping 6,896 and the bias moved -0.57 posterior sd against the
    exact -9.0. The bank is now also read in sorted-name order, and a far better fit there is named."""
    import warnings

    g = torch.Generator().manual_seed(0)
    n, sig = 400, 0.5
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w, b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 0.3
    y = x @ w + b + sig * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    near = torch.cat([torch.full((40, 1), b, dtype=torch.float64), w.expand(40, 3)], 1)
    near = near + 0.02 * torch.randn(40, 4, generator=g, dtype=torch.float64)  # bias first: tree_ravel's order
    for bank, warned in ((near, True), (near[:, [1, 2, 3, 0]], False)):
        un = MCMCUnlearner(
            model,
            nll=lambda m, bt: 0.5 * (m(bt[0]).squeeze(-1) - bt[1]) ** 2 / sig**2,
            log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()) / 9.0,
            bank=bank,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            un.propose((x[:10], y[:10]), (x[10:], y[10:]))
        said = [str(m.message) for m in caught if "sorted-name order" in str(m.message)]
        assert bool(said) == warned, said
        if warned:
            assert "tree_ravel" in said[0] and "dict of stacked tensors" in said[0]


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(2, 6), nn.Linear(1, 6), nn.Linear(12, 2)

    def forward(self, x1, x2):
        return self.out(torch.cat([torch.tanh(self.a(x1)), torch.tanh(self.b(x2))], 1))


class _OneInput(_TwoInputs):
    def forward(self, x):
        return super().forward(x[:, :2], x[:, 2:])


def test_a_model_of_several_inputs_gets_kfac_through_its_nll() -> None:
    # K-FAC called model(batch[0]) to detect the likelihood and to plan its memory: a forward(x1, x2) model crashed
    # with a TypeError; it now falls back to the empirical Fisher and plans through the user's nll
    _, x, y, _ = _problem(14)
    torch.manual_seed(14)
    two = _TwoInputs()
    one = _OneInput()
    one.load_state_dict(two.state_dict())
    theta = parameters_to_vector(two.parameters()).detach()
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=torch.Generator().manual_seed(14))
    nll_two = lambda m, b: nn.functional.cross_entropy(m(b[0][:, :2], b[0][:, 2:]), b[1], reduction="none")  # noqa: E731
    banks = []
    for model, nll, lik in ((two, nll_two, "auto"), (one, _nll, "empirical")):
        un = MCMCUnlearner(model, nll=nll, log_prior=_log_prior, bank=bank, solver="kfac", likelihood=lik)
        report = un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        assert report.passed and report.shift_norm > 0
        assert report.info["kfac_likelihood"] == "empirical"
        banks.append(un.bank)
        if model is two:
            assert "cannot be called on its own (TypeError" in report.info["kfac_likelihood_reason"]
    torch.testing.assert_close(banks[0], banks[1])  # the same network and curvature: the same removal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_refused_naming_float32(dtype: torch.dtype) -> None:
    model, _, _, bank = _problem(15)
    model = model.to(dtype)
    with pytest.raises(ValueError, match=r"parameters are torch\.(b?float16).*Unlearn in float32: model\.float\(\)"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank.to(dtype))
    assert all(p.dtype == dtype for p in model.parameters())


def test_samples_that_are_references_to_the_live_parameters_are_refused_with_the_fix() -> None:
    model, _, _, bank = _problem(16)
    references = []
    for row in bank[:5]:  # the classic sampler-loop mistake: in-place steps, state_dict() stored without copying
        ParamSpec.assign(model, row)
        references.append(model.state_dict())
    with pytest.raises(ValueError, match=r"state_dicts 0 and 1 hold the same tensor for '0\.weight'.*v\.clone\(\)"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=references)
    same = bank[-1].repeat(5, 1)  # copies, but all of one state: no posterior to average over
    with pytest.raises(ValueError, match=r"all 5 samples are identical.*parameters_to_vector"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=same)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in references]  # distinct memory, identical values
    with pytest.raises(ValueError, match="all 5 samples are identical"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=copies)
    one = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank[-1:])  # one sample: a bank of one
    assert one.bank.shape == (1, bank.shape[1])


def test_a_bank_on_the_meta_device_is_refused_naming_it() -> None:
    # state_dicts on meta were refused as "the same memory" (every meta tensor's address is 0), a tensor bank crashed
    # in Tensor.item() (stop 60's probe)
    model, _, _, bank = _problem(16)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    state = [{k: v.to("meta") for k, v in ParamSpec.of(model).unflatten(row).items()} for row in bank[:3]]
    meta = bank.to("meta")
    for given, what in (
        (meta, "the bank tensor"),
        (list(meta), "sample 0"),
        (state, "sample 0's '0.weight'"),
        ({k: torch.stack([sd[k] for sd in state]) for k in state[0]}, "'0.weight'"),
    ):
        with pytest.raises(ValueError, match=rf"bank: {re.escape(what)} is on the meta device.*map_location='cpu'"):
            un.bank = given
        assert torch.equal(un.bank, bank)


def test_non_finite_remaining_data_is_refused_naming_the_rows_and_nothing_changes() -> None:
    model, x, y, bank = _problem(17)
    keep = torch.ones(240, dtype=torch.bool)
    keep[:6] = False
    xr = x[keep].clone()
    xr[100, 1] = float("nan")  # one bad row among the remaining ones
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    live = parameters_to_vector(model.parameters()).detach().clone()
    with pytest.raises(InvalidRequestError, match=r"field 0 has NaN.*row\(s\) \[100\] of the rows given"):
        un.remove((x[:6], y[:6]), (xr, y[keep]))
    # through a loader: found in the first minibatch that holds it (the loader yields the rows in order here)
    loader = DataLoader(TensorDataset(xr, y[keep]), batch_size=117)
    with pytest.raises(InvalidRequestError, match=r"remaining data: field 0 has NaN.*row\(s\) \[100\] of a minibatch"):
        un.remove((x[:6], y[:6]), loader)
    assert torch.equal(un.bank, bank) and torch.equal(parameters_to_vector(model.parameters()), live)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo: torch.jit deprecations
def test_a_compiled_model_is_unlearned_through_the_module_it_wraps_with_its_state_dict_names() -> None:
    import torch._dynamo

    model, x, y, bank = _problem(18)
    plain = []
    for row in bank:
        ParamSpec.assign(model, row)
        plain.append({k: v.clone() for k, v in model.state_dict().items()})
    compiled = torch.compile(copy.deepcopy(model))
    given = [{"_orig_mod." + k: v.clone() for k, v in sd.items()} for sd in plain]  # compiled.state_dict() names
    assert set(given[0]) == set(compiled.state_dict())
    torch._dynamo.utils.counters.clear()
    out = {}
    for name, m, b in (("plain", copy.deepcopy(model), plain), ("compiled", compiled, given)):
        un = MCMCUnlearner(m, nll=_nll, log_prior=_log_prior, bank=b)
        assert un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0)).passed
        out[name] = (un.bank, un.samples())
    # every evaluation ran on the wrapped module: nothing was compiled (each parameter swap had recompiled the graph)
    assert not torch._dynamo.utils.counters["frames"]
    assert torch.equal(out["plain"][0], out["compiled"][0])  # the same removal
    returned = out["compiled"][1]
    assert list(returned[0]) == list(given[0])  # the compiled model's names, as given
    compiled.load_state_dict(returned[-1])
    assert torch.equal(parameters_to_vector(compiled.parameters()), out["compiled"][0][-1])


def test_samples_with_different_batchnorm_statistics_get_a_warning_saying_which_buffers_are_used() -> None:
    import warnings

    _, x, y, _ = _problem(19)
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    states = []
    for s in range(6):  # a chain sampled in training mode: each sample carries its own running statistics
        model.train()
        model(x[40 * s : 40 * s + 40])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    model.eval()
    with pytest.warns(UserWarning, match=r"different values of 2 non-parameter entries.*running_mean"):
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=states)
    assert un.forget([0, 1, 2], RemovableDataset(x, y, batch_size=40, seed=0)).passed
    out = un.samples()
    assert all(torch.equal(o["1.running_mean"], s["1.running_mean"]) for o, s in zip(out, states))  # their own
    frozen = [{**sd, "1.running_mean": states[-1]["1.running_mean"], "1.running_var": states[-1]["1.running_var"]}
              for sd in states]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=frozen)  # the same statistics: no warning
    stacked = {k: torch.stack([sd[k] for sd in states]) for k in states[0]}  # the layout `posteriors` uses
    with pytest.warns(UserWarning, match=r"different values of 2 non-parameter entries.*running_mean"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=stacked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCMCUnlearner(
            model, nll=_nll, log_prior=_log_prior, bank={k: torch.stack([sd[k] for sd in frozen]) for k in states[0]}
        )


def test_curvature_minibatches_of_unequal_size_are_pooled_not_cut_to_the_smallest() -> None:
    from mcmc_unlearner.stream import _Stream

    x = torch.arange(150.0).view(-1, 1)
    y = torch.arange(150)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)  # 64, 64 and a partial 22 per epoch
    stacked = _Stream(loader, None).stacked(4)  # draws 64, 64, 22, 64 rows
    assert stacked[0].shape == (4, 53, 1)  # 214 rows split evenly (cut to the smallest: 4 x 22)
    used = stacked[1].flatten()
    assert torch.equal(used, torch.cat([torch.arange(150), torch.arange(64)])[:212])  # the rows drawn, in order
    assert torch.equal(stacked[0].flatten().long(), used)  # the fields stay paired
    full = _Stream(DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64), None).stacked(2)
    assert torch.equal(full[1], torch.arange(128).view(2, 64))  # equal sizes: the minibatches as they came


def test_assigning_the_bank_takes_what_bank_takes_and_refuses_non_finite_samples() -> None:
    """``unlearner.bank = ...`` (the README's ``unlearner.bank = run_chain(...)``) stored the value as given: a list of
    state_dicts or a float64 bank crashed inside the next request, a wrongly sized one in ``split_with_sizes``. It
    now goes through the same conversion as ``bank=``. A sample with NaN was accepted and every request then blamed
    "the model and data" for a non-finite gradient: refused, naming the sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(60, 3), torch.randint(2, (60,))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dicts = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(6)]
    reference = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=dicts)
    flat = reference.bank.clone()
    for value in (dicts, flat.double()):
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior)
        un.bank = value
        assert un.bank.dtype == torch.float32 and torch.allclose(un.bank, flat)
        assert un.remove((x[:4], y[:4]), (x[4:], y[4:])).passed
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior)
    with pytest.raises(ValueError):
        un.bank = flat[:, :-1]
    bad = flat.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* 1 of its 6 samples, the first at index 3"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bad)
    with pytest.raises(ValueError, match="the first at index 3"):
        un.bank = bad
    assert un.bank is None


class _LargeAllocations(TorchDispatchMode):
    """Records every tensor an operation allocates of at least ``nbytes`` (not a view of its inputs)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.seen = nbytes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().nbytes() >= self.nbytes:
                if t.untyped_storage().data_ptr() not in given:
                    self.seen.append(f"{func}: {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("kind", ["flat", "every_parameter", "vectors", "state_dicts", "stacked"])
def test_a_non_finite_bank_is_refused_before_it_is_copied(kind) -> None:
    """The bank was copied (and a boolean [S, D] isfinite temporary made) before its samples were checked for NaN and
    inf: 1.2-2.9 s to refuse a 1.9M-parameter bank of 50. Now the caller's tensors are read in place first; the
    message names the samples and the fix, and they are left as they were."""
    model, _, _, bank = _problem(6)
    bank[4, 20], bank[9, 1] = float("nan"), float("-inf")
    if kind == "every_parameter":  # a [S, D_all] bank of a model with a frozen parameter (its columns the model's)
        bank[:, 12:16] = model[0].bias.detach()
        model[0].bias.requires_grad_(False)
        given = bank
    else:
        given = {"flat": bank, **_layouts(model, bank)}[kind]
    before = copy.deepcopy(given)
    watch = _LargeAllocations(bank.numel() * bank.element_size() // 2)  # half the bank: a copy of it
    with watch, pytest.raises(ValueError, match=r"in 2 of its 12 samples.*\(samples \[4, 9\]\): drop those samples"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=given)
    assert watch.seen == [], f"the bank was copied before its refusal: {watch.seen}"
    torch.testing.assert_close(given, before, rtol=0, atol=0, equal_nan=True)


def test_a_float64_sample_beyond_the_models_float32_range_is_named() -> None:
    """Finite in the caller's float64 but inf in the model's float32: refused naming the sample and the dtype."""
    model, _, _, bank = _problem(7)
    big = bank.double()
    big[5, 3] = 1e300
    with pytest.raises(ValueError, match=r"\(NaN or inf\) in float32, the model's dtype, in 1 of its 12 .*\[5\]"):
        MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=big)
    assert MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank.double()).bank.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_a_bank_of_integers_is_refused_with_what_to_pass(dtype) -> None:
    """An int64 [S, D] bank was cast to the model's dtype and used, warned about only by the checks it then failed
    (stop 45's probe)."""
    model, _, _, bank = _problem(3)
    ints = (bank * 10).round().to(dtype)
    with pytest.raises(ValueError, match=r"bank: the samples are (int64|int32|bool), not floating-point"):
        MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=ints)
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(ValueError, match=r"not floating-point"):
        un.bank = ints
    assert torch.equal(un.bank, bank)  # the setter refused before anything changed


def test_a_complex_bank_for_a_real_model_is_refused_naming_the_fix() -> None:
    # stop 57's probe: a complex bank was cast to the model's float32 with torch's warning only, its imaginary
    # parts (here up to 1.3) dropped, and samples() came back complex with zero imaginary parts; refused now in
    # every layout and in the frozen-column paths, as an integer bank is, before anything changes
    model, _, _, bank = _problem(3)
    cplx = torch.complex(bank, 0.3 * torch.randn(bank.shape, generator=torch.Generator().manual_seed(0)))
    fm, _, _, full, n_frozen, log_prior = _frozen_problem()
    full_c = torch.complex(full, torch.zeros_like(full))
    full_c[:, n_frozen:] += 0.3j  # imaginary parts only in the trainable columns
    cases = [(model, _log_prior, given) for given in _layouts(model, cplx).values()]
    cases += [(fm, log_prior, full_c), (fm, log_prior, list(full_c))]
    match = r"bank: the samples are complex64 \(complex\) but the model's parameters are float32 \(real\).*bank\.real"
    for m, prior, given in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused before torch's cast warning
            with pytest.raises(ValueError, match=match):
                MCMCUnlearner(copy.deepcopy(m), nll=_nll, log_prior=prior, bank=given)
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(ValueError, match=match):
        un.bank = cplx
    assert torch.equal(un.bank, bank)  # the setter refused before anything changed
    real = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=cplx.real)  # the fix named
    assert torch.equal(real.bank, bank)


def test_a_bank_set_after_loading_a_checkpoint_warns_that_the_loaded_state_is_gone() -> None:
    """A resumed run that set the bank after load_curvature_state() lost the checkpoint's state without a word: its
    banks then differed from the uninterrupted run's by up to 0.044 (stop 45's probe). Setting it first, or resetting
    on purpose, says nothing."""
    import warnings

    model, x, y, bank = _problem(5)
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    saved = un.curvature_state()
    for order in ("load, then bank", "bank, then load", "load, reset, bank", "load, request, bank"):
        again = MCMCUnlearner(copy.deepcopy(un.model), nll=_nll, log_prior=_log_prior)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if order == "bank, then load":
                again.bank = un.bank
                again.load_curvature_state(*saved)
            else:
                again.load_curvature_state(*saved)
                if order == "load, reset, bank":
                    again.reset_curvature()
                if order == "load, request, bank":
                    again.bank = un.bank.clone()  # (warned: not judged in this case)
                    caught.clear()
                    again.load_curvature_state(*saved)
                    again.remove((x[10:20], y[10:20]), (x[20:], y[20:]))
                again.bank = un.bank
        said = [str(w.message) for w in caught if "discards the state load_curvature_state() loaded" in str(w.message)]
        assert bool(said) == (order == "load, then bank"), (order, said)
        if said:
            assert "set the bank first" in said[0] and caught[0].filename == __file__


@pytest.mark.parametrize("layout", ["state_dicts", "stacked"])
def test_samples_whose_buffers_all_differ_from_the_models_are_warned_about(layout) -> None:
    """BatchNorm statistics re-estimated after sampling: every sample holds the old ones, the model the new ones; the
    request computed with the model's and returned the samples with their own, every check passing, 0.14 of the way
    to retraining instead of 0.64 (stop 45's probe). Samples that agree with the model say nothing."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    rows = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        rows.append({k: v.clone() for k, v in model.state_dict().items()})
    bank = rows if layout == "state_dicts" else {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def built() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
        said = [w for w in caught if "not the model's values" in str(w.message)]
        assert all(w.filename == __file__ for w in said)  # attributed to the caller's line
        return [str(w.message) for w in said]

    assert built() == []
    with torch.no_grad():
        model[1].running_mean.add_(0.3)  # re-estimated after sampling
    said = built()
    fix = "samples[0][name]" if layout == "state_dicts" else "samples[name][0]"  # each layout's own indexing
    assert len(said) == 1 and "['1.running_mean']" in said[0] and f"b.copy_({fix})" in said[0]
    for name, b in model.named_buffers():  # the fix, followed: the warning goes
        b.copy_(rows[0][name])
    assert built() == []


@pytest.mark.parametrize("empty", [[], {}, ()])
def test_an_empty_bank_is_refused_as_holding_no_samples(empty) -> None:
    # an empty list was refused as "give ... a list of state_dicts ...; got list": the layout it had
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"bank: it holds no samples \(an empty ") as info:
        to_flat(empty, ParamSpec.of(model), model=model)
    assert "got list" not in str(info.value) and "bank=None" in str(info.value)


class _Clamped(torch.nn.Module):
    """A linear layer clamped between frozen bounds ``[-inf, inf]`` (a frozen parameter that is not finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.bounds = torch.nn.Parameter(torch.tensor([-float("inf"), float("inf")]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).clamp(self.bounds[0], self.bounds[1])


@pytest.mark.parametrize("layout", ["tensor", "vectors"])
def test_a_frozen_parameter_holding_inf_does_not_make_the_bank_non_finite(layout) -> None:
    """The check before the copy read every column of a bank holding every parameter, the frozen ones too: a frozen
    ``±inf`` (clamp bounds), the model's own value in every sample, refused a valid bank (the review of stop 52). A
    NaN in a trainable column is still refused, naming its sample."""
    torch.manual_seed(0)
    model = _Clamped()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + torch.cat([torch.zeros(5, 2), 0.05 * torch.randn(5, 8)], 1)  # the module's own bounds first

    def nll(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1], reduction="none").sum(1)

    given = bank if layout == "tensor" else list(bank)
    un = MCMCUnlearner(model, nll=nll, bank=given)
    torch.testing.assert_close(un.bank, bank[:, 2:], rtol=0, atol=0)
    bad = bank.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"in 1 of its 5 samples, the first at index 3"):
        MCMCUnlearner(model, nll=nll, bank=bad if layout == "tensor" else list(bad))


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every new storage an operation allocates (not a view of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in given:
                given.add(t.untyped_storage().data_ptr())
                self.nbytes += t.untyped_storage().nbytes()
        return out


def _wide_model(frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 40), nn.Tanh(), nn.Linear(40, 10))
    model[0].bias.requires_grad_(not frozen)
    return model


@pytest.mark.parametrize(
    "kind",
    ["state_dicts", "state_dicts_float64", "vectors", "every_parameter", "stacked_float64", "stacked_transposed"],
)
def test_a_list_bank_is_built_into_one_tensor_without_a_second_copy(kind) -> None:
    """A list of state_dicts (or of [D] vectors) was flattened row by row and then stacked (and its identity check
    made a boolean [S, D]): 2-2.25 banks allocated (1.9x the peak RSS of the result for a 1.3M-parameter bank of 50).
    A dict of stacked tensors was concatenated and then cast (3.0x the result's peak RSS from float64 to float32,
    1.5x from float32 to float64; a non-contiguous one reshaped into a copy first). Now each row (each stacked
    block) is copied into one preallocated [S, D] tensor: the result is all that is allocated."""
    model = _wide_model(frozen=kind == "every_parameter")
    g = torch.Generator().manual_seed(1)
    dt = torch.float64 if kind.endswith("float64") else torch.float32
    if kind.startswith("stacked"):
        given = {
            k: (v + 0.1 * torch.randn((12, *v.shape), generator=g, dtype=dt)).to(dt)
            for k, v in model.state_dict().items()
        }
        if kind == "stacked_transposed":  # weights stored transposed: reshape(S, -1) could not be a view
            given = {k: v.mT.contiguous().mT if v.ndim == 3 else v for k, v in given.items()}
            assert not given["0.weight"].is_contiguous()
    elif kind.startswith("state_dicts"):
        given = [{k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dt) for k, v in model.state_dict().items()}]
        given += [
            {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dt) for k, v in given[0].items()} for _ in range(11)
        ]
    else:
        every = kind == "every_parameter"
        theta = parameters_to_vector(model.parameters() if every else ParamSpec.params(model)).detach()
        keep = torch.cat([torch.full((p.numel(),), p.requires_grad or not every) for p in model.parameters()])
        keep = keep[: theta.numel()]
        given = [theta + keep * 0.1 * torch.randn(theta.shape, generator=g) for _ in range(12)]
    watch = _AllocatedBytes()
    with watch:
        flat, _ = to_flat(given, ParamSpec.of(model), dtype=torch.float32, model=model)
    result = flat.numel() * flat.element_size()
    assert result <= watch.nbytes < 1.05 * result + 4096, f"{watch.nbytes} bytes allocated for a {result}-byte bank"


def _old_flat(bank, names, dtype, trainable=None):
    """What to_flat computed before: rows concatenated, stacked, the frozen columns dropped, cast."""
    if isinstance(bank[0], torch.Tensor):
        flat = torch.stack([r.detach() for r in bank])
    else:
        flat = torch.stack([torch.cat([sd[n].detach().reshape(-1) for n in names]) for sd in bank])
    return (flat if trainable is None else flat[:, trainable]).to(dtype)


@pytest.mark.parametrize("layout", ["plain", "mixed_dtypes", "float64_row", "prefix", "tied", "every_parameter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_a_list_bank_built_in_place_equals_the_stacked_one(layout, dtype) -> None:
    """The in-place build gives bit for bit the old concatenate-stack-cast result and layout (type promotion across
    blocks and rows, wrapper prefixes, tied names, a bank of every parameter), and the same samples() round trip."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    if layout == "tied":
        model[2].weight = model[0].weight
    if layout == "mixed_dtypes":  # blocks promoted to float64 in the old concatenation, then cast
        model[0].bias.data = model[0].bias.data.double()
        model[2].weight.data = model[2].weight.data.half()
    if layout == "every_parameter":
        model[0].bias.requires_grad_(False)
    spec = ParamSpec.of(model)
    dicts = [
        {k: v + (0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in model.state_dict().items()}
        for _ in range(5)
    ]
    trainable, names = None, spec.names
    if layout == "tied":
        for sd in dicts:
            sd["2.weight"] = sd["0.weight"]
    if layout == "float64_row":  # one sample in float64: the old stack promoted every row
        dicts[2] = {k: v.double() for k, v in dicts[2].items()}
    given = dicts
    if layout == "prefix":
        given = [{"module." + k: v for k, v in sd.items()} for sd in dicts]
        names = ["module." + n for n in spec.names]
    if layout == "every_parameter":  # [D_all] vectors holding the model's frozen values, one in float64
        trainable = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in model.parameters()])
        frozen = model[0].bias.detach()
        given = [
            torch.cat([(frozen if n == "0.bias" else sd[n]).reshape(-1) for n in model.state_dict()]) for sd in dicts
        ]
        given[3] = given[3].double()
    before = copy.deepcopy(given)
    flat, lay = to_flat(given, spec, dtype=dtype, model=model)
    want = _old_flat(given, names, dtype, trainable)
    assert flat.dtype == want.dtype and torch.equal(flat, want)
    torch.testing.assert_close(given, before, rtol=0, atol=0)  # the caller's tensors untouched
    back = lay.restore(flat)
    if trainable is not None:
        assert lay.kind == "flat_list" and lay.dtype == torch.float64 and torch.equal(lay.trainable, trainable)
        assert all(b.dtype == torch.float64 and torch.equal(b[~trainable], frozen.double()) for b in back)
    else:
        assert lay.kind == "state_dicts" and lay.prefix == ("module." if layout == "prefix" else "")
        assert [list(sd) for sd in back] == [list(sd) for sd in given]
        assert all(b[k].dtype == s[k].dtype for b, s in zip(back, given) for k in s)
        if layout == "tied":
            assert all(b["2.weight"] is b["0.weight"] for b in back)
    assert torch.equal(to_flat(back, spec, dtype=dtype, model=model)[0], lay.as_returned(flat))


@pytest.mark.parametrize("layout", ["plain", "mixed_dtypes", "prefix", "tied", "transposed", "buffers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_a_stacked_bank_built_in_place_equals_the_concatenated_one(layout, dtype) -> None:
    """A dict of stacked tensors built block by block into one [S, D] tensor gives bit for bit the old
    concatenate-then-cast result (type promotion across blocks, wrapper prefixes, tied names, non-contiguous blocks,
    carried buffers), the same layout and the same samples() round trip."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    if layout == "tied":
        model[2].weight = model[0].weight
    if layout == "mixed_dtypes":  # blocks promoted to float64 in the old concatenation, then cast
        model[0].bias.data = model[0].bias.data.double()
        model[2].weight.data = model[2].weight.data.half()
    spec = ParamSpec.of(model)
    S = 5
    given = {
        k: v + (0.1 * torch.randn((S, *v.shape), generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }
    if layout != "buffers":  # the buffers' entries: per-sample ([S, 4]) only here
        given = {k: v[0] if k.startswith("1.running") else v for k, v in given.items()}
    if layout == "tied":
        given["2.weight"] = given["0.weight"]
    if layout == "transposed":
        given = {k: v.movedim(0, -1).contiguous().movedim(-1, 0) if v.ndim > 1 else v for k, v in given.items()}
    names = spec.names
    if layout == "prefix":
        given = {"_orig_mod." + k: v for k, v in given.items()}
        names = ["_orig_mod." + n for n in spec.names]
    before = copy.deepcopy(given)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the buffers differ from the model's (warned about, tested elsewhere)
        flat, lay = to_flat(given, spec, dtype=dtype, model=model)
    want = torch.cat([given[n].detach().reshape(S, -1) for n in names], 1).to(dtype)
    assert flat.dtype == want.dtype and torch.equal(flat, want) and flat.is_contiguous()
    torch.testing.assert_close(given, before, rtol=0, atol=0)  # the caller's tensors untouched
    assert lay.kind == "stacked" and lay.prefix == ("_orig_mod." if layout == "prefix" else "")
    assert lay.tied == ((("2.weight", "0.weight"),) if layout == "tied" else ())
    back = lay.restore(flat)
    assert list(back) == list(given) and all(back[k].dtype == given[k].dtype for k in given)
    assert all(back[k].shape == given[k].shape for k in given)
    if layout == "tied":
        assert back["2.weight"] is back["0.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(to_flat(back, spec, dtype=dtype, model=model)[0], lay.as_returned(flat))


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_samples", r"bank: it holds no samples$"),
        ("integers", r"bank: the samples are int64, not floating-point"),
        ("identical", r"bank: all 4 samples are identical"),
        ("nan_and_identical", r"non-finite values \(NaN or inf\) in 4 of its 4 samples"),
        ("identical_and_overflow", r"bank: all 4 samples are identical"),
        ("overflow", r"\(NaN or inf\) in float16, the model's dtype, in 1 of its 4 samples.*\[2\]"),
    ],
)
def test_a_stacked_bank_is_refused_as_before(case, match) -> None:
    """The in-place build of a dict of stacked tensors keeps the old refusals and their order: NaN/inf (before any
    copy), no samples, integers, identical samples, then samples that overflow the target dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    g = torch.Generator().manual_seed(4)
    given = {
        k: v + 0.1 * torch.randn((4, *v.shape), generator=g, dtype=torch.float64) for k, v in model.state_dict().items()
    }
    if case == "no_samples":
        given = {k: v[:0] for k, v in given.items()}
    if case == "integers":
        given = {k: (10 * v).round().long() for k, v in given.items()}
    if "identical" in case:
        given = {k: v[:1].expand_as(v).clone() for k, v in given.items()}
    if case.startswith("nan"):
        given["0.weight"][:, 0, 0] = float("nan")
    if "overflow" in case:
        given["0.bias"][2 if case == "overflow" else slice(None), 1] = 1e300
    with pytest.raises(ValueError, match=match):
        to_flat(given, ParamSpec.of(model), dtype=torch.float16, model=model)


def test_a_multi_output_nll_left_unsummed_on_as_many_rows_as_outputs_is_told_to_sum_too() -> None:
    """Three removed rows of a 3-output regression's unsummed ``mse_loss`` give ``[3, 3]``, which reads as a
    broadcast alone: the refusal named only "reduction='none'", what the nll already did (stop 70's review). The sum
    over each row's terms is named beside it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 4, generator=g)
    y = torch.randn(60, 3, generator=g)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(4, theta.numel(), generator=g)
    un = MCMCUnlearner(
        model, nll=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1], reduction="none"), log_prior=_log_prior, bank=bank
    )
    with pytest.raises(ValueError, match=r"got \[3, 3\]: .*sum them: .*\.sum\(-1\)"):
        un.remove((x[:3], y[:3]), (x[3:], y[3:]))
    assert torch.equal(un.bank, bank)
