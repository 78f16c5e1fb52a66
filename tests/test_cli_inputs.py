"""Bad inputs to the experiment commands and to summary (probe 34a). Each fails on main a67c28f."""

import gzip
import json
import struct

import numpy as np
import pytest

from mcmc_unlearner.cli import main
from mcmc_unlearner.experiments.bnn import BNNConfig, _Experiment
from mcmc_unlearner.image_data import load_dataset, read_idx


def _idx(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def _fmnist(folder, n_train=60, n_test=20, h_test=28, y_train=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y_tr = rng.integers(0, 10, n_train) if y_train is None else y_train
    files = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 255, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": _idx(y_tr),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 255, (n_test, h_test, h_test))),
        "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, n_test)),
    }
    for name, raw in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    return folder


def test_idx_dims_whose_product_wraps_int64_are_refused_as_truncated(tmp_path):
    # 2**21 * 2**21 * 2**22 = 2**64: np.prod in int64 wraps to 0, so a 16-byte header "matched" its size
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", 2**21, 2**21, 2**22)))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)


def test_train_and_test_images_of_different_sizes_are_refused_when_loaded(tmp_path):
    root = _fmnist(tmp_path / "fm", h_test=20)
    with pytest.raises(ValueError, match="test images"):
        load_dataset("fashion-mnist", root)  # was accepted; bnn crashed after training (exit 70)


def test_remove_class_absent_from_training_data_is_refused_before_training(tmp_path):
    root = _fmnist(tmp_path / "fm", y_train=np.arange(60) % 9 + 1)  # no class 0
    with pytest.raises(ValueError, match="no point of that class"):
        _Experiment(BNNConfig(dataset="fashion-mnist", data_dir=str(root), arch="mlp", progress=False))


def test_empty_test_split_is_refused_before_training(tmp_path):
    root = _fmnist(tmp_path / "fm", n_test=0)
    with pytest.raises(ValueError, match="test split is empty"):
        _Experiment(BNNConfig(dataset="fashion-mnist", data_dir=str(root), arch="mlp", progress=False))


def test_save_model_folder_holding_out_is_refused_before_any_work(tmp_path, capsys):
    out, model = tmp_path / "m" / "out", tmp_path / "m"
    rc = main(["demo", "--out", str(out), "--save-model", str(model), "--quiet", "--threads", "1"])
    assert rc == 2
    assert "--save-model" in capsys.readouterr().err
    assert not model.exists()  # was: the origin chain trained, then refused, the empty parent left behind


def _run(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    raw = text.encode("utf-8") if isinstance(text, str) else text
    (d / "metrics.json").write_bytes(raw)
    return str(d)


@pytest.mark.parametrize(
    "content",
    [
        '{"experiment": "gmm", "seed": 1, "x": 1' + "0" * 400 + "}",  # int beyond float range: exit 70
        '{"experiment": "gmm", "a": ' + '{"a": ' * 5000 + "1" + "}" * 5001,  # deep nesting: exit 70
        b'{"experiment": "gmm", "x": "\xff\xfe"}',  # not UTF-8: message without the file name
    ],
    ids=["huge-int", "deep", "not-utf8"],
)
def test_summary_corrupt_metrics_is_one_line_exit_2_naming_the_file(tmp_path, capsys, content):
    good = _run(tmp_path, "good", json.dumps({"experiment": "gmm", "seed": 0, "x": 1.0}))
    bad = _run(tmp_path, "bad", content)
    rc = main(["summary", good, bad])
    err = capsys.readouterr().err
    assert rc in (0, 2), err
    if rc == 2:
        assert "bad" in err and "internal error" not in err


def _mkdir_fails_at(monkeypatch, target):
    """``Path.mkdir`` refuses ``target`` as a read-only file system would (``/proc/x`` as root: ENOENT)."""
    import errno
    import pathlib

    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


@pytest.mark.parametrize("command", ["demo", "bnn"])
def test_out_folder_that_cannot_be_created_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, command):
    """Was: the raw OS message (`[Errno 2] No such file or directory: '/proc/x'`), and parents left behind."""
    out = tmp_path / "a" / "b" / "run"
    _mkdir_fails_at(monkeypatch, out)
    rc = main([command, "--out", str(out), "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: --out cannot create folder '{out}': Read-only file system" in err, err
    assert "Errno" not in err
    assert not (tmp_path / "a").exists()  # the parents it made are removed again
    assert list(tmp_path.iterdir()) == []


def test_summary_out_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from mcmc_unlearner.experiments import report

    run = _run(tmp_path, "r0", json.dumps({"experiment": "gmm", "seed": 0, "x": 1.0}))
    dest = tmp_path / "s.json"

    def mkstemp(*args, **kwargs):
        raise OSError(errno.ENOENT, "No such file or directory", str(tmp_path / ".s.json.x.tmp"))

    monkeypatch.setattr(report.tempfile, "mkstemp", mkstemp)
    rc = main(["summary", run, "--out", str(dest)])
    out, err = capsys.readouterr()
    assert rc == 2 and not out and err.count("\n") == 1, err
    assert f"--out cannot write '{dest}': No such file or directory" in err and ".tmp" not in err, err
    assert not dest.exists()
