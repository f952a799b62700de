"""The wire between key holder and worker: framed messages, the worker server, and the client link.

A frame is b"PDHE", a kind byte, the body length (8 bytes, little-endian) and the body: a JSON header
(length-prefixed) naming float fields, float64/int64 arrays and byte blobs, then the arrays' and blobs' bytes
in header order. Every length, dtype and field is checked before use; anything else is refused with one line.
What crosses the wire is exactly the dataclasses below: ciphertexts, the public context (its parameters only),
and the plaintext fields an update needs (see README's threat model).

Neither end trusts the other's sizes or pace. A frame's size is capped by ``Limits``, derived from the CKKS
parameters: the key holder splits a step into updates of at most ``Limits.ciphertexts`` ciphertexts (and as
many slots' worth of plaintext values), so the largest legitimate frame is known before any of it is read, and
a declared length over the cap is refused from the frame's first 13 bytes. Every read has a timeout, and a
frame must arrive within the timeout plus its size at ``MIN_RATE``.

One cohesive thing, kept whole over 400 lines: the wire format and both of its ends, checked against
each other in one place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import socketserver
import struct
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from privdiff.errors import PrivdiffError
from privdiff.he.ckks import Worker
from privdiff.io.untrusted import json_depth

MAGIC = b"PDHE"
HELLO, READY, UPDATE, RESULT, ERROR = range(1, 6)
HEAD = 13  # magic, kind, body length
MAX_HEADER = 1 << 16  # the JSON header: a few names, and one length per blob (at most 2 x MAX_CIPHERTEXTS)
MAX_CONTEXT = 1 << 14  # the public context as sent: its parameters only (131 bytes at degree 32768, 15 primes)
SMALL_FRAME = 4 + MAX_HEADER + MAX_CONTEXT  # HELLO, READY, ERROR
FRAME_CIPHERTEXT_BYTES = 1 << 24  # an update's ciphertexts (values and offsets) fill at most 16 MiB
MAX_CIPHERTEXTS = 1024  # per list and message, whatever the parameters (keeps the header under MAX_HEADER)
MIN_RATE = 1 << 18  # bytes/s: the slowest link a frame may take (256 KiB/s)
MAX_ERROR = 200  # characters of a peer's error text that are shown
CONNECT_TIMEOUT = 10.0  # seconds the key holder waits to connect to its worker
REPLY_TIMEOUT = 30.0  # seconds it waits for a reply (plus the reply's size at MIN_RATE)
_DTYPES = {"f8": np.float64, "i8": np.int64}
_FIELDS = {  # kind -> (floats, arrays, blob lists)
    HELLO: ((), (), ("context",)),
    READY: ((), (), ()),
    UPDATE: (("factor",), ("offsets", "plain", "plain_offsets", "indices"), ("ciphertexts", "offset_ciphertexts")),
    RESULT: ((), ("plain",), ("ciphertexts",)),
    ERROR: ((), (), ()),
}
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit also takes "²", which int() refuses
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")


class Closed(PrivdiffError):
    """The peer hung up between two messages."""


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """``text`` safe to print: terminal escapes and control characters removed, whitespace folded, truncated."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in _ESCAPES.sub("", text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Limits:
    """The largest legitimate messages for one CKKS context: slots per ciphertext, and a bound on a
    serialised ciphertext (two polynomials of degree N over the data level's primes, 8 bytes a coefficient,
    plus compression's worst-case growth and headers)."""

    slots: int
    ciphertext_bytes: int

    @classmethod
    def of(cls, context) -> Limits:  # noqa: ANN001 - a TenSEAL context
        data = context.seal_context().data.first_context_data()
        degree, primes = data.parms().poly_modulus_degree(), data.chain_index() + 1
        raw = 2 * degree * primes * 8
        return cls(degree // 2, raw + raw // 128 + 4096)

    @property
    def ciphertexts(self) -> int:
        """Ciphertexts per list in one update (values, and encrypted offsets)."""
        return max(1, min(MAX_CIPHERTEXTS, FRAME_CIPHERTEXT_BYTES // (2 * self.ciphertext_bytes)))

    @property
    def values(self) -> int:
        """Values per array in one update."""
        return self.ciphertexts * self.slots

    @property
    def update_frame(self) -> int:
        return 4 + MAX_HEADER + 2 * self.ciphertexts * self.ciphertext_bytes + 4 * 8 * self.values

    def result_frame(self, ciphertexts: int, plain: int) -> int:
        return 4 + MAX_HEADER + ciphertexts * self.ciphertext_bytes + 8 * plain

    def check(self, request: Request) -> None:
        """Refuse an update larger than one message may be."""
        counts = [len(request.ciphertexts), len(request.offset_ciphertexts)]
        sizes = [len(request.offsets), len(request.plain), len(request.plain_offsets), len(request.indices)]
        if max(counts) > self.ciphertexts or max(sizes) > self.values:
            raise PrivdiffError(f"an update holds more than {self.ciphertexts} ciphertexts or {self.values} values")


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


def _parse_header(text: bytes) -> dict:
    """The JSON header, refused when nested deeper than its fixed shape (dict -> dict -> list)."""
    if json_depth(text) > 3:
        raise ValueError("the header is nested too deeply")
    header = json.loads(text)
    if not isinstance(header, dict) or not all(isinstance(header.get(k), dict) for k in ("floats", "arrays", "blobs")):
        raise ValueError("the header is not an object of floats, arrays and blobs")
    if not isinstance(header.get("error", ""), str):
        raise ValueError("the error is not text")
    return header


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a length")
    return value


def decode(kind: int, body: bytes | bytearray, header_limit: int = MAX_HEADER) -> Message:
    """Parse a body of ``kind`` whose header is at most ``header_limit`` bytes; any inconsistency raises
    PrivdiffError."""
    if kind not in _FIELDS:
        raise PrivdiffError(f"malformed message: unknown message kind {kind}")
    view = memoryview(body)
    try:
        (size,) = struct.unpack_from("<I", view)
        if size > min(header_limit, len(body) - 4):
            raise ValueError(f"a header of {size} bytes (at most {min(header_limit, len(body) - 4)})")
        header = _parse_header(bytes(view[4:4 + size]))
        floats, arrays, blobs = header["floats"], header["arrays"], header["blobs"]
        want_floats, want_arrays, want_blobs = _FIELDS[kind]
        if set(floats) != set(want_floats) or set(arrays) != set(want_arrays) or set(blobs) != set(want_blobs):
            raise ValueError("unexpected fields")
        message = Message(kind, error=one_line(header.get("error", ""), 500))
        for name in want_floats:
            value = floats[name]
            if not isinstance(value, int | float) or not np.isfinite(value):
                raise ValueError(f"{name} is not a finite number")
            message.floats[name] = float(value)
        at = 4 + size
        for name in want_arrays:
            code, count = arrays[name]
            dtype, count = _DTYPES[code], _count(count)
            if at + count * 8 > len(body):
                raise ValueError(f"array {name} runs past the message")
            array = np.frombuffer(view, dtype=dtype, count=count, offset=at)
            if dtype == np.float64 and not np.isfinite(array).all():
                raise ValueError(f"array {name} holds NaN or inf")
            message.arrays[name] = array
            at += count * 8
        for name in want_blobs:
            if not isinstance(blobs[name], list):
                raise ValueError(f"blob {name} has no lengths")
            message.blobs[name] = []
            for n in map(_count, blobs[name]):
                if at + n > len(body):
                    raise ValueError(f"blob {name} runs past the message")
                message.blobs[name].append(bytes(view[at:at + n]))
                at += n
        if at != len(body):
            raise ValueError(f"{len(body) - at} unexpected bytes at the end")
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as error:
        raise PrivdiffError(f"malformed message: {one_line(str(error))}") from None
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


def split(request: Request, limits: Limits) -> Iterator[Request]:
    """``request`` as updates that each fit one message (at least one). Ciphertext i holds values
    i * slots onwards, as ``KeyHolder.encrypt`` packs them, so its plain offsets and indices go with it."""
    c, v = limits.ciphertexts, limits.values
    parts = max(1, -(-len(request.ciphertexts) // c), -(-len(request.offset_ciphertexts) // c),
                -(-len(request.offsets) // v), -(-len(request.indices) // v), -(-len(request.plain) // v))
    for i in range(parts):
        cts, values = slice(i * c, (i + 1) * c), slice(i * v, (i + 1) * v)
        yield Request(request.factor, request.ciphertexts[cts], request.offsets[values],
                      request.offset_ciphertexts[cts], request.plain[values], request.plain_offsets[values],
                      request.indices[values])


def work(worker: Worker, request: Request) -> Reply:
    """The worker's whole job: ciphertext + offset for the encrypted values, factor x value + offset for the rest."""
    if len(request.plain) != len(request.plain_offsets):
        raise PrivdiffError(f"{len(request.plain)} plaintext values but {len(request.plain_offsets)} offsets")
    offsets = list(request.offset_ciphertexts) if request.offset_ciphertexts else request.offsets
    return Reply(worker.add(request.ciphertexts, offsets), request.factor * request.plain + request.plain_offsets)


def _read_exactly(sock: socket.socket, n: int, deadline: float, timeout: float) -> bytearray:
    """``n`` bytes, each read within ``timeout`` and all by ``deadline`` (time.monotonic); the buffer grows with
    what arrives, never ahead of it."""
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(data)} of {n} bytes arrived in time")
        sock.settimeout(min(timeout, left))
        try:
            chunk = sock.recv(min(n - len(data), 1 << 20))
        except TimeoutError:
            raise TimeoutError(f"{len(data)} of {n} bytes arrived in time") from None
        if not chunk:
            raise PrivdiffError(f"the connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_message(sock: socket.socket, limit: int = SMALL_FRAME, timeout: float = 30.0,
                 wait: float | None = None) -> tuple[Message, int]:
    """The next message and its size on the wire. Its first byte may take ``wait`` seconds (default
    ``timeout``); then every read must progress within ``timeout``, and the whole frame arrive within
    ``timeout`` plus its size at MIN_RATE. A body declared over ``limit`` bytes is refused unread.
    A peer that hangs up before the first byte raises Closed; one that stalls, TimeoutError."""
    wait = timeout if wait is None else wait
    sock.settimeout(wait)
    try:
        first = sock.recv(1)
    except TimeoutError:
        raise TimeoutError(f"no message for {wait:g} s") from None
    if not first:
        raise Closed("the connection closed")
    start = time.monotonic()
    head = first + _read_exactly(sock, HEAD - 1, start + timeout, timeout)
    if head[:4] != MAGIC:
        raise PrivdiffError("malformed message: not a privdiff HE frame")
    (length,) = struct.unpack("<Q", head[5:])
    if length > limit:
        raise PrivdiffError(f"malformed message: a body of {length} bytes is over the limit of {limit}")
    body = _read_exactly(sock, length, start + timeout + length / MIN_RATE, timeout)
    return decode(head[4], body), HEAD + length


def _send(sock: socket.socket, data: bytes, timeout: float) -> None:
    """All of ``data`` within ``timeout`` plus its size at MIN_RATE."""
    sock.settimeout(timeout + len(data) / MIN_RATE)
    sock.sendall(data)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: WorkerServer = self.server  # type: ignore[assignment]
        sock: socket.socket = self.request
        worker, limits = None, None
        try:
            while True:
                try:  # between updates the key holder runs its model: it may take idle_timeout
                    message, _ = read_message(sock, max(SMALL_FRAME, limits.update_frame) if limits else SMALL_FRAME,
                                              server.read_timeout, server.idle_timeout if worker else None)
                except Closed:
                    return
                if message.kind == HELLO:
                    if len(message.blobs["context"]) != 1 or len(message.blobs["context"][0]) > MAX_CONTEXT:
                        raise PrivdiffError(f"the public context must be one blob of at most {MAX_CONTEXT} bytes "
                                            f"(its parameters only)")
                    worker = Worker(message.blobs["context"][0])
                    limits = Limits.of(worker.context)
                    _send(sock, encode(Message(READY)), server.read_timeout)
                elif message.kind == UPDATE and worker is not None and limits is not None:
                    request = request_of(message)
                    limits.check(request)
                    reply = work(worker, request)
                    _send(sock, encode(Message(RESULT, arrays={"plain": reply.plain},
                                               blobs={"ciphertexts": reply.ciphertexts})), server.read_timeout)
                else:
                    raise PrivdiffError("unexpected message: send the public context first, then updates")
        except TimeoutError as error:
            self._refuse(f"timed out: {error}")
        except PrivdiffError as error:
            self._refuse(str(error))
        except Exception as error:  # noqa: BLE001 - TenSEAL's and anything else's errors are one ERROR line too
            self._refuse(f"could not apply the update ({type(error).__name__}: {error})")

    def _refuse(self, error: str) -> None:
        error = one_line(error)
        self.server.log(f"refused a request from {self.client_address[0]}: {error}")  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            _send(self.request, encode(Message(ERROR, error=error)), 1.0)
            _linger(self.request)


def _linger(sock: socket.socket, budget: int = 1 << 16, seconds: float = 0.5) -> None:
    """Half-close, then read (and drop) what the peer still sends, at most ``budget`` bytes for ``seconds``:
    closing with unread input makes the kernel reset the connection, which can discard the ERROR unread."""
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + seconds
    while budget > 0 and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        chunk = sock.recv(min(budget, 1 << 14))
        if not chunk:
            return
        budget -= len(chunk)


class WorkerServer(socketserver.ThreadingTCPServer):
    """Serves encrypted updates; each connection brings its own public context. At most ``max_connections``
    are served at once (others get one ERROR and are closed, without a thread); a connection that sends
    nothing for ``idle_timeout`` seconds between updates, or stalls ``timeout`` seconds inside a message, is
    dropped; a message over what the context's parameters need is refused unread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], log: Callable[[str], None] = lambda line: None,
                 max_connections: int = 8, timeout: float = 30.0, idle_timeout: float = 600.0) -> None:
        if max_connections < 1:
            raise PrivdiffError(f"max_connections={max_connections} must be at least 1")
        if not 0 < timeout <= idle_timeout:
            raise PrivdiffError(f"a timeout of {timeout:g} s must be above 0 and at most the idle timeout "
                                f"({idle_timeout:g} s)")
        super().__init__(address, _Handler)
        self.log = log
        self.max_connections, self.read_timeout, self.idle_timeout = max_connections, timeout, idle_timeout
        self._open = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        if not self._open.acquire(blocking=False):
            self.log(f"refused a connection from {client_address[0]}: {self.max_connections} are open")
            with contextlib.suppress(OSError):
                request.settimeout(0.0)  # never wait on a peer being turned away
                request.sendall(encode(Message(ERROR, error=f"busy: {self.max_connections} connections are open")))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._open.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()


def public_parameters(public_context: bytes) -> tuple[bytes, Limits]:
    """What a worker is sent of ``public_context``: its parameters only (adding needs no evaluation keys), and
    the context's limits. Refuses a context that holds the secret key."""
    context = Worker(public_context).context
    return context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False), Limits.of(context)


def parse_address(address: str, any_port: bool = False, what: str = "address") -> tuple[str, int]:
    """(host, port) from HOST:PORT (an IPv6 host in brackets or bare), refused in one line naming ``what``; port 0
    (the system picks one) only where ``any_port``. The port is ASCII digits; the host an IP address or a DNS
    name (labels of 1-63 letters, digits, hyphens or underscores), so no later encoding of it can fail."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not _PORT.fullmatch(port) or not (0 if any_port else 1) <= int(port) < 65536 or not _valid_host(host):
        raise PrivdiffError(f"{what} {one_line(address, 80)!r} is not HOST:PORT (an IP address or host name, "
                            f"and a port of {0 if any_port else 1} to 65535)")
    return host, int(port)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))


class RemoteWorker:
    """The key holder's end of a connection to ``privdiff he worker``; counts the bytes each way. Every reply
    must come within ``timeout`` seconds (plus its size at MIN_RATE) and fit what the request needs; anything
    else ends the run with one line."""

    def __init__(self, address: str, public_context: bytes, timeout: float | None = None,
                 connect_timeout: float | None = None) -> None:
        self.address = address
        self.timeout = REPLY_TIMEOUT if timeout is None else timeout
        connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        parameters, self.limits = public_parameters(public_context)
        try:
            self.sock = socket.create_connection(parse_address(address, what="worker address"),
                                                 timeout=connect_timeout)
        except OSError as error:
            raise PrivdiffError(f"the worker at {address} is unreachable ({error.strerror or error})") from None
        self.sent = self.received = 0
        try:
            self._exchange(Message(HELLO, blobs={"context": [parameters]}), READY, SMALL_FRAME)
        except PrivdiffError:
            self.close()
            raise

    def _exchange(self, message: Message, expect: int, limit: int) -> Message:
        data = encode(message)
        try:
            _send(self.sock, data, self.timeout)
            reply, size = read_message(self.sock, limit, self.timeout)
        except TimeoutError:
            raise PrivdiffError(f"the worker at {self.address} did not answer within {self.timeout:g} s") from None
        except OSError as error:
            raise PrivdiffError(f"the worker at {self.address} stopped answering ({error})") from None
        except Closed:
            raise PrivdiffError(f"the worker at {self.address} closed the connection") from None
        except PrivdiffError as error:
            raise PrivdiffError(f"the worker at {self.address} answered with a bad message ({error})") from None
        self.sent += len(data)
        self.received += size
        if reply.kind == ERROR:
            raise PrivdiffError(f"the worker at {self.address} refused the request: {one_line(reply.error)}")
        if reply.kind != expect:
            raise PrivdiffError(f"the worker at {self.address} answered with an unexpected message (kind "
                                f"{reply.kind}, not {expect})")
        return reply

    def update(self, request: Request) -> Reply:
        """The worker's reply to ``request``, sent as updates that each fit one message."""
        ciphertexts, plain = [], []
        for part in split(request, self.limits):
            limit = self.limits.result_frame(len(part.ciphertexts), len(part.plain))
            reply = self._exchange(request_message(part), RESULT, limit)
            got, values = reply.blobs["ciphertexts"], reply.arrays["plain"]
            if len(got) != len(part.ciphertexts) or len(values) != len(part.plain):
                raise PrivdiffError(f"the worker at {self.address} returned {len(got)} ciphertexts and {len(values)} "
                                    f"plaintext values for {len(part.ciphertexts)} and {len(part.plain)}")
            ciphertexts += got
            plain.append(values)
        return Reply(ciphertexts, np.concatenate(plain))

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
        seen = request_of(decode(UPDATE, data[HEAD:], len(data)))  # one message, however large
        if self.record is not None:
            self.record.append(seen)
        reply = work(self.worker, seen)
        back = encode(Message(RESULT, arrays={"plain": reply.plain}, blobs={"ciphertexts": reply.ciphertexts}))
        self.sent += len(data)
        self.received += len(back)
        return reply

    def close(self) -> None:
        pass
