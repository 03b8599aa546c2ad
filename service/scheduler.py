"""Continuous batching of Generate streams: one forward pass per decode step for every stream with a token due.

Each Generate stream asks the scheduler for its next step (`await scheduler.step(decoder)`) instead of taking its
own turn on the MLX thread. A driver task gathers the requests, and each scheduler turn is one job on the MLX
thread: at most one prefill chunk of one stream whose input is still being fed, then one batched decode step of
up to `max_batch` streams that each feed a single token (generation.decode_batch: the model called with (B, 1)
tokens, over the batch arena where the sessions' caches fit it, quant/batch_arena.py). Streams join and leave
between turns. Other MLX work (Append, Attend, commits' snapshots) queues on the same thread between turns.

A long prompt is fed in chunks sized by cost, so that the decoding streams wait no longer than one chunk of it
alone: with streams decoding, a turn aims at CHUNK_SHARE of the prompt's average chunk (`PREFILL_CHUNK` tokens at
its middle position) for the chunk and the decode step together. The cost of a token grows with its position
(attention); `ChunkCost` fits seconds per token as a line in the position to the chunks fed so far. Alone, a
prompt is fed in full chunks. A fresh session's key mean comes from its first PREFILL_CHUNK tokens: fed in smaller
pieces beside decoding streams, they wait in fp16 until the last piece, which ends where a whole chunk would, so a
prompt codes alike whether or not streams decode beside it (generation.Decoder sets the caches' mean_tokens).

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

import numpy as np

from kvshard.quant.batch_arena import BatchArena
from kvshard.service import metrics
from kvshard.service.generation import PREFILL_CHUNK, decode_batch, finish_in_turn
from kvshard.service.worker import SerialExecutor, blas_threads

ORDERS = ("round-robin", "arrival")
DEFAULT_MAX_BATCH = 32
# After a turn, the streams it served need a moment on the event loop (detokenize, send the token, maybe commit)
# before they ask for the next step; the driver waits for them up to this share of the last turn's time. A stream
# that misses a turn waits a whole turn more (its gap doubles: on the CPU, 8 batched streams' p99 gap was twice
# their median), so the wait is bounded by the share rather than by a few milliseconds.
GATHER_SHARE, GATHER_MAX_S = 0.2, 0.25
_RATE_WINDOW_S = 10.0  # the aggregate tokens/s metric covers the last this many seconds
CHUNK_SHARE = 0.85  # with streams decoding, a prefill turn's target: this share of the prompt's average chunk alone
MIN_CHUNK = 32  # the fewest prompt tokens a turn feeds, so that a prompt always advances
# A decode step multiplies the weights by at most max_batch rows: memory-bound, so a second OpenBLAS thread barely
# helps, and one that waits for a busy core stalls the step. One thread: a step of 8 SmolLM2 rows 1.09 -> 0.75 s,
# one row 0.66 -> 0.49 s (benchmarks/results/batch_step_cpu.json, 2 shared cores). Prefill chunks keep the default.
DECODE_BLAS_THREADS = 1


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
        self.chunk_cost = ChunkCost()
        self._spans: dict[int, tuple[int, int]] = {}  # id(decoder) -> (first, end position) of the prompt it feeds
        self._decode_s = 0.0  # the last batched decode step's seconds
        self._turn_ended = None  # when the last turn ended, while streams are generating

    # ---- the streams' side --------------------------------------------------------------------------------

    def join(self, decoder) -> None:
        """A stream begins: the driver waits for it when gathering a turn."""
        self._streams[id(decoder)] = next(self._joined)

    def leave(self, decoder) -> None:
        self._streams.pop(id(decoder), None)
        self._served.pop(id(decoder), None)
        self._spans.pop(id(decoder), None)
        if not self._streams:
            self._turn_ended = None
        self._arrived.set()  # a turn waiting for this stream need not wait any more

    async def release(self, decoder) -> None:
        """After `leave`: the stream's session leaves the batch arena, its caches owning all their codes again
        (on the MLX thread, after any turn still running its step), before the caller lets go of the session.
        One at a time: on the H200, jobs releasing 8 or 31 streams together cost more than they saved."""
        if decoder.released:
            return
        await self.mlx.run(self.arena.release, decoder.session.caches, job="BatchArena.release")
        decoder.released = True

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
            chunk, fed_from, prompt_end = self._chunk(prefill.decoder, bool(batch)) if prefill else (0, 0, 0)
            started = time.monotonic()
            if self._turn_ended is not None:
                metrics.SCHEDULER_SECONDS.labels("between_turns").observe(started - self._turn_ended)
            # The job is handed to the MLX thread before this task can be interrupted, and the driver is never
            # cancelled by a stream, so a taken request always runs to its end.
            outcomes, on_thread, prefill_s, decode_s = await self.mlx.run(
                _run_turn, prefill.decoder if prefill else None, chunk, [r.decoder for r in batch], self.arena)
            self._turn_ended = time.monotonic()
            self._last_turn_s = self._turn_ended - started
            metrics.SCHEDULER_SECONDS.labels("hand_off").observe(on_thread - started)
            if prefill:
                self.chunk_cost.add(fed_from, min(chunk, prompt_end - fed_from), prefill_s)
                metrics.SCHEDULER_SECONDS.labels("prefill_chunk").observe(prefill_s)
            if batch:
                self._decode_s = decode_s
                metrics.SCHEDULER_SECONDS.labels("decode_step").observe(decode_s)
            self._count_tokens(outcomes)
            for request, outcome in zip(self._taken, outcomes, strict=True):
                if request.future.done():  # its stream was cancelled meanwhile: the step happened regardless
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)
            self._taken = []

    def _chunk(self, decoder, decoding: bool) -> tuple[int, int, int]:
        """(tokens of the decoder's prompt to feed this turn, the position they start at, the prompt's end)."""
        start = decoder.session.caches[0].offset
        first, end = self._spans.setdefault(id(decoder), (start, start + decoder.pending_tokens()))
        chunk = chunk_tokens(self.chunk_cost, first, end, start, self._decode_s) if decoding else PREFILL_CHUNK
        if start < PREFILL_CHUNK:  # the pieces of a fresh session's first chunk end where a whole one would
            chunk = min(chunk, PREFILL_CHUNK - start)
        return chunk, start, end

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


def _run_turn(prefill, chunk: int, batch: list, arena: BatchArena) -> tuple[list, float, float, float]:
    """(MLX thread) One turn: a prefill chunk of `chunk` tokens, then the batched decode step. Each stream's outcome
    is its token, None (a chunk fed, more input left) or the exception its step raised; when the turn began on
    this thread (time.monotonic); and the seconds of each part."""
    outcomes = []
    started = time.monotonic()
    if prefill is not None:
        arena.release(prefill.session.caches)  # (not a member, unless its conversation moved back meanwhile)
        try:
            outcomes.append(prefill.step(chunk))
        except Exception as error:  # noqa: BLE001 (handed to its own stream, which re-raises it)
            outcomes.append(error)
    fed = time.monotonic()
    if batch:
        with blas_threads(DECODE_BLAS_THREADS):
            outcomes.extend(decode_batch(batch, arena))
    decoded = time.monotonic()
    finish_in_turn(([prefill] if prefill is not None else []) + batch, outcomes, arena)
    return outcomes, started, fed - started, decoded - fed


def chunk_tokens(cost: "ChunkCost", first: int, end: int, start: int, decode_s: float) -> int:
    """Tokens of a prompt spanning positions [first, end) to feed from `start` in a turn whose decode step takes
    decode_s: the chunk and the step together CHUNK_SHARE of the prompt's average chunk alone (a whole chunk
    before any was fed)."""
    average = cost.per_token((first + end) / 2)
    if average is None:
        return PREFILL_CHUNK
    budget = CHUNK_SHARE * PREFILL_CHUNK * average - decode_s
    return int(min(max(budget / cost.per_token(start + PREFILL_CHUNK / 2), MIN_CHUNK), PREFILL_CHUNK))


class ChunkCost:
    """Seconds per prefill token as a line in the token's position, fitted to the last chunks fed (of any prompt):
    the weights cost every token the same, attention more the later it comes."""

    def __init__(self, keep: int = 32):
        self._seen = deque(maxlen=keep)  # (mid position, seconds per token) of a chunk

    def add(self, start: int, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self._seen.append((start + tokens / 2, seconds / tokens))

    def per_token(self, position: float) -> float | None:
        """The fitted seconds per token at this position; None before any chunk was fed."""
        if not self._seen:
            return None
        x, y = np.array(self._seen).T
        if np.ptp(x) < PREFILL_CHUNK:  # one position: no slope to fit
            return float(np.median(y))
        slope, at_zero = np.polyfit(x, y, 1)
        return max(float(at_zero + slope * position), float(y.min()) / 2)
