"""CompressedKVCache: an mlx_lm-compatible KV cache that holds keys AND values as packed codes.

Token order inside the cache: optional fp16 attention sinks (the first tokens), then codes, then an optional
fp16 window of the most recent tokens. Tokens leave the window for the codes as new ones arrive. Between
steps the cache holds only these — no fp16 copy of the history.
"""

import copy
import json
import os

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import _BaseCache

from . import kernels
from .attention import CodeSegment, ExactSegment, compressed_attention, decode_keys
from .kernels import dispatch, gpu
from .methods import make_method
from .methods.klt import KLT, WIDE_BITS, KLTPlan
from .methods.outliers import OutlierChannels
from .methods.scaled import ScaledKeys
from .observers import start_timer
from .rope import rotate

_GROW_TOKENS = 256  # codes are preallocated in steps, as mlx_lm's KVCache does, so decode appends in place
WINDOW_BLOCK = 16  # see CompressedKVCache._window_block
_MIN_TOKENS_FOR_MEAN = 8  # tokens wait in fp16 until the key mean is estimated from at least this many
# kvshard's own state format, so that a state loads whatever mlx_lm release saved it (their meta_state protocol
# changed between releases; ours travels inside the state). 1: the unversioned meta of releases before it.
STATE_FORMAT = 2
# Model-level objects a copy of a cache shares rather than copies: fixed once built, the same for every session.
_SHARED_ON_COPY = ("observers", "key_quantizer", "value_quantizer", "key_plan", "value_plan", "key_scale")
_FLOATS = frozenset((mx.float16, mx.bfloat16, mx.float32))


def _check_count(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
    return value


def _slice(codes: dict, start: int, stop: int) -> dict:
    return {name: a[:, :, start:stop] for name, a in codes.items()}


class CompressedKVCache(_BaseCache):
    def __init__(
        self,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        method: str = "turboquant_mse",
        key_bits: int = 4,
        value_bits: int | None = None,
        seed: int = 42,
        sink_tokens: int = 0,
        window: int = 0,
        center_keys: bool = True,
        value_method: str | None = None,
        key_scale: mx.array | None = None,
        key_plan: KLTPlan | None = None,
        value_plan: KLTPlan | None = None,
        observers=None,
        outlier_channels: int = 0,
    ):
        self.method = method
        self.observers = list(observers or ())  # quant/observers.py; none: the hooks below cost nothing
        # Calibrated `klt` transforms. Like codebooks and rotations they belong to the model, shared by every
        # session; `nbytes` counts what each cache holds per token, so they are not in it.
        self.key_plan, self.value_plan = key_plan, value_plan
        self.key_scale = None if key_scale is None else mx.array(key_scale).astype(mx.float16)
        self.value_method_name = value_method or method
        self.key_bits = key_bits
        self.value_bits = key_bits if value_bits is None else value_bits
        self.seed = seed
        self.sink_tokens = _check_count(sink_tokens, "sink_tokens")
        self.window = _check_count(window, "window")
        self.center_keys = bool(center_keys)
        self.outlier_channels = _check_count(outlier_channels, "outlier_channels")
        self.head_dim = None
        self.n_kv_heads = None
        # Build the quantizers now when the shape is known, so bad bits/method fail at construction.
        probe_dim = head_dim if head_dim is not None else 64
        make_method(method, probe_dim, key_bits, seed)
        make_method(self.value_method_name, probe_dim, self.value_bits, seed)
        for field, plan, name in (("key_plan", key_plan, method), ("value_plan", value_plan, self.value_method_name)):
            if plan is not None and (not isinstance(plan, KLTPlan) or name != "klt"):
                raise ValueError(f"{field} must be a KLTPlan and needs method 'klt', got {type(plan).__name__} with {name!r}")
        if key_plan is not None and key_scale is not None:
            raise ValueError("key_scale and key_plan exclude each other: a klt plan already weighs keys by the queries")
        if head_dim is not None:
            self._init_shape(head_dim, n_kv_heads)
        self._clear()

    # ---- construction -------------------------------------------------------------------------------------

    def _init_shape(self, head_dim: int, n_kv_heads: int | None) -> None:
        self.head_dim = head_dim
        self.n_kv_heads = n_kv_heads
        self.key_quantizer = make_method(self.method, head_dim, self.key_bits, self.seed)
        if self.key_scale is not None:
            if self.key_scale.shape != (n_kv_heads, head_dim):
                raise ValueError(
                    f"key_scale must have shape (kv_heads, head_dim) = ({n_kv_heads}, {head_dim}), "
                    f"got {tuple(self.key_scale.shape)}"
                )
            self.key_quantizer = ScaledKeys(self.key_quantizer, self.key_scale)
        self.value_quantizer = make_method(self.value_method_name, head_dim, self.value_bits, self.seed)
        for field, plan in (("key_plan", self.key_plan), ("value_plan", self.value_plan)):
            if plan is not None and plan.analysis.shape[:2] not in ((n_kv_heads, head_dim), (1, head_dim)):
                raise ValueError(
                    f"{field} must be for (kv_heads, head_dim) = ({n_kv_heads}, {head_dim}), got {plan.analysis.shape[:2]}"
                )
        if self.key_plan is not None:
            self.key_quantizer = KLT(head_dim, self.key_bits, self.seed, plan=self.key_plan)
        if self.outlier_channels:
            self.key_quantizer = OutlierChannels(self.key_quantizer, self.outlier_channels)
        if self.value_plan is not None:
            self.value_quantizer = KLT(head_dim, self.value_bits, self.seed, plan=self.value_plan)

    @property
    def _key_rope(self) -> tuple | None:
        """(frequencies, traditional) when the key plan codes keys before RoPE: codes and the key mean are then
        of un-rotated keys (quant/rope.py)."""
        plan = self.key_plan
        return None if plan is None or plan.rope_frequencies is None else (plan.rope_frequencies, plan.rope_traditional)

    def _clear(self) -> None:
        self.read_by_hook = False
        self.input_dtype = None  # what update_and_fetch was last given: K/V views come back in it, as from KVCache
        # The decode step's append in the attention kernel's launch: update_and_fetch leaves the new token here
        # and `attention` codes it in place; `_written` is that launch's output until something else reads codes.
        self._pending = None
        self._written = None
        self._fusable = None  # whether this cache's appends can be coded in the attention launch (worked out once)
        self._block = None  # tokens that leave the window together (_window_block, worked out once)
        self._ring, self._ring_start = None, 0  # the window's buffers while held as a ring; its oldest slot
        self._plan = None  # (key, the decode step's launches or None): _coded_decode_plan, _append_and_attend
        self._lease = None  # a batch arena's hold on this cache's newest codes (quant/batch_arena.py)
        # Set when `state` or `trim` may have handed out views of the buffers: in-place appends wait until an
        # ordinary append has given the cache buffers of its own again (MLX copies a buffer still viewed).
        self._exported = False
        self.offset = 0
        self.n_encoded = 0
        self.sink_keys = self.sink_values = None
        self.window_keys = self.window_values = None
        self.key_codes = self.value_codes = None
        self.key_mean = None
        # A fresh cache fed its first tokens in pieces (a prompt fed in small chunks beside decoding streams) holds
        # them in fp16 until this many have arrived, so its key mean comes from as many tokens as one whole first
        # chunk would give it (service/generation.py sets it; 0: the mean comes from the first append).
        self.mean_tokens = 0

    @property
    def config(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "n_kv_heads": self.n_kv_heads,
            "method": self.method,
            "value_method": self.value_method_name,
            "key_bits": self.key_bits,
            "value_bits": self.value_bits,
            "seed": self.seed,
            "sink_tokens": self.sink_tokens,
            "window": self.window,
            "center_keys": self.center_keys,
            "outlier_channels": self.outlier_channels,
            "key_plan_bits": None if self.key_plan is None else [int(b) for b in self.key_plan.coordinate_bits],
            "value_plan_bits": None if self.value_plan is None else [int(b) for b in self.value_plan.coordinate_bits],
            "plan_norm_bits": [None if p is None else p.norm_bits for p in (self.key_plan, self.value_plan)],
            "plan_wide_bits": [None if p is None else p.wide_bits for p in (self.key_plan, self.value_plan)],
            "key_plan_rope": None if self._key_rope is None else {
                "frequencies": [float(w) for w in self._key_rope[0]], "traditional": self._key_rope[1]},
        }

    # ---- appending --------------------------------------------------------------------------------------

    def _validate(self, keys: mx.array, values: mx.array, check_finite: bool) -> None:
        for field, x in (("keys", keys), ("values", values)):
            if not isinstance(x, mx.array):
                raise TypeError(f"{field} must be an mx.array, got {type(x).__name__}")
            if x.ndim != 4:
                raise ValueError(f"{field} must have shape (batch, kv_heads, tokens, head_dim), got {tuple(x.shape)}")
            if not mx.issubdtype(x.dtype, mx.floating):
                raise ValueError(f"{field} must be a floating-point array, got {x.dtype}")
        if keys.shape != values.shape:
            raise ValueError(f"values shape {tuple(values.shape)} must match keys shape {tuple(keys.shape)}")
        B, H, _, D = keys.shape
        if self.head_dim is not None and D != self.head_dim:
            raise ValueError(f"head_dim of keys must be {self.head_dim}, got {D}")
        if self.n_kv_heads is not None and H != self.n_kv_heads:
            raise ValueError(f"kv_heads of keys must be {self.n_kv_heads}, got {H}")
        held = self.sink_keys if self.sink_keys is not None else self.window_keys
        if held is not None and held.shape[0] != B:
            raise ValueError(f"batch of keys must be {held.shape[0]}, got {B}")
        if check_finite:
            for field, x in (("keys", keys), ("values", values)):
                if not mx.isfinite(x).all().item():
                    raise ValueError(f"{field} contain NaN or Inf")

    def _store(self, keys: mx.array, values: mx.array) -> None:
        if self.head_dim is None or self.n_kv_heads is None:
            self._init_shape(keys.shape[-1], keys.shape[1])
        keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        n = keys.shape[2]
        if self._codes_direct():
            # The decode step's path: nothing waits in fp16, so the tokens go straight into the code buffers.
            self.offset += n
            self._encode(keys, values)
            return
        self.offset += n
        held_sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        take = min(self.sink_tokens - held_sinks, n)
        if take > 0:
            self.sink_keys = _concat(self.sink_keys, keys[:, :, :take])
            self.sink_values = _concat(self.sink_values, values[:, :, :take])
            keys, values = keys[:, :, take:], values[:, :, take:]
        if keys.shape[2] == 0:
            return
        self.window_keys = _concat(self.window_keys, keys)
        self.window_values = _concat(self.window_values, values)
        overflow = self.window_keys.shape[2] - self.window
        if self.center_keys and self.key_mean is None:
            if self.window_keys.shape[2] < _MIN_TOKENS_FOR_MEAN or self.offset < self.mean_tokens:
                return
            # Keys share a large common direction; encoding k − μ spends the bits on what differs between them.
            window = self._unrope(self.window_keys.astype(mx.float32), self._codes_start())
            self.key_mean = window.mean(axis=2, keepdims=True).astype(mx.float16)
        if overflow >= self._window_block():
            self._encode(self.window_keys[:, :, :overflow], self.window_values[:, :, :overflow])
            if self.window:
                self.window_keys = self.window_keys[:, :, overflow:]
                self.window_values = self.window_values[:, :, overflow:]
            else:
                self.window_keys = self.window_values = None

    def _window_block(self) -> int:
        """Tokens that leave the fp16 window (of `window` tokens, maybe none) for the codes together. 1 (every token
        as it leaves) but on CUDA for methods that no encode kernel covers (klt's calibrated layouts): their encode
        is ~300 small MLX ops a layer, so there up to WINDOW_BLOCK − 1 tokens more wait in fp16 and are coded in one
        encode every WINDOW_BLOCK steps (the waiting tokens are attended exactly and counted in nbytes)."""
        if self.head_dim is None:  # no quantizers yet: nothing is coded before the first append
            return 1
        if self._block is None:
            self._block = WINDOW_BLOCK if kernels.gpu_backend() == "cuda" and not gpu.pair_covers(
                self.key_quantizer, self.value_quantizer) else 1
        return self._block

    def _codes_direct(self) -> bool:
        """Whether new tokens go straight into the codes: no window, sinks full, the key mean known."""
        return self.window == 0 and self.window_keys is None and (self.key_mean is not None or not self.center_keys) \
            and (self.sink_keys is not None and self.sink_keys.shape[2] == self.sink_tokens or not self.sink_tokens) \
            and self._window_block() == 1

    def _defer_append(self, keys, values) -> bool:
        """Whether this append can wait for `attention`, whose kernel codes it in place (one launch a layer): one
        valid token of the held shape, no sinks, the key mean known, room in the code buffers, and either no
        window or a full one (held as a ring: the kernel codes its oldest token, the new one takes its slot);
        no observers (they see each encode), keys after RoPE, on CUDA with both methods' rotations in the
        kernel. Checked in this order, so that the decode step's own host time stays small."""
        if (not self.read_by_hook or self._pending is not None or not self.n_encoded or self._exported
                or self.observers):
            return False
        if self._fusable is None:
            self._fusable = (kernels.gpu_backend() == "cuda" and self._key_rope is None and not self.sink_tokens
                             and gpu.append_supported(self.key_quantizer, self.value_quantizer))
        if not self._fusable or (self.key_mean is None and self.center_keys):
            return False
        idx = self.key_codes["idx"]
        token = (idx.shape[0], self.n_kv_heads, 1, self.head_dim)
        if not (type(keys) is mx.array and type(values) is mx.array and keys.shape == token
                and values.shape == token and keys.dtype in _FLOATS and values.dtype in _FLOATS
                and idx.shape[2] > self.n_encoded):
            return False
        if not self.window:
            return self.window_keys is None
        if self.window_keys is None or self.window_keys.shape[2] != self.window:
            return False
        if self._ring is None or self._ring[0] is not self.window_keys:
            # The ring is written in place: it gets buffers of its own (the window may be a view of a prefill's K/V).
            self.window_keys, self.window_values = self.window_keys + 0, self.window_values + 0
            self._ring = (self.window_keys, self.window_values)
        return True

    def _settle(self) -> None:
        """Before anything but the decode kernel reads the codes or the window: the last in-place launch is
        evaluated (a graph that slices the buffers does not depend on it), the ring put back in token order, and
        a deferred token appended the ordinary way; codes a batch arena holds for this cache copied back."""
        if self._lease is not None:
            self._lease.give_back(self)
        if self._written is not None:
            mx.eval(self._written)
            self._written = None
        if self._ring_start:
            start, self._ring_start = self._ring_start, 0
            self.window_keys = mx.concatenate([self.window_keys[:, :, start:], self.window_keys[:, :, :start]], axis=2)
            self.window_values = mx.concatenate([self.window_values[:, :, start:], self.window_values[:, :, :start]],
                                                axis=2)
            self._ring = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.offset -= 1  # _store counts it again
            self._store(*pending)

    def _codes_start(self) -> int:
        """Position of the first coded token: codes follow the sinks."""
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    def _unrope(self, keys: mx.array, start: int) -> mx.array:
        if self._key_rope is None:
            return keys
        if keys.shape[2] <= kernels.SMALL_APPEND_TOKENS and kernels.gpu_backend() is None:  # a CPU decode step
            return kernels.rotate_rows(keys, start, *self._key_rope, inverse=True)
        return rotate(keys.astype(mx.float32), start, *self._key_rope, inverse=True)

    def _encode(self, keys: mx.array, values: mx.array) -> None:
        if self._written is not None:
            self._settle()
        keys = self._unrope(keys, self._codes_start() + self.n_encoded)
        if self.key_mean is not None:
            keys = keys - self.key_mean
        start = start_timer(self.observers, keys, values)
        # The quantizers' encode, fused: one kernel for keys and values on CUDA; on the CPU bit for bit the same.
        new_k, new_v = kernels.encode_pair(self.key_quantizer, keys, self.value_quantizer, values)
        self.put_codes(new_k, new_v)
        for observer in self.observers:
            observer.on_encode(self, keys, values, new_k, new_v, start)

    def put_codes(self, new_k: dict, new_v: dict) -> None:
        """Append codes this cache's quantizers made (of keys less the key mean) after the held codes. A batch of
        sessions' caches that code alike encodes all rows in one call and puts each row here (quant/batch_view.py)."""
        n = next(iter(new_k.values())).shape[2]
        if self.key_codes is None:
            self.key_codes, self.value_codes = {}, {}
        needed = self.n_encoded + n
        capacity = 0 if not self.key_codes else next(iter(self.key_codes.values())).shape[2]
        if needed > capacity:
            # Kept codes are cut at n_encoded (a trim may have left capacity beyond it), so grow from there.
            grow = ((n + _GROW_TOKENS - 1) // _GROW_TOKENS) * _GROW_TOKENS
            for held, fresh in ((self.key_codes, new_k), (self.value_codes, new_v)):
                for name, a in fresh.items():
                    extra = mx.zeros((*a.shape[:2], grow, a.shape[3]), dtype=a.dtype)
                    held[name] = extra if name not in held else mx.concatenate([held[name][:, :, : self.n_encoded], extra], axis=2)
        for held, fresh in ((self.key_codes, new_k), (self.value_codes, new_v)):
            for name, a in fresh.items():
                held[name][:, :, self.n_encoded : needed] = a
        self.n_encoded = needed
        self._exported = False

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """mlx_lm's entry point. Returns the full K/V *lazily*, so that an attention that reads them gets the
        right answer; once kvshard's attention hook has read this cache (`read_by_hook`: it reads the codes and
        never the K/V), it returns the new tokens instead, as building the graph of the whole decoded history
        at every step cost a third of a GPU decode step."""
        if self._defer_append(keys, values):
            self._pending = (keys, values)
            self.offset += 1
            self.input_dtype = keys.dtype
            return keys, values
        self._validate(keys, values, check_finite=False)
        self._settle()
        if keys.shape[2]:  # as KVCache, an update of no tokens only fetches
            self._store(keys, values)
        self.input_dtype = keys.dtype
        for observer in self.observers:
            observer.on_append(self, keys, values)
        if self.read_by_hook:
            return keys, values
        return tuple(x.astype(keys.dtype) for x in self.dequantized())

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Append tokens: (head_dim,), (tokens, head_dim), (kv_heads, tokens, head_dim) or (1, kv_heads, tokens,
        head_dim). Invalid input raises ValueError naming the field and leaves the cache as it was."""
        keys, values = _as_4d(keys, "keys"), _as_4d(values, "values")
        self._validate(keys, values, check_finite=True)
        self._settle()
        self._store(keys, values)
        mx.eval(self._arrays())
        for observer in self.observers:
            observer.on_append(self, keys, values)

    # ---- reading ----------------------------------------------------------------------------------------

    def segments(self, exact: bool = True) -> list:
        """The held tokens in order: fp16 sinks, codes, fp16 window. exact=False hands over the code buffers
        uncut (longer than n_encoded; the attention paths cut them where they need to), which saves the
        decode step a slice per code array."""
        self._settle()
        parts = []
        if self.sink_keys is not None and self.sink_keys.shape[2]:
            parts.append(ExactSegment(self.sink_keys, self.sink_values))
        if self.n_encoded:
            parts.append(
                CodeSegment(
                    _slice(self.key_codes, 0, self.n_encoded) if exact else self.key_codes,
                    _slice(self.value_codes, 0, self.n_encoded) if exact else self.value_codes,
                    self.key_mean,
                    self.n_encoded,
                    None if self._key_rope is None else (*self._key_rope, self._codes_start()),
                )
            )
        if self.window_keys is not None and self.window_keys.shape[2]:
            parts.append(ExactSegment(self.window_keys, self.window_values))
        return parts

    def attention(self, queries: mx.array, scale: float, mask=None) -> mx.array:
        """Attention of (B, Hq, L, D) queries over every held token, read from the codes."""
        if self._pending is not None:
            kernel = dispatch.append_kernel(queries, mask, self.n_kv_heads, self.key_quantizer, self.value_quantizer)
            if kernel is not None:
                return self._append_and_attend(queries, scale, kernel)
        if mask is None and not self.observers and self.n_encoded and kernels.gpu_backend() == "cuda":
            plan = self._coded_decode_plan(queries, scale)
            if plan is not None:
                exact = [(a, b) for a, b in ((self.sink_keys, self.sink_values), (self.window_keys, self.window_values))
                         if a is not None and a.shape[2]]
                return plan(queries, exact)
        start = start_timer(self.observers, queries)
        output = compressed_attention(
            queries,
            self.segments(exact=False),
            n_kv_heads=self.n_kv_heads,
            key_method=self.key_quantizer,
            value_method=self.value_quantizer,
            scale=scale,
            mask=mask,
        )
        for observer in self.observers:
            observer.on_attend(self, queries, output, start)
        return output

    def _coded_decode_plan(self, queries: mx.array, scale: float):
        """The decode step's two launches over the codes, the sinks and the window (gpu.coded_decode_plan) when
        dispatch picks the coded-layout kernel for them, else None; worked out once for the codes as they stand
        and reused until they change (every WINDOW_BLOCK steps), so that a step does not re-derive the path, the
        launch shapes and the constant inputs. Keyed on everything they depend on; the plan holds the code
        buffers it was made for, so their ids cannot come back for other buffers."""
        self._settle()
        key = ("coded", queries.shape, queries.dtype, scale, self.n_encoded, self._codes_start(),
               id(self.key_codes["idx"]), id(self.value_codes["idx"]), id(self.key_mean),
               self.window_keys is not None and self.window_keys.shape[2] > 0, os.environ.get(dispatch.ENV_BACKEND))
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        segments = self.segments(exact=False)
        codes = [s for s in segments if s.is_codes]
        plan = None
        if (len(codes) == 1 and len(segments) <= 3 and gpu.coded_merge_supported(self.value_quantizer, queries.shape[3])
                and dispatch.choose(None, queries, segments, self.key_quantizer, self.value_quantizer, None)
                == "mma_coded"):
            plan = gpu.coded_decode_plan(queries, codes[0], self.key_quantizer, self.value_quantizer, scale,
                                         len(segments) - 1)
        self._plan = (key, plan)
        return plan

    def _append_and_attend(self, queries: mx.array, scale: float, kernel: str) -> mx.array:
        """The deferred token coded into row n_encoded of the buffers (or, with a window, the ring's oldest token
        coded there and the new one put in its slot) and attended, with the rest, in one launch."""
        keys, values = self._pending
        self._pending = None
        B = queries.shape[0]
        # The launch's derivation is reused while these stay the same (gpu.append_plan): the plan holds the buffers
        # it was made for, so their ids cannot come back for other buffers.
        key = ("append", queries.shape, queries.dtype, scale, kernel, id(self.key_codes["idx"]),
               id(self.value_codes["idx"]), id(self.key_mean), self.window,
               gpu.split_size(kernel, B, self.n_kv_heads, self.n_encoded))
        if self._plan is None or self._plan[0] != key:
            segment = CodeSegment(self.key_codes, self.value_codes, self.key_mean, self.n_encoded)
            self._plan = (key, gpu.append_plan(kernel, queries, segment, self.key_quantizer, self.value_quantizer,
                                               scale, self.window))
        ring = None
        if self.window:
            ring = (self.window_keys, self.window_values, self._ring_start)
            self._ring_start = (self._ring_start + 1) % self.window
        if self._written is not None:
            # The last launch wrote the token before this one in place, and nothing but its output depends on it:
            # if that output was never evaluated (a caller discarded it), the launch would never run.
            queries = mx.depends(queries, self._written)
        out = self._plan[1](queries, (keys.astype(mx.float16), values.astype(mx.float16)),
                            gpu.row_lengths(self.n_encoded, B), ring)[0]
        self.n_encoded += 1
        self._written = out
        return out

    def attend(self, q: mx.array, scale: float | None = None) -> mx.array:
        """Attention of queries over all held tokens (no causal mask): (D,), (Lq, D), (Hq, Lq, D) or
        (1, Hq, Lq, D); the output has the query's shape."""
        if self.offset == 0:
            raise ValueError("cache is empty: append keys and values before attend")
        q4 = _as_4d(q, "q")
        if q4.shape[-1] != self.head_dim:
            raise ValueError(f"head_dim of q must be {self.head_dim}, got {q4.shape[-1]}")
        if q4.shape[1] % self.n_kv_heads:
            raise ValueError(f"query heads ({q4.shape[1]}) must be a multiple of kv_heads ({self.n_kv_heads})")
        scale = self.head_dim**-0.5 if scale is None else scale
        return self.attention(q4, scale).reshape(q.shape)

    def dequantized(self) -> tuple[mx.array, mx.array]:
        """All held K and V in fp16, for code that needs them (tests, generic attention)."""
        keys, values = [], []
        for segment in self.segments():
            if isinstance(segment, ExactSegment):
                keys.append(segment.keys)
                values.append(segment.values)
            else:
                keys.append(decode_keys(segment, self.key_quantizer).astype(mx.float16))
                values.append(self.value_quantizer.decode(segment.value_codes).astype(mx.float16))
        return mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)

    def __len__(self) -> int:
        return self.offset

    def __bool__(self) -> bool:
        # An empty cache is still a cache (`caches = caches or make()`, mlx_lm's `if cache and ...`): as KVCache.
        return True

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def _arrays(self) -> list:
        self._settle()
        held = (self.sink_keys, self.sink_values, self.window_keys, self.window_values, self.key_mean, self.key_scale)
        arrays = [a for a in held if a is not None]
        for codes in (self.key_codes or {}, self.value_codes or {}):
            arrays.extend(a[:, :, : self.n_encoded] for a in codes.values())
        return arrays

    @property
    def nbytes(self) -> int:
        """Bytes actually held for the tokens: packed codes, norms, fp16 sinks, window and key mean."""
        return sum(a.nbytes for a in self._arrays())

    def memory_bytes(self) -> int:
        return self.nbytes

    @property
    def fp16_key_bytes(self) -> int:
        """What the keys would take in fp16, for compression ratios."""
        return 0 if self.head_dim is None else 2 * self.offset * self.head_dim * (self.n_kv_heads or 0) * self._batch()

    @property
    def compressed_key_bytes(self) -> int:
        self._settle()
        held = [self.sink_keys, self.window_keys, self.key_mean]
        held_bytes = sum(a.nbytes for a in held if a is not None)
        return held_bytes + sum(a[:, :, : self.n_encoded].nbytes for a in (self.key_codes or {}).values())

    def _batch(self) -> int:
        for a in (self.sink_keys, self.window_keys):
            if a is not None:
                return a.shape[0]
        return next(iter(self.key_codes.values())).shape[0] if self.key_codes else 1

    # ---- trimming -----------------------------------------------------------------------------------------

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens (window first, then codes, then sinks); returns how many were dropped."""
        self._settle()
        self._exported = True  # rows a saved state holds may be coded again
        n = min(_check_count(n, "n"), self.offset)
        left = n
        if left and self.window_keys is not None:
            drop = min(left, self.window_keys.shape[2])
            keep = self.window_keys.shape[2] - drop
            self.window_keys, self.window_values = self.window_keys[:, :, :keep], self.window_values[:, :, :keep]
            left -= drop
        if left and self.n_encoded:
            drop = min(left, self.n_encoded)
            self.n_encoded -= drop
            left -= drop
        if left and self.sink_keys is not None:
            keep = self.sink_keys.shape[2] - left
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]
        self.offset -= n
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(N, self.offset, return_array=return_array, window_size=window_size)

    # ---- state --------------------------------------------------------------------------------------------

    @property
    def state(self) -> dict:
        self._settle()
        self._exported = True
        dtype = None if self.input_dtype is None else str(self.input_dtype).removeprefix("mlx.core.")
        meta = dict(self.config, offset=self.offset, n_encoded=self.n_encoded, format=STATE_FORMAT, dtype=dtype)
        state = {"meta": json.dumps(meta, sort_keys=True)}
        for name in ("sink_keys", "sink_values", "window_keys", "window_values", "key_mean", "key_scale"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name)
        for side, plan in (("key", self.key_plan), ("value", self.value_plan)):
            if plan is not None:
                state[f"{side}_plan_analysis"] = mx.array(plan.analysis)  # float32, as KLTPlan holds them
                state[f"{side}_plan_energies"] = mx.array(plan.energies)
        if self.n_encoded:
            state["key_codes"] = _slice(self.key_codes, 0, self.n_encoded)
            state["value_codes"] = _slice(self.value_codes, 0, self.n_encoded)
        return state

    @state.setter
    def state(self, state: dict) -> None:
        meta = json.loads(state["meta"])
        if meta.get("format", 1) > STATE_FORMAT:
            raise ValueError(f"state format {meta['format']} is newer than this kvshard reads (up to {STATE_FORMAT})")
        wide = meta.get("plan_wide_bits", [WIDE_BITS, WIDE_BITS])  # states before the choice: every plan's default
        self.__init__(
            head_dim=meta["head_dim"],
            n_kv_heads=meta["n_kv_heads"],
            method=meta["method"],
            key_bits=meta["key_bits"],
            value_bits=meta["value_bits"],
            seed=meta["seed"],
            sink_tokens=meta["sink_tokens"],
            window=meta["window"],
            center_keys=meta["center_keys"],
            value_method=meta["value_method"],
            key_scale=state.get("key_scale"),
            key_plan=_plan_from_state(state, "key", meta.get("key_plan_bits"), meta.get("plan_norm_bits", [16, 16])[0],
                                      meta.get("key_plan_rope"), wide[0]),
            value_plan=_plan_from_state(state, "value", meta.get("value_plan_bits"), meta.get("plan_norm_bits", [16, 16])[1],
                                        wide_bits=wide[1]),
            observers=getattr(self, "observers", None),
            outlier_channels=meta.get("outlier_channels", 0),
        )
        for name in ("sink_keys", "sink_values", "window_keys", "window_values", "key_mean"):
            setattr(self, name, state.get(name))
        self.key_codes = dict(state["key_codes"]) if "key_codes" in state else None
        self.value_codes = dict(state["value_codes"]) if "value_codes" in state else None
        self.offset, self.n_encoded = meta["offset"], meta["n_encoded"]
        self.input_dtype = None if meta.get("dtype") is None else getattr(mx, meta["dtype"])

    @property
    def meta_state(self) -> str:
        return self.state["meta"]

    @classmethod
    def from_state(cls, state: dict, meta_state: str | None = None):
        """mlx_lm's loaders call from_state(state) (0.32) or from_state(state, meta_state) (0.29–0.31). Our meta
        travels inside the state, so either call loads it; a meta_state beside a state without one (saved by the
        older protocol) is used."""
        if "meta" not in state and meta_state:
            state = dict(state, meta=meta_state)
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    # ---- the rest of mlx_lm's cache protocol ------------------------------------------------------------------

    @property
    def keys(self) -> mx.array | None:
        """Every held key decoded, (B, kv_heads, tokens, head_dim) in the dtype the model feeds (None when empty),
        as KVCache.keys for code that reads it (BatchKVCache.merge, KV-sharing layers). It MATERIALISES the
        history from the codes at each read; attention never needs it."""
        return self._decoded(0)

    @keys.setter
    def keys(self, depends_on: mx.array) -> None:
        """mlx_lm's pipeline-parallel models set `cache.keys = mx.depends(cache.keys, h)` so that evaluating the
        cache runs the send of h. The history is not replaced: the held codes are made to depend on the array."""
        self._settle()
        if self.key_codes:
            self.key_codes = {name: mx.depends(a, depends_on) for name, a in self.key_codes.items()}

    @property
    def values(self) -> mx.array | None:
        """Every held value decoded; materialises the history, as `keys`."""
        return self._decoded(1)

    def keys_and_values(self) -> tuple:
        """(keys, values), decoded as `keys` / `values` (KV-sharing layers read another layer's cache so)."""
        return self.keys, self.values

    def _decoded(self, which: int) -> mx.array | None:
        if self.offset == 0:
            return None
        return self.dequantized()[which].astype(self.input_dtype or mx.float16)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "CompressedKVCache":
        """The cache itself: it already holds codes at its own bits. mlx_lm's kv_bits / quantized_kv_start
        (maybe_quantize_kv_cache) therefore leave a kvshard cache as it is rather than re-quantizing a decoded
        history into an affine QuantizedKVCache, which would drop the codes and the attention from them."""
        return self

    @classmethod
    def merge(cls, caches: list) -> "BatchCompressedKVCache":  # noqa: F821 (quant/batch_cache.py)
        """One batch cache over these single-sequence caches, for mlx_lm's BatchGenerator (quant/batch_cache.py)."""
        from .batch_cache import BatchCompressedKVCache

        return BatchCompressedKVCache.merge(caches)

    def __deepcopy__(self, memo):
        """A copy with its own codes, sinks and window; the quantizers, plans, key scales and observers (fixed,
        model-level) are shared. mlx_lm's LRUPromptCache and BatchGenerator deep-copy caches."""
        self._settle()
        self._exported = True  # a copy's arrays may share buffers with ours: neither appends in place until it owns them
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            shared = name in _SHARED_ON_COPY or isinstance(value, mx.Dtype)  # a Dtype is immutable and cannot be pickled
            if name in ("_lease", "_plan"):  # a batch arena holds this cache, not its copy; a plan holds our buffers
                value, shared = None, True
            twin.__dict__[name] = value if shared else copy.deepcopy(value, memo)
        return twin


def _plan_from_state(state: dict, side: str, bits, norm_bits, rope=None, wide_bits=WIDE_BITS) -> KLTPlan | None:
    if bits is None:
        return None
    rope = rope or {"frequencies": None, "traditional": False}
    return KLTPlan(np.array(state[f"{side}_plan_analysis"]), np.array(state[f"{side}_plan_energies"]), tuple(bits),
                   norm_bits, rope["frequencies"], rope["traditional"], wide_bits)


def _concat(held: mx.array | None, new: mx.array) -> mx.array:
    return new if held is None else mx.concatenate([held, new], axis=2)


def _as_4d(x, field: str) -> mx.array:
    if not isinstance(x, mx.array):
        try:
            x = mx.array(x)
        except Exception as err:
            raise TypeError(f"{field} must be an array, got {type(x).__name__}") from err
    if x.ndim == 1:
        return x[None, None, None]
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    if x.ndim == 4:
        return x
    raise ValueError(f"{field} must have 1 to 4 dimensions, got shape {tuple(x.shape)}")
