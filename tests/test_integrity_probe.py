"""Probe k: key files behind links, empty key variable, forget on a folder whose ledger and state disagree,
verify --expect-head's false rollback claim. Fails on the current code; passes with fix-*.patch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_gmm, tiny_gmm
from mcmc_unlearner.service import integrity
from mcmc_unlearner.service import ledger as L
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.fsio import StoreError, sha256_hex
from mcmc_unlearner.service.integrity import KEY_ENV, resolve_key
from mcmc_unlearner.service.state import state_bytes, tensors_digest

KEY = "k" * 32


def test_key_file_behind_a_symlink_is_read(tmp_path):
    # Kubernetes secret volumes mount each key as a link (key -> ..data/key); process substitution is /dev/fd/N
    real = tmp_path / "..data"
    real.mkdir()
    (real / "key").write_text(KEY + "\n")
    (tmp_path / "key").symlink_to("..data/key")
    assert resolve_key(tmp_path / "key").secret == KEY.encode()


def test_key_file_message_does_not_talk_about_model_folders(tmp_path):
    with pytest.raises(StoreError) as exc:
        resolve_key(tmp_path)  # a folder
    assert "model folder" not in str(exc.value) and "backup" not in str(exc.value)


def test_empty_key_variable_is_not_silently_no_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "")  # e.g. export MCMC_UNLEARNER_KEY=$(cat missing-file)
    with pytest.raises(StoreError, match="empty"):
        resolve_key()


def _digest(t):
    params = torch.cat([t[k].reshape(-1) for k in sorted(k for k in t if k.startswith("model/"))])
    return tensors_digest([("params", params), ("bank", t["bank"]), ("alive", t["data/alive"])])


def _rewrite(folder, tensors, fix_ledger):
    """An unsigned folder's state replaced, the manifest's hashes recomputed (and the ledger's, if asked)."""
    m = json.loads((folder / "manifest.json").read_text())
    blob = state_bytes(tensors)
    (folder / m["state_file"]).write_bytes(blob)
    m["state_sha256"], m["model_sha256"] = sha256_hex(blob), _digest(tensors)
    lines = (folder / "ledger.jsonl").read_bytes().split(b"\n")[:-1]
    if fix_ledger:
        es = [json.loads(x) for x in lines]
        es[-1]["after_sha256"] = m["model_sha256"]
        prev, out = L.GENESIS, b""
        for e in es:
            e["prev_sha256"] = prev
            line = L.canonical_json(e).encode()
            out += line + b"\n"
            prev = L.line_sha256(line)
        (folder / "ledger.jsonl").write_bytes(out)
        m["ledger_head"] = prev
    m = {k: v for k, v in m.items() if k not in ("manifest_sha256", "manifest_hmac", "integrity")}
    integrity.sign(m, None)
    (folder / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", ["params", "mask"])
def test_forget_refuses_what_verify_fails(tmp_path, case):
    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=8, burn=40))
    orig = load_file(str(folder / "state-000000.safetensors"))
    forget(folder, [3, 14], request_id="r1")
    t = dict(load_file(str(folder / "state-000001.safetensors")))
    if case == "params":  # the pre-unlearning parameters and bank put back; only the manifest recomputed
        t["model/means"], t["bank"] = orig["model/means"], orig["bank"]
        _rewrite(folder, t, fix_ledger=False)
    else:  # id 3 back in the training set; manifest and ledger recomputed
        alive = t["data/alive"].clone()
        alive[3] = True
        t["data/alive"] = alive
        _rewrite(folder, t, fix_ledger=True)
    assert not verify(folder).ok
    st = status(folder)  # it said "state hash ok: yes" and nothing else
    assert not st["ledger_matches_state"] and st["ledger_state_problems"]
    before = (folder / "ledger.jsonl").read_bytes()
    with pytest.raises(StoreError, match="does not match the stored state"):
        forget(folder, [3] if case == "mask" else [40], request_id="r2")
    assert (folder / "ledger.jsonl").read_bytes() == before


def test_expect_head_no_false_rollback_claim(tmp_path, capsys):
    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=8, burn=40))
    h1 = forget(folder, [3], request_id="r1").head
    forget(folder, [4], request_id="r2")
    m = json.loads((folder / "manifest.json").read_text())
    p = folder / m["state_file"]
    b = bytearray(p.read_bytes())
    b[-1] ^= 1
    p.write_bytes(bytes(b))
    res = verify(folder, expect_head=h1)
    assert not res.ok
    assert not any("rolled back" in x for x in res.problems), res.problems


@pytest.mark.parametrize("name", ["sampler/state/0/momentum_buffer", "unlearner/carry", "unlearner/cache"])
def test_non_finite_sampler_or_unlearner_state_is_reported_and_refused(tmp_path, name):
    """Stop 56's probe: NaN SGHMC momentum, carried influence or cached curvature (hashes recomputed, as a writer bug
    would leave them) passed verify and status, and forget committed on top of them (or blamed the model or the
    damping). Now verify reports it, status and forget refuse it, and no file changes."""
    from conftest import folder_state

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=8, burn=40, refresh_every=5))
    forget(folder, [3, 14], request_id="r1")  # refresh_every=5: the curvature cache is kept in the state
    t = dict(load_file(str(folder / "state-000001.safetensors")))
    assert name in t
    t[name] = torch.full_like(t[name], float("nan"))
    _rewrite(folder, t, fix_ledger=False)
    before = folder_state(folder)
    res = verify(folder)
    assert not res.ok and any("saved sampler/unlearner state is not finite" in p and name in p for p in res.problems)
    with pytest.raises(StoreError, match=r"saved sampler/unlearner state is not finite.*restore the folder"):
        status(folder)
    with pytest.raises(StoreError, match="saved sampler/unlearner state is not finite"):
        forget(folder, [5], request_id="r2")
    assert folder_state(folder) == before


def test_save_model_refuses_non_finite_sampler_state(tmp_path):
    """Stop 56's probe: save_model wrote a diverged SGHMC's NaN momentum, and every later request carried it."""
    from mcmc_unlearner.service.state import nonfinite_state

    objs = tiny_gmm(0, bank=8, burn=40)
    for st in objs[1].state.values():
        st["momentum_buffer"].fill_(float("inf"))
    with pytest.raises(StoreError, match=r"cannot save: .*momentum_buffer\): .*nothing was saved"):
        save_gmm(tmp_path / "m", objs)
    assert not (tmp_path / "m").exists()  # refused before the folder is created
    assert nonfinite_state({"bank": torch.tensor([float("nan")])}) == []  # the bank has its own check
