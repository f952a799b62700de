"""The wire between key holder and worker: framed messages, the worker server, and the client link.

A frame is b"PDHE", a kind byte, the body length (8 bytes, little-endian) and the body: a JSON header
(length-prefixed) naming float fields, float64/int64 arrays and byte blobs, then the arrays' and blobs' bytes
in header order. Every length, dtype and field is checked before use; anything else is refused with one line.
What crosses the wire is exactly the dataclasses below: ciphertexts, the public context, and the plaintext
fields an update needs (see README's threat model).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from privdiff.errors import PrivdiffError
from privdiff.he.ckks import Worker

MAGIC = b"PDHE"
HELLO, READY, UPDATE, RESULT, ERROR = range(1, 6)
MAX_BODY = 1 << 31  # 2 GiB: far above a 4 x 128 x 128 latent's ciphertexts
_DTYPES = {"f8": np.float64, "i8": np.int64}
_FIELDS = {  # kind -> (floats, arrays, blob lists)
    HELLO: ((), (), ("context",)),
    READY: ((), (), ()),
    UPDATE: (("factor",), ("offsets", "plain", "plain_offsets", "indices"), ("ciphertexts", "offset_ciphertexts")),
    RESULT: ((), ("plain",), ("ciphertexts",)),
    ERROR: ((), (), ()),
}


@dataclass
class Request:
    """One step for the worker: encrypted values (+ offsets), and the plaintext remainder (x factor + offset).

    ``offsets`` are the plain offsets of the encrypted values (already divided by ``factor``, empty when
    ``offset_ciphertexts`` carry them encrypted); ``indices`` are the encrypted values' flat positions (sparse
    packing; empty for dense packing, where value i is element i).
    """

    factor: float
    ciphertexts: list[bytes]
    offsets: np.ndarray
    offset_ciphertexts: list[bytes]
    plain: np.ndarray
    plain_offsets: np.ndarray
    indices: np.ndarray


@dataclass
class Reply:
    ciphertexts: list[bytes]
    plain: np.ndarray


@dataclass
class Message:
    kind: int
    floats: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, list[bytes]] = field(default_factory=dict)
    error: str = ""


def encode(message: Message) -> bytes:
    header = {"floats": message.floats, "error": message.error,
              "arrays": {k: ["f8" if a.dtype == np.float64 else "i8", len(a)] for k, a in message.arrays.items()},
              "blobs": {k: [len(b) for b in v] for k, v in message.blobs.items()}}
    head = json.dumps(header).encode()
    parts = [struct.pack("<I", len(head)), head]
    parts += [np.ascontiguousarray(a).tobytes() for a in message.arrays.values()]
    parts += [b for v in message.blobs.values() for b in v]
    body = b"".join(parts)
    return MAGIC + bytes([message.kind]) + struct.pack("<Q", len(body)) + body


def decode(kind: int, body: bytes) -> Message:
    """Parse a body of ``kind``; any inconsistency raises PrivdiffError."""
    if kind not in _FIELDS:
        raise PrivdiffError(f"unknown message kind {kind}")
    try:
        (size,) = struct.unpack_from("<I", body)
        header = json.loads(body[4:4 + size])
        floats, arrays, blobs = header["floats"], header["arrays"], header["blobs"]
        want_floats, want_arrays, want_blobs = _FIELDS[kind]
        if set(floats) != set(want_floats) or set(arrays) != set(want_arrays) or set(blobs) != set(want_blobs):
            raise ValueError("unexpected fields")
        message = Message(kind, error=str(header.get("error", ""))[:500])
        for name in want_floats:
            value = floats[name]
            if not isinstance(value, int | float) or not np.isfinite(value):
                raise ValueError(f"{name} is not a finite number")
            message.floats[name] = float(value)
        at = 4 + size
        for name in want_arrays:
            code, count = arrays[name]
            dtype = _DTYPES[code]
            nbytes = int(count) * 8
            if count < 0 or at + nbytes > len(body):
                raise ValueError(f"array {name} runs past the message")
            array = np.frombuffer(body, dtype=dtype, count=int(count), offset=at)
            if dtype == np.float64 and not np.isfinite(array).all():
                raise ValueError(f"array {name} holds NaN or inf")
            message.arrays[name] = array
            at += nbytes
        for name in want_blobs:
            sizes = blobs[name]
            message.blobs[name] = []
            for n in sizes:
                if not isinstance(n, int) or n < 0 or at + n > len(body):
                    raise ValueError(f"blob {name} runs past the message")
                message.blobs[name].append(body[at:at + n])
                at += n
        if at != len(body):
            raise ValueError(f"{len(body) - at} unexpected bytes at the end")
    except PrivdiffError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, struct.error, json.JSONDecodeError) as error:
        raise PrivdiffError(f"malformed message: {error}") from None
    return message


def request_message(request: Request) -> Message:
    return Message(UPDATE, {"factor": request.factor},
                   {"offsets": request.offsets, "plain": request.plain, "plain_offsets": request.plain_offsets,
                    "indices": request.indices},
                   {"ciphertexts": request.ciphertexts, "offset_ciphertexts": request.offset_ciphertexts})


def request_of(message: Message) -> Request:
    a, b = message.arrays, message.blobs
    return Request(message.floats["factor"], b["ciphertexts"], a["offsets"], b["offset_ciphertexts"], a["plain"],
                   a["plain_offsets"], a["indices"])


def work(worker: Worker, request: Request) -> Reply:
    """The worker's whole job: ciphertext + offset for the encrypted values, factor x value + offset for the rest."""
    if len(request.plain) != len(request.plain_offsets):
        raise PrivdiffError(f"{len(request.plain)} plaintext values but {len(request.plain_offsets)} offsets")
    offsets = list(request.offset_ciphertexts) if request.offset_ciphertexts else request.offsets
    return Reply(worker.add(request.ciphertexts, offsets), request.factor * request.plain + request.plain_offsets)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise PrivdiffError(f"the connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> tuple[Message, int]:
    """The next message and its size on the wire."""
    head = _read_exactly(sock, 13)
    if head[:4] != MAGIC:
        raise PrivdiffError("malformed message: not a privdiff HE frame")
    (length,) = struct.unpack("<Q", head[5:])
    if length > MAX_BODY:
        raise PrivdiffError(f"malformed message: body of {length} bytes is over the limit")
    return decode(head[4], _read_exactly(sock, length)), 13 + length


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        worker = None
        try:
            while True:
                try:
                    message, _ = read_message(sock)
                except PrivdiffError as error:
                    if "closed after 0 of" in str(error):
                        return  # the key holder hung up between messages
                    raise
                if message.kind == HELLO:
                    worker = Worker(message.blobs["context"][0] if message.blobs["context"] else b"")
                    sock.sendall(encode(Message(READY)))
                elif message.kind == UPDATE and worker is not None:
                    reply = work(worker, request_of(message))
                    sock.sendall(encode(Message(RESULT, arrays={"plain": reply.plain},
                                                blobs={"ciphertexts": reply.ciphertexts})))
                else:
                    raise PrivdiffError("unexpected message: send the public context first, then updates")
        except PrivdiffError as error:
            self.server.log(f"refused a request from {self.client_address[0]}: {error}")  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):
                sock.sendall(encode(Message(ERROR, error=str(error))))


class WorkerServer(socketserver.ThreadingTCPServer):
    """Serves encrypted updates; each connection brings its own public context."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], log: Callable[[str], None] = lambda line: None) -> None:
        super().__init__(address, _Handler)
        self.log = log


def parse_address(address: str, any_port: bool = False) -> tuple[str, int]:
    """(host, port) from HOST:PORT; port 0 (the system picks one) only where ``any_port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise PrivdiffError(f"worker address {address!r} is not HOST:PORT")
    return host, int(port)


class RemoteWorker:
    """The key holder's end of a connection to ``privdiff he worker``; counts the bytes each way."""

    def __init__(self, address: str, public_context: bytes, timeout: float = 120.0) -> None:
        self.address = address
        try:
            self.sock = socket.create_connection(parse_address(address), timeout=min(timeout, 10.0))
        except OSError as error:
            raise PrivdiffError(f"the worker at {address} is unreachable ({error.strerror or error})") from None
        self.sock.settimeout(timeout)
        self.sent = self.received = 0
        self._exchange(Message(HELLO, blobs={"context": [public_context]}), READY)

    def _exchange(self, message: Message, expect: int) -> Message:
        data = encode(message)
        try:
            self.sock.sendall(data)
            reply, size = read_message(self.sock)
        except OSError as error:
            raise PrivdiffError(f"the worker at {self.address} stopped answering ({error})") from None
        except PrivdiffError as error:
            raise PrivdiffError(f"the worker at {self.address} answered with a bad message ({error})") from None
        self.sent += len(data)
        self.received += size
        if reply.kind == ERROR:
            raise PrivdiffError(f"the worker at {self.address} refused the request: {reply.error}")
        if reply.kind != expect:
            raise PrivdiffError(f"the worker at {self.address} answered with an unexpected message")
        return reply

    def update(self, request: Request) -> Reply:
        reply = self._exchange(request_message(request), RESULT)
        return Reply(reply.blobs["ciphertexts"], reply.arrays["plain"])

    def close(self) -> None:
        self.sock.close()


class LocalWorker:
    """Both roles in one process: the worker still sees only the encoded messages and the public context."""

    def __init__(self, public_context: bytes, record: list[Request] | None = None) -> None:
        self.worker = Worker(public_context)
        self.record = record
        self.sent = self.received = 0

    def update(self, request: Request) -> Reply:
        data = encode(request_message(request))
        seen = request_of(decode(UPDATE, data[13:]))
        if self.record is not None:
            self.record.append(seen)
        reply = work(self.worker, seen)
        back = encode(Message(RESULT, arrays={"plain": reply.plain}, blobs={"ciphertexts": reply.ciphertexts}))
        self.sent += len(data)
        self.received += len(back)
        return reply

    def close(self) -> None:
        pass
