"""The bad-input contract of `privdiff he worker|sample` (issue 20): addresses checked at parse time, a batch
that cannot fit refused by its memory estimate, and hostile workers (silent, a 2 GiB frame, an ERROR with
terminal escapes) ending `he sample --worker` in one line within seconds, before any model loads and with
nothing created."""

from __future__ import annotations

import importlib.util
import resource
import socket
import struct
import time
from pathlib import Path

import pytest

from privdiff.he import protocol
from privdiff.he.protocol import ERROR, MAGIC, READY, Message, encode

_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
refused = _checks.refused

TIMEOUT = 0.5


@pytest.fixture
def no_model(monkeypatch):
    import privdiff.models.registry

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(privdiff.models.registry, "load_model", load_model)


def _sample(tmp_path: Path, *extra: str) -> list:
    return ["he", "sample", "--model", "tiny", "--prompt", "x", "--out", tmp_path / "out", *extra]


@pytest.mark.parametrize("address", ["127.0.0.1:\u00b2", "127.0.0.1:\u0661\u0662", "a" * 70 + ".example:7000",
                                     "localhost", ":7000", "host:70000", "bad host:1", "-x:1", "[::1]:-1"])
def test_bad_addresses_are_refused_at_parse_time(tmp_path, capsys, no_model, address):
    refused(capsys, tmp_path, _sample(tmp_path, f"--worker={address}"), "argument --worker", "HOST:PORT")
    refused(capsys, tmp_path, ["he", "worker", f"--listen={address}"], "argument --listen", "HOST:PORT")


def test_good_addresses_parse():
    assert protocol.parse_address("[::1]:7000") == ("::1", 7000)
    assert protocol.parse_address("he_worker.local:0", any_port=True) == ("he_worker.local", 0)
    assert protocol.parse_address("x" * 63 + ".example:1") == ("x" * 63 + ".example", 1)


def test_a_batch_that_cannot_fit_is_refused_saying_what_fits(tmp_path, capsys):
    line = refused(capsys, tmp_path, _sample(tmp_path, "--num-images", "64", "--height", "4096", "--width", "4096"),
                   "64 image(s) of 4096x4096 need about", "GiB")
    assert "lower the height and width" in line or "image(s) of that size fit" in line


def _huge_frame(conn: socket.socket) -> None:
    conn.sendall(MAGIC + bytes([READY]) + struct.pack("<Q", 2 << 30))
    chunk = b"\0" * (1 << 20)
    try:
        for _ in range(256):  # streams 256 MiB of the announced 2 GiB while the key holder listens
            conn.sendall(chunk)
    except OSError:
        pass


HOSTILE = "\x1b[31mred\x1b[0m\x1b]0;owned\x07 text\r\nmore\x9b2J" + "x" * 5000


def _hostile_error(conn: socket.socket) -> None:
    conn.sendall(encode(Message(ERROR, error=HOSTILE)))


@pytest.mark.parametrize(("answer", "fragment"), [
    (lambda conn: None, f"did not answer within {TIMEOUT:g} s"),
    (_huge_frame, "over the limit"),
    (_hostile_error, "refused the request: red text more 2J"),
], ids=["silent", "2-GiB-frame", "escapes"])
def test_hostile_workers_end_he_sample_in_one_line(tmp_path, capsys, monkeypatch, no_model, fake_worker, answer,
                                                   fragment):
    monkeypatch.setattr(protocol, "REPLY_TIMEOUT", TIMEOUT)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    line = refused(capsys, tmp_path, _sample(tmp_path, "--worker", fake_worker(answer, 4 * TIMEOUT)), fragment)
    assert time.monotonic() - start < 10 * TIMEOUT
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown) * 1024 < 64 << 20  # ru_maxrss: KiB
    assert line.isprintable() and "\x1b" not in line and "owned" not in line and len(line) < 400
