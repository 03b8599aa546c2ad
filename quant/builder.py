"""KVCacheBuilder: the public way to make compressed caches from a KVCacheConfig (quant/config.py; the seed's
API, kept), and the hook that routes mlx_lm's attention to the codes."""

import sys
import threading
from dataclasses import replace

import mlx_lm.models.cache as mlx_cache
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .cache import CompressedKVCache
from .config import KVCacheConfig
from .sliding import Float16RotatingKVCache

# load_prompt_cache looks cache classes up by name in mlx_lm's module; make ours findable there.
mlx_cache.CompressedKVCache = CompressedKVCache


def _attention(layer):
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def _attention_shape(layer) -> tuple[int | None, int | None]:
    attn = _attention(layer)
    return getattr(attn, "head_dim", None), getattr(attn, "n_kv_heads", None)


_running = threading.local()  # per thread, the (model, make_cache) calls model_caches has under way


def model_caches(model) -> list:
    """The caches mlx_lm would make for the model: the first make_cache of its class hierarchy that is not already
    running for it (never the instance's). So a make_cache that calls for_model, replaced on the instance or
    overridden in a subclass, does not recurse: inside it, for_model starts from the make_cache it overrides."""
    running = _running.__dict__.setdefault("calls", set())
    for klass in type(model).__mro__:
        make = klass.__dict__.get("make_cache")
        if make is None or (id(model), make) in running:
            continue
        running.add((id(model), make))
        try:
            return make(model)
        finally:
            running.discard((id(model), make))
    return [KVCache() for _ in _layers(model)]


def _layers(model) -> list:
    return getattr(model, "layers", None) or model.model.layers


def _check_compressible(model, layer, index: int) -> None:
    """A compressed cache attends from its codes through the hook on scaled_dot_product_attention: refuse layers
    whose attention computes its scores itself, or adds learned sinks."""
    attn = _attention(layer)
    family = getattr(getattr(model, "args", None), "model_type", type(model).__module__)
    if attn is None:
        raise ValueError(f"{family}: layer {index} has no self_attn/attention module for a compressed cache")
    module = sys.modules.get(type(attn).__module__)
    if getattr(module, "scaled_dot_product_attention", None) is None:
        why = " (it soft-caps its attention logits)" if hasattr(attn, "attn_logit_softcapping") else ""
        raise ValueError(
            f"{family}: layer {index}'s attention ({type(attn).__module__}) computes its scores itself instead of "
            f"calling scaled_dot_product_attention{why}, so a compressed cache cannot attend from its codes"
        )
    if getattr(attn, "sinks", None) is not None:
        raise ValueError(f"{family}: layer {index}'s attention has learned sinks, which compressed caches do not support")


def install_attention_hook(model) -> None:
    """Make the model's attention modules call the cache's own `attention` (CompressedKVCache's reads codes) instead of
    mlx_lm's SDPA on materialised K/V. mlx_lm's model files import `scaled_dot_product_attention` by name,
    so the name is wrapped in each module that the model's layers come from."""
    modules = {type(m).__module__ for _, m in model.named_modules()}
    for module_name in modules:
        module = sys.modules.get(module_name)
        original = getattr(module, "scaled_dot_product_attention", None)
        if original is None or getattr(original, "kvshard_hook", False):
            continue

        def sdpa(queries, keys, values, cache, scale, mask, sinks=None, _original=original):
            if callable(getattr(cache, "attention", None)):  # CompressedKVCache, or any cache that attends itself
                if sinks is not None:
                    raise ValueError("compressed caches do not support learned attention sinks")
                cache.read_by_hook = True  # its update_and_fetch can stop building K/V that nobody reads
                return cache.attention(queries, scale=scale, mask=mask)
            return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        sdpa.kvshard_hook = True
        module.scaled_dot_product_attention = sdpa


class KVCacheBuilder:
    """Fluent construction of a standalone cache, or `for_model` for one cache per layer of a model."""

    def __init__(self, config: KVCacheConfig | None = None):
        self.config = config or KVCacheConfig()
        self.n_kv_heads = None

    def with_method(self, method: str) -> "KVCacheBuilder":
        self.config = replace(self.config, method=method)
        return self

    def with_head_dim(self, head_dim: int) -> "KVCacheBuilder":
        self.config = replace(self.config, head_dim=head_dim)
        return self

    def with_kv_heads(self, n_kv_heads: int) -> "KVCacheBuilder":
        self.n_kv_heads = n_kv_heads
        return self

    def with_bit_width(self, inlier: int, value: int | None = None) -> "KVCacheBuilder":
        self.config = replace(self.config, key_bits=inlier, value_bits=value)
        return self

    def with_seed(self, seed: int) -> "KVCacheBuilder":
        self.config = replace(self.config, seed=seed)
        return self

    def with_sinks(self, tokens: int) -> "KVCacheBuilder":
        self.config = replace(self.config, sink_tokens=tokens)
        return self

    def with_window(self, tokens: int) -> "KVCacheBuilder":
        self.config = replace(self.config, window=tokens)
        return self

    def with_observers(self, *observers) -> "KVCacheBuilder":
        self.config = replace(self.config, observers=list(observers))
        return self

    def with_outlier_channels(self, n: int) -> "KVCacheBuilder":
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"outlier_channels: with_outlier_channels needs an integer >= 1, got {n!r}")
        self.config = replace(self.config, outlier_channels=n)
        return self

    def with_artifact_store(self, folder) -> "KVCacheBuilder":
        """Load rotations and codebooks from a `kvshard precompute` folder (or an ArtifactStore) instead of computing them."""
        self.config = replace(self.config, artifact_store=getattr(folder, "folder", folder))
        return self

    def build(self) -> CompressedKVCache:
        return self.config.make_cache(n_kv_heads=self.n_kv_heads)

    @staticmethod
    def for_model(model, config: KVCacheConfig) -> list:
        """One cache per layer: a CompressedKVCache wherever the model would use a plain KVCache (full
        attention). Sliding-window layers (mlx_lm's RotatingKVCache) get a float16 rotating window; with
        config.sliding == "compressed" a SlidingCompressedKVCache, with "full" a CompressedKVCache. Other layers
        (recurrent) keep the model's own cache. Per-layer bits and plans are indexed over the compressed layers
        in order. Callable from a replaced `model.make_cache`."""
        caches = model_caches(model)
        layers = _layers(model)
        compress_sliding = config.sliding in ("compressed", "full")
        compressed = [
            i for i, c in enumerate(caches)
            if type(c) is KVCache or (compress_sliding and type(c) is RotatingKVCache)
        ]
        for i in compressed:
            _check_compressible(model, layers[i], i)
        for name in ("key_scales", "key_plans", "value_plans"):
            given = getattr(config, name)
            if given is not None and len(given) != len(compressed):
                raise ValueError(
                    f"{name} has {len(given)} entries but the model has {len(compressed)} compressed layers "
                    f"(sliding={config.sliding!r}; calibration covers full-attention layers, as sliding='fp16' compresses)"
                )
        for rank, i in enumerate(compressed):
            head_dim, n_kv_heads = _attention_shape(layers[i])
            max_size = None
            if type(caches[i]) is RotatingKVCache and config.sliding == "compressed":
                if caches[i].keep:
                    raise ValueError(f"layer {i}: a sliding window that keeps its first {caches[i].keep} tokens cannot be compressed")
                max_size = caches[i].max_size
            caches[i] = config.make_cache(rank, len(compressed), head_dim, n_kv_heads, max_size)
        for i, c in enumerate(caches):
            if type(c) is RotatingKVCache:
                caches[i] = Float16RotatingKVCache(max_size=c.max_size, keep=c.keep)
        install_attention_hook(model)
        return caches
