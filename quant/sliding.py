"""Caches for sliding-window attention layers (Gemma 2/3, Mistral-style hybrids, Cohere 2, OLMo 3): a layer that
only ever looks `window` tokens back holds at most that many.

Two kinds, chosen by KVCacheConfig.sliding (KVCacheBuilder.for_model):
- Float16RotatingKVCache: mlx_lm's RotatingKVCache holding float16 K/V whatever the model computes in. Exact
  attention; a fixed window x layers x fp16 bytes.
- SlidingCompressedKVCache: a CompressedKVCache that drops the tokens no later query can see. Attention reads the
  codes like any CompressedKVCache, so the window costs what the codes cost. Its fp16 sinks (the first tokens,
  Gemma's <bos> among them) stay exact while they are in the window and leave it like any other token.

Both expose mlx_lm's `make_mask(N, window_size=...)` for what they hold: the model builds one sliding mask from
the first sliding layer's cache and gives it to all of them, so every sliding layer must hold the same tokens.

Effective bits on a hybrid model (`effective_bits_vs_fp16`): 8 · bytes held / K+V elements that the model's fp16
cache holds at that length, i.e. `tokens` per full-attention layer and min(tokens, window) per sliding layer. A
cache that drops what leaves its window is counted at the window it keeps between steps (after a chunk of a
prefill it briefly holds window − 1 + chunk tokens); a cache that keeps every token (sliding="full") is counted
whole, so at long contexts its sliding layers cost more than fp16 ones.
"""

import json

import mlx.core as mx
import mlx_lm.models.cache as mlx_cache
from mlx_lm.models.cache import RotatingKVCache

from .cache import CompressedKVCache


class Float16RotatingKVCache(RotatingKVCache):
    """RotatingKVCache storing float16 K/V (as llama.cpp's default f16 cache); attention runs in the model's dtype."""

    def update_and_fetch(self, keys, values):
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(keys.dtype), v.astype(values.dtype)


class SlidingCompressedKVCache(CompressedKVCache):
    """CompressedKVCache of a sliding-window layer of `max_size` tokens (a query sees itself and max_size − 1
    before it). Before new tokens are stored, tokens older than the last max_size − 1 are dropped: those are the
    ones the new queries may see, as in mlx_lm's RotatingKVCache. The oldest go first: sinks, then codes, then the
    front of the fp16 window. A sink dropped is not refilled (sink_tokens shrinks to the sinks still held), so the
    cache attends to exactly the tokens of the model's own rotating window."""

    def __init__(self, *args, max_size: int | None = None, **kwargs):
        # The state setter re-runs __init__ without max_size: it keeps the one set from the state.
        max_size = getattr(self, "max_size", None) if max_size is None else max_size
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer (the sliding window), got {max_size!r}")
        if kwargs.get("sink_tokens", 0) >= max_size:
            raise ValueError(f"sink_tokens: must be fewer than the {max_size}-token window, got {kwargs['sink_tokens']}")
        self.max_size = max_size
        super().__init__(*args, **kwargs)

    def _clear(self) -> None:
        super()._clear()
        self.n_dropped = 0

    def _codes_start(self) -> int:
        # Position of the first held coded token (after the sinks still held): keys coded before RoPE are rotated
        # back from there.
        return self.n_dropped + (0 if self.sink_keys is None else self.sink_keys.shape[2])

    @property
    def held(self) -> int:
        return self.offset - self.n_dropped

    def _store(self, keys, values) -> None:
        self._drop(self.held - (self.max_size - 1))
        super()._store(keys, values)

    def _drop(self, n: int) -> None:
        """Forget the n oldest tokens: sinks first, then codes, then the front of the fp16 window."""
        if n <= 0:
            return
        from_sinks = min(n, 0 if self.sink_keys is None else self.sink_keys.shape[2])
        if from_sinks:
            self.sink_tokens = self.sink_keys.shape[2] - from_sinks
            if self.sink_tokens:
                self.sink_keys, self.sink_values = self.sink_keys[:, :, from_sinks:], self.sink_values[:, :, from_sinks:]
            else:
                self.sink_keys = self.sink_values = None
        self.n_dropped += from_sinks
        n -= from_sinks
        if n <= 0:
            return
        from_codes = min(n, self.n_encoded)
        if from_codes:
            for codes in (self.key_codes, self.value_codes):
                for name, a in codes.items():
                    codes[name] = a[:, :, from_codes : self.n_encoded]
            self.n_encoded -= from_codes
        if n > from_codes:
            self.window_keys = self.window_keys[:, :, n - from_codes :]
            self.window_values = self.window_values[:, :, n - from_codes :]
        self.n_dropped += n

    def trim(self, n: int) -> int:
        # Dropped tokens cannot come back: only held ones can be trimmed.
        return super().trim(min(n, self.held))

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """Mask of N new queries over the tokens the next store keeps, then themselves; None when all are seen."""
        window = window_size or self.max_size
        kept = min(self.held, self.max_size - 1)
        if N == 1:
            return None
        queries = mx.arange(kept, kept + N)[:, None]
        keys = mx.arange(kept + N)[None]
        return (queries >= keys) & (queries < keys + window)

    @property
    def config(self) -> dict:
        return dict(super().config, max_size=self.max_size)

    @property
    def state(self) -> dict:
        state = super().state
        state["meta"] = json.dumps(dict(json.loads(state["meta"]), n_dropped=self.n_dropped), sort_keys=True)
        return state

    @state.setter
    def state(self, state: dict) -> None:
        meta = json.loads(state["meta"])
        self.max_size = meta["max_size"]
        CompressedKVCache.state.fset(self, state)
        self.n_dropped = meta["n_dropped"]

    @property
    def meta_state(self) -> str:
        return self.state["meta"]

    def hold(self) -> dict:
        """What `rewind` needs to bring the cache back to this moment exactly. A trim cannot: the tokens a later
        store dropped do not come back. MLX arrays are immutable, so this copies references, not arrays."""
        return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(self).items()}

    def rewind(self, held: dict) -> None:
        vars(self).clear()
        vars(self).update(held)


def restore_cache(state: dict) -> CompressedKVCache:
    """The cache a state was saved from: a SlidingCompressedKVCache when its meta names a window, else a
    CompressedKVCache."""
    sliding = "max_size" in json.loads(state["meta"])
    return (SlidingCompressedKVCache if sliding else CompressedKVCache).from_state(state)


def exact_trim_limit(caches, tokens: int) -> int | None:
    """The most tokens a conversation of `tokens` tokens can lose so that its sliding-window caches still hold every
    token the next step's queries see (the first of them may be the last kept token, fed again); None when no cache
    has dropped any."""
    limits = [tokens - c.max_size - c.n_dropped for c in caches if isinstance(c, SlidingCompressedKVCache) and c.n_dropped]
    return max(min(limits), 0) if limits else None


def sliding_windows(model) -> list:
    """Per layer, the sliding window of the model's own cache (mlx_lm's make_cache), or None for full attention."""
    from .builder import model_caches

    return [c.max_size if isinstance(c, RotatingKVCache) else None for c in model_caches(model)]


def effective_bits_vs_fp16(model, caches, tokens: int, batch: int = 1) -> float:
    """8 · bytes the caches keep / K+V elements of the model's fp16 cache at `tokens` tokens (module docstring),
    for caches holding `batch` sequences of that length."""
    from .eval import held_bytes, held_tokens

    args = model.args
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    windows = sliding_windows(model)
    fp16_tokens = sum(tokens if w is None else min(tokens, w) for w in windows)
    kept = 0.0
    for cache in caches:
        held, nbytes = held_tokens(cache), held_bytes(cache)
        window = cache.max_size if isinstance(cache, (RotatingKVCache, SlidingCompressedKVCache)) else None
        kept += nbytes if window is None or held <= window else nbytes * window / held
    return 8 * kept / (2 * args.num_key_value_heads * head_dim * fp16_tokens * batch)


# load_prompt_cache looks cache classes up by name in mlx_lm's module.
mlx_cache.SlidingCompressedKVCache = SlidingCompressedKVCache
mlx_cache.Float16RotatingKVCache = Float16RotatingKVCache
