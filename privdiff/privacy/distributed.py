"""One release across the processes torchrun (or Slurm's srun, or a user) starts: the ranks and their protocol.

A process is one rank of a world when the environment says so (torchrun's ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without ``WORLD_SIZE`` above 1 it is the whole world and
nothing here talks to anyone. Rank 0 leads: it alone checks the inputs, calibrates, charges the ledger, draws
from the CSPRNG, adds the noise and writes. The others only do what rank 0 sends them.

The protocol is a fixed sequence of collectives on a gloo group (CPU; also when the work runs on GPUs through
NCCL), each bounded by the rank timeout (``PRIVDIFF_RANK_TIMEOUT`` seconds, default 1800: the longest a rank
waits for the slowest one to reach the same step). Failure anywhere is failure everywhere: every step that does
work (:meth:`World.collect`) gathers each rank's outcome to rank 0, which tells all ranks whether to go on; a
failing rank's one-line message is raised by rank 0 alone (:class:`ReportedElsewhere` elsewhere), a rank that
dies breaks its connections and the ranks waiting on it fail at once, and a rank that hangs fails the others at
the timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from privdiff.errors import PrivdiffError, ReportedElsewhere
from privdiff.privacy.mechanism import noisy_mean, poisson_sample
from privdiff.privacy.randomness import SecureRandom

T = TypeVar("T")
S = TypeVar("S")

TIMEOUT_VARIABLE = "PRIVDIFF_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
MAX_WORLD = 1024
"""The most ranks a release runs on: the float64 sum's error bound holds for them (docs/privacy.md)."""

_ABORT = "abort"  # what rank 0 sends instead of a plan or a verdict when it fails first


def _env_int(name: str, minimum: int, maximum: int, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise PrivdiffError(f"environment variable {name} is not set (torchrun sets it; set it when starting "
                                "ranks by hand)")
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or not minimum <= value <= maximum:
        raise PrivdiffError(f"environment variable {name}={text[:40]!r} must be an integer from {minimum} to "
                            f"{maximum}")
    return value


def rank_timeout() -> float:
    """Seconds a rank waits at a step for the others (``PRIVDIFF_RANK_TIMEOUT``, default 1800)."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 7 * 24 * 3600:
        raise PrivdiffError(f"environment variable {TIMEOUT_VARIABLE}={text[:40]!r} must be a number of seconds "
                            "from 1 to 604800")
    return value


def world_size_requested() -> int:
    """The world size the environment asks for: ``WORLD_SIZE``, or 1 when it is not set."""
    return _env_int("WORLD_SIZE", 1, MAX_WORLD, default=1)


def shares(n: int, size: int) -> list[range]:
    """The public split of records 0..n-1 into ``size`` contiguous slices whose lengths differ by at most one."""
    cuts = [n * r // size for r in range(size + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


@dataclass
class World:
    """This process's place among the ranks of one release (``World()`` is a lone process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)
    _stage: str = field(default="plan", repr=False)
    _in_work: bool = field(default=False, repr=False)
    _in_protocol: bool = field(default=False, repr=False)
    _pending: bool = field(default=False, repr=False)

    @property
    def leader(self) -> bool:
        """Whether this is rank 0, which checks, charges, adds the noise and writes."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` when the world has several ranks."""
        return f"cuda:{self.local_rank}" if self.size > 1 and device == "cuda" else device

    def on_signal(self, signum: int, frame: object) -> None:
        """SIGINT/SIGTERM: an interrupt now where it cannot break the protocol's order of collectives (in a rank's
        own work, or on rank 0 before the plan is sent and after the last step), else at the next such point."""
        if not self._in_protocol and (self._in_work or (self.leader and self._stage in ("plan", "finishing"))):
            raise KeyboardInterrupt
        self._pending = True

    def finishing(self) -> None:
        """The last step that involves every rank is done: rank 0 may be interrupted again at once."""
        self._stage = "finishing"
        if self.leader and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        """Run one collective, never cut short by an interrupt (it waits for the next safe point); a peer that died or
        hung becomes one line."""
        self._in_protocol = True
        try:
            return call()
        except (RuntimeError, OSError) as exc:  # gloo: connection closed by peer, or the timeout
            who = "a rank" if self.leader else "rank 0 or another rank"
            raise PrivdiffError(f"{who} stopped or stalled while this rank waited to {what} ({_one_line(exc)}); "
                                "no file written") from None
        finally:
            self._in_protocol = False

    def scatter(self, items: list | None) -> Any:
        """Rank 0 hands item r to rank r (``items`` None on other ranks); each rank returns its own item."""
        if self.size == 1:
            return items[0]
        import torch.distributed as dist

        out = [None]
        self._collective("receive its share", lambda: dist.scatter_object_list(
            out, items if self.leader else None, src=0, group=self._group))
        if out[0] == _ABORT:
            raise ReportedElsewhere("rank 0 refused the release")
        self._stage = "work"
        return out[0]

    def broadcast(self, item: Any) -> Any:
        """Rank 0's ``item`` on every rank (``item`` is ignored elsewhere)."""
        if self.size == 1:
            return item
        import torch.distributed as dist

        out = [("ok", item) if self.leader else None]
        self._collective("hear from rank 0", lambda: dist.broadcast_object_list(out, src=0, group=self._group))
        return self._opened(out[0])

    @staticmethod
    def _opened(message: tuple[str, Any]) -> Any:
        """A broadcast's item, or the end rank 0 announced instead (``finish``), raised."""
        tag, item = message
        if tag == "end":
            raise ReportedElsewhere(item or "rank 0 ended the release")
        return item

    def collect(self, work: Callable[[], T]) -> list[T] | None:
        """Every rank runs ``work``; rank 0 gets every rank's result (in rank order), the others None.

        A failure (a one-line error, or an interrupt) on any rank ends every rank: rank 0 raises it, naming the
        rank, and the others raise :class:`ReportedElsewhere`.
        """
        interrupted = False
        self._in_work = True
        try:
            if self._pending:  # an interrupt that came while this rank waited on the others
                self._pending = False
                raise KeyboardInterrupt
            outcome: tuple[str, Any] = ("ok", work())
        except KeyboardInterrupt:
            if self.size == 1:
                raise
            interrupted, outcome = True, ("error", "interrupted")
        except (PrivdiffError, OSError) as exc:
            if self.size == 1:
                raise
            outcome = ("error", _one_line(exc))
        finally:
            self._in_work = False
        if self.size == 1:
            return [outcome[1]]
        import torch.distributed as dist

        gathered = [None] * self.size if self.leader else None
        verdict = [None]
        try:
            self._collective("send its result", lambda: dist.gather_object(outcome, gathered, dst=0,
                                                                           group=self._group))
            if self.leader:
                failed = [(r, o[1]) for r, o in enumerate(gathered) if o[0] != "ok"]
                verdict[0] = f"rank {failed[0][0]}: {failed[0][1]}" if failed else None
            self._collective("hear whether to go on", lambda: dist.broadcast_object_list(verdict, src=0,
                                                                                          group=self._group))
        except PrivdiffError:
            if interrupted:  # Ctrl-C reached every rank, and another one has gone already: this one was interrupted
                raise KeyboardInterrupt from None
            raise
        if interrupted:
            raise KeyboardInterrupt
        if verdict[0] is not None:
            self._stage = "told"
            if self._pending:  # this rank was interrupted too, while it waited: say so
                raise KeyboardInterrupt
            if self.leader:
                raise PrivdiffError(verdict[0])
            raise ReportedElsewhere(verdict[0])
        return [o[1] for o in gathered] if self.leader else None

    def finish(self, error: str | None) -> None:
        """Rank 0 tells the other ranks how the release ended (None: written); the others raise if it failed."""
        if self.size == 1:
            return
        import torch.distributed as dist

        message = [("end", error)] if self.leader else [None]
        self._collective("hear how the release ended", lambda: dist.broadcast_object_list(message, src=0,
                                                                                          group=self._group))
        if not self.leader and message[0][1] is not None:
            if self._pending:  # this rank was interrupted too, while it waited: say so
                raise KeyboardInterrupt
            raise ReportedElsewhere(message[0][1])
        self._pending = False  # the release is over: an interrupt that came at its very end changes nothing

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Rank 0's whole release: whatever ends it, the other ranks are told at the step they wait in."""
        if self.size == 1:
            yield
            return
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(PrivdiffError):  # a peer already gone: nothing to tell it
                if self._stage == "plan":
                    self.scatter([_ABORT] * self.size)
                elif self._stage in ("work", "finishing"):
                    self.finish(_one_line(exc) if not isinstance(exc, KeyboardInterrupt) else "rank 0: interrupted")
            raise
        self.finish(None)

    def close(self) -> None:
        """Leave the process group (a no-op for a lone process)."""
        if self.size > 1:
            import torch.distributed as dist

            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group()


@dataclass(frozen=True)
class Share:
    """What rank 0 sends one rank: its public slice of the records (``rows``; what the rank needs of them in
    ``records``), which of them were sampled (record indices), the key of the per-record training streams (empty
    when the work has no randomness) and the release's settings."""

    records: Any
    rows: range
    sampled: list[int]
    key: bytes
    settings: Any


def aggregate_across_ranks(
    world: World,
    prepare: Callable[[Share], S],
    partial: Callable[[S, Share], torch.Tensor],
    *,
    records: Callable[[range], Any] | None = None,
    n: int = 0,
    sample_rate: float = 1.0,
    seed: int | None = None,
    settings: Any = None,
    training_key: bool = False,
    clip_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    divisor: float = 1.0,
) -> tuple[torch.Tensor, S] | None:
    """One subsampled Gaussian release whose per-record work is spread over the ranks of ``world``.

    Rank 0 (which alone passes ``records``, ``n`` and the parameters) draws the Poisson sample of the n records
    from the release's CSPRNG (``SecureRandom(seed)``), then, with ``training_key``, 32 bytes keying the
    per-record training streams, and sends each rank its public slice (``shares``). Every rank runs
    ``prepare(share)`` (load the model, decode the whole slice), then ``partial(state, share)``: the float64 sum of
    its sampled records' bounded vectors (``bounded_sum``). Rank 0 adds the partial sums and the noise once
    (``noisy_mean``) and returns (the noisy mean, its own prepared state); the other ranks return None. One
    process (``World()``) draws exactly what ``poisson_sample``, ``random_bytes`` and ``noisy_mean`` draw there.
    """
    plans = None
    if world.leader:
        rng = SecureRandom(seed)
        sampled = poisson_sample(n, sample_rate, rng).tolist()
        key = rng.random_bytes(32) if training_key else b""
        plans = [Share(records(rows), rows, [i for i in sampled if i in rows], key, settings)
                 for rows in shares(n, world.size)]
    share: Share = world.scatter(plans)
    state: dict[str, S] = {}

    def run_prepare() -> None:
        state["prepared"] = prepare(share)

    world.collect(run_prepare)
    partials = world.collect(lambda: partial(state["prepared"], share).detach().to("cpu", torch.float64))
    if not world.leader:
        world.finishing()
        return None
    mean = noisy_mean(partials, clip_norm, noise_multiplier, divisor, rng)
    world.finishing()
    return mean, state["prepared"]


def join_world(uses_cuda: bool = False) -> World:
    """This process's World from torchrun's environment; a lone World when ``WORLD_SIZE`` is unset or 1.

    The process group's default backend is NCCL when the work runs on CUDA (``uses_cuda``), gloo otherwise; the
    release protocol always runs on a gloo group. Every collective is bounded by :func:`rank_timeout`.
    """
    size = world_size_requested()
    if size == 1:
        return World()
    rank = _env_int("RANK", 0, size - 1)
    local_rank = _env_int("LOCAL_RANK", 0, MAX_WORLD - 1, default=rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise PrivdiffError(f"environment variable {name} is not set (torchrun sets it; set it when starting "
                                "ranks by hand)")
    _env_int("MASTER_PORT", 1, 65535)
    import torch.distributed as dist

    if not dist.is_available():
        raise PrivdiffError(f"this torch {torch.__version__} has no torch.distributed; run one process")
    timeout = timedelta(seconds=rank_timeout())
    backend = "nccl" if uses_cuda else "gloo"
    if uses_cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # NCCL's communicators on this rank's own GPU
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=timeout)
        group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except (RuntimeError, ValueError, OSError) as exc:
        raise PrivdiffError(f"rank {rank} could not join the other {size - 1} rank(s) at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {_one_line(exc)}") from None
    world = World(rank=rank, size=size, local_rank=local_rank, _group=group)
    signal.signal(signal.SIGINT, world.on_signal)
    signal.signal(signal.SIGTERM, world.on_signal)  # torchrun ends the other ranks with SIGTERM: unwind, no file
    return world
