"""Many sessions' caches of one layer seen as one mlx_lm cache, for one batched forward pass.

mlx_lm batches sequences by padding them into one K/V buffer per layer (`BatchKVCache`), with per-row offsets in
an array that its RoPE takes. Sessions here keep their own compressed caches, of different lengths and budgets,
so the view pads nothing: it speaks the same protocol to the model (an array `offset`, `make_mask`), hands each
row's new keys and values to that row's own cache, and gives each row attention over its own cache only. Where
every row's cache is one code segment of the same configuration and the GPU has a kernel for it, all rows attend
in one kernel call with per-row lengths; otherwise each row goes through its cache's own attention path.

`batch_views(per_session_caches)` makes one view per layer; the model is then called with (B, L) tokens and
`cache=views`. The caches are changed as by B separate calls; nothing of the view outlives the step.
"""

import mlx.core as mx

from . import kernels
from .attention import CodeSegment
from .kernels import dispatch, gpu


class BatchCacheView:
    def __init__(self, caches: list):
        if not caches:
            raise ValueError("caches: a batch needs at least one row")
        self.caches = caches
        # Read by the model's RoPE before update_and_fetch: each row continues at its own position.
        self.offset = mx.array([cache.offset for cache in caches])
        self._fetched = [None] * len(caches)  # rows whose cache has no attention of its own: their full K/V

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[0] != len(self.caches):
            raise ValueError(f"keys: batch of {keys.shape[0]} rows for a view of {len(self.caches)} caches")
        if self._encode_together(keys, values):
            self.offset = self.offset + keys.shape[2]
            return keys, values
        for row, cache in enumerate(self.caches):
            fetched = cache.update_and_fetch(keys[row : row + 1], values[row : row + 1])
            if not callable(getattr(cache, "attention", None)):
                self._fetched[row] = fetched
        self.offset = self.offset + keys.shape[2]
        return keys, values  # attention reads each row's own cache, never these

    def _encode_together(self, keys: mx.array, values: mx.array) -> bool:
        """Where every row's cache codes alike and would put the tokens straight into its codes (no fp16 sinks or
        window waiting, the key mean known, no observers), encode all rows in one call and hand each cache its
        row's codes: one encode per layer instead of one per session. The codes are those each cache would make."""
        first = self.caches[0]
        if len(self.caches) == 1 or not all(_same_codes(c, first) for c in self.caches):
            return False
        for cache in self.caches:
            cache._settle()  # a token an earlier step left for its fused append kernel goes in first
        if not all(_codes_directly(c) for c in self.caches):
            return False
        given = keys.dtype
        keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        if first.key_mean is not None:
            keys = keys - mx.concatenate([cache.key_mean for cache in self.caches], axis=0)
        new_k, new_v = kernels.encode_pair(first.key_quantizer, keys, first.value_quantizer, values)
        for row, cache in enumerate(self.caches):
            cache.offset += keys.shape[2]
            cache.input_dtype = given  # as its update_and_fetch records it
            cache.put_codes({n: a[row : row + 1] for n, a in new_k.items()}, {n: a[row : row + 1] for n, a in new_v.items()})
        return True

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """Rows differ in length, so a mask over all of them would pad; each row's attention masks itself.
        One token per row needs no mask; a chunk of N tokens per row is causal within the chunk."""
        if window_size is not None:
            raise ValueError("window_size: a batch view does not serve sliding-window layers")
        return None if N == 1 else "causal"

    def attention(self, queries: mx.array, scale: float, mask=None) -> mx.array:
        """Attention of (B, Hq, L, D) queries, row b over the tokens of cache b only."""
        if mask is not None and not isinstance(mask, str):
            raise ValueError("mask: a batch view takes None or 'causal'; each row's cache masks its own tokens")
        for cache, fetched in zip(self.caches, self._fetched, strict=True):
            if fetched is None:
                cache.read_by_hook = True  # as the hook marks a cache it attends from: no K/V built for nobody
        fused = self._fused_attention(queries, scale) if mask is None else None
        if fused is not None:
            return fused
        rows = [self._row_attention(row, queries[row : row + 1], scale, mask) for row in range(len(self.caches))]
        return mx.concatenate(rows, axis=0)

    def _row_attention(self, row: int, queries: mx.array, scale: float, mask) -> mx.array:
        cache = self.caches[row]
        if self._fetched[row] is None:
            return cache.attention(queries, scale=scale, mask=mask)
        keys, values = self._fetched[row]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def _fused_attention(self, queries: mx.array, scale: float) -> mx.array | None:
        """One GPU kernel call for all rows (the per-row-length kernels), or None where it does not apply:
        each cache must hold only codes (no fp16 sinks or window), coded the same way."""
        first = self.caches[0]
        if len(self.caches) == 1 or not all(_same_codes(cache, first) for cache in self.caches):
            return None
        key_method, value_method = first.key_quantizer, first.value_quantizer
        segments = []
        for cache in self.caches:
            parts = cache.segments(exact=False)
            if len(parts) != 1 or not parts[0].is_codes:
                return None
            segments.append(parts[0])
        if len({s.key_mean is None for s in segments}) != 1:
            return None
        kernel = dispatch.gpu_kernel(queries, segments[0], key_method, value_method, honour_env=True)
        if kernel is None:
            return None
        stacked = stack_segments(segments)
        lengths = mx.array([s.length for s in segments], dtype=mx.int32)
        return gpu.attention(queries, stacked, key_method, value_method, scale, kernel, lengths=lengths)[0]


def _same_codes(cache, first) -> bool:
    """Whether the cache codes exactly as `first` does (so `first`'s quantizers read its codes): the same
    configuration, seeds included, and the same calibrated plans and key scales."""
    if getattr(cache, "key_quantizer", None) is None or getattr(first, "key_quantizer", None) is None:
        return False
    if cache is first:
        return True
    return (cache.config == first.config and cache.key_plan is first.key_plan and cache.value_plan is first.value_plan
            and cache.key_scale is first.key_scale)


def _codes_directly(cache) -> bool:
    """Whether the cache's next tokens go straight into its codes (CompressedKVCache's decode-step path)."""
    return cache._codes_direct() and cache.n_encoded > 0 and cache._key_rope is None and not cache.observers


def stack_segments(segments: list) -> CodeSegment:
    """Code segments of one configuration as one segment of B rows, each row's buffer zero-padded to the longest
    (the kernels read `lengths[b]` tokens of row b and nothing past it)."""
    capacity = max(next(iter(s.key_codes.values())).shape[2] for s in segments)

    def stacked(side: str) -> dict:
        return {
            name: mx.concatenate([_padded(getattr(s, side)[name], capacity) for s in segments], axis=0)
            for name in getattr(segments[0], side)
        }

    mean = None if segments[0].key_mean is None else mx.concatenate([s.key_mean for s in segments], axis=0)
    return CodeSegment(stacked("key_codes"), stacked("value_codes"), mean, max(s.length for s in segments))


def _padded(a: mx.array, capacity: int) -> mx.array:
    short = capacity - a.shape[2]
    if short == 0:
        return a
    return mx.concatenate([a, mx.zeros((*a.shape[:2], short, *a.shape[3:]), dtype=a.dtype)], axis=2)


def batch_views(per_session_caches: list[list]) -> list[BatchCacheView]:
    """One view per layer over the sessions' layer caches: per_session_caches[b][layer]."""
    layers = {len(caches) for caches in per_session_caches}
    if len(layers) != 1:
        raise ValueError(f"caches: every session needs the same number of layers, got {sorted(layers)}")
    return [BatchCacheView([caches[layer] for caches in per_session_caches]) for layer in range(layers.pop())]
