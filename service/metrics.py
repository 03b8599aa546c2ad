"""Prometheus metrics of a shard, served on --metrics-port."""

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
HOT_SESSIONS = Gauge("kvshard_hot_sessions", "Sessions held in memory")
HOT_BYTES = Gauge("kvshard_hot_session_bytes", "Bytes the caches of hot sessions hold")
STORED_BYTES = Gauge("kvshard_stored_bytes", "Bytes in the session store")
STORED_SESSIONS = Gauge("kvshard_stored_sessions", "Sessions in the session store")


def serve_metrics(port: int, host: str, manager) -> None:
    """Start the /metrics HTTP endpoint; session gauges are read from the manager at scrape time."""
    HOT_SESSIONS.set_function(lambda: len(manager.hot))
    HOT_BYTES.set_function(manager.hot_bytes)
    STORED_BYTES.set_function(manager.store.total_bytes)
    STORED_SESSIONS.set_function(manager.store.count)
    start_http_server(port, addr=host)
