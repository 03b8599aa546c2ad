"""Token-by-token generation over a model session.

A session's conversation is `record.token_ids`; its caches hold a prefix of it, and the rest (the last
generated token, or a new turn's input) is fed on the next step. One `Decoder.step` is one model call on the
MLX thread: feed what is pending (a long input in chunks, one step each), sample the next token, append it to
the conversation. Between steps other sessions use the worker, and the handler streams the token and commits
checkpoints.
"""

import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from kvshard.quant.batch_arena import BatchArena, SlidingWindowLayer
from kvshard.quant.batch_view import batch_views
from kvshard.quant.sliding import SlidingCompressedKVCache
from kvshard.service import logs, metrics
from kvshard.service.errors import LimitExceeded
from kvshard.service.sessions import Session, SessionManager, snapshots
from kvshard.service.worker import run_to_completion

PREFILL_CHUNK = 256  # tokens per forward pass while feeding a long input
_STOP, _LENGTH = "stop", "length"


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0

    def check(self, vocab_size: int) -> "Sampling":
        checks = (
            ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_p", 0 <= self.top_p <= 1, "in [0, 1]"),
            ("top_k", 0 <= self.top_k < vocab_size, f"in [0, {vocab_size})"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
        )
        for name, ok, allowed in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"sampling.{name}: must be {allowed}, got {value}")
        return self

    def sample(self, logits: mx.array, position: int) -> int:
        """Greedy at temperature 0; otherwise a draw keyed by (seed, position), so a resumed or retried call
        draws the same token at the same place."""
        if self.temperature == 0:
            return mx.argmax(logits, axis=-1).item()
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.top_k:
            logprobs = apply_top_k(logprobs, self.top_k)
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p:
            logprobs = apply_min_p(logprobs, self.min_p)
        key = mx.random.key((self.seed * 1_000_003 + position) % (1 << 63))
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key).item()


@dataclass
class GenerateOptions:
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    replay_from: int | None = None  # stream the session's tokens from here first (resume only)


@dataclass
class GeneratedToken:
    token_id: int
    text: str
    offset: int
    committed_offset: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Decoder:
    def __init__(self, model, session: Session, prompt: list[int], sampling: Sampling, progress: dict):
        self.model = model
        self.session = session
        self.prompt = prompt
        self.sampling = sampling
        self.progress = progress  # the session's last_generate, counted here so it matches the tokens
        self._before = None  # (tokens, cache offsets, sliding caches held) before the token being fed, for a rollback
        self.released = False  # out of the batch arena (Scheduler.release), once its stream ended
        self.stop_token_ids: frozenset[int] = frozenset()
        self.final = None  # (finish reason, the session's snapshot) taken in the turn that sampled the last token

    def pending_tokens(self) -> int:
        """Tokens the next step feeds before it can sample (1 on a plain decode step)."""
        held = self.session.caches[0].offset
        return max(len(self.session.record.token_ids) + len(self.prompt) - held, 1)

    def step(self, chunk: int = PREFILL_CHUNK) -> int | None:
        """(MLX thread) Feed up to `chunk` pending tokens; once none are left, sample one and append it.

        Returns the token, or None while a long input is still being fed: each chunk is its own turn on the MLX
        thread, so other sessions are not held up by a long prompt. On error the session is as it was before
        this token's first chunk."""
        try:
            pending = self._begin()
            logits = self.model.model(mx.array(pending[:chunk])[None], cache=self.session.caches)[:, -1, :]
            mx.eval(logits)
            if len(pending) > chunk:
                self.session.mark_all_changed()
                return None
            token = self._sample(logits)
        except BaseException:
            self.rollback()
            raise
        return self._accept(token)

    def _begin(self) -> list[int]:
        """Move the input into the conversation; the tokens the caches do not hold yet."""
        caches, tokens = self.session.caches, self.session.record.token_ids
        if self._before is None:
            held = [c.hold() if isinstance(c, SlidingCompressedKVCache) else None for c in caches]
            self._before = len(tokens), [c.offset for c in caches], held
        tokens.extend(self.prompt)
        self.prompt = []
        if caches[0].offset == 0:
            # A fresh session's key mean comes from its first PREFILL_CHUNK tokens (or its whole shorter input)
            # however the scheduler chunks them: fed in smaller pieces, they wait in fp16 until all are in.
            for cache in caches:
                if hasattr(cache, "mean_tokens"):
                    cache.mean_tokens = min(PREFILL_CHUNK, len(tokens))
        if caches[0].offset == len(tokens):
            # Nothing pending (the conversation was trimmed to a token already in the cache): feed it again.
            for cache in caches:
                cache.trim(1)
        return tokens[caches[0].offset :]

    def _sample(self, logits: mx.array) -> int:
        return self.sampling.sample(logits.astype(mx.float32), len(self.session.record.token_ids))

    def _accept(self, token: int, grown_bytes: int | None = None) -> int:
        """The sampled token joins the conversation. grown_bytes: the step ran in a batch arena, whose caches
        each grew by one token of known size (reading their nbytes would copy the arena's codes back)."""
        self._before = None
        session = self.session
        session.record.token_ids.append(token)
        self.progress["generated_tokens"] += 1
        if grown_bytes is None:
            session.mark_all_changed()
        else:
            session.dirty.update(range(len(session.caches)))
            session.record.layer_offsets = [c.offset for c in session.caches]
            session.memory_bytes += grown_bytes
        return token

    def finish_reason(self, token: int) -> str | None:
        """After `_accept(token)`: why the stream ends on it, as far as tokens tell (a stop string, found in the
        text, can end it too: `generate` decides)."""
        if token in self.stop_token_ids:
            return _STOP
        return _LENGTH if self.progress["generated_tokens"] >= self.progress["max_tokens"] else None

    def rollback(self) -> None:
        """The session as it was before this token's first chunk."""
        if self._before is None:
            return
        before_tokens, before_offsets, held = self._before
        for cache, offset, was in zip(self.session.caches, before_offsets, held, strict=True):
            if was is None:
                cache.trim(cache.offset - offset)
            else:
                cache.rewind(was)  # a store may have dropped tokens that a trim cannot bring back
        del self.session.record.token_ids[before_tokens:]
        self._before = None


def decode_batch(decoders: list[Decoder], arena: BatchArena | None = None) -> list:
    """(MLX thread) One decode step of several sessions in one forward pass: the model is called with one pending
    token per row. Where every row's caches can share the batch arena (quant/batch_arena.py: codes only, coded
    alike), each layer is one encode and one attention for all rows; otherwise the model runs over batch views
    of the sessions' own caches (quant/batch_view.py), row by row inside each layer. Each row samples with its
    own stream's sampling at its own position. Returns each decoder's token, or the exception its step raised:
    if the batched pass fails, every row is rolled back and run alone, so an error stays with its stream."""
    sessions = [decoder.session.caches for decoder in decoders]
    # A lone row that fits decodes in the arena too: a stream's steps then take one path whether or not others
    # decode beside it (the same attention kernel), so a seeded stream draws the same tokens either way.
    in_arena = arena is not None and all(arena.slot_of(c) is not None or arena.fits(c) for c in sessions)
    if in_arena or len(decoders) > 1:
        grown = None
        try:
            pending = [decoder._begin() for decoder in decoders]
            if any(len(p) != 1 for p in pending):
                raise ValueError("decode_batch: every row must feed exactly one token")
            model = decoders[0].model.model
            if in_arena:
                views = arena.views(arena.join(sessions))
                grown = arena.bytes_per_token()
            else:
                for caches in sessions:  # their caches take their codes back from the arena before the rows' own writes
                    _leave(arena, caches)
                views = batch_views(sessions)
            built, built_cpu = time.perf_counter(), time.thread_time()
            logits = model(mx.array(pending), cache=views)[:, -1, :]
            evaluated, built_cpu = time.perf_counter(), time.thread_time() - built_cpu
            mx.eval(logits)
            # Where a step's time goes: the graph's host build (and the thread's own CPU time in it: less than
            # the build's wall time when the thread waited, for the GIL or a lock) against the wait for the device.
            metrics.SCHEDULER_SECONDS.labels("decode_build").observe(evaluated - built)
            metrics.SCHEDULER_SECONDS.labels("decode_build_cpu").observe(built_cpu)
            metrics.SCHEDULER_SECONDS.labels("decode_eval").observe(time.perf_counter() - evaluated)
            greedy = mx.argmax(logits, axis=-1).tolist()  # one evaluation for every greedy row
            tokens = [greedy[row] if decoder.sampling.temperature == 0 else decoder._sample(logits[row : row + 1])
                      for row, decoder in enumerate(decoders)]
        except Exception as error:  # noqa: BLE001 (each row is retried alone below, and raises its own error)
            metrics.BATCH_FALLBACKS.inc()
            if isinstance(error, SlidingWindowLayer):
                arena.model_slides = True  # every step of this model would fail so: its streams step alone
            for decoder in decoders:
                _leave(arena, decoder.session.caches)
                decoder.rollback()
        else:
            return [decoder._accept(token, grown) for decoder, token in zip(decoders, tokens, strict=True)]
    outcomes = []
    for decoder in decoders:
        _leave(arena, decoder.session.caches)
        try:
            outcomes.append(decoder.step())
        except Exception as error:  # noqa: BLE001 (handed to its own stream, which re-raises it)
            outcomes.append(error)
    return outcomes


def finish_in_turn(decoders: list[Decoder], outcomes: list, arena: BatchArena | None) -> None:
    """(MLX thread, right after the step) The streams whose token ends them leave the arena together and their
    sessions' commit snapshots are taken here, so that `generate` only writes them to the store before yielding
    the last token. As jobs of their own, queued behind the next turn of the streams still decoding, they held
    each ending stream's last token back by a whole batched step, and by the others' releases."""
    ending = []
    for decoder, outcome in zip(decoders, outcomes, strict=True):
        reason = decoder.finish_reason(outcome) if isinstance(outcome, int) else None  # (None: a chunk fed; or an error)
        if reason is not None:
            ending.append((decoder, reason))
    if not ending:
        return
    try:
        if arena is not None:
            arena.release_many([decoder.session.caches for decoder, _ in ending])
        for decoder, reason in ending:
            decoder.released = True
            decoder.progress.update(finished=True, finish_reason=reason)
        taken = snapshots([decoder.session for decoder, _ in ending])
        for (decoder, reason), snapshot in zip(ending, taken, strict=True):
            decoder.final = reason, snapshot
    except Exception:  # noqa: BLE001 (the tokens stand; each stream releases and commits in jobs of its own)
        logs.logger().exception("finish_in_turn failed: the streams release and commit in jobs of their own")
        for decoder, _ in ending:
            decoder.final = None
            decoder.released = False


def _leave(arena: BatchArena | None, caches: list) -> None:
    """(MLX thread) Before anything but the arena writes to a session's caches, they leave it with their codes."""
    if arena is not None:
        arena.release(caches)


class TextStream:
    """Incremental detokenization with stop strings.

    Text is released once it decodes to whole characters (a token can end mid-UTF-8 sequence), and any tail
    that could be the start of a stop string is held back until the next token settles it.
    """

    def __init__(self, decode, stop: list[str]):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._held = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self._ids.append(token)
        settled = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(settled) and not text.endswith("\ufffd"):
            self._held += text[len(settled) :]
            self._prefix, self._read = self._read, len(self._ids)
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[: min(hits)], ""
            return out
        keep = max((k for s in self._stop for k in range(1, len(s)) if self._held.endswith(s[:k])), default=0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


async def generate(manager: SessionManager, scheduler, model, session: Session, prompt: list[int], options: GenerateOptions):
    """Run one Generate call on a session the caller holds; yields a GeneratedToken per token. Each step is
    taken by the scheduler (service/scheduler.py), batched with the other streams' steps.

    Commits every `checkpoint_tokens` tokens and at the end; the last token is yielded only after its commit,
    so a final message means a durable turn. If the caller goes away (or anything fails) after some tokens,
    what was generated is committed, and GetSession's last_generate tells a client where to resume.
    """
    limits = manager.limits
    record = session.record
    start = record.offset
    if len(prompt) > limits.max_prompt_tokens:
        raise LimitExceeded(f"prompt: {len(prompt)} tokens exceed max_prompt_tokens {limits.max_prompt_tokens}")
    if start + len(prompt) + options.max_tokens > limits.max_session_tokens:
        raise LimitExceeded(
            f"max_tokens: the session holds {start} tokens; {len(prompt)} more input and {options.max_tokens} generated "
            f"would exceed max_session_tokens {limits.max_session_tokens}"
        )
    text = TextStream(model.decode, options.stop)
    replay = [] if options.replay_from is None else _replayed(record, options.replay_from)
    for i, token in enumerate(replay):
        last = i == len(replay) - 1 and options.max_tokens == 0
        delta = text.add(token) + (text.flush() if last else "")
        finish = (record.last_generate or {}).get("finish_reason") if last else None
        yield GeneratedToken(token, delta, options.replay_from + i + 1, session.committed_offset, finish, 0, i + 1)
    if options.max_tokens == 0:
        return
    progress = dict(start_offset=start, prompt_tokens=len(prompt), generated_tokens=0, max_tokens=options.max_tokens, finished=False)
    record.last_generate = progress
    decoder = Decoder(model, session, prompt, options.sampling, progress)
    stop_ids = decoder.stop_token_ids = options.stop_token_ids
    scheduler.join(decoder)
    started = time.monotonic()
    try:
        for generated in range(1, options.max_tokens + 1):
            token = None
            while token is None:
                token = await scheduler.step(decoder)
            delta = text.add(token)
            finish = _STOP if (token in stop_ids or text.stopped) else _LENGTH if generated == options.max_tokens else None
            if finish is not None:
                delta += "" if text.stopped else text.flush()
                scheduler.leave(decoder)
                final, decoder.final = decoder.final, None
                if final is not None and final[0] == finish:  # the turn left the arena and took the snapshot
                    await manager.commit(session, snapshot=final[1])
                else:  # (a stop string ended it: the snapshot, if any, says another finish reason)
                    progress.update(finished=True, finish_reason=finish)
                    await run_to_completion(scheduler.release(decoder))
                    await manager.commit(session)
            elif generated % limits.checkpoint_tokens == 0:
                await manager.commit(session)
            yield GeneratedToken(
                token_id=token,
                text=delta,
                offset=record.offset,
                committed_offset=session.committed_offset,
                finish_reason=finish,
                prompt_tokens=len(prompt),
                generated_tokens=len(replay) + generated,
            )
            if finish is not None:
                return
    finally:
        scheduler.leave(decoder)
        if progress["generated_tokens"]:
            metrics.STREAM_TOKENS_PER_SECOND.observe(progress["generated_tokens"] / (time.monotonic() - started))
        # Both run on the MLX thread after any step still in flight, and complete even when the handler was
        # cancelled, before the caller releases the session lock.
        await run_to_completion(_leave_and_keep(manager, scheduler, decoder))


async def _leave_and_keep(manager: SessionManager, scheduler, decoder: Decoder) -> None:
    """The stream's session leaves the batch arena (its caches own all their codes again); and if the call was cut
    short (client gone, deadline, error), what was generated is committed."""
    session = decoder.session
    await scheduler.release(decoder)
    if session.session_id in manager.hot:
        await manager.commit(session, only_if_changed=True)


def _replayed(record, replay_from: int) -> list[int]:
    if replay_from > record.offset:
        raise ValueError(f"replay_from: {replay_from} is past the session's offset {record.offset}")
    return record.token_ids[replay_from:]
