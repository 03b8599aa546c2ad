"""Observers: measurements a CompressedKVCache reports as it works, for caches given `observers=[...]`
(KVCacheConfig(observers=...) or KVCacheBuilder.with_observers). A cache without observers makes no calls here.

The cache calls three hooks, each observer overriding those it needs:
  on_append(cache, keys, values)                        after tokens are stored (fp16 window, sinks or codes)
  on_encode(cache, keys, values, key_codes, value_codes, start)  after tokens are coded; keys as coded (mean removed)
  on_attend(cache, queries, output, start)              after an attention call
`start` is time.perf_counter() taken once the inputs were evaluated, so latency is the cache's own work.

Observers keep running totals (and a bounded window of recent latencies), not histories, so one can stay on in a
long-running service; `callback`, where given, also receives each measurement (the service feeds Prometheus with it).
Observers shared by the caches of a model keep one slot per cache, in the order the caches were first seen
(for a model's prefill: layer order); `per_cache=False` pools every cache into slot 0 (a service's sessions come
and go: per-cache slots would grow without end).
"""

import statistics
import time
from collections import deque

import mlx.core as mx

RECENT = 1024  # latencies kept for medians


def start_timer(observers, *inputs) -> float | None:
    """Evaluate the inputs (so an observer times only the cache's work) and start the clock; None when unobserved."""
    if not observers:
        return None
    mx.eval(*inputs)
    return time.perf_counter()


class Observer:
    def __init__(self, callback=None, per_cache: bool = True):
        self.callback = callback
        self.per_cache = per_cache
        self._slots: dict[int, int] = {}

    def slot(self, cache) -> int:
        """Index of this cache among those observed, in order of first sight (0 for all when not per_cache)."""
        return self._slots.setdefault(id(cache), len(self._slots)) if self.per_cache else 0

    def on_append(self, cache, keys, values) -> None:
        pass

    def on_encode(self, cache, keys, values, key_codes, value_codes, start) -> None:
        pass

    def on_attend(self, cache, queries, output, start) -> None:
        pass

    def _emit(self, **measurement) -> None:
        if self.callback is not None:
            self.callback(**measurement)


def _squared(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return (x * x).sum()


class DistortionObserver(Observer):
    """Squared error of what the cache codes: Σ‖k − k̂‖² / Σ‖k‖² for keys (as coded: mean-centred, un-RoPE'd where
    the plan says so) and the same for values, per cache and over all."""

    def __init__(self, callback=None, per_cache: bool = True):
        super().__init__(callback, per_cache)
        self.sums: list[dict] = []

    def on_encode(self, cache, keys, values, key_codes, value_codes, start) -> None:
        key_hat = cache.key_quantizer.decode(key_codes)
        value_hat = cache.value_quantizer.decode(value_codes)
        measured = [_squared(keys - key_hat), _squared(keys), _squared(values - value_hat), _squared(values)]
        mx.eval(measured)
        slot = self.slot(cache)
        while len(self.sums) <= slot:
            self.sums.append({"key_error": 0.0, "key_energy": 0.0, "value_error": 0.0, "value_energy": 0.0, "tokens": 0})
        sums = self.sums[slot]
        for name, value in zip(("key_error", "key_energy", "value_error", "value_energy"), measured):
            sums[name] += value.item()
        sums["tokens"] += keys.shape[2]
        self._emit(layer=slot, key_relative_mse=measured[0].item() / max(measured[1].item(), 1e-30),
                   value_relative_mse=measured[2].item() / max(measured[3].item(), 1e-30), tokens=keys.shape[2])

    def _relative(self, side: str, sums: list[dict]) -> float:
        energy = sum(s[f"{side}_energy"] for s in sums)
        return sum(s[f"{side}_error"] for s in sums) / energy if energy else float("nan")

    def key_relative_mse(self, layer: int | None = None) -> float:
        return self._relative("key", self.sums if layer is None else [self.sums[layer]])

    def value_relative_mse(self, layer: int | None = None) -> float:
        return self._relative("value", self.sums if layer is None else [self.sums[layer]])


class LatencyObserver(Observer):
    """Seconds of each encode and attention call (inputs evaluated first, output evaluated before the clock stops)."""

    def __init__(self, callback=None, per_cache: bool = True):
        super().__init__(callback, per_cache)
        self.count = {"encode": 0, "attend": 0}
        self.total_s = {"encode": 0.0, "attend": 0.0}
        self.recent = {"encode": deque(maxlen=RECENT), "attend": deque(maxlen=RECENT)}

    def _record(self, event: str, outputs, start: float) -> None:
        mx.eval(outputs)
        seconds = time.perf_counter() - start
        self.count[event] += 1
        self.total_s[event] += seconds
        self.recent[event].append(seconds)
        self._emit(event=event, seconds=seconds)

    def on_encode(self, cache, keys, values, key_codes, value_codes, start) -> None:
        self._record("encode", [key_codes, value_codes], start)

    def on_attend(self, cache, queries, output, start) -> None:
        self._record("attend", output, start)

    def median_s(self, event: str) -> float:
        return statistics.median(self.recent[event]) if self.recent[event] else float("nan")


class MemoryObserver(Observer):
    """Bytes each observed cache holds (its `nbytes`) after every append; `total_bytes` over the caches, and the peak."""

    def __init__(self, callback=None, per_cache: bool = True):
        super().__init__(callback, per_cache)
        self.bytes: list[int] = []
        self.peak_bytes = 0

    def on_append(self, cache, keys, values) -> None:
        slot = self.slot(cache)
        while len(self.bytes) <= slot:
            self.bytes.append(0)
        self.bytes[slot] = cache.nbytes
        self.peak_bytes = max(self.peak_bytes, self.total_bytes)
        self._emit(layer=slot, bytes=self.bytes[slot], total_bytes=self.total_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)


class KeyNormObserver(Observer):
    """L2 norms of appended keys per cache and KV head: count, mean, mean square (RateQuant's sensitivity), max."""

    def __init__(self, callback=None, per_cache: bool = True):
        super().__init__(callback, per_cache)
        self.stats: list[dict] = []

    def on_append(self, cache, keys, values) -> None:
        norms = mx.linalg.norm(keys.astype(mx.float32), axis=-1)  # (B, H, T)
        per_head = [norms.sum(axis=(0, 2)), (norms * norms).sum(axis=(0, 2)), norms.max(axis=(0, 2))]
        mx.eval(per_head)
        slot = self.slot(cache)
        while len(self.stats) <= slot:
            self.stats.append(None)
        count = norms.shape[0] * norms.shape[2]
        held = self.stats[slot]
        if held is None:
            held = self.stats[slot] = {"count": 0, "sum": mx.zeros_like(per_head[0]),
                                       "sum_sq": mx.zeros_like(per_head[0]), "max": mx.zeros_like(per_head[0])}
        held["count"] += count
        held["sum"] = held["sum"] + per_head[0]
        held["sum_sq"] = held["sum_sq"] + per_head[1]
        held["max"] = mx.maximum(held["max"], per_head[2])
        mx.eval(held["sum"], held["sum_sq"], held["max"])
        self._emit(layer=slot, mean_norm=per_head[0].sum().item() / (count * norms.shape[1]), tokens=norms.shape[2])

    def mean_norm(self, layer: int) -> mx.array:
        return self.stats[layer]["sum"] / self.stats[layer]["count"]

    def mean_square_norm(self, layer: int) -> mx.array:
        return self.stats[layer]["sum_sq"] / self.stats[layer]["count"]

    def max_norm(self, layer: int) -> mx.array:
        return self.stats[layer]["max"]
