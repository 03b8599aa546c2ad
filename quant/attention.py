"""Attention straight from packed codes: the portable pure-MLX path.

⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩, so the query is rotated once, scored against codes decoded in the rotated domain one
block at a time, the softmax runs online across blocks (flash-decoding), values are accumulated in their own
rotated domain and un-rotated once at the end. No fp16 K or V of the history is ever materialised; peak
memory is one block. fp16 segments (attention sinks, the recent window) are attended exactly beside the codes.
GQA: query heads are grouped under their KV head; K/V are never repeated.

`compressed_attention` runs the path that kernels/dispatch.py chooses: a fused GPU kernel, the CPU fast path,
on a GPU under a mask (prefill) the layer's history decoded once into MLX's fused SDPA, or the portable loop
below. `backend=` or KVSHARD_ATTENTION=pure|cpu|cuda|metal|prefill forces one (tests compare them).
"""

from dataclasses import dataclass

import mlx.core as mx

from . import kernels
from .kernels import dispatch, gpu
from .rope import rotate

BLOCK_TOKENS = 4096


@dataclass
class ExactSegment:
    """Tokens held in fp16: (B, H, t, D) keys and values."""

    keys: mx.array
    values: mx.array

    is_codes = False

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass
class CodeSegment:
    """Tokens held as codes: dicts of (B, H, ≥ t, ·) arrays, plus the key mean that was subtracted before encoding.
    key_rope, for keys coded before RoPE: (frequencies, traditional, position of the segment's first token)."""

    key_codes: dict
    value_codes: dict
    key_mean: mx.array | None
    length: int
    key_rope: tuple | None = None
    is_codes = True

    @property
    def n_kv_heads(self) -> int:
        return next(iter(self.key_codes.values())).shape[1]

    def held(self) -> "CodeSegment":
        """The segment with its code arrays cut to `length` tokens: the cache hands the GPU kernels its
        preallocated buffers (they read `length` tokens per row), every other path takes exact arrays."""
        if next(iter(self.key_codes.values())).shape[2] == self.length:
            return self
        return self.block(0, self.length)

    def block(self, start: int, stop: int) -> "CodeSegment":
        take = lambda codes: {name: a[:, :, start:stop] for name, a in codes.items()}  # noqa: E731
        rope = None if self.key_rope is None else (*self.key_rope[:2], self.key_rope[2] + start)
        return CodeSegment(take(self.key_codes), take(self.value_codes), self.key_mean, stop - start, rope)


def decode_keys(segment: CodeSegment, key_method) -> mx.array:
    """A code segment's keys as attention sees them, in float32: the mean added back and, for keys coded
    before RoPE, RoPE put back at their positions."""
    keys = key_method.decode(segment.key_codes)
    if segment.key_mean is not None:
        keys = keys + segment.key_mean.astype(mx.float32)
    if segment.key_rope is not None:
        frequencies, traditional, position = segment.key_rope
        keys = rotate(keys, position, frequencies, traditional)
    return keys


def _allowed(mask, n_queries: int, total: int, start: int, length: int):
    """The mask restricted to key positions [start, start + length): None, a bool array, or an additive one."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        if start + length <= total - n_queries + 1:
            return None  # every query sees every key of this block
        q_pos = mx.arange(total - n_queries, total)[:, None]
        k_pos = mx.arange(start, start + length)[None]
        return q_pos >= k_pos
    return mask[..., start : start + length]


def _apply_mask(scores: mx.array, mask) -> mx.array:
    """scores: (B, Hkv, group, L, t); mask: (L, t), or (B, 1 or Hq, L, t) as mlx_lm builds them."""
    if mask is None:
        return scores
    if mask.ndim == 4:
        mask = mask.reshape(mask.shape[0], -1, scores.shape[2] if mask.shape[1] > 1 else 1, *mask.shape[-2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, -mx.inf)
    return scores + mask


def compressed_attention(
    queries, segments, *, n_kv_heads: int, key_method, value_method, scale: float, mask=None, backend=None
) -> mx.array:
    """softmax(q·Kᵀ·scale + mask)·V over segments in token order. queries: (B, Hq, L, D) -> (B, Hq, L, D).

    backend: None/"auto" picks the fastest path that covers the case; "pure", "cpu", "cuda" or "metal" force one
    (a forced fast path that does not cover the case raises ValueError)."""
    if mask is None and backend is None and len(segments) == 1 and segments[0].is_codes:
        # The decode step without fp16 segments first, with the fewest checks: its host time is a large part of
        # what a step waits for.
        kernel = dispatch.gpu_kernel(queries, segments[0], key_method, value_method, honour_env=True)
        if kernel is not None:
            return gpu.attention(queries, segments[0], key_method, value_method, scale, kernel)[0]
    path = dispatch.choose(backend, queries, segments, key_method, value_method, mask)
    if path not in (*dispatch.GPU_PATHS, "cpu"):  # those read `length` tokens of the buffers they are handed
        segments = [s.held() if s.is_codes else s for s in segments]
    if path == "pure":
        return _pure_attention(queries, segments, n_kv_heads, key_method, value_method, scale, mask)
    if path == "prefill":
        return _prefill_attention(queries, segments, key_method, value_method, scale, mask)
    return _fast_attention(path, queries, segments, n_kv_heads, key_method, value_method, scale, mask)


def _prefill_attention(queries, segments, key_method, value_method, scale, mask):
    """Many queries under a mask on a GPU (prefill): decode this layer's history to the queries' dtype once and
    run MLX's fused SDPA. The fp16 K/V exist only while this layer's attention runs; decode steps never come
    here. Matmul-shaped work is what GPUs do best, and the blocked portable loop keeps every block's
    scores alive until the graph is evaluated (gigabytes at 16K tokens)."""
    keys, values = [], []
    for segment in segments:
        if segment.length == 0:
            continue
        if isinstance(segment, ExactSegment):
            keys.append(segment.keys.astype(queries.dtype))
            values.append(segment.values.astype(queries.dtype))
        else:
            keys.append(decode_keys(segment, key_method).astype(queries.dtype))
            values.append(value_method.decode(segment.value_codes).astype(queries.dtype))
    keys, values = mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _exact_part(q, segment: ExactSegment, allowed):
    """Attention of q (B, Hkv, g, L, D) fp32 over fp16 tokens: (normalised output, log-sum-exp)."""
    return _exact_arrays(q, segment.keys, segment.values, allowed)


def _exact_arrays(q, keys, values, allowed=None):
    scores = q @ keys[:, :, None].astype(mx.float32).swapaxes(-1, -2)
    scores = _apply_mask(scores, allowed)
    peak = scores.max(axis=-1, keepdims=True)
    safe = mx.where(mx.isinf(peak), 0.0, peak)
    weights = mx.exp(scores - safe)
    total = weights.sum(axis=-1, keepdims=True)
    out = (weights @ values[:, :, None].astype(mx.float32)) / mx.maximum(total, 1e-30)
    return out, safe + mx.log(total)


def _merge(parts):
    """Exact merge of (output, lse) pairs computed over disjoint key sets."""
    peak = parts[0][1]
    for _, lse in parts[1:]:
        peak = mx.maximum(peak, lse)
    peak = mx.where(mx.isinf(peak), 0.0, peak)
    weights = [mx.exp(lse - peak) for _, lse in parts]
    out = sum(w * o for w, (o, _) in zip(weights, parts))
    return out / mx.maximum(sum(weights), 1e-30)


@mx.compile
def _merge_with_exact(q, parts, exact):
    """_merge of the kernels' (output, lse) parts and of attention over unmasked fp16 segments [(keys, values)]: a
    decode step's sinks and window beside its codes. Compiled: traced once per shape, so the step's host time does
    not grow with its ~25 small ops."""
    return _merge(list(parts) + [_exact_arrays(q, keys, values) for keys, values in exact])


def _fast_attention(path, queries, segments, n_kv_heads, key_method, value_method, scale, mask):
    B, n_q_heads, L, D = queries.shape
    group = n_q_heads // n_kv_heads
    live = [s for s in segments if s.length]
    if path in dispatch.GPU_PATHS and len(live) == 1:
        return gpu.attention(queries, live[0], key_method, value_method, scale, path)[0]
    codes = [s for s in live if s.is_codes]
    if (path == "mma_coded" and mask is None and len(codes) == 1 and len(live) <= 3
            and gpu.coded_merge_supported(value_method, D)):
        # A decode step beside the fp16 sinks and window: two launches, the merge and the fp16 tokens in the second.
        exact = [(s.keys, s.values) for s in live if not s.is_codes]
        return gpu.coded_decode(queries, codes[0], key_method, value_method, scale, exact)

    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv_heads, group, L, D)
    parts, start = [], 0
    total = sum(s.length for s in segments)
    if path == "cpu":  # every segment, fp16 ones and the merge included
        out = kernels.cpu_attention(q, segments, key_method, value_method,
                                    lambda start, n: _allowed(mask, L, total, start, n))
        return out.reshape(B, n_q_heads, L, D).astype(queries.dtype)
    exact = []  # unmasked fp16 segments, attended inside the compiled merge
    for segment in segments:
        if segment.length == 0:
            pass
        elif not segment.is_codes:
            allowed = _allowed(mask, L, total, start, segment.length)
            if allowed is None:
                exact.append((segment.keys, segment.values))
            else:
                parts.append(_exact_part(q, segment, allowed))
        else:
            out, lse = gpu.attention(queries, segment, key_method, value_method, scale, path, with_lse=True)
            parts.append(
                (out.astype(mx.float32).reshape(B, n_kv_heads, group, L, D), lse.reshape(B, n_kv_heads, group, L, 1))
            )
        start += segment.length
    return _merge_with_exact(q, parts, exact).reshape(B, n_q_heads, L, D).astype(queries.dtype)


def _pure_attention(queries, segments, n_kv_heads, key_method, value_method, scale, mask) -> mx.array:
    B, n_q_heads, L, D = queries.shape
    group = n_q_heads // n_kv_heads
    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv_heads, group, L, D)
    q_rot = key_method.rotate_query(q)
    total = sum(s.length for s in segments)

    running_max = mx.full((B, n_kv_heads, group, L, 1), -mx.inf)
    denominator = mx.zeros((B, n_kv_heads, group, L, 1))
    exact_acc = mx.zeros((B, n_kv_heads, group, L, D))
    rotated_acc = None
    start = 0

    def blocks():
        nonlocal start
        for segment in segments:
            if isinstance(segment, ExactSegment):
                yield start, segment
            else:
                for b in range(0, segment.length, BLOCK_TOKENS):
                    yield start + b, segment.block(b, min(b + BLOCK_TOKENS, segment.length))
            start += segment.length

    for block_start, block in blocks():
        if block.length == 0:
            continue
        if isinstance(block, ExactSegment):
            scores = q @ block.keys[:, :, None].astype(mx.float32).swapaxes(-1, -2)
        elif block.key_rope is not None:
            # Keys coded before RoPE: each token's rotation differs, so they cannot be scored in the coded domain.
            scores = q @ decode_keys(block, key_method)[:, :, None].swapaxes(-1, -2)
        else:
            keys_rot = key_method.decode_rotated(block.key_codes)[:, :, None]
            scores = q_rot @ keys_rot.swapaxes(-1, -2)
            if block.key_mean is not None:
                # Keys were encoded as k − μ; q·μ is one number per query, added back so that exact segments
                # and code segments share one softmax.
                scores = scores + (q * block.key_mean[:, :, None].astype(mx.float32)).sum(-1, keepdims=True)
        scores = _apply_mask(scores, _allowed(mask, L, total, block_start, block.length))
        block_max = mx.maximum(running_max, scores.max(axis=-1, keepdims=True))
        # Rows whose every key so far is masked keep −inf; exp(−inf − (−inf)) would be NaN.
        safe_max = mx.where(mx.isinf(block_max), 0.0, block_max)
        correction = mx.exp(running_max - safe_max)
        weights = mx.exp(scores - safe_max)
        denominator = denominator * correction + weights.sum(axis=-1, keepdims=True)
        exact_acc = exact_acc * correction
        if rotated_acc is not None:
            rotated_acc = rotated_acc * correction
        if isinstance(block, ExactSegment):
            exact_acc = exact_acc + weights @ block.values[:, :, None].astype(mx.float32)
        else:
            values_rot = value_method.decode_rotated(block.value_codes)[:, :, None]
            contribution = weights @ values_rot
            rotated_acc = contribution if rotated_acc is None else rotated_acc + contribution
        running_max = block_max

    out = exact_acc
    if rotated_acc is not None:
        out = out + value_method.unrotate(rotated_acc)
    out = out / mx.maximum(denominator, 1e-30)
    return out.reshape(B, n_q_heads, L, D).astype(queries.dtype)
