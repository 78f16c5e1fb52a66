"""Request parsing and validation: ids, request ids and solver settings, refused before any work.

Property-based (Hypothesis): every input is either parsed to exactly the ids written in it or refused with an
:class:`InvalidRequestError` — never another exception, never a silently different id list.
"""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcmc_unlearner import InvalidRequestError
from mcmc_unlearner.data import as_id_tensor
from mcmc_unlearner.service import requests
from mcmc_unlearner.service.requests import (
    MAX_ID,
    as_keywords,
    check_request_id,
    check_settings,
    parse_ids,
    read_ids,
)

ids_lists = st.lists(st.integers(0, MAX_ID), min_size=1, max_size=30)
SEPS = st.sampled_from([" ", ",", "\n", "\t", " , ", "\r\n", ",\n"])


@settings(max_examples=200, deadline=None)
@given(ids=ids_lists, seps=st.lists(SEPS, min_size=30, max_size=30), comment=st.booleans())
def test_text_requests_round_trip(ids, seps, comment):
    text = "".join(f"{i}{s}" for i, s in zip(ids, seps)) + ("# a comment 12 é\n" if comment else "")
    assert parse_ids(text) == ids


@settings(max_examples=200, deadline=None)
@given(ids=ids_lists, wrap=st.booleans())
def test_json_requests_round_trip(ids, wrap):
    text = json.dumps({"ids": ids} if wrap else ids)
    assert parse_ids(text) == ids
    assert parse_ids(text.encode()) == ids


def _reference(text: str) -> list[int]:
    """An independent reading of the request format (the documented grammar), for comparison."""
    body = text.strip(" \t\n\r\f\v")
    if body.startswith(("[", "{")):
        obj = json.loads(body)
        if isinstance(obj, dict):
            assert set(obj) == {"ids"}
            obj = obj["ids"]
        return list(obj)
    tokens = [t for line in body.split("\n") for t in re.split(r"[ \t\r\f\v,]+", line.split("#", 1)[0]) if t]
    assert all(re.fullmatch(r"[0-9]+", t) for t in tokens)
    return [int(t) for t in tokens]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200), st.text('0123456789 ,#\n[]{}"ids:-', max_size=60)))
def test_any_input_is_parsed_faithfully_or_refused(raw):
    """Arbitrary input: refused with a one-line ASCII message, or parsed to exactly the ids the grammar reads."""
    try:
        ids = parse_ids(raw)
    except InvalidRequestError as exc:
        assert "\n" not in str(exc) and str(exc).isascii()
        return
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    assert ids and all(isinstance(i, int) and 0 <= i <= MAX_ID for i in ids)
    assert ids == _reference(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("٥٠", "ASCII digits"),  # Arabic-Indic digits: int() would read 50
        ("५", "ASCII digits"),
        ("1_000", "ASCII digits"),
        ("+5", "ASCII digits"),
        ("0x10", "ASCII digits"),
        ("5\u00a06", "ASCII digits"),  # no-break space is not a separator
        (str(2**63), "too large"),
        (str(2**64 - 1), "too large"),
        ("9" * 5000, "too large"),
        (f"[{2**63}]", "too large"),
        ("[" + "9" * 5000 + "]", "too large"),
        ('{"ids":[32],"ids":[33]}', "duplicate key"),
        ('{"ids":[1],"extra":true}', "unknown key"),
        ("[[1]]", "not an integer"),
        ('{"ids":[[1]]}', "nested too deeply"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, NaN]", "not valid JSON"),
        ("[1.0]", "not an integer"),
        ("[-1]", "negative"),
        ("[true]", "not an integer"),
        (b"\xff\xfe1", "UTF-8"),
        ("[]", "empty"),
        ("# nothing\n", "empty"),
    ],
)
def test_bad_ids_refused(text, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_ids(text)


def test_size_limit_checked_before_parsing(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(50 << 20)  # 50 MB (sparse): the limit refuses it by its size, unread
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="max-request-bytes"):
        read_ids(big)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(InvalidRequestError, match="larger than 10 bytes"):
        read_ids("-", max_bytes=10, stdin=io.BytesIO(b"1 2 3 4 5 6 7 8"))
    assert read_ids("-", stdin=io.BytesIO(b"4\n5\n")) == [4, 5]
    small = tmp_path / "ids.txt"
    small.write_text("7 8")
    with pytest.raises(InvalidRequestError, match="more than --max-request-bytes 2"):
        read_ids(small, max_bytes=2)
    assert read_ids(small) == [7, 8]


def test_id_sources_must_be_regular_files(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidRequestError, match="not a regular file; to pipe ids in, use --ids -"):
        read_ids(tmp_path / "fifo")  # would block on open without a writer
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        read_ids(tmp_path)
    with pytest.raises(InvalidRequestError, match="not found"):
        read_ids(tmp_path / "missing")


@settings(max_examples=300, deadline=None)
@given(rid=st.text(max_size=200))
def test_request_ids_printable_bounded(rid):
    ok = 1 <= len(rid) <= 128 and all(" " <= c <= "~" for c in rid) and rid == rid.strip(" ")
    if ok:
        assert check_request_id(rid) == rid
    else:
        with pytest.raises(InvalidRequestError) as info:
            check_request_id(rid)
        assert "\n" not in str(info.value) and "\r" not in str(info.value) and str(info.value).isascii()


@pytest.mark.parametrize(
    "rid", ["", " ", "a" * 129, "x" * 130_000, "t\r\x1b[2Kapplied request ticket-FAKE", "a\nb", " x"]
)
def test_bad_request_ids(rid):
    with pytest.raises(InvalidRequestError, match="request-id"):
        check_request_id(rid)


@pytest.mark.parametrize(
    ("settings_", "match"),
    [
        ({"damping": -1e6}, "--damping must be 'auto' or >= 0"),
        ({"damping": "nan"}, "--damping must be finite"),
        ({"damping": "inf"}, "finite"),
        ({"damping": "abc"}, "must be a number"),
        ({"tol": "nan"}, "--tol must be finite"),
        ({"tol": 0}, r"--tol must be in \(0, 1\)"),
        ({"tol": 1.5}, r"\(0, 1\)"),
        ({"iter_T": -1}, "--iter-T must be between 0"),
        ({"iter_T": "2.5"}, "whole number"),
        ({"iter_T": str(2**63)}, "whole number"),
        ({"curvature_draws": 0}, "--curvature-draws must be between 1"),
        ({"curvature_draws": -3}, "between 1"),
        ({"scaling": "-1"}, "--scaling must be 'auto' or a positive number"),
        ({"scaling": "abc"}, "--scaling must be a number"),
        ({"solver": "newton"}, "--solver must be one of"),
        ({"bank_shift": "x"}, "--bank-shift"),
        ({"hessian": "x"}, "--hessian"),
        ({"emptied_label": "drop"}, "--emptied-label must be one of resample, always, refuse"),
    ],
)
def test_settings_validated_with_the_fix_named(settings_, match):
    with pytest.raises(InvalidRequestError, match=match) as cli:
        check_settings(settings_, interface="cli")  # the command line's spelling: its flags
    # from Python (forget(..., overrides=), the default) the same message names the keyword, never the flag
    # (stop 56: overrides={"tol": True} was refused naming --tol)
    with pytest.raises(InvalidRequestError) as python:
        check_settings(settings_)
    key = next(iter(settings_))
    assert str(python.value) == as_keywords(str(cli.value)) and "--" not in str(python.value)
    assert str(python.value).startswith(f"{key} ") and str(cli.value).startswith(f"{requests.FLAGS[key]} ")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("tol", True, "tol must be a number, got 'True'"),
        ("damping", False, "damping must be a number, got 'False'"),
        ("iter_T", True, "iter_T must be a whole number, got 'True'"),
        ("curvature_draws", 2.5, "curvature_draws must be a whole number, got '2.5'"),
        ("scaling", [1], "scaling must be a number, got '[1]'"),
        ("solver", 3, "solver must be one of auto"),
    ],
)
def test_wrong_typed_overrides_name_the_keyword_from_python_and_the_flag_from_the_cli(key, value, words):
    with pytest.raises(InvalidRequestError) as python:
        check_settings({key: value})
    assert str(python.value).startswith(words) and "--" not in str(python.value), str(python.value)
    with pytest.raises(InvalidRequestError) as cli:
        check_settings({key: value}, interface="cli")
    assert str(cli.value).startswith(words.replace(key, requests.FLAGS[key], 1)), str(cli.value)
    with pytest.raises(InvalidRequestError, match="interface must be 'python' or 'cli'"):
        check_settings({key: value}, interface="web")


def test_good_settings_normalised():
    got = check_settings(
        {"damping": "0", "tol": "1e-4", "iter_T": "50", "curvature_draws": 8, "scaling": "auto", "solver": "kfac"}
    )
    assert got == {"damping": 0.0, "tol": 1e-4, "iter_T": 50, "curvature_draws": 8, "scaling": "auto", "solver": "kfac"}
    assert check_settings({"damping": None}) == {}
    assert check_settings({"emptied_label": "refuse"}) == {"emptied_label": "refuse"}


@pytest.mark.parametrize(
    "ids, shown",
    [
        (np.array([2**64 - 1], dtype=np.uint64), "18446744073709551615"),  # was: "unknown id(s) [-1]"
        (np.array([3, 2**63], dtype=np.uint64), "9223372036854775808"),
        (torch.tensor([2**63], dtype=torch.uint64), "9223372036854775808"),  # was: [-9223372036854775808]
        ([2**70], str(2**70)),  # was: "ids must be integers, got values of type object"
    ],
)
def test_ids_above_int64_are_named_as_too_large_not_wrapped(ids, shown) -> None:
    """uint64 ids over 2^63 wrapped to negative int64 ("unknown id(s) [-1]"); Python ints over 2^63 were "not
    integers"."""
    with pytest.raises(InvalidRequestError, match=f"id {shown} is too large"):
        as_id_tensor(ids)


def test_ordinary_unsigned_ids_still_read() -> None:
    assert as_id_tensor(np.array([3, 5], dtype=np.uint64)).tolist() == [3, 5]
    assert as_id_tensor(torch.tensor([7], dtype=torch.uint64)).tolist() == [7]
    assert as_id_tensor(np.array([1], dtype=np.uint8)).tolist() == [1]


def test_option_spellings_turn_into_each_other():
    from mcmc_unlearner.service.requests import as_flags, as_keywords

    said = (
        "retrain, or repair (--on-failure repair); nothing was written (raise --repair-steps, e.g. tenfold, or commit "
        "it: --on-failure accept); raise --iter-T or use --solver auto; --iter-T 0 leaves no round"
    )
    python = as_keywords(said)
    assert python == (
        "retrain, or repair (on_failure='repair'); nothing was written (raise repair_steps, e.g. tenfold, or commit "
        "it: on_failure='accept'); raise iter_T or use solver='auto'; iter_T=0 leaves no round"
    )
    assert as_flags(python) == said
    assert as_flags("iter_T=0 has no effect with solver='exact'; pass damping='auto'") == (
        "--iter-T 0 has no effect with --solver exact; pass --damping auto"
    )
    assert as_flags("the solver stopped; un.iter_T and the damping") == "the solver stopped; un.iter_T and the damping"
    # a list of values stays as the library wrote it (no "--solver kfac/'cg'")
    assert as_flags("use solver='kfac'/'cg'") == "use solver='kfac'/'cg'"


def test_ids_from_a_closed_standard_input_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """Stop 56's probe: `forget --ids - <&-` (Python then sets sys.stdin to None) was an internal error, exit 70."""
    import sys

    from mcmc_unlearner.cli import main

    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(InvalidRequestError, match="standard input is closed; pipe the ids in"):
        read_ids("-")
    assert main(["forget", "--model", str(tmp_path), "--ids", "-"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcmc-unlearner forget: error: --ids - reads the ids from standard input, but standard input")
    assert err.count("\n") == 1
    stream = io.BytesIO(b"1")
    stream.close()  # a closed stream: refused, not a raw ValueError
    with pytest.raises(InvalidRequestError, match="cannot read the ids from standard input"):
        read_ids("-", stdin=stream)


def test_python_request_id_and_wait_are_checked_in_python_terms(tmp_path):
    """Stop 56's probe: forget(request_id=5) said "--request-id is empty" (the CLI's flag, and not what was wrong);
    forget(wait="x") reached the lock as a raw TypeError, and wait=nan or -5 were taken as 0."""
    import math

    from conftest import folder_state, save_gmm, tiny_gmm
    from mcmc_unlearner.service.deletion import forget, status, verify
    from mcmc_unlearner.service.requests import check_wait

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=8, burn=40))
    before = folder_state(folder)
    for rid in (5, b"x"):
        with pytest.raises(InvalidRequestError, match=r"^request_id must be a string, got (int|bytes)") as info:
            forget(folder, [3], request_id=rid)
        assert "--request-id" not in str(info.value)
    with pytest.raises(InvalidRequestError, match=r"^request_id is empty"):
        forget(folder, [3], request_id="")
    for wait in ("x", math.nan, -5, True, math.inf, None):
        with pytest.raises(InvalidRequestError, match=r"^wait must be a number of seconds in \[0, 86400\]"):
            forget(folder, [3], wait=wait)
    with pytest.raises(InvalidRequestError, match="wait must be"):
        status(folder, wait=math.nan)
    with pytest.raises(InvalidRequestError, match="wait must be"):
        verify(folder, wait=-1)
    assert folder_state(folder) == before
    assert check_wait(0) == 0.0 and check_wait(2.5) == 2.5
    with pytest.raises(InvalidRequestError, match=r"^--request-id is empty"):  # the CLI's wording is kept
        check_request_id("")


def test_wait_takes_numpy_numbers() -> None:
    """Stop 56's review: check_wait refused np.int64(5) and np.float32(2.5) (a value read from a config array)."""
    import numpy as np

    from mcmc_unlearner.service.requests import check_wait

    assert check_wait(np.int64(5)) == 5.0 and type(check_wait(np.int64(5))) is float
    assert check_wait(np.float32(2.5)) == 2.5 and check_wait(np.uint8(0)) == 0.0
    for wait in (np.bool_(True), np.float64("nan"), np.int64(-1), np.float64(1e9)):
        with pytest.raises(InvalidRequestError, match="wait must be a number of seconds"):
            check_wait(wait)


def test_ids_from_a_text_only_standard_input_say_so(monkeypatch) -> None:
    """Stop 56's review: a sys.stdin without ``.buffer`` (io.StringIO in an embedding program) was called closed."""
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n2\n"))
    with pytest.raises(InvalidRequestError, match=r"StringIO\) is a text stream without a byte buffer") as info:
        read_ids("-")
    assert "closed" not in str(info.value) and "stdin=" in str(info.value)
    assert read_ids("-", stdin=io.BytesIO(b"1\n2\n")) == [1, 2]


def test_ids_from_a_text_stream_passed_as_stdin_are_read() -> None:
    """Stop 56's second review: ``read_ids('-', stdin=io.StringIO(...))`` raised a raw TypeError (bytes.startswith
    on a str); a text stream is read as UTF-8, with the same limit and the same parse."""
    assert read_ids("-", stdin=io.StringIO("4\n5\n")) == [4, 5]
    assert read_ids("-", stdin=io.StringIO("\ufeff[1, 2]")) == [1, 2]  # a byte-order mark read as text
    with pytest.raises(InvalidRequestError, match="larger than 10 bytes"):
        read_ids("-", max_bytes=10, stdin=io.StringIO("1 2 3 4 5 6 7 8"))
    with pytest.raises(InvalidRequestError, match="'a' is not an id"):
        read_ids("-", stdin=io.StringIO("a\n"))
    with pytest.raises(InvalidRequestError, match="more than once"):
        read_ids("-", stdin=io.StringIO("3\n3\n"), unique=True)
