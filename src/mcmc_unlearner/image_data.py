"""Image classification datasets for the BNN experiments, loaded without torchvision.

:func:`load_dataset` returns an :class:`ImageData` with float32 ``NCHW`` images scaled to ``[0, 1]``
(raw pixel value / max value; no mean/std standardisation) and int64 labels.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16 divided by 16), split
  25 % test with a stratified, seeded ``train_test_split``. Never downloads anything.
* ``mnist`` / ``fashion-mnist``: the four IDX files (plain or ``.gz``) in one folder, searched in this order:
  ``<data_dir>/MNIST/raw/`` or ``<data_dir>/FashionMNIST/raw/`` (torchvision's layout), ``<data_dir>/`` itself
  (the Debian layout: ``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist/``)
  and ``<data_dir>/mnist/`` or ``<data_dir>/fashion-mnist/`` (``data_dir=/usr/share/datasets``). The 28x28 images
  are zero-padded by 2 pixels to 32x32 for LeNet-5 (the paper's code resizes them to 32x32 instead). The two
  data sets share file names: a folder whose training labels start exactly as the *other* data set's official
  training file does is passed over.
* ``cifar10`` / ``cifar100``: the "python version" pickled batches under
  ``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/`` (or directly in ``<data_dir>``; fine
  labels for CIFAR-100), read with a restricted unpickler that can only rebuild numpy arrays.

Files are parsed by this module. torchvision is used only to *download* missing files when
``download=True`` and is imported lazily (``pip install "mcmc-unlearner[vision]"``).
If ``data_dir`` is ``None`` it defaults to ``$MCMC_UNLEARNER_DATA`` or ``./data``.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: the CLI finds missing files without loading it
    from torch import Tensor

__all__ = [
    "DATASETS",
    "DatasetPickleError",
    "ImageData",
    "RestrictedUnpickler",
    "canonical_name",
    "class_indices",
    "find_mnist_files",
    "image_shape",
    "load_dataset",
    "missing_dataset",
    "mnist_search_dirs",
    "read_cifar_batch",
    "read_idx",
    "subset_by_class",
]

#: Canonical dataset names accepted by :func:`load_dataset`.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")

_ALIASES = {
    "digits": "digits",
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}

_MNIST_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
#: Sub-folders of ``data_dir`` holding the files directly (the Debian package's folder names).
_MNIST_FLAT_DIRS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist"}
#: What to do when the files are missing, besides ``--download``.
_MNIST_INSTALL = {
    "fashion-mnist": "install the Debian package (apt-get install dataset-fashion-mnist) and pass "
    "--data-dir /usr/share/datasets/fashion-mnist",
    "mnist": "place the four MNIST IDX files in one of those folders",
}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: The first 10 labels of each data set's official training file (``train-labels-idx1-ubyte``): the two data sets
#: share file names, so a folder of files is told apart by its content, not its name.
_OFFICIAL_FIRST_LABELS = {
    "mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}
_OTHER_IDX_SET = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR100_DIR = "cifar-100-python"

_INSTALL_HINT = 'pip install "mcmc-unlearner[vision]"'


@dataclass
class ImageData:
    """An image classification dataset held in memory.

    Attributes:
        x_train: Training images, float32 ``[N, C, H, W]`` in ``[0, 1]``.
        y_train: Training labels, int64 ``[N]``.
        x_test: Test images, float32 ``[M, C, H, W]`` in ``[0, 1]``.
        y_test: Test labels, int64 ``[M]``.
        n_classes: Number of classes.
        name: Canonical dataset name.
        in_shape: Shape ``(C, H, W)`` of one image.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    name: str
    in_shape: tuple[int, int, int]

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.shape[0])


def class_indices(y: Tensor, cls: int) -> Tensor:
    """Indices (int64, ascending) of the examples whose label equals ``cls``."""
    import torch

    return torch.nonzero(torch.as_tensor(y) == int(cls), as_tuple=False).flatten().long()


def subset_by_class(x: Tensor, y: Tensor, cls: int) -> tuple[Tensor, Tensor]:
    """Return ``(x[idx], y[idx])`` for the examples of class ``cls``."""
    idx = class_indices(y, cls)
    return x[idx], y[idx]


# --- IDX (MNIST) ------------------------------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, detected by the ``.gz`` suffix).

    The header is validated: two zero bytes, a known type code, ``ndim >= 1`` and a payload whose
    length is exactly ``prod(dims) * itemsize``.

    Args:
        path: File path.

    Returns:
        Array with the file's dims, in native byte order.

    Raises:
        ValueError: If the file is truncated, has trailing bytes, has a corrupt header/gzip stream, or is
            gzip-compressed under a name without ``.gz``.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs at least 4)")
    if raw[:2] == b"\x1f\x8b":
        raise ValueError(
            f"{path}: gzip-compressed (magic number {raw[:4].hex()}), but its name does not end in .gz; rename it "
            f"to {path.name}.gz or decompress it (gunzip)"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim < 1:
        raise ValueError(f"{path}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (need {header} bytes, file has {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: np.prod in int64 wraps for huge dims
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {kind}: dims {dims} need {expected} bytes in total, file has {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    """Return the plain or ``.gz`` version of an IDX file, preferring the plain one."""
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _first_labels(path: Path) -> tuple[int, ...] | None:
    """The first (up to 10) labels of a uint8 IDX label file, reading only its first bytes; ``None`` when
    unreadable (the full read then reports the problem)."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(18)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 8 or head[:4] != b"\x00\x00\x08\x01":
        return None
    return tuple(head[8:])


def _holds_other_set(key: str, files: dict[str, Path]) -> str | None:
    """The other IDX data set's name when the training labels of ``files`` start exactly as that data set's
    official training file does (then the files are evidently not ``key``'s); else ``None``."""
    other = _OTHER_IDX_SET[key]
    if _first_labels(files["train-labels-idx1-ubyte"]) == _OFFICIAL_FIRST_LABELS[other]:
        return other
    return None


def _folder_files(d: Path) -> dict[str, Path] | None:
    """The four IDX files in folder ``d`` (plain preferred over ``.gz``), or ``None`` when one is absent."""
    found = {s: _find_idx(d, s) for pair in _MNIST_FILES.values() for s in pair}
    if all(p is not None for p in found.values()):
        return {s: p for s, p in found.items() if p is not None}
    return None


def mnist_search_dirs(name: str, root: str | os.PathLike) -> list[Path]:
    """Folders searched, in order, for the IDX files of ``name`` (``"mnist"`` or ``"fashion-mnist"``).

    ``<root>/<MNIST|FashionMNIST>/raw`` (torchvision), ``<root>`` itself (Debian: the files directly in the
    folder) and ``<root>/<mnist|fashion-mnist>`` (``root=/usr/share/datasets``). Both data sets use the same
    file names, so ``<root>`` itself is skipped for MNIST when its folder name says Fashion-MNIST; and
    :func:`find_mnist_files` passes over a folder whose files are evidently the other data set's.
    """
    key = _ALIASES.get(name.strip().lower())
    if key not in _MNIST_DIRS:
        raise ValueError(f"{name!r} is not an IDX data set; choose 'mnist' or 'fashion-mnist'")
    root = Path(root).expanduser()
    dirs = [root / _MNIST_DIRS[key] / "raw"]
    if not (key == "mnist" and "fashion" in root.resolve().name.lower()):
        dirs.append(root)
    dirs.append(root / _MNIST_FLAT_DIRS[key])
    return dirs


def find_mnist_files(name: str, root: str | os.PathLike) -> dict[str, Path] | None:
    """The four IDX files of ``name`` from the first folder of :func:`mnist_search_dirs` that holds all four.

    A folder whose training labels start exactly as the *other* data set's official training file does (MNIST:
    5, 0, 4, 1, 9, ...; Fashion-MNIST: 9, 0, 0, 3, 0, ...) holds that data set and is passed over.

    Returns:
        ``{stem: path}`` (plain file preferred over ``.gz``), or ``None`` when no folder has all four.
    """
    key = _ALIASES.get(name.strip().lower(), name)
    for d in mnist_search_dirs(name, root):
        files = _folder_files(d)
        if files is not None and _holds_other_set(key, files) is None:
            return files
    return None


def _load_mnist_split(files: dict[str, Path], split: str) -> tuple[Tensor, Tensor]:
    """Read one MNIST-format split and return padded 32x32 images in [0, 1] and labels."""
    import torch

    img_stem, lbl_stem = _MNIST_FILES[split]
    img_path, lbl_path = files[img_stem], files[lbl_stem]
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{lbl_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path}: {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= 10:
        raise ValueError(
            f"{lbl_path}: labels outside [0, 10): {int(labels.min())}..{int(labels.max())}; (Fashion-)MNIST has "
            "10 classes: the file is corrupt or from another data set"
        )
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x, torch.from_numpy(labels.astype(np.int64))


def _mnist_missing(name: str, root: Path) -> list[Path]:
    """Nothing when some searched folder holds all four files; else the files missing from the first folder."""
    if find_mnist_files(name, root) is not None:
        return []
    stems = [s for pair in _MNIST_FILES.values() for s in pair]
    first = mnist_search_dirs(name, root)[0]
    return [first / s for s in stems if _find_idx(first, s) is None] or [first / s for s in stems]


# --- CIFAR pickles ----------------------------------------------------------------------------------
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (plus builtin containers, which need no globals).

    Allowed globals: ``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``. Anything else raises :class:`pickle.UnpicklingError`
    before it is imported or called, so a malicious file cannot execute code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):
        """Resolve only the allowed numpy globals; refuse everything else."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset pickle")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


class DatasetPickleError(pickle.UnpicklingError, ValueError):
    """A data-set pickle that cannot be read: corrupt, truncated, not a pickle, or referring to a global the
    :class:`RestrictedUnpickler` refuses. Both a :class:`ValueError` and a :class:`pickle.UnpicklingError`."""


def _restricted_load(path: Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (latin1 for Python-2 numpy strings).

    Raises:
        DatasetPickleError: naming ``path`` and the problem.
    """
    data = path.read_bytes()
    fix = "replace it with the file from the official CIFAR 'python version' archive"
    if data[:2] == b"\x1f\x8b":
        raise DatasetPickleError(
            f"{path}: gzip-compressed data, not a pickle (a .tar.gz archive not extracted?); extract the archive "
            f"(tar xzf cifar-*-python.tar.gz) or {fix}"
        )
    if not data:
        raise DatasetPickleError(f"{path}: empty file; {fix}")
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing to load global"):
            raise DatasetPickleError(
                f"{path}: {e} (only numpy arrays are rebuilt, as the official Python-2 batch files need); {fix}"
            ) from e
        kind = "truncated pickle" if "truncated" in str(e) else "corrupt pickle, or not a pickle"
        raise DatasetPickleError(f"{path}: {kind} ({e}); {fix}") from e
    except EOFError as e:
        raise DatasetPickleError(f"{path}: truncated pickle (ran out of input); {fix}") from e
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, MemoryError) as e:
        raise DatasetPickleError(f"{path}: corrupt pickle ({type(e).__name__}: {e}); {fix}") from e


def read_cifar_batch(path: str | os.PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR "python version" batch file safely.

    Args:
        path: Batch file, e.g. ``cifar-10-batches-py/data_batch_1``.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` / ``"coarse_labels"`` (CIFAR-100).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        DatasetPickleError: (a ``ValueError`` and a ``pickle.UnpicklingError``) naming the file, if it is not a
            readable pickle (truncated, corrupt, gzip-compressed) or references anything but numpy array globals.
        ValueError: If the content is not a well-formed batch.
    """
    path = Path(path)
    obj = _restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict batch, got {type(obj).__name__}")
    # Python-2 files give str keys under latin1; Python-3 files may have bytes keys.
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: batch lacks 'data' or {label_key!r} (keys: {sorted(map(str, batch))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_files(name: str, root: Path) -> tuple[list[Path], list[Path], str]:
    """Train and test batch files and the label key: in ``root/<cifar-10-batches-py|cifar-100-python>`` (torchvision's
    layout), or in ``root`` itself when only it holds them all (``root`` is the batch folder)."""
    sub, train, test, key = (
        (_CIFAR10_DIR, _CIFAR10_TRAIN, ("test_batch",), "labels")
        if name == "cifar10"
        else (_CIFAR100_DIR, ("train",), ("test",), "fine_labels")
    )
    d = root / sub
    if not all((d / f).is_file() for f in (*train, *test)) and all((root / f).is_file() for f in (*train, *test)):
        d = root
    return [d / f for f in train], [d / f for f in test], key


def _load_cifar_files(paths: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    import torch

    parts = [read_cifar_batch(p, label_key) for p in paths]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x).to(torch.float32).div_(255.0), torch.from_numpy(y)


# --- download ---------------------------------------------------------------------------------------
def _download(name: str, root: Path, missing: list[Path]) -> None:
    """Download ``name`` into ``root`` with torchvision (imported lazily)."""
    import torch

    paths = "\n  ".join(str(p) for p in missing)
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise ImportError(
            f"downloading {name!r} needs torchvision: {_INSTALL_HINT}, or place the files at:\n  {paths}"
        ) from e
    except (RuntimeError, AttributeError, OSError) as e:  # a torchvision built for another torch fails on import
        raise ImportError(
            f"downloading {name!r} needs torchvision, but the installed one does not import beside torch "
            f"{torch.__version__} ({type(e).__name__}: {str(e)[:120]}); install the torchvision release matching "
            f"this torch, or place the files at:\n  {paths}"
        ) from e
    cls = {
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _default_root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("MCMC_UNLEARNER_DATA", "data")).expanduser()


def missing_dataset(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Why :func:`load_dataset` would refuse ``name`` from ``data_dir`` without ``download`` (its message; ``None``:
    the files are there, or the name is not a data set's), found without loading torch or reading the images."""
    key = _ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if key is None or key == "digits":
        return None
    root = _default_root(data_dir)
    missing = _missing_files(key, root)
    return _missing_message(key, root, missing) if missing else None


def _missing_files(name: str, root: Path) -> list[Path]:
    if name in _MNIST_DIRS:
        return _mnist_missing(name, root)
    train, test, _ = _cifar_files(name, root)
    return [p for p in (*train, *test) if not p.is_file()]


def _not_a_file(path: Path) -> str | None:
    """Why something at ``path`` is not a readable file (a dangling symlink, a directory), or ``None``."""
    if path.is_symlink() and not path.exists():
        return f"{path.name} is a dangling symlink (to {os.readlink(path)})"
    if path.is_dir():
        return f"{path.name} is a directory, not a file"
    return None


def _absent_idx(d: Path, stems: list[str]) -> str:
    """Which IDX files of ``stems`` folder ``d`` lacks, and what is in their place (a dangling symlink, a folder)."""
    absent = [s for s in stems if _find_idx(d, s) is None]
    odd = {s: next((w for w in (_not_a_file(d / s), _not_a_file(d / f"{s}.gz")) if w), None) for s in absent}
    plain = [s for s in absent if odd[s] is None]
    return "; ".join(([f"missing {', '.join(plain)}"] if plain else []) + [w for w in odd.values() if w])


def _missing_message(key: str, root: Path, missing: list[Path]) -> str:
    """What is missing, where it was looked for and what to do about it."""
    download = f"or pass download=True (CLI: --download) to fetch them with torchvision ({_INSTALL_HINT})"
    if key not in _MNIST_DIRS:
        folder = _cifar_files(key, root)[0][0].parent
        paths = "\n  ".join(f"{p} ({_not_a_file(p)})" if _not_a_file(p) else str(p) for p in missing)
        return (
            f"dataset {key!r} not found; expected files (in {folder}, or all of them in {root} itself):\n  {paths}\n"
            f"Place them there, {download}."
        )
    stems = [s for pair in _MNIST_FILES.values() for s in pair]
    lines, held = [], ""
    for d in mnist_search_dirs(key, root):
        files = _folder_files(d)
        other = _holds_other_set(key, files) if files is not None else None
        if not d.is_dir():
            state = "no such folder"
        elif other is not None:
            held = f" ({d} holds the {other} files)"
            state = (
                f"holds {other}'s files, not {key}'s (its first 10 training labels "
                f"{list(_OFFICIAL_FIRST_LABELS[other])} are {other}'s official ones): passed over"
            )
        else:
            state = _absent_idx(d, stems)
        lines.append(f"  {d}: {state}")
    return (
        f"dataset {key!r} not found{held}: no folder holds all four {key} IDX files ({', '.join(stems)}; plain "
        f"or .gz).\nSearched:\n" + "\n".join(lines) + f"\nTo fix: {_MNIST_INSTALL[key]}, {download}."
    )


def _load_digits(seed: int) -> ImageData:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return ImageData(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        n_classes=10,
        name="digits",
        in_shape=(1, 8, 8),
    )


def canonical_name(name: str) -> str | None:
    """The name in :data:`DATASETS` of ``name`` or its alias (``fmnist``, ``cifar-10``, ...); ``None``: unknown."""
    return _ALIASES.get(name.strip().lower()) if isinstance(name, str) else None


def image_shape(name: str, data_dir: str | os.PathLike | None = None) -> tuple[tuple[int, int, int], int] | None:
    """The image shape ``(C, H, W)`` and class count :func:`load_dataset` gives ``name``, found without loading torch
    or the images: (Fashion-)MNIST's image size from its training file's IDX header (torchvision's 28x28 when the
    files are absent, as ``--download`` fetches them), padded by 2 pixels. ``None``: an unknown name or an unreadable
    header (:func:`load_dataset` refuses those)."""
    key = canonical_name(name)
    if key is None:
        return None
    if key == "digits":
        return (1, 8, 8), 10
    if key not in _MNIST_DIRS:
        return (3, 32, 32), 10 if key == "cifar10" else 100  # (_load_cifar_files checks 3x32x32)
    files = find_mnist_files(key, _default_root(data_dir))
    if files is None:
        return (1, 32, 32), 10
    path = files[_MNIST_FILES["train"][0]]
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(16)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":  # uint8, 3 dims (what _load_mnist_split accepts)
        return None
    h, w = (int.from_bytes(head[i : i + 4], "big") for i in (8, 12))
    return (1, h + 4, w + 4), 10


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False, seed: int = 0
) -> ImageData:
    """Load an image classification dataset into memory.

    Args:
        name: One of :data:`DATASETS` (aliases such as ``fashion_mnist`` or ``cifar-10`` accepted).
        data_dir: Folder holding the files (torchvision's layout, or the files directly in it; for
            (Fashion-)MNIST see :func:`mnist_search_dirs`); defaults to ``$MCMC_UNLEARNER_DATA`` or ``./data``. Ignored
            for ``digits``.
        download: Fetch missing files with torchvision (optional dependency) into ``data_dir``.
        seed: Random state of the stratified train/test split (``digits`` only; the others have
            fixed official splits).

    Returns:
        An :class:`ImageData` with images in ``[0, 1]``.

    Raises:
        ValueError: Unknown name, or corrupt/truncated files (named in the message).
        FileNotFoundError: Files missing and ``download`` is false.
        ImportError: Files missing, ``download`` true, and torchvision not installed.
    """
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if key == "digits":
        return _load_digits(seed)

    root = _default_root(data_dir)
    missing = _missing_files(key, root)
    if missing:
        if not download:
            raise FileNotFoundError(_missing_message(key, root, missing))
        _download(key, root, missing)
        still = _missing_files(key, root)
        if still:
            raise FileNotFoundError(f"download of {key!r} did not produce: {', '.join(map(str, still))}")

    if key in _MNIST_DIRS:
        files = find_mnist_files(key, root)
        assert files is not None  # checked above
        x_tr, y_tr = _load_mnist_split(files, "train")
        x_te, y_te = _load_mnist_split(files, "test")
        n_classes = 10
    else:
        train, test, label_key = _cifar_files(key, root)
        x_tr, y_tr = _load_cifar_files(train, label_key)
        x_te, y_te = _load_cifar_files(test, label_key)
        n_classes = 10 if key == "cifar10" else 100
    if tuple(x_tr.shape[1:]) != tuple(x_te.shape[1:]):
        raise ValueError(
            f"{key}: training images are {'x'.join(map(str, x_tr.shape[1:]))} but test images "
            f"{'x'.join(map(str, x_te.shape[1:]))}; both splits must come from the same data set"
        )
    for split, y in (("train", y_tr), ("test", y_te)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"{key} {split} labels outside [0, {n_classes}): {int(y.min())}..{int(y.max())}")
    return ImageData(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        n_classes=n_classes,
        name=key,
        in_shape=tuple(int(s) for s in x_tr.shape[1:]),
    )
