"""Co-decoding sessions' codes in one buffer per layer, so that a batched decode step costs a constant number of
ops per layer, whatever the number of rows.

A batch arena holds, for each layer, the codes of the sessions that decode together (service/scheduler.py) in
one preallocated (slots, kv_heads, capacity, ·) buffer per code array, with per-slot lengths and key means. A
session's caches join by copying their codes in once; a (B, 1) decode step is then, per layer, one encode of
the B new tokens written at each row's length and one attention with per-row lengths: on the CPU one call of
the native kernel's rows entry point (the buffer is numpy, written in place); on CUDA one launch of the append
kernel, which codes the new tokens into the buffer in place and attends (quant/kernels/gpu.py).

The sessions' caches stay the durable truth. Every step moves each row's `offset` and `n_encoded` with the
arena; the codes themselves are copied back lazily: a cache that belongs to an arena holds a lease
(`cache._lease`), and whatever reads its codes first (its `_settle`: state for a commit, trim, segments,
nbytes, deepcopy) takes back the tokens the arena coded since. A row leaves (`release`) with the same copy,
and before anything but the arena writes to its cache (a prefill chunk, a row run alone): `sync` rejects a row
whose cache moved behind the arena's back (a trim), which then joins again from its cache. A row that leaves
frees its slot, which the next session to join takes: moving the last member into the hole instead copied that
member's whole codes on the MLX thread while every stream waited (~5-12 ms a 4K-token SmolLM2 session on the
CPU, each time a stream ended).

Rows that can share a layer's buffer: caches that hold only codes (no fp16 sinks or window, the key mean known),
coded alike (one configuration, the same calibrated plans and key scales), keys coded after RoPE, no observers.
`fits(caches)` says whether a session's caches qualify; other batches take quant/batch_view.py's per-row path.
"""

import functools

import mlx.core as mx
import numpy as np

from . import kernels
from .attention import CodeSegment
from .cache import CompressedKVCache
from .kernels import dispatch, gpu
from .kernels.cpu import cpu_rows_attention, cpu_supported

_GROW_TOKENS = 256  # token capacity grows in steps (a row's next token always has room: see _room)
_CODE_SIDES = ("key_codes", "value_codes")


def coding(cache) -> tuple:
    """What decides a cache's codes: its configuration, seeds included, and its calibrated plans and key scales
    (model-level objects, compared by identity). Caches of one coding share a buffer and its quantizers."""
    return cache.config, cache.key_plan, cache.value_plan, cache.key_scale


def _same_coding(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(x is y for x, y in zip(a[1:], b[1:], strict=True))


def codes_only(cache) -> bool:
    """Whether the cache holds only codes and codes its next tokens straight away: no fp16 sinks or window, the
    key mean known (or not used), keys coded after RoPE, no observers (they see each encode of their cache)."""
    if type(cache) is not CompressedKVCache or cache.key_quantizer is None or cache.observers:
        return False
    cache._settle()
    return (cache.n_encoded > 0 and cache.n_encoded == cache.offset and cache.sink_keys is None
            and cache.window_keys is None and cache._codes_direct() and cache._key_rope is None)


class _Lease:
    """A cache's place in an arena layer: the layer reads its codes back through it (`CompressedKVCache._settle`)."""

    def __init__(self, layer: "ArenaLayer", slot: int):
        self.layer, self.slot = layer, slot

    def give_back(self, cache) -> None:
        self.layer.sync(self.slot)


class ArenaLayer:
    """One layer's buffer: slot s holds the codes of `caches[s]`, its first `lengths[s]` tokens; the cache's own
    buffers hold the first `synced[s]` of them. A free slot (its member left) holds None and no tokens."""

    def __init__(self, first: CompressedKVCache, on_gpu: bool):
        self.key_method, self.value_method = first.key_quantizer, first.value_quantizer
        self.coding = coding(first)
        self.on_gpu = on_gpu
        self.n_kv_heads = first.n_kv_heads
        self.caches: list = []
        self.lengths: list[int] = []
        self.synced: list[int] = []
        self.codes = {side: None for side in _CODE_SIDES}  # name -> (slots, H, capacity, w)
        self._means: list = []  # per slot its cache's key mean (1, H, 1, D) fp16, None where free or not centred
        self.key_mean = None  # (slots, H, 1, D) fp16 (zeros in free slots), or None when keys are not centred
        self._pending = None  # on a GPU, the step's (slots, keys, values): `attend`'s launch codes them in place
        self._written = None  # on a GPU, the output of the last in-place launch, until evaluated

    @property
    def capacity(self) -> int:
        return 0 if self.codes["key_codes"] is None else next(iter(self.codes["key_codes"].values())).shape[2]

    # ---- rows in and out ------------------------------------------------------------------------------------

    def add(self, caches: list[CompressedKVCache], slots: list[int]) -> None:
        """Copy the caches' codes into the given slots (free ones, or new ones at the end; each cache must fit:
        codes_only and coded like the first). All at once: on a GPU every evaluation waits for the device, and two
        per cache and layer (1,024 for 32 sessions of 16 layers; now 32) made 32 sessions joining take 120 ms on
        the H200, now 28-39 ms."""
        for cache in caches:
            cache._settle()  # a token its own GPU step left for the next launch goes into its codes first
            if cache.n_encoded != cache.offset:
                raise ValueError("cache: holds tokens other than codes, which a batch arena does not")
        self._flush()  # (a GPU write below copies the buffer it writes into)
        # Room for them all at once (a growth copies every slot), and for each row's next token (`store`).
        self._room(max(len(self.caches), max(slots) + 1), max(c.n_encoded for c in caches) + 2)
        for slot, cache in zip(slots, caches, strict=True):
            n = cache.n_encoded
            for side in _CODE_SIDES:
                for name, held in getattr(cache, side).items():
                    self._write_prefix(self.codes[side][name], slot, held, n)
            if slot >= len(self.caches):  # new slots at the end (free ones in between stay free)
                grow = slot + 1 - len(self.caches)
                self.caches += [None] * grow
                self.lengths += [0] * grow
                self.synced += [0] * grow
                self._means += [None] * grow
            self.caches[slot], self.lengths[slot], self.synced[slot] = cache, n, n
            self._means[slot] = None if cache.key_mean is None else cache.key_mean.astype(mx.float16)
            cache._lease = _Lease(self, slot)
        self._stack_means()
        self._settle_buffers()

    def sync(self, slot: int, settle: bool = True) -> list:
        """Copy the tokens the arena coded since the last sync back into the slot's cache; returns the cache's code
        arrays that changed. settle=False: the caller has flushed the buffers and evaluates what is returned before
        the buffers are written again (BatchArena.release, for every layer in one evaluation)."""
        cache, start, stop = self.caches[slot], self.synced[slot], self.lengths[slot]
        lease = None if cache is None else cache._lease
        if stop <= start or lease is None or lease.layer is not self or lease.slot != slot or cache.n_encoded != stop:
            return []  # nothing new, or the cache moved on without the arena (its state replaced): ours is stale
        if settle:
            self._flush()
        fresh = [{name: self._read(a, slot, start, stop) for name, a in self.codes[side].items()} for side in _CODE_SIDES]
        cache.n_encoded = start
        cache.put_codes(*fresh)
        changed = [getattr(cache, side) for side in _CODE_SIDES]
        if settle:
            mx.eval(changed)  # copies: the slot may be reused after this
        self.synced[slot] = stop
        return changed

    def remove(self, slots: list[int]) -> None:
        """The slots' caches leave and the slots are free (trailing free slots are dropped, so that a step's rows
        are the live ones); the key means are stacked again once for all of them. The caller
        (BatchArena.release_many) has synced the slots and evaluated what came back."""
        for slot in slots:
            self.caches[slot]._lease = None
            self.caches[slot], self.lengths[slot], self.synced[slot], self._means[slot] = None, 0, 0, None
        while self.caches and self.caches[-1] is None:
            del self.caches[-1], self.lengths[-1], self.synced[-1], self._means[-1]
        self._stack_means()

    def _stack_means(self) -> None:
        """key_mean: the slots' means in one array, zeros in free slots (their rows attend nothing)."""
        present = [m for m in self._means if m is not None]
        if not present:
            self.key_mean = None
            return
        zeros = mx.zeros_like(present[0])
        self.key_mean = mx.concatenate([zeros if m is None else m for m in self._means], axis=0)

    # ---- storage: numpy on the CPU (the kernel reads it, written in place), MLX arrays on a GPU ---------------

    def _room(self, slots: int, tokens: int) -> None:
        """Buffers for at least this many slots and tokens per slot. They grow with headroom (a quarter more
        tokens, twice the slots): a growth copies every slot, and fresh pages cost as much as the copy."""
        rows = 0 if self.codes["key_codes"] is None else next(iter(self.codes["key_codes"].values())).shape[0]
        if rows >= slots and self.capacity >= tokens:
            return
        self._flush()
        new_rows = max(slots, 2 * rows if rows < slots else rows)
        if self.capacity >= tokens:
            new_tokens = self.capacity
        else:
            new_tokens = -(-(tokens + max(tokens // 4, _GROW_TOKENS)) // _GROW_TOKENS) * _GROW_TOKENS
        layouts = (self.key_method.layout, self.value_method.layout)
        for side, layout in zip(_CODE_SIDES, layouts, strict=True):
            grown = {}
            for name, (width, dtype) in layout.items():
                fresh = self._zeros((new_rows, self.n_kv_heads, new_tokens, width), dtype)
                if self.codes[side] is not None:
                    old = self.codes[side][name]
                    fresh = self._write_block(fresh, old)
                grown[name] = fresh
            self.codes[side] = grown
        self._settle_buffers()

    def _zeros(self, shape, dtype):
        dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        if self.on_gpu:
            return mx.zeros(shape, dtype=dtype)
        return np.zeros(shape, _NUMPY[dtype])

    @staticmethod
    def _write_block(fresh, old):
        rows, _, tokens, _ = old.shape
        fresh[:rows, :, :tokens] = old  # numpy in place; MLX as a slice update of the new array
        return fresh

    def _write_prefix(self, buffer, slot: int, held, n: int) -> None:
        """buffer[slot, :, :n] = held[0, :, :n] (a cache's code buffer, (1, H, capacity, w)), in one copy: on the
        CPU numpy reads the evaluated MLX buffer where it lies (slicing it in MLX first copied it once more)."""
        if self.on_gpu:
            buffer[slot : slot + 1, :, :n] = held[:, :, :n]
        else:
            mx.eval(held)
            buffer[slot, :, :n] = np.asarray(held)[0, :, :n]

    def _read(self, buffer, slot: int, start: int, stop: int) -> mx.array:
        """buffer[slot, :, start:stop] as a (1, H, n, w) MLX array of its own."""
        if self.on_gpu:
            return buffer[slot : slot + 1, :, start:stop] + 0  # an op: a buffer of its own, not a view of ours
        return mx.array(np.ascontiguousarray(buffer[slot : slot + 1, :, start:stop]))  # (a strided copy: 3.5x slower)

    def _settle_buffers(self) -> None:
        """On a GPU, the buffers evaluated, so that the in-place launch writes the arrays we hold."""
        if self.on_gpu:
            mx.eval(self._held())

    def _held(self) -> list:
        return [self.codes, [] if self.key_mean is None else self.key_mean]

    def _flush(self) -> None:
        """On a GPU, the last in-place launch run before the buffers are read: a graph that slices them does not
        depend on it (only its output does)."""
        if self.on_gpu:
            mx.eval(self._flushed())

    def _flushed(self) -> list:
        """What _flush evaluates (the buffers and the last launch's output), the launch then forgotten."""
        written, self._written = self._written, None
        return [self.codes, [] if written is None else written]

    # ---- one decode step ----------------------------------------------------------------------------------

    def store(self, slots: list[int], keys: mx.array, values: mx.array) -> None:
        """The step's new tokens, one per row: (B, H, 1, D) for slots[b]."""
        # Every slot's next token has room: on a GPU the launch writes one for the slots not in this step too.
        self._room(len(self.caches), max(self.lengths) + 2)
        given = keys.dtype
        keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        if self.on_gpu:
            self._pending = (slots, keys, values)
        else:
            self._encode_and_write(slots, keys, values)
        for slot in slots:
            cache = self.caches[slot]
            cache.offset += 1
            cache.n_encoded += 1
            cache.input_dtype = given

    def _encode_and_write(self, slots: list[int], keys: mx.array, values: mx.array) -> None:
        """(CPU) One encode of the rows' tokens (less their key means), written at each row's length in place."""
        if self.key_mean is not None:
            keys = keys - self._rows(self.key_mean, slots)
        new_k, new_v = kernels.encode_pair(self.key_method, keys, self.value_method, values)
        rows, tokens = np.asarray(slots), np.asarray([self.lengths[s] for s in slots])
        for side, new in zip(_CODE_SIDES, (new_k, new_v), strict=True):
            for name, a in new.items():
                self.codes[side][name][rows, :, tokens] = np.asarray(a)[:, :, 0]
        for slot in slots:
            self.lengths[slot] += 1

    def attend(self, slots: list[int], queries: mx.array, scale: float) -> mx.array:
        """Attention of (B, Hq, 1, D) queries, row b over slot slots[b]'s tokens, in one call for all rows."""
        S, B = len(self.caches), len(slots)
        every = slots == list(range(S))
        H = self.n_kv_heads
        q = queries if every else _scatter(queries, slots, S)
        if self._pending is not None:  # CUDA: the new tokens coded into the buffers by the attention's launch
            pending_slots, keys, values = self._pending
            self._pending = None
            kernel = dispatch.append_kernel(q, None, H, self.key_method, self.value_method)
            if kernel is None:
                raise ValueError("batch arena: no CUDA kernel appends and attends these caches' codes")
            lengths = list(self.lengths)  # a slot not in the step gets a token past its length, never read
            keys, values = (x if every else _scatter(x, pending_slots, S) for x in (keys, values))
            segment = CodeSegment(self.codes["key_codes"], self.codes["value_codes"], self.key_mean, max(lengths))
            if self._written is not None:  # the last step's launch runs first, even if its output was discarded
                q = mx.depends(q, self._written)
            out = gpu.attention(q, segment, self.key_method, self.value_method, scale, kernel,
                                lengths=mx.array(lengths, dtype=mx.int32), append=(keys, values))[0]
            for slot in pending_slots:
                self.lengths[slot] += 1
            self._written = out
        else:  # CPU: one call of the native kernel, slots not in the step given no tokens
            lengths = [n if every or s in slots else 0 for s, n in enumerate(self.lengths)]
            segment = CodeSegment(self.codes["key_codes"], self.codes["value_codes"], None, max(lengths))
            _, n_q_heads, L, D = q.shape
            # One code segment: q·mean is the same for every score of a row, so the softmax drops the key mean.
            q5 = (q.astype(mx.float32) * scale).reshape(S, H, n_q_heads // H, L, D)
            out = cpu_rows_attention(q5, segment, self.key_method, self.value_method, np.asarray(lengths, np.int32))
            out = out.reshape(S, n_q_heads, L, D).astype(queries.dtype)
        return out if every else mx.take(out, mx.array(slots, dtype=mx.int32), axis=0)

    def _rows(self, a: mx.array, slots: list[int]) -> mx.array:
        if slots == list(range(len(self.caches))):
            return a[: len(slots)] if a.shape[0] != len(slots) else a
        return mx.take(a, mx.array(slots, dtype=mx.int32), axis=0)

    @functools.cached_property
    def bytes_per_token(self) -> int:
        """Code bytes one token adds to a cache of this layer (nbytes grows by this much per token)."""
        heads = self.n_kv_heads
        return sum(heads * width * np.dtype(_NUMPY[getattr(mx, d) if isinstance(d, str) else d]).itemsize
                   for layout in (self.key_method.layout, self.value_method.layout) for width, d in layout.values())


_NUMPY = {mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.float16: np.float16,
          mx.float32: np.float32, mx.int8: np.int8, mx.int32: np.int32}


def _scatter(x: mx.array, slots: list[int], S: int) -> mx.array:
    """(B, ...) rows placed at `slots` of an (S, ...) array of zeros."""
    full = mx.zeros((S, *x.shape[1:]), dtype=x.dtype)
    full[mx.array(slots, dtype=mx.int32)] = x
    return full


class SlidingWindowLayer(ValueError):
    """A model layer asked for a sliding-window mask: the arena serves full-attention layers only."""


class ArenaView:
    """One layer of a batched decode step over an arena layer: what the model sees as that layer's cache."""

    def __init__(self, layer: ArenaLayer, slots: list[int], offset: mx.array):
        self.layer, self.slots = layer, slots
        self.offset = offset  # (B,) the rows' positions: the same in every layer of a session

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[0] != len(self.slots) or keys.shape[2] != 1:
            raise ValueError(f"keys: a batch arena step takes one token for each of {len(self.slots)} rows, "
                             f"got {tuple(keys.shape)}")
        self.layer.store(self.slots, keys, values)
        self.offset = self.offset + 1
        return keys, values  # the attention reads the arena, never these

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise SlidingWindowLayer("window_size: a batch arena serves full-attention layers (Gemma's sliding ones "
                                     "run unbatched)")
        if N != 1:
            raise ValueError("a batch arena serves decode steps (one token per row)")
        return None

    def attention(self, queries: mx.array, scale: float, mask=None) -> mx.array:
        if mask is not None:
            raise ValueError("mask: a batch arena step is one token per row and needs none")
        return self.layer.attend(self.slots, queries, scale)


class BatchArena:
    """The arena of one model: per layer an ArenaLayer, and the sessions (their per-layer caches) in it."""

    def __init__(self):
        self.layers: list[ArenaLayer] | None = None
        self.members: list[list | None] = []  # per slot, the session's per-layer caches (None: a free slot)
        self.model_slides = False  # set once a step met a sliding-window layer: no session of this model fits

    def fits(self, caches: list) -> bool:
        """Whether a session's per-layer caches can join: codes only in every layer, of methods this device's
        kernel covers (the CPU kernel's, or on CUDA the append kernel's), coded like the members'."""
        if self.model_slides or not all(codes_only(c) and _device_covers(c) for c in caches):
            return False
        return not self.members or self._codes_alike(caches)

    def _codes_alike(self, caches: list) -> bool:
        return self.layers is not None and len(caches) == len(self.layers) and all(
            _same_coding(coding(c), layer.coding) for c, layer in zip(caches, self.layers, strict=True))

    def slot_of(self, caches: list) -> int | None:
        for slot, member in enumerate(self.members):
            if member is caches:
                return slot
        return None

    def join(self, sessions: list[list]) -> list[int]:
        """The sessions' slots (each session: its per-layer caches, which must fit): joined now where needed (their
        codes copied into free slots, lowest first, then new ones; the buffers sized once for all of them), or
        again where a member's caches moved without the arena (a trim: their offsets differ from the arena's
        lengths)."""
        joining = []
        for caches in sessions:
            slot = self.slot_of(caches)
            if slot is not None and not all(c.offset == layer.lengths[slot] and c._lease is not None
                                            and c._lease.slot == slot for c, layer in zip(caches, self.layers, strict=True)):
                self.release(caches)
                slot = None
            if slot is None:
                joining.append(caches)
        if joining:
            if not self.members and not self._codes_alike(joining[0]):
                # The buffers are kept while the arena is empty, for the next batch of the same coding.
                self.layers = [ArenaLayer(c, on_gpu=kernels.gpu_backend() is not None) for c in joining[0]]
            free = [slot for slot, member in enumerate(self.members) if member is None][: len(joining)]
            slots = free + list(range(len(self.members), len(self.members) + len(joining) - len(free)))
            for i, layer in enumerate(self.layers):
                layer.add([caches[i] for caches in joining], slots)
            self.members.extend([None] * (max(slots) + 1 - len(self.members)))
            for slot, caches in zip(slots, joining, strict=True):
                self.members[slot] = caches
        return [self.slot_of(caches) for caches in sessions]

    def release(self, caches: list) -> None:
        """The session leaves: its caches get the codes back and own them again (release_many of one)."""
        self.release_many([caches])

    def release_many(self, sessions: list[list]) -> None:
        """The sessions leave (each: its per-layer caches; ones not in the arena are skipped): their caches get the
        codes back and own them again, and their slots are free. Every layer's buffers are read and copied back
        in two evaluations for all of them: on a GPU each waits for the device, and per layer and session they
        cost 3.5 ms a 16-layer session (32 leaving one by one: 110-118 ms on the H200, 51-59 ms with three
        evaluations a session)."""
        slots = sorted({slot for slot in map(self.slot_of, sessions) if slot is not None})
        if not slots:
            return
        if self.layers[0].on_gpu:  # every layer's last in-place launch run before its buffers are read
            mx.eval([layer._flushed() for layer in self.layers])
        changed = [layer.sync(slot, settle=False) for layer in self.layers for slot in slots]
        mx.eval(changed)  # copies of their own before the slots are written
        for layer in self.layers:
            layer.remove(slots)
        for slot in slots:
            self.members[slot] = None
        while self.members and self.members[-1] is None:
            del self.members[-1]
        if self.layers[0].on_gpu:
            mx.eval([layer._held() for layer in self.layers])

    def views(self, slots: list[int]) -> list[ArenaView]:
        offset = mx.array([self.layers[0].caches[s].offset for s in slots])
        return [ArenaView(layer, slots, offset) for layer in self.layers]

    def bytes_per_token(self) -> int:
        """Bytes one decode step adds to a member session (all layers)."""
        return sum(layer.bytes_per_token for layer in self.layers)


def _device_covers(cache) -> bool:
    kind = kernels.gpu_backend()
    if kind is None:
        return cpu_supported(cache.key_quantizer, cache.value_quantizer)
    return kind == "cuda" and gpu.append_supported(cache.key_quantizer, cache.value_quantizer)


def settle_leased(caches: list) -> None:
    """Copy back into each cache that an arena holds the tokens the arena coded for it since, in two evaluations
    for all of them (each cache's own `_settle` takes two, on a GPU each waiting for the device: 32 for a commit's
    snapshot of a 16-layer session). The caches stay in their arenas."""
    leased = [cache for cache in caches if cache._lease is not None]
    if not leased:
        return
    layers = list({id(c._lease.layer): c._lease.layer for c in leased}.values())
    if any(layer.on_gpu for layer in layers):  # every layer's last in-place launch run before its buffers are read
        mx.eval([layer._flushed() for layer in layers])
    changed = []
    for cache in leased:
        changed += cache._lease.layer.sync(cache._lease.slot, settle=False)
    mx.eval(changed)  # copies of their own before the buffers are written again
