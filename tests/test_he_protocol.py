"""The HE wire under hostile peers: the worker bounds its resources and answers every bad message with one
ERROR line; the key holder turns every bad reply into one PrivdiffError line. Real sockets on 127.0.0.1."""

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from privdiff.errors import PrivdiffError
from privdiff.he import protocol
from privdiff.he.ckks import KeyHolder
from privdiff.he.protocol import (
    ERROR,
    HELLO,
    MAGIC,
    READY,
    RESULT,
    UPDATE,
    LocalWorker,
    Message,
    RemoteWorker,
    Request,
    WorkerServer,
    decode,
    encode,
    public_parameters,
    read_message,
    request_message,
)

TIMEOUT = 0.5  # the servers' and clients' timeouts here, so that stalls show in about a second


@pytest.fixture(scope="module")
def holder():
    return KeyHolder()


@pytest.fixture
def server():
    """A worker with two connection slots and short timeouts; its log lines are in ``server.lines``."""
    lines = []
    server = WorkerServer(("127.0.0.1", 0), log=lines.append, max_connections=2, timeout=TIMEOUT,
                          idle_timeout=2 * TIMEOUT)
    server.lines = lines
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _address(server):
    return f"127.0.0.1:{server.server_address[1]}"


def _connect(server):
    return socket.create_connection(server.server_address, timeout=5)


def _frame(kind, body):
    return MAGIC + bytes([kind]) + struct.pack("<Q", len(body)) + body


def _body(header):
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    return struct.pack("<I", len(head)) + head


def _hello(holder):
    return encode(Message(HELLO, blobs={"context": [public_parameters(holder.public_context())[0]]}))


def _update(holder, values, offsets):
    blobs = [v.serialize() for v in holder.encrypt(values)]
    return Request(0.5, blobs, offsets, [], np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))


def _error_of(sock):
    """The worker's reply, which must be one ERROR line; the worker closes the connection after it."""
    reply, _ = read_message(sock, timeout=5)
    assert reply.kind == ERROR and "\n" not in reply.error
    assert sock.recv(1) == b""
    return reply.error


def _still_serves(server, holder):
    link = RemoteWorker(_address(server), holder.public_context(), timeout=5)
    values = np.linspace(-1, 1, 10)
    sent = holder.encrypt(values)
    reply = link.update(Request(0.5, [v.serialize() for v in sent], np.ones(10), [], np.zeros(0), np.zeros(0),
                                np.zeros(0, dtype=np.int64)))
    link.close()
    assert np.allclose(holder.decrypt_reply(sent, reply.ciphertexts), values + 1, atol=1e-6)


def _wait_for_free_slots(server, slots=2):
    """Until every connection thread has ended and given its slot back (each ends after its last reply)."""
    deadline = time.monotonic() + 10
    while server._open._value < slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server._open._value == slots


# -- the worker -----------------------------------------------------------------------------------------------

def test_connections_over_the_cap_are_turned_away_without_a_thread(server, holder):
    held = [_connect(server) for _ in range(2)]
    for sock in held:  # both slots taken: each has sent its context
        sock.sendall(_hello(holder))
        assert read_message(sock, timeout=5)[0].kind == READY
    threads = threading.active_count()
    start = time.monotonic()
    for _ in range(20):
        with _connect(server) as sock:
            assert "busy: 2 connections" in _error_of(sock)
    assert time.monotonic() - start < 5 and threading.active_count() == threads
    for sock in held:
        sock.close()
    _wait_for_free_slots(server)
    _still_serves(server, holder)


def test_idle_and_half_sent_connections_are_dropped_after_the_timeout(server, holder):
    start = time.monotonic()
    with _connect(server) as idle, _connect(server) as half:
        half.sendall(_frame(HELLO, bytes(100))[:60])  # 60 of 113 bytes, then nothing
        assert "timed out" in _error_of(idle) and "timed out" in _error_of(half)
    assert time.monotonic() - start < 10 * TIMEOUT  # bounded by the timeouts (loose: CI machines are shared)
    _wait_for_free_slots(server)  # the error is sent before the thread ends and gives its slot back
    with _connect(server) as between:  # after the context, a key holder may pause idle_timeout between updates
        between.sendall(_hello(holder))
        assert read_message(between, timeout=5)[0].kind == READY
        assert "timed out" in _error_of(between)
    assert sum("timed out" in line for line in server.lines) == 3
    _still_serves(server, holder)


def test_a_frame_over_the_cap_is_refused_before_its_body(server, holder):
    _, limits = public_parameters(holder.public_context())
    assert limits.ciphertexts == 31 and limits.update_frame < 32 << 20  # default parameters: N 16384, one data prime
    biggest = request_message(Request(0.5, [bytes(limits.ciphertext_bytes)] * limits.ciphertexts,
                                      np.zeros(limits.values), [bytes(limits.ciphertext_bytes)] * limits.ciphertexts,
                                      np.zeros(limits.values), np.zeros(limits.values),
                                      np.zeros(limits.values, dtype=np.int64)))
    assert len(encode(biggest)) - protocol.HEAD <= limits.update_frame
    with _connect(server) as sock:  # before the context: only a context-sized frame
        sock.sendall(_frame(HELLO, b"")[:5] + struct.pack("<Q", 2 << 30))  # the head of a 2 GiB body, no body
        assert "over the limit" in _error_of(sock)
    with _connect(server) as sock:
        sock.sendall(_hello(holder))
        assert read_message(sock, timeout=5)[0].kind == READY
        sock.sendall(MAGIC + bytes([UPDATE]) + struct.pack("<Q", limits.update_frame + 1))
        assert f"over the limit of {limits.update_frame}" in _error_of(sock)
    with _connect(server) as sock:  # a context with its evaluation keys is far more than parameters
        sock.sendall(encode(Message(HELLO, blobs={"context": [holder.public_context()]})))
        assert "over the limit" in _error_of(sock)
    _still_serves(server, holder)


def test_a_nested_header_is_one_error_not_a_recursion(server, holder):
    nested = _body(b"[" * 30_000 + b"]" * 30_000)
    with pytest.raises(PrivdiffError, match="nested too deeply"):
        decode(UPDATE, nested)
    deep_object = _body(b'{"floats": {"a": [[1]]}, "arrays": {}, "blobs": {}}')
    with pytest.raises(PrivdiffError, match="nested too deeply"):
        decode(READY, deep_object)
    with pytest.raises(PrivdiffError, match="nested too deeply"):  # brackets inside strings do not count
        decode(READY, _body(b'{"floats": {}, "arrays": {}, "blobs": {}, "error": "[[[[[[", "x": [[[1]]]}'))
    assert decode(ERROR, _body(b'{"floats": {}, "arrays": {}, "blobs": {}, "error": "[[[[[[]"}')).error == "[[[[[[]"
    with _connect(server) as sock:
        sock.sendall(_frame(HELLO, nested))
        assert "nested too deeply" in _error_of(sock)
    assert not any("Traceback" in line for line in server.lines)
    _still_serves(server, holder)


@pytest.mark.parametrize(("offsets", "fragment"), [
    (3, "could not apply the update"), (20, "10 encrypted values but 20"), ("garbage", "could not be read")])
def test_a_bad_update_is_one_error_line_and_the_worker_serves_on(server, holder, offsets, fragment):
    request = _update(holder, np.arange(10.0), np.ones(offsets if isinstance(offsets, int) else 10))
    if offsets == "garbage":
        request.ciphertexts = [b"\x00" * 1000]
    with _connect(server) as sock:
        sock.sendall(_hello(holder))
        assert read_message(sock, timeout=5)[0].kind == READY
        sock.sendall(encode(request_message(request)))
        assert fragment in _error_of(sock)
    _still_serves(server, holder)


def test_a_step_over_one_message_is_split_and_merged(server, holder, monkeypatch):
    """With room for one ciphertext a message, a 3-ciphertext step (sparse, so with indices and a plaintext part)
    goes as 3 updates and comes back as one reply, the same as in one process."""
    monkeypatch.setattr(protocol, "FRAME_CIPHERTEXT_BYTES", 1)
    slots = holder.params.slots
    values = np.random.default_rng(0).uniform(-1, 1, 2 * slots + 5)
    rest = np.random.default_rng(1).uniform(-1, 1, slots + 7)
    vectors = holder.encrypt(values)
    request = Request(0.5, [v.serialize() for v in vectors], values / 3, [], rest, rest / 5,
                      np.arange(len(values), dtype=np.int64))
    link = RemoteWorker(_address(server), holder.public_context(), timeout=5)
    exchange, sent = link._exchange, []
    link._exchange = lambda message, *args: sent.append(message.blobs["ciphertexts"]) or exchange(message, *args)
    far = link.update(request)
    near = LocalWorker(holder.public_context()).update(request)
    assert [len(blobs) for blobs in sent] == [1, 1, 1]
    assert np.allclose(holder.decrypt_reply(vectors, far.ciphertexts), values * 4 / 3, atol=1e-6)
    assert np.array_equal(far.plain, near.plain) and np.allclose(far.plain, 0.5 * rest + rest / 5)
    two = _update(holder, values[:slots + 1], values[:slots + 1])  # within the frame cap, over the count
    with pytest.raises(PrivdiffError, match="more than 1 ciphertexts"):
        exchange(request_message(two), RESULT, 1 << 30)
    link.close()


# -- the key holder -------------------------------------------------------------------------------------------


HOSTILE = "\x1b[31mred\x1b[0m\x1b]0;owned\x07 line\r\nnext\x9b2J \u202eevil\x00" + "x" * 5000


@pytest.mark.parametrize(("answer", "fragment"), [
    (lambda conn: conn.sendall(_frame(READY, _body(b"[" * 50_000))), "nested too deeply"),
    (lambda conn: conn.sendall(MAGIC + bytes([READY]) + struct.pack("<Q", 300 << 20)), "over the limit"),
    (lambda conn: conn.sendall(encode(Message(RESULT, arrays={"plain": np.zeros(0)}, blobs={"ciphertexts": []}))),
     "unexpected message"),
    (lambda conn: conn.sendall(_frame(ERROR, _body({"floats": {}, "arrays": {}, "blobs": {}, "error": HOSTILE}))),
     "refused the request: red line next 2J"),
    (lambda conn: conn.sendall(_frame(READY, b"")[:9]), f"did not answer within {TIMEOUT:g} s"),
    (lambda conn: None, f"did not answer within {TIMEOUT:g} s"),
    (lambda conn: conn.shutdown(socket.SHUT_RDWR), "closed the connection"),
], ids=["nested", "oversize", "wrong-kind", "hostile-error", "half-sent", "silent", "hang-up"])
def test_every_bad_reply_is_one_line_for_the_key_holder(holder, fake_worker, answer, fragment):
    start = time.monotonic()
    with pytest.raises(PrivdiffError) as caught:
        RemoteWorker(fake_worker(answer, 3 * TIMEOUT), holder.public_context(), timeout=TIMEOUT)
    text = str(caught.value)
    assert fragment in text and time.monotonic() - start < 10 * TIMEOUT
    assert text.isprintable() and len(text) < 400 and "\x1b" not in text and "owned" not in text
