"""BatchCompressedKVCache: several sequences' compressed caches behind mlx_lm's batch-cache protocol, so that
`BatchGenerator` / `batch_generate` (continuous batching) run over kvshard caches.

mlx_lm's BatchKVCache lines its rows up on one padded token axis (left padding, per-row offsets). Codes need no
such axis: each row stays the CompressedKVCache it was (its own length, key mean, sinks and window), so merge,
filter, extend and extract copy or move rows — codes and all, never re-encoded — and a row decodes bit for bit
as it would alone. What the batch adds is the bookkeeping of mlx_lm's padding: `prepare(right_padding=…)` before a
right-padded prompt chunk (BatchGenerator's prefill) and `prepare(left_padding=…)` before a left-padded one say
which of the next tokens of each row are padding; only the real ones reach the row.

Attention runs per row over that row's own tokens (`attention`, called by kvshard's hook on
scaled_dot_product_attention, which KVCacheBuilder.for_model installs): each row's real queries attend under its
own causal mask, through the same path the row would take alone (the CPU kernel is one call per row anyway);
padded query positions get zeros, which mlx_lm never reads. The model's batch mask is therefore not used.
"""

import copy
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .cache import CompressedKVCache
from .sliding import SlidingCompressedKVCache


@dataclass(frozen=True)
class RowMasks:
    """The mask a batch hands the model for a sliding-window layer: rows differ in length, so each row's mask is
    built where the row attends, from this window. The model passes it on to the attention untouched."""

    window_size: int


def _counts(value, batch: int, field: str) -> list[int]:
    counts = [int(n) for n in (value.tolist() if isinstance(value, mx.array) else value)]
    if len(counts) != batch or any(n < 0 for n in counts):
        raise ValueError(f"{field} must hold {batch} non-negative counts, one per row, got {counts}")
    return counts


class BatchCompressedKVCache(_BaseCache):
    def __init__(self, rows: list):
        for i, row in enumerate(rows):
            if not isinstance(row, CompressedKVCache):
                raise TypeError(f"rows[{i}] must be a CompressedKVCache, got {type(row).__name__}")
        configs = {i: row.config for i, row in enumerate(rows) if row.head_dim is not None}
        if configs:
            first, reference = next(iter(configs.items()))
            for i, config in configs.items():
                # kv_heads stays unknown (None) in a cache made without it until its first tokens.
                differing = sorted(k for k in reference if config[k] != reference[k]
                                   and not (k == "n_kv_heads" and None in (config[k], reference[k])))
                if differing or type(rows[i]) is not type(rows[first]):
                    raise ValueError(f"rows[{i}] differs from rows[{first}] in {differing or 'cache class'}: a batch's rows are one layer's caches")
        self.rows = list(rows)
        self.read_by_hook = False
        self._skip = [0] * len(rows)  # left padding still to come, per row
        self._keep = None  # with right padding: real tokens still to come, per row
        self._last = []  # per row, (first, stop, tokens held before, the row's own mask) of the last update

    @classmethod
    def merge(cls, caches: list) -> "BatchCompressedKVCache":
        """The batch of copies of these caches (mlx_lm's _merge_caches), one row each: as with BatchKVCache, the
        caches handed to BatchGenerator / batch_generate are not changed by the generation."""
        return cls([copy.deepcopy(c) for c in caches])

    # ---- what mlx_lm reads ------------------------------------------------------------------------------------

    @property
    def offset(self) -> mx.array:
        """Per row, the position of its next token: RoPE offsets for the model's batched forward pass."""
        return mx.array([row.offset for row in self.rows], dtype=mx.int32)

    @property
    def left_padding(self) -> mx.array:
        """Rows hold no padding: each keeps only its real tokens."""
        return mx.zeros((len(self.rows),), dtype=mx.int32)

    def size(self) -> int:
        return max((row.offset for row in self.rows), default=0)

    def empty(self) -> bool:
        return all(row.empty() for row in self.rows)

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows)

    def memory_bytes(self) -> int:
        return self.nbytes

    @property
    def state(self) -> list:
        """The rows' states (lists of arrays for mx.eval); a batch is saved by extracting its rows."""
        return [row.state for row in self.rows]

    # ---- padding: which of the next tokens are real --------------------------------------------------------------

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        """Before a padded chunk: left_padding[i] leading pad tokens of row i are skipped (over as many updates as
        they span); with right_padding, only the first lengths[i] tokens of row i are kept until `finalize`."""
        batch = len(self.rows)
        if left_padding is not None:
            self._skip = [s + n for s, n in zip(self._skip, _counts(left_padding, batch, "left_padding"))]
        if right_padding is not None and max(_counts(right_padding, batch, "right_padding")) > 0:
            if lengths is None:
                raise ValueError("lengths is required with right_padding: the real tokens per row")
            self._keep = _counts(lengths, batch, "lengths")

    def finalize(self) -> None:
        """After a padded prompt: the padding is behind us (rows never held it, so nothing moves)."""
        self._keep = None
        self._skip = [0] * len(self.rows)

    # ---- the forward pass ---------------------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store each row's real tokens of a (B, kv_heads, L, head_dim) chunk in that row. Returns the chunk: the
        attention reads the rows (`attention`), which needs kvshard's hook on the model."""
        if keys.ndim != 4 or keys.shape[0] != len(self.rows):
            raise ValueError(f"keys must have shape ({len(self.rows)}, kv_heads, tokens, head_dim), got {tuple(keys.shape)}")
        if self._last and not self.read_by_hook:
            raise RuntimeError(
                "BatchCompressedKVCache attends through kvshard's attention hook, which this model lacks: make its "
                "caches with KVCacheBuilder.for_model (or call kvshard.quant.builder.install_attention_hook(model))"
            )
        L = keys.shape[2]
        last = []
        for i, row in enumerate(self.rows):
            first = min(self._skip[i], L)
            self._skip[i] -= first
            stop = L if self._keep is None else first + min(L - first, self._keep[i])
            if self._keep is not None:
                self._keep[i] -= stop - first
            mask, held = None, row.offset
            if stop > first:
                # The row's own mask for its new queries, taken before the store (a sliding row drops tokens there).
                mask = row.make_mask(stop - first)
                row.read_by_hook = True  # the row's K/V are never fetched: attention reads its codes
                row.update_and_fetch(keys[i : i + 1, :, first:stop], values[i : i + 1, :, first:stop])
            last.append((first, stop, held, mask))
        self._last = last
        return keys, values

    def attention(self, queries: mx.array, scale: float, mask=None) -> mx.array:
        """Attention of (B, Hq, L, D) queries, each row's real queries over that row's own tokens under its own
        causal mask; of the model's `mask` only a sliding window (RowMasks) is read."""
        B, n_q_heads, L, D = queries.shape
        window = mask.window_size if isinstance(mask, RowMasks) else None
        outputs = []
        for row, (first, stop, held, row_mask) in zip(self.rows, self._last):
            if window is not None and not isinstance(row, SlidingCompressedKVCache):
                # A plain cache of a sliding layer (sliding="full") holds every token: the window is a mask.
                row_mask = create_attention_mask(stop - first, held, return_array=False, window_size=window)
            parts = []
            if first:
                parts.append(mx.zeros((1, n_q_heads, first, D), dtype=queries.dtype))
            if stop > first:
                parts.append(row.attention(queries[len(outputs) : len(outputs) + 1, :, first:stop], scale, row_mask))
            if stop < L:
                parts.append(mx.zeros((1, n_q_heads, L - stop, D), dtype=queries.dtype))
            outputs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
        return mx.concatenate(outputs, axis=0)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs):
        """What the model hands the attention of every layer like this one; the attention builds each row's own."""
        if window_size is not None:
            return RowMasks(window_size)
        return None if N == 1 else "causal"

    # ---- rows joining and leaving ------------------------------------------------------------------------------

    def filter(self, batch_indices) -> None:
        """Keep only these rows, in this order (sequences that finished leave the batch)."""
        indices = _counts(batch_indices, len(batch_indices), "batch_indices") if len(batch_indices) else []
        if any(i >= len(self.rows) for i in indices):
            raise ValueError(f"batch_indices must be below the batch size {len(self.rows)}, got {indices}")
        self.rows = [self.rows[i] for i in indices]
        self._skip = [self._skip[i] for i in indices]
        self._keep = None if self._keep is None else [self._keep[i] for i in indices]
        self._last = [self._last[i] for i in indices] if self._last else []

    def extend(self, other: "BatchCompressedKVCache") -> None:
        """Append other's rows (a prefilled batch joining the decoding one); other gives them up."""
        if not isinstance(other, BatchCompressedKVCache):
            raise TypeError(f"other must be a BatchCompressedKVCache, got {type(other).__name__}")
        if self._keep is not None or other._keep is not None:
            raise ValueError("a batch cannot be extended in the middle of a right-padded prompt (before finalize)")
        self.rows = BatchCompressedKVCache(self.rows + other.rows).rows  # checks they are one layer's caches
        self._skip = self._skip + other._skip
        self._last = []
        self.read_by_hook = self.read_by_hook or other.read_by_hook

    def extract(self, idx: int) -> CompressedKVCache:
        """Row idx as a cache of its own (a copy: the batch keeps its row until `filter` drops it)."""
        return copy.deepcopy(self.rows[idx])

    # ---- the rest of the protocol -----------------------------------------------------------------------------

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens of every row; returns the most any row dropped."""
        return max((row.trim(n) for row in self.rows), default=0)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "BatchCompressedKVCache":
        """Itself: its rows already hold codes (CompressedKVCache.to_quantized)."""
        return self
