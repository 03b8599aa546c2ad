"""Attention straight from packed codes: the portable pure-MLX path.

⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩, so the query is rotated once, scored against codes decoded in the rotated domain one
block at a time, the softmax runs online across blocks (flash-decoding), values are accumulated in their own
rotated domain and un-rotated once at the end. No fp16 K or V of the history is ever materialised; peak
memory is one block. fp16 segments (attention sinks, the recent window) are attended exactly beside the codes.
GQA: query heads are grouped under their KV head; K/V are never repeated.
"""

from dataclasses import dataclass

import mlx.core as mx

BLOCK_TOKENS = 4096


@dataclass
class ExactSegment:
    """Tokens held in fp16: (B, H, t, D) keys and values."""

    keys: mx.array
    values: mx.array

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass
class CodeSegment:
    """Tokens held as codes: dicts of (B, H, t, ·) arrays, plus the key mean that was subtracted before encoding."""

    key_codes: dict
    value_codes: dict
    key_mean: mx.array | None
    length: int

    def block(self, start: int, stop: int) -> "CodeSegment":
        take = lambda codes: {name: a[:, :, start:stop] for name, a in codes.items()}  # noqa: E731
        return CodeSegment(take(self.key_codes), take(self.value_codes), self.key_mean, stop - start)


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
    queries, segments, *, n_kv_heads: int, key_method, value_method, scale: float, mask=None
) -> mx.array:
    """softmax(q·Kᵀ·scale + mask)·V over segments in token order. queries: (B, Hq, L, D) -> (B, Hq, L, D)."""
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
