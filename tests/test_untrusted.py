"""privdiff.io.untrusted: files refused by kind before any read, bounded JSON, typed config numbers."""

import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privdiff.errors import PrivdiffError
from privdiff.io.untrusted import config_float, config_int, file_kind, parse_json, read_bytes, read_json, regular_file


def test_non_regular_files_are_refused_by_kind_without_opening_them(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        cases = [(fifo, "is a FIFO, not a file"), (tmp_path, "is a folder, not a file"),
                 (tmp_path / "sock", "is a socket, not a file"), (tmp_path / "none", "does not exist"),
                 ("/dev/null", "is a character device, not a file")]
        for path, message in cases:
            with pytest.raises(PrivdiffError, match=message):
                read_bytes(path, "the ledger", 100)
    (tmp_path / "ok").write_bytes(b"abc")
    assert regular_file(tmp_path / "ok", "x") == tmp_path / "ok" and file_kind(tmp_path / "ok") is None


def test_a_file_over_its_cap_is_refused_before_it_is_read(tmp_path):
    (tmp_path / "big").write_bytes(bytes(101))
    with pytest.raises(PrivdiffError, match="has 101 bytes, more than the 100"):
        read_bytes(tmp_path / "big", "the config", 100)


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 400 + "]" * 400, "nested more than 32 deep"),
    ('{"a": NaN}', "not valid JSON"),
    ('{"a": -Infinity}', "not valid JSON"),
    ("{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (" " * 2000, "more than the 1000"),
])
def test_hostile_json_is_one_line(text, message):
    with pytest.raises(PrivdiffError, match=message) as error:
        parse_json(text, "the report", limit=1000)
    assert "\n" not in str(error.value)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    (tmp_path / "c.json").write_text('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"]]"}')
    assert read_json(tmp_path / "c.json", "the config", depth=2) == {"a": "[" * 40 + '"]]'}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                    max_leaves=30))
def test_any_json_value_parses_or_is_refused_in_one_line(value):
    import json

    text = json.dumps(value)
    try:
        assert parse_json(text, "x", depth=4) == json.loads(text)
    except PrivdiffError as error:
        assert "\n" not in str(error) and "nested" in str(error)


@pytest.mark.parametrize("value", [True, "8", 3.5, -1, 10**400, None, [1]])
def test_config_ints_are_typed_and_ranged(value):
    with pytest.raises(PrivdiffError, match="heads must be a whole number in 1..64"):
        config_int(value, "heads", 1, 64)


@pytest.mark.parametrize("value", [True, "1e-3", float("nan"), float("inf"), 1e-310, 10**400, 2.0])
def test_config_floats_are_typed_finite_and_ranged(value):
    with pytest.raises(PrivdiffError, match="noise multiplier must be"):
        config_float(value, "noise multiplier", 1e-3, 1.0)
    assert config_float(1, "x", 0, 2) == 1.0
