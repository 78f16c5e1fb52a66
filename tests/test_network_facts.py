"""The command line's torch-free account of a network (:class:`~mcmc_unlearner.options.ModelFacts`, ``bnn``'s
:func:`~mcmc_unlearner.experiments.options.network_facts`) and of what ``solver='auto'`` picks for it
(:func:`~mcmc_unlearner.options.auto_solver`) are the library's, so that ``bnn`` refuses a combination that depends
on the network before loading torch with the verdict the run's own unlearner would give."""

from __future__ import annotations

import copy
import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mcmc_unlearner.experiments.options import (
    ARCHITECTURE_NAMES,
    DEFAULT_ARCH,
    PRESETS,
    QUICK,
    BNNConfig,
    network_facts,
    run_network,
)
from mcmc_unlearner.image_data import DATASETS, find_mnist_files, image_shape, load_dataset
from mcmc_unlearner.memory import resolve_budget
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.options import (
    FLOAT_LIMITS,
    ModelFacts,
    SolverName,
    auto_solver,
    auto_solver_reason,
    check_combinations,
    dense_memory_refusal,
)
from mcmc_unlearner.samplers import SGLD
from mcmc_unlearner.unlearner import MCMCUnlearner

#: The images and classes :func:`load_dataset` gives each data set (its official files).
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 32, 32), 10),
    "fashion-mnist": ((1, 32, 32), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
#: Settings under which ``solver='auto'`` picks each of kfac, cg, exact/ggn for bnn's networks.
AUTO_SETTINGS = (
    {},
    {"hessian": "full"},
    {"exact_max_dim": 10**7, "memory_budget": "100GB"},
    {"exact_max_dim": 10**7, "memory_budget": "100TB"},
    {"exact_max_dim": 10**7, "memory_budget": "100TB", "hessian": "full"},
    {"exact_max_dim": 10**7},  # the default budget (a quarter of the memory available, at most 1 GiB)
)
_REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def facts_of(model: nn.Module) -> ModelFacts:
    """What ``MCMCUnlearner`` reads of ``model`` (the inputs of its ``solver='auto'`` rule), from the module."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharing = (nn.modules.conv._ConvNd, nn.RNNBase)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.requires_grad]
    weights = [p for _, p in model.named_parameters(remove_duplicate=False)]
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    return ModelFacts(
        dim=sum(p.numel() for p in params),
        itemsize=params[0].element_size(),
        kfac_layers=len(layers),
        weight_sharing=tuple(
            sorted(
                {
                    type(m).__name__
                    for m in model.modules()
                    if isinstance(m, sharing) and any(p.requires_grad for p in m.parameters(recurse=False))
                }
            )
        ),
        attention=any(isinstance(m, nn.MultiheadAttention) for m in model.modules()),
        tied_layers=sum(sum(w is m.weight for w in weights) > 1 for m in layers),
        diagonal_layers=sum("weight" not in m._parameters or any(m is a.out_proj for a in attention) for m in layers),
    )


def _resolved(model: nn.Module, **options) -> MCMCUnlearner:
    dim = sum(p.numel() for p in model.parameters())
    bank = 0.01 * torch.randn(2, dim, generator=torch.Generator().manual_seed(0), dtype=next(model.parameters()).dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MCMCUnlearner(
            model,
            SGLD(model.parameters(), lr=1e-4),
            bank=bank,
            nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
            **options,
        )


def _predicted(facts: ModelFacts, options: dict) -> str:
    budget = resolve_budget(options.get("memory_budget"))
    return auto_solver(facts, options.get("hessian", "remaining"), options.get("exact_max_dim", 1000), budget).value


@pytest.mark.parametrize("dataset", DATASETS)
def test_auto_s_pick_on_every_bnn_network_is_predicted_without_torch(dataset):
    """For every data set and architecture ``bnn`` runs, the network's facts stated from its layer sizes are the
    built network's, and :func:`auto_solver` on them picks what ``MCMCUnlearner`` resolves on the network."""
    shape, classes = SHAPES[dataset]
    for arch in ARCHITECTURE_NAMES:
        facts = network_facts(arch, shape, classes)
        try:
            torch.manual_seed(0)
            model = build_model(arch, shape, classes)
        except ValueError:  # images too small for the architecture: the run refuses it when it builds the network
            assert facts is None, (arch, shape)
            continue
        assert facts == facts_of(model), (dataset, arch)
        for options in AUTO_SETTINGS:
            assert _predicted(facts, options) == _resolved(model, **options).solver.value, (dataset, arch, options)


@pytest.mark.parametrize("preset", [None, *PRESETS, "quick"])
def test_every_preset_s_network_is_the_one_its_run_unlearns(preset):
    """A preset's (and the default's) network as :func:`run_network` states it is what the run builds."""
    cfg = BNNConfig(**(QUICK if preset == "quick" else PRESETS[preset] if preset else {}))
    shape, classes = SHAPES[cfg.dataset]
    torch.manual_seed(0)
    model = build_model(cfg.arch or DEFAULT_ARCH[cfg.dataset], shape, classes)
    facts = run_network(cfg)
    assert facts == facts_of(model)
    for options in AUTO_SETTINGS:
        assert _predicted(facts, options) == _resolved(model, **options).solver.value, (preset, options)


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_image_shape_is_load_dataset_s(tmp_path):
    """The images' shape read from the files' headers is what :func:`load_dataset` gives (MNIST files of 20x20
    images: 24x24 after the padding)."""
    for name in ("digits", "fmnist"):
        if name == "fmnist" and find_mnist_files("fashion-mnist", _REAL_FMNIST) is None:
            continue
        data = load_dataset(name, _REAL_FMNIST)
        assert image_shape(name, _REAL_FMNIST) == (data.in_shape, data.n_classes)
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 7), ("t10k", 3)):
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx(rng.integers(0, 256, (n, 20, 20), dtype=np.uint8)))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n, dtype=np.uint8)))
    data = load_dataset("mnist", tmp_path)
    assert data.in_shape == (1, 24, 24)
    assert image_shape("mnist", tmp_path) == (data.in_shape, data.n_classes)
    assert image_shape("nosuch") is None


#: Models for every branch of ``solver='auto'``'s rule (dense, attention, weight sharing, float64, no layers).
def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.att(x, x, x)[0].mean(1))

    class Free(nn.Module):  # parameters but no Linear/Conv layer
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    return {
        "mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        "mlp64": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double(),
        "conv": nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3)),
        "attention": Attention(),
        "free": Free(),
    }


@pytest.mark.parametrize("budget", [None, 10**4, 10**5, 10**7])
@pytest.mark.parametrize("hessian", ["remaining", "full"])
def test_auto_solver_is_the_constructor_s_rule(hessian, budget):
    """:func:`auto_solver` on :func:`facts_of` a model picks what the constructor picks, in every branch of its
    rule; :func:`check_combinations` given the facts refuses what the constructor refuses, with its message."""
    for name, model in _models().items():
        facts = facts_of(model)
        for most in (10, 1000):
            options = {"hessian": hessian, "exact_max_dim": most, "memory_budget": budget}
            assert _predicted(facts, options) == _resolved(model, **options).solver.value, (name, options)
            for extra in ({"bank_shift": "affine"}, {"damping_shape": "data"}, {"damping": 1e39}, {}):
                for solver in ("auto", "exact", "kfac"):
                    kw = {**options, **extra, "solver": solver}
                    try:
                        _resolved(model, **kw)
                        library = None
                    except (ValueError, MemoryError) as exc:
                        library = (type(exc), str(exc))
                    try:
                        check_combinations(kw, facts)
                        said = None
                    except (ValueError, MemoryError) as exc:
                        said = (type(exc), str(exc))
                    assert said == library, (name, kw)


def test_a_float64_model_s_pick_and_refusal_are_auto_solver_s_in_its_item_size():
    """The constructor picks ``solver='auto'`` with :func:`auto_solver_reason` on the facts it reads of the model
    (:func:`facts_of`'s, tied layers included), in the parameters' item size: a 67-parameter float64 MLP's dense
    matrices (215 kB) are over half a 380 kB budget where its float32 twin's (162 kB) are not, and over a 190 kB
    budget for ``solver='exact'``, refused alike through the constructor and :func:`check_combinations`."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    for name, model in {**_models(), "tied": Tied()}.items():
        assert _resolved(model, solver="cg")._model_facts() == facts_of(model), name
    torch.manual_seed(0)
    mlp32 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    mlp64 = copy.deepcopy(mlp32).double()
    assert facts_of(mlp64) == facts_of(mlp32)._replace(itemsize=8)
    for budget, pick32, pick64 in ((380_000, SolverName.EXACT, SolverName.KFAC), (10**6, "exact", "exact")):
        for model, pick in ((mlp32, pick32), (mlp64, pick64)):
            un = _resolved(model, memory_budget=budget)
            assert (un.solver, un.solver_reason) == auto_solver_reason(facts_of(model), "remaining", 1000, budget)
            assert un.solver == pick, (model, budget)
    options = {"solver": "exact", "memory_budget": 190_000}
    _resolved(mlp32, **options)  # 162 kB fit
    with pytest.raises(MemoryError) as library:
        _resolved(mlp64, **options)
    assert str(library.value) == dense_memory_refusal(SolverName.EXACT, 67, 8, 190_000, kfac_builds=True)
    with pytest.raises(MemoryError) as said:
        check_combinations(options, facts_of(mlp64))
    assert str(said.value) == str(library.value)
    with pytest.raises(ValueError, match=r"ModelFacts.itemsize 2: the unlearner takes float32 \(4\) or float64"):
        check_combinations(options, facts_of(mlp32)._replace(itemsize=2))


def test_float_limits_are_torch_s():
    for name, (largest, smallest) in FLOAT_LIMITS.items():
        info = torch.finfo(getattr(torch, name))
        assert (largest, smallest) == (info.max, info.smallest_normal)
