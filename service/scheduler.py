"""Continuous batching of Generate streams: one forward pass per decode step for every stream with a token due.

Each Generate stream asks the scheduler for its next step (`await scheduler.step(decoder)`) instead of taking its
own turn on the MLX thread. A driver task gathers the requests, and each scheduler turn is one job on the MLX
thread: at most one prefill chunk of one stream whose input is still being fed (`PREFILL_CHUNK` tokens), then one
batched decode step of up to `max_batch` streams that each feed a single token (generation.decode_batch: the
model called with (B, 1) tokens over a batch view of the sessions' own caches, quant/batch_view.py). Streams
join and leave between turns; a long prompt delays the decoding streams by one chunk per turn, never by its
whole prefill. Other MLX work (Append, Attend, commits' snapshots) queues on the same thread between turns.

Fair order when more streams are due than `max_batch`: "round-robin" serves the streams that were served least
recently first, so every stream gets a step at least every ⌈due / max_batch⌉ turns; "arrival" serves the streams
in the order their Generate calls began (the oldest call finishes first).

A stream's step changes only its own session; a stream cancelled while it waits is dropped from the queue, and
one cancelled mid-turn lets the turn finish (its token is kept and committed by generate's cleanup, exactly as
before batching). A batched step that fails is rolled back and its rows rerun one by one, so an error reaches
only the stream it belongs to.
"""

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from kvshard.quant.batch_arena import BatchArena
from kvshard.service import metrics
from kvshard.service.generation import decode_batch
from kvshard.service.worker import SerialExecutor

ORDERS = ("round-robin", "arrival")
DEFAULT_MAX_BATCH = 32
# After a turn, the streams it served need a moment on the event loop (detokenize, send the token, maybe commit)
# before they ask for the next step; the driver waits for them up to this share of the last turn's time.
GATHER_SHARE, GATHER_MAX_S = 0.2, 0.02
_RATE_WINDOW_S = 10.0  # the aggregate tokens/s metric covers the last this many seconds


@dataclass(eq=False)
class _Request:
    decoder: object
    future: asyncio.Future
    stream: int  # the stream's join order (arrival)
    asked: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, mlx: SerialExecutor, max_batch: int = DEFAULT_MAX_BATCH, order: str = "round-robin"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch_size: must be a positive integer, got {max_batch!r}")
        if order not in ORDERS:
            raise ValueError(f"batch_order: must be one of {', '.join(ORDERS)}, got {order!r}")
        self.mlx = mlx
        self.max_batch = max_batch
        self.order = order
        self._waiting: list[_Request] = []
        self._taken: list[_Request] = []  # the requests of the turn on the MLX thread now
        self._streams: dict[int, int] = {}  # id(decoder) -> join order, for the streams between join and leave
        self._served: dict[int, int] = {}  # id(decoder) -> the turn it was last served in
        self._joined = itertools.count()
        self._turns = itertools.count(1)
        self._arrived = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self._last_turn_s = 0.0
        self._recent = deque()  # (time, tokens) of the last turns, for the aggregate rate
        self.arena = BatchArena()  # the co-decoding sessions' codes, one buffer per layer (MLX thread only)

    # ---- the streams' side --------------------------------------------------------------------------------

    def join(self, decoder) -> None:
        """A stream begins: the driver waits for it when gathering a turn."""
        self._streams[id(decoder)] = next(self._joined)

    def leave(self, decoder) -> None:
        self._streams.pop(id(decoder), None)
        self._served.pop(id(decoder), None)
        self._arrived.set()  # a turn waiting for this stream need not wait any more

    async def release(self, decoder) -> None:
        """After `leave`: the stream's session leaves the batch arena, its caches owning all their codes again
        (on the MLX thread, after any turn still running its step), before the caller lets go of the session."""
        await self.mlx.run(self.arena.release, decoder.session.caches)

    async def step(self, decoder) -> int | None:
        """The stream's next step: its sampled token, or None when a prefill chunk was fed and more input is left.
        Raises what the step raised; the session is then as it was before the step."""
        request = _Request(decoder, asyncio.get_running_loop().create_future(), self._streams.get(id(decoder), -1))
        self._waiting.append(request)
        self._arrived.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self._waiting:  # not taken into a turn yet: it never runs
                self._waiting.remove(request)
            raise

    # ---- the driver ---------------------------------------------------------------------------------------

    async def _drive(self) -> None:
        try:
            await self._turns_while_waiting()
        except BaseException as error:
            # The MLX thread refused the turn (shutting down): no stream may wait for an answer that never comes.
            for request in self._taken + self._waiting:
                if not request.future.done():
                    request.future.set_exception(error if isinstance(error, Exception) else RuntimeError("scheduler stopped"))
            self._taken, self._waiting = [], []
            raise

    async def _turns_while_waiting(self) -> None:
        while self._waiting:
            await self._gather()
            if not self._waiting:
                break
            turn = next(self._turns)
            prefill, batch = self._pick(turn)
            self._taken = ([prefill] if prefill else []) + batch
            now = time.monotonic()
            for request in self._taken:
                metrics.QUEUE_WAIT.observe(now - request.asked)
            if batch:
                metrics.BATCH_SIZE.observe(len(batch))
            started = time.monotonic()
            # The job is handed to the MLX thread before this task can be interrupted, and the driver is never
            # cancelled by a stream, so a taken request always runs to its end.
            outcomes = await self.mlx.run(_run_turn, prefill.decoder if prefill else None, [r.decoder for r in batch],
                                          self.arena)
            self._last_turn_s = time.monotonic() - started
            self._count_tokens(outcomes)
            for request, outcome in zip(self._taken, outcomes, strict=True):
                if request.future.done():  # its stream was cancelled meanwhile: the step happened regardless
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)
            self._taken = []

    async def _gather(self) -> None:
        """Wait until every stream that is generating has asked for its step, or the gather time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(GATHER_MAX_S, GATHER_SHARE * self._last_turn_s)
        while len(self._waiting) < min(max(len(self._streams), 1), self.max_batch):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _pick(self, turn: int) -> tuple[_Request | None, list[_Request]]:
        """(one stream to feed a prefill chunk, the streams to decode one token each), in the fair order."""
        if self.order == "round-robin":
            ordered = sorted(self._waiting, key=lambda r: (self._served.get(id(r.decoder), 0), r.stream, r.asked))
        else:
            ordered = sorted(self._waiting, key=lambda r: (r.stream, r.asked))
        prefill = next((r for r in ordered if r.decoder.pending_tokens() > 1), None)
        batch = [r for r in ordered if r is not prefill and r.decoder.pending_tokens() <= 1][: self.max_batch]
        for request in ([prefill] if prefill else []) + batch:
            self._waiting.remove(request)
            self._served[id(request.decoder)] = turn
        return prefill, batch

    def _count_tokens(self, outcomes: list) -> None:
        now = time.monotonic()
        self._recent.append((now, sum(isinstance(o, int) for o in outcomes)))
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Tokens all streams generated per second over the last _RATE_WINDOW_S seconds (a gauge)."""
        now = time.monotonic()
        tokens = sum(n for t, n in self._recent if t >= now - _RATE_WINDOW_S)
        return tokens / _RATE_WINDOW_S


def _run_turn(prefill, batch: list, arena: BatchArena) -> list:
    """(MLX thread) One turn: the prefill chunk, then the batched decode step. Each stream's outcome is its token,
    None (a chunk fed, more input left) or the exception its step raised."""
    outcomes = []
    if prefill is not None:
        arena.release(prefill.session.caches)  # (not a member, unless its conversation moved back meanwhile)
        try:
            outcomes.append(prefill.step())
        except Exception as error:  # noqa: BLE001 (handed to its own stream, which re-raises it)
            outcomes.append(error)
    if batch:
        outcomes.extend(decode_batch(batch, arena))
    return outcomes
