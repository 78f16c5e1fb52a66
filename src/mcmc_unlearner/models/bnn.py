"""Bayesian neural networks (classifiers) for SG-MCMC sampling and MCMC-influence unlearning.

Every network here is a :class:`BayesianNet`: an ``nn.Module`` whose ``forward(x)`` returns logits and
which implements the model protocol of :mod:`mcmc_unlearner.models`:

* ``log_prior()``: isotropic Gaussian prior ``Σ_w log N(w; 0, prior_std²)`` over *all* parameters
  (weights and biases), normalising constants included, so the value is an exact log density;
* ``nll((x, y))``: per-example cross-entropy, shape ``[B]``.

Both are pure functions of the parameters, so ``torch.func.functional_call`` together with
``grad``/``jvp``/``vmap`` can be applied. No BatchNorm or dropout is used anywhere.

Architectures (all use ReLU activations and 2x2 max-pooling, :class:`MaxPool2x2`; convolutions are "valid" unless
stated):

=============== =========================================================== ==========================
name            layers                                                      parameters (default shape)
=============== =========================================================== ==========================
``mlp``         flatten, Linear(d, 100), ReLU, Linear(100, 10)              79,510 (d = 784)
``lenet5``      conv6@5x5, pool, conv16@5x5, pool, fc120, fc84, fc10        61,706 (1x32x32)
``small_cnn``   conv64@5x5, pool, conv64@5x5, pool, fc384, fc10             725,962 (3x32x32)
``digits_net``  conv8@3x3 (pad 1), pool, fc64, fc10                        8,986 (1x8x8)
=============== =========================================================== ==========================

Use :func:`build_model` (or the :data:`ARCHITECTURES` registry) to construct a network from an input
shape and a number of classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "BayesianNet",
    "DigitsNet",
    "LeNet5",
    "MaxPool2x2",
    "SmallCNN",
    "build_model",
    "digits_net",
    "lenet5",
    "log_gaussian_prior",
    "mlp",
    "small_cnn",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` whose plain forward pass without autograd takes the maximum of four strided views.

    The values are the same to every bit (a maximum is exact). Where no derivative can follow (``torch.no_grad``,
    ``inference_mode``, a plain tensor: the unlearner's safety check on convolutional networks, predictions),
    LeNet-5's whole forward pass on 256 rows of 32x32 is then 2.2x faster on one thread: torch's CPU kernel spends
    about 4.6 ns per input element there, as long as the convolutions take (``benchmarks/maxpool.py``). So under
    ``vmap`` alone (the check's forward passes batched over its draws, where torch's batched kernel took 15 ms
    against the views' 2.2 ms for 8 draws of 256 rows of the digits net's 16x8x8 maps; stop 59). Everywhere else
    torch's kernel runs, so every derivative is exactly torch's: with autograd on (the four views' backward pass was
    measured no faster in total), and under ``torch.func``'s derivative transforms or forward-mode AD, where
    ``torch.maximum``'s tangent ``b' + [a > b]·(a' − b')`` differs from the selected input's tangent in the last
    bits (the digits BNN's check, which takes ``jvp``, moved its end point by 1e-5 relative).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not self._as_built() or not _plain(x):
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])

    def _as_built(self) -> bool:
        """Whether the layer still pools 2x2 windows with stride 2 and no padding (its attributes can be changed)."""
        pair = (2, 2)
        return (
            _pair(self.kernel_size) == pair
            and _pair(self.stride) == pair
            and _pair(self.padding) == (0, 0)
            and _pair(self.dilation) == (1, 1)
            and not self.ceil_mode
            and not self.return_indices
        )


def _plain(x: Tensor) -> bool:
    """Whether ``x``'s values are those of an ordinary tensor: not inside a ``torch.func`` transform that can take a
    derivative (``grad``, ``jvp``, ``functionalize``) and without a forward-mode tangent. Inside ``vmap`` alone (any
    number of levels; the unlearner's check batches its draws so) the values are a batch of ordinary tensors, and
    the maximum of four strided views is the same to every bit: ``True`` there too. ``False`` when torch cannot
    tell (the private checks are missing)."""
    functorch = torch._C._functorch
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    batched = getattr(functorch, "is_batchedtensor", None)
    unwrap = getattr(functorch, "get_unwrapped", None)
    if wrapped is None:
        return False
    while wrapped(x):  # vmap's levels only: a derivative transform's wrapper anywhere runs torch's kernel
        if batched is None or unwrap is None or not batched(x):
            return False
        x = unwrap(x)
    return fwAD.unpack_dual(x).tangent is None


def log_gaussian_prior(module: nn.Module, std: float) -> Tensor:
    """Log density of an isotropic Gaussian prior ``N(0, std² I)`` over all parameters of ``module``.

    Constants are kept: the result equals ``Σ_w log N(w; 0, std²)`` exactly, i.e.
    ``-Σ w² / (2 std²) - P · (log std + ½ log 2π)`` with ``P`` the number of scalar parameters.
    Only the first term depends on the parameters, so gradients are unaffected by the constant.

    Args:
        module: Module whose ``parameters()`` are summed over (works under ``functional_call``).
        std: Prior standard deviation, must be positive.

    Returns:
        Scalar tensor in the parameters' dtype/device.
    """
    if std <= 0:
        raise ValueError(f"prior std must be positive, got {std}")
    params = list(module.parameters())
    if not params:
        raise ValueError("module has no parameters")
    sq = sum(p.pow(2).sum() for p in params)
    count = sum(p.numel() for p in params)
    return -0.5 * sq / (std * std) - count * (math.log(std) + _LOG_SQRT_2PI)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(h, w)`` for an int or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check_positive(shape: tuple[int, int], arch: str, input_size: tuple[int, int]) -> None:
    """Raise if an architecture's feature map collapsed to nothing for the given input size."""
    if min(shape) < 1:
        raise ValueError(f"{arch}: input size {input_size} is too small (feature map would be {shape})")


class BayesianNet(nn.Module):
    """Base class for Bayesian classifiers with an isotropic Gaussian weight prior.

    Subclasses implement ``forward(x) -> logits``. The class also exposes the seed-API energy
    functions ``F(z)`` and ``h(z)``, which use the settable training-set size :attr:`n`.

    Args:
        prior_std: Standard deviation of the Gaussian prior on every parameter (paper: 0.1).
        n: Training-set size used by :meth:`F`; may be set later via ``model.n = ...``.
    """

    def __init__(self, prior_std: float = 0.1, n: int | None = None) -> None:
        super().__init__()
        if prior_std <= 0:
            raise ValueError(f"prior_std must be positive, got {prior_std}")
        self.prior_std = float(prior_std)
        self.n = n

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return logits of shape ``[B, n_classes]``."""
        raise NotImplementedError

    def log_prior(self) -> Tensor:
        """Scalar ``Σ_w log N(w; 0, prior_std²)`` over all parameters (constants included)."""
        return log_gaussian_prior(self, self.prior_std)

    def nll(self, batch: Sequence[Tensor]) -> Tensor:
        """Per-example negative log-likelihood (cross-entropy) of a batch ``(x, y)``; shape ``[B]``."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")

    # --- seed-API compatibility -------------------------------------------------------------------
    def F(self, z: Sequence[Tensor]) -> Tensor:
        """Minibatch energy ``-log_prior() + n · mean(nll(z))``; requires :attr:`n` to be set."""
        if self.n is None:
            raise RuntimeError("model.n (training-set size) must be set before calling F()")
        return -self.log_prior() + self.n * self.nll(z).mean()

    def h(self, z: Sequence[Tensor]) -> Tensor:
        """Summed negative log-likelihood ``Σ_{z_i ∈ z} nll(z_i)`` (scalar)."""
        return self.nll(z).sum()

    def extra_repr(self) -> str:
        """Show the prior scale and ``n`` in ``repr``."""
        return f"prior_std={self.prior_std}, n={self.n}"


class MLP(BayesianNet):
    """Fully connected ReLU network; inputs of any shape are flattened to ``in_features``.

    Args:
        in_features: Number of input features after flattening.
        hidden: Widths of the hidden layers (may be empty for logistic regression).
        n_classes: Number of output classes.
        prior_std: Prior standard deviation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100,),
        n_classes: int = 10,
        prior_std: float = 0.1,
    ) -> None:
        super().__init__(prior_std)
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(in_features)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, n_classes]``."""
        return self.net(x)


class LeNet5(BayesianNet):
    """LeNet-5 (ReLU, max-pooling): conv6@5x5, pool, conv16@5x5, pool, fc120, fc84, fc``n_classes``.

    Designed for 32x32 inputs (MNIST padded by 2 pixels); other sizes work if large enough.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        prior_std: float = 0.1,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__(prior_std)
        size = _pair(input_size)
        out = tuple(((s - 4) // 2 - 4) // 2 for s in size)
        _check_positive(out, "lenet5", size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * out[0] * out[1], 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, n_classes]``."""
        return self.classifier(self.features(x))


class SmallCNN(BayesianNet):
    """The paper's CIFAR CNN: conv64@5x5, pool, conv64@5x5, pool, fc384, fc``n_classes`` (ReLU, valid)."""

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 10,
        prior_std: float = 0.1,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__(prior_std)
        size = _pair(input_size)
        out = tuple(((s - 4) // 2 - 4) // 2 for s in size)
        _check_positive(out, "small_cnn", size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Conv2d(64, 64, 5),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * out[0] * out[1], 384),
            nn.ReLU(),
            nn.Linear(384, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, n_classes]``."""
        return self.classifier(self.features(x))


class DigitsNet(BayesianNet):
    """Small CNN for 8x8 digits: conv``channels``@3x3 (pad 1), ReLU, pool, fc``hidden``, ReLU, fc out."""

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        prior_std: float = 0.1,
        input_size: int | Sequence[int] = 8,
        channels: int = 8,
        hidden: int = 64,
    ) -> None:
        super().__init__(prior_std)
        size = _pair(input_size)
        out = tuple(s // 2 for s in size)
        _check_positive(out, "digits_net", size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(channels * out[0] * out[1], hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, n_classes]``."""
        return self.classifier(self.features(x))


# --- factories ------------------------------------------------------------------------------------
def mlp(in_features: int, hidden: Sequence[int] = (100,), n_classes: int = 10, prior_std: float = 0.1) -> MLP:
    """Build an :class:`MLP` (ReLU hidden layers)."""
    return MLP(in_features, hidden, n_classes, prior_std)


def lenet5(
    in_channels: int = 1,
    n_classes: int = 10,
    prior_std: float = 0.1,
    input_size: int | Sequence[int] = 32,
) -> LeNet5:
    """Build a :class:`LeNet5` (ReLU, max-pool) for ``input_size`` images (default 32x32)."""
    return LeNet5(in_channels, n_classes, prior_std, input_size)


def small_cnn(
    in_channels: int = 3,
    n_classes: int = 10,
    prior_std: float = 0.1,
    input_size: int | Sequence[int] = 32,
) -> SmallCNN:
    """Build the paper's CIFAR :class:`SmallCNN` for ``input_size`` images (default 32x32)."""
    return SmallCNN(in_channels, n_classes, prior_std, input_size)


def digits_net(
    in_channels: int = 1,
    n_classes: int = 10,
    prior_std: float = 0.1,
    input_size: int | Sequence[int] = 8,
) -> DigitsNet:
    """Build a :class:`DigitsNet` for 8x8 inputs (8,986 parameters with 10 classes)."""
    return DigitsNet(in_channels, n_classes, prior_std, input_size)


def _image_shape(arch: str, in_shape: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """Split a ``(C, H, W)`` shape into channels and spatial size, with a clear error otherwise."""
    if len(in_shape) != 3:
        raise ValueError(f"architecture {arch!r} needs an image shape (C, H, W), got {tuple(in_shape)}")
    c, h, w = (int(s) for s in in_shape)
    return c, (h, w)


def _build_mlp(in_shape: Sequence[int], n_classes: int, prior_std: float, **kwargs) -> BayesianNet:
    return mlp(math.prod(int(s) for s in in_shape), n_classes=n_classes, prior_std=prior_std, **kwargs)


def _build_lenet5(in_shape: Sequence[int], n_classes: int, prior_std: float, **kwargs) -> BayesianNet:
    c, size = _image_shape("lenet5", in_shape)
    return lenet5(c, n_classes, prior_std, input_size=size, **kwargs)


def _build_small_cnn(in_shape: Sequence[int], n_classes: int, prior_std: float, **kwargs) -> BayesianNet:
    c, size = _image_shape("small_cnn", in_shape)
    return small_cnn(c, n_classes, prior_std, input_size=size, **kwargs)


def _build_digits_net(in_shape: Sequence[int], n_classes: int, prior_std: float, **kwargs) -> BayesianNet:
    c, size = _image_shape("digits_net", in_shape)
    return DigitsNet(c, n_classes, prior_std, input_size=size, **kwargs)


#: Registry of architecture builders ``(in_shape, n_classes, prior_std, **kwargs) -> BayesianNet``.
#: Add an entry to make a new architecture available to :func:`build_model` (and the CLI).
ARCHITECTURES: dict[str, Callable[..., BayesianNet]] = {
    "mlp": _build_mlp,
    "lenet5": _build_lenet5,
    "small_cnn": _build_small_cnn,
    "digits_net": _build_digits_net,
}


def build_model(arch: str, in_shape: Sequence[int], n_classes: int, prior_std: float = 0.1, **kwargs) -> BayesianNet:
    """Construct a registered architecture.

    Args:
        arch: Name in :data:`ARCHITECTURES` (case-insensitive; ``-`` is treated as ``_``).
        in_shape: Shape of one input example, e.g. ``(1, 32, 32)``; an MLP flattens it.
        n_classes: Number of output classes.
        prior_std: Prior standard deviation of every parameter.
        **kwargs: Extra architecture options (e.g. ``hidden=(200, 200)`` for ``mlp``).

    Returns:
        A freshly initialised :class:`BayesianNet`.

    Raises:
        ValueError: If ``arch`` is unknown or ``in_shape`` does not suit the architecture.
    """
    key = arch.strip().lower().replace("-", "_")
    if key not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; available: {known}")
    return ARCHITECTURES[key](tuple(in_shape), int(n_classes), float(prior_std), **kwargs)
