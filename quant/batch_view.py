"""Many sessions' caches of one layer seen as one mlx_lm cache, row by row: the batched step for rows that cannot
share a batch arena (quant/batch_arena.py: caches with fp16 sinks or windows, of different configurations, fp16
mlx_lm caches).

mlx_lm batches sequences by padding them into one K/V buffer per layer (`BatchKVCache`), with per-row offsets in
an array that its RoPE takes. Sessions here keep their own caches, of different lengths and budgets, so the view
pads nothing: it speaks the same protocol to the model (an array `offset`, `make_mask`), hands each row's new
keys and values to that row's own cache, and gives each row attention over its own cache only, through the
path the row would take alone.

`batch_views(per_session_caches)` makes one view per layer; the model is then called with (B, L) tokens and
`cache=views`. The caches are changed as by B separate calls; nothing of the view outlives the step.
"""

import mlx.core as mx


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
        for row, cache in enumerate(self.caches):
            fetched = cache.update_and_fetch(keys[row : row + 1], values[row : row + 1])
            if not callable(getattr(cache, "attention", None)):
                self._fetched[row] = fetched
        self.offset = self.offset + keys.shape[2]
        return keys, values  # attention reads each row's own cache, never these

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
        rows = []
        for row, cache in enumerate(self.caches):
            if self._fetched[row] is None:
                cache.read_by_hook = True  # as the hook marks a cache it attends from: no K/V built for nobody
                rows.append(cache.attention(queries[row : row + 1], scale=scale, mask=mask))
            else:
                keys, values = self._fetched[row]
                rows.append(mx.fast.scaled_dot_product_attention(queries[row : row + 1], keys, values, scale=scale,
                                                                 mask=mask))
        return mx.concatenate(rows, axis=0)


def batch_views(per_session_caches: list[list]) -> list[BatchCacheView]:
    """One view per layer over the sessions' layer caches: per_session_caches[b][layer]."""
    layers = {len(caches) for caches in per_session_caches}
    if len(layers) != 1:
        raise ValueError(f"caches: every session needs the same number of layers, got {sorted(layers)}")
    return [BatchCacheView([caches[layer] for caches in per_session_caches]) for layer in range(layers.pop())]
