"""Prometheus metrics of a shard, served on --metrics-port."""

import mlx.core as mx
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kvshard.quant.observers import DistortionObserver, KeyNormObserver, LatencyObserver

RPCS = Counter("kvshard_rpcs", "RPCs answered, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "kvshard_rpc_seconds",
    "RPC duration (streams: until the last message)",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
MALFORMED = Counter("kvshard_malformed_requests", "Requests whose body did not parse, by method", ["method"])
TOKENS_GENERATED = Counter("kvshard_generated_tokens", "Tokens generated")
TOKENS_APPENDED = Counter("kvshard_appended_tokens", "Tokens appended to raw sessions")
BATCH_SIZE = Histogram("kvshard_batch_size", "Streams decoded together in one batched forward pass",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128))
BATCH_FALLBACKS = Counter("kvshard_batch_fallbacks", "Batched decode steps that failed and were rerun one stream at a time")
QUEUE_WAIT = Histogram("kvshard_queue_wait_seconds", "Seconds a Generate step waited for its scheduler turn",
                       buckets=(1e-4, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
SCHEDULER_SECONDS = Histogram(
    "kvshard_scheduler_seconds",
    "Seconds of the scheduler's turns, by part: decode_step and prefill_chunk (on the MLX thread), hand_off (a turn "
    "handed to the MLX thread until it starts there), between_turns (a turn's end until the next is handed off while "
    "streams generate: their tokens sent, commits, the gather of the next step's streams); inside a batched "
    "decode_step: decode_build (the forward pass's graph built on the host), decode_build_cpu (the MLX thread's CPU "
    "time in it) and decode_eval (its evaluation)",
    ["part"], buckets=(1e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
WORKER_JOB_SECONDS = Histogram(
    "kvshard_worker_job_seconds",
    "Seconds of each job on the shard's one-thread workers (kvshard-mlx: compute, kvshard-store: store I/O), by the "
    "function run: what keeps the MLX thread from the next decode step",
    ["worker", "job"], buckets=(1e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
WORKER_JOB_CPU_SECONDS = Counter(
    "kvshard_worker_job_cpu_seconds",
    "CPU seconds of the worker's thread in each job (against kvshard_worker_job_seconds: the rest it waited, for the "
    "device, the GIL or the kernel)", ["worker", "job"])
TOKENS_PER_SECOND = Gauge("kvshard_generate_tokens_per_second", "Tokens all Generate streams produced per second (last 10 s)")
STREAM_TOKENS_PER_SECOND = Histogram("kvshard_stream_tokens_per_second", "Tokens per second of one Generate call, over its run",
                                     buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
HOT_SESSIONS = Gauge("kvshard_hot_sessions", "Sessions held in memory")
HOT_BYTES = Gauge("kvshard_hot_session_bytes", "Bytes the caches of hot sessions hold")
STORED_BYTES = Gauge("kvshard_stored_bytes", "Bytes in the session store")
STORED_SESSIONS = Gauge("kvshard_stored_sessions", "Sessions in the session store")
# What the process holds beyond its idle size: MLX arrays alive (hot sessions, the model, calls in flight) and
# freed MLX buffers kept for reuse (MLX's cache); --memory-budget bounds only the hot sessions' share.
MLX_ACTIVE_BYTES = Gauge("kvshard_mlx_active_bytes", "Bytes of MLX arrays alive")
MLX_CACHE_BYTES = Gauge("kvshard_mlx_cache_bytes", "Bytes of freed MLX buffers kept for reuse")
RESIDENT_GROWTH_BYTES = Gauge("kvshard_resident_growth_bytes", "RSS grown since the shard started serving (what --memory-budget bounds)")
WORKING_BYTES = Gauge("kvshard_call_working_bytes", "Working memory the calls in flight hold against the memory budget")
_SECONDS = (1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
CACHE_SECONDS = Histogram("kvshard_cache_seconds", "Seconds of a cache's encode or attention call (--observe-caches)",
                          ["event"], buckets=_SECONDS)
CACHE_RELATIVE_MSE = Histogram("kvshard_cache_relative_mse", "Σ‖x − x̂‖² / Σ‖x‖² of one encode call (--observe-caches)",
                               ["side"], buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1))
CACHE_KEY_NORM = Histogram("kvshard_cache_key_norm", "Mean L2 norm of the keys of one append (--observe-caches)",
                           buckets=(0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000))
# The cache observers of `kvshard serve --observe-caches`, given to every session's caches; empty (free) otherwise.
CACHE_OBSERVERS: list = []


def _observed_error(key_relative_mse, value_relative_mse, **_) -> None:
    CACHE_RELATIVE_MSE.labels("keys").observe(key_relative_mse)
    CACHE_RELATIVE_MSE.labels("values").observe(value_relative_mse)


def observe_caches() -> None:
    """Feed the quant observers' measurements of every session's caches into the metrics above."""
    CACHE_OBSERVERS[:] = [
        LatencyObserver(lambda event, seconds: CACHE_SECONDS.labels(event).observe(seconds), per_cache=False),
        DistortionObserver(_observed_error, per_cache=False),
        KeyNormObserver(lambda mean_norm, **_: CACHE_KEY_NORM.observe(mean_norm), per_cache=False),
    ]


def serve_metrics(port: int, host: str, manager, scheduler) -> None:
    """Start the /metrics HTTP endpoint; session gauges are read from the manager, rates from the scheduler, at
    scrape time."""
    TOKENS_PER_SECOND.set_function(scheduler.tokens_per_second)
    HOT_SESSIONS.set_function(lambda: len(manager.hot))
    HOT_BYTES.set_function(manager.hot_bytes)
    STORED_BYTES.set_function(manager.store.total_bytes)
    STORED_SESSIONS.set_function(manager.store.count)
    MLX_ACTIVE_BYTES.set_function(mx.get_active_memory)
    MLX_CACHE_BYTES.set_function(mx.get_cache_memory)
    WORKING_BYTES.set_function(lambda: manager.working)
    RESIDENT_GROWTH_BYTES.set_function(manager.resident_growth)
    start_http_server(port, addr=host)
