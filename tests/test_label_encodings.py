"""Class labels as users store them (stop 47's probe): rows marked ``ignore_index=-100`` among the labels, and
labels that are not a ``[B]`` integer tensor. The first made a plain cross-entropy read as another loss when such a
row was among the probe rows (the emptied-class check then skipped, the class still predicted with p = 0.90) and
crashed the emptied class's draw; the second skipped the emptied-class check without a word."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import Likelihood, detect_likelihood


def _ce(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")  # ignore_index=-100: those rows' loss is 0


def _log_prior(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _blobs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + 0.6 * torch.randn(120, 2, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    bank = []
    for t in range(600):  # the user's SGLD loop
        energy = 120 * _ce(model, (x, y)).mean() - _log_prior(model)
        model.zero_grad()
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * 1e-3 * p.grad + 1e-3**0.5 * torch.randn_like(p))
        if t >= 400 and t % 25 == 0:
            bank.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    return x, y, model, torch.stack(bank)


def test_ignored_rows_among_the_probe_rows_leave_a_cross_entropy_recognised():
    x, y, model, _ = _blobs()
    marked = y.clone()
    marked[::2] = -100  # the first probe rows among them
    kind, _ = detect_likelihood(model, _ce, (x, marked))
    assert kind is Likelihood.CATEGORICAL


def test_a_class_removal_beside_ignored_rows_draws_the_class_row_without_crashing():
    x, y, model, bank = _blobs()
    labels = torch.cat([y, torch.full((10,), -100)])  # ten unlabelled rows in the data
    x = torch.cat([x, torch.randn(10, 2, generator=torch.Generator().manual_seed(5))])
    gone = labels == 0
    un = MCMCUnlearner(model, nll=_ce, log_prior=_log_prior, bank=bank, emptied_label="always")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.remove((x[gone], labels[gone]), (x[~gone], labels[~gone]))  # was: index -100 is out of bounds
    assert isinstance(report.info["emptied_labels"], dict) and "0" in report.info["emptied_labels"]
    assert str(report.info.get("emptied_label_resample", "")).startswith("drawn")


def test_labels_that_are_not_integer_class_labels_say_the_emptied_class_was_not_checked():
    x, y, model, bank = _blobs()

    def soft(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")  # one-hot float targets

    onehot = F.one_hot(y, 3).float()
    gone = y == 0
    un = MCMCUnlearner(model, nll=soft, log_prior=_log_prior, bank=bank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.remove((x[gone], onehot[gone]), (x[~gone], onehot[~gone]))
    assert str(report.info["emptied_labels"]).startswith("not checked: batch[1] holds one-hot or probability targets")
    # one column is a binary target, not a one-hot row: nothing said (the review of stop 47)
    binary = MCMCUnlearner(nn.Linear(2, 1), nll=lambda m, b: F.binary_cross_entropy_with_logits(
        m(b[0]), b[1], reduction="none").squeeze(-1), log_prior=_log_prior, bank=torch.randn(4, 3))  # fmt: skip
    t = (y == 0).float()[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = binary.propose((x[gone], t[gone]), (x[~gone], t[~gone]))
    assert "emptied_labels" not in out.report.info
