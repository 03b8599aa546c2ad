#!/usr/bin/env bash
# The whole distributed setup on one machine: Redis (appendonly, fsync always), N kvshard shards sharing it,
# and nginx in front, all on loopback with free ports. Prints the front address; Ctrl-C (or SIGTERM, or
# `deploy/local-cluster.sh stop RUN_DIR`) stops everything it started.
#
#   deploy/local-cluster.sh 3                       # or: make cluster N=3
#   deploy/local-cluster.sh 3 --redis-cluster       # the store on a Redis Cluster: 3 masters, 1 replica each
#   deploy/local-cluster.sh 3 -- --model none       # arguments after -- go to every `kvshard serve`
#   deploy/local-cluster.sh stop /tmp/kvshard-cluster.XXXX
#
# Environment: KVSHARD_RUN_DIR (default: a new /tmp/kvshard-cluster.*), KVSHARD_PYTHON (default: the
# repository's .venv), LEASE_TTL (seconds, default 5).
# RUN_DIR/cluster.env lists what runs (FRONT, REDIS_URL, SHARD_PORTS, SHARD_PIDS, ...) for scripts and tests.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" = stop ]; then
    run_dir=${2:?usage: local-cluster.sh stop RUN_DIR}
    kill -TERM "$(cat "$run_dir/supervisor.pid")"
    exit 0
fi

shards=${1:-3}
shift || true
redis_cluster=0
if [ "${1:-}" = --redis-cluster ]; then
    redis_cluster=1
    shift
fi
[ "${1:-}" = -- ] && shift
case $shards in '' | *[!0-9]* | 0) echo "local-cluster.sh: N must be a number of shards >= 1, got '$shards'" >&2; exit 2 ;; esac

python=${KVSHARD_PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || { echo "local-cluster.sh: no Python at $python (run make setup, or set KVSHARD_PYTHON)" >&2; exit 2; }
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx" ] || { echo "local-cluster.sh: nginx is not installed (apt-get install nginx)" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "local-cluster.sh: redis-server is not installed" >&2; exit 2; }
openblas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
# MLX's CPU wheel links the reference BLAS; Debian's OpenBLAS is ~60x faster for its matmuls.
[ -e "$openblas" ] && export LD_PRELOAD=$openblas
# Row-invariant kernels: a batched decode step codes K/V as the same step alone (service/cli.py says why).
grep -qsw avx2 /proc/cpuinfo && export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Haswell}

run_dir=${KVSHARD_RUN_DIR:-$(mktemp -d /tmp/kvshard-cluster.XXXXXX)}
mkdir -p "$run_dir"
echo $$ >"$run_dir/supervisor.pid"
shard_pids=()
nginx_pid=""
redis_pids=()

stop_group() {
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

stop_all() {
    trap - INT TERM EXIT
    # Shards first (they drain and hand their leases back), then nginx, then Redis.
    stop_group "${shard_pids[@]}"
    stop_group $nginx_pid
    stop_group "${redis_pids[@]}"
    echo "stopped; logs in $run_dir"
    exit 0
}
trap stop_all INT TERM EXIT

free_port() {  # [bus]: also keep port + 10000 free, for a Redis Cluster node's bus
    "$python" - "${1:-}" <<'PY'
import socket, sys

while True:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not sys.argv[1]:
        break
    if port + 10000 < 65536:
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
                break
            except OSError:
                pass
print(port)
PY
}

start_redis() {  # port directory [extra args]
    local port=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always --save "" "$@" \
        >"$dir/redis.log" 2>&1 &
    redis_pids+=("$!")
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
        kill -0 "${redis_pids[-1]}" 2>/dev/null || { echo "redis-server on port $port exited; see $dir/redis.log" >&2; exit 1; }
        sleep 0.1
    done
}

if [ "$redis_cluster" = 1 ]; then
    nodes=()
    for i in 0 1 2 3 4 5; do
        port=$(free_port bus)
        start_redis "$port" "$run_dir/redis-$i" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1000
        nodes+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$run_dir/redis-cluster-create.log"
    until redis-cli -p "${nodes[0]#*:}" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
    redis_ports=$(IFS=,; echo "${nodes[*]}")
    # Each commit waits until one replica has it (see service/store/redis.py: narrows, does not close, the
    # window in which a failover loses an acknowledged commit).
    store="redis+cluster://$redis_ports?wait_replicas=1"
else
    port=$(free_port)
    start_redis "$port" "$run_dir/redis"
    redis_ports=127.0.0.1:$port
    store="redis://127.0.0.1:$port/0"
fi

shard_ports=()
for i in $(seq 0 $((shards - 1))); do
    port=$(free_port)
    "$python" -m kvshard.service.cli serve --host 127.0.0.1 --port "$port" --store "$store" \
        --lease-ttl "${LEASE_TTL:-5}" "$@" >"$run_dir/shard-$i.log" 2>&1 &
    shard_pids+=("$!")
    shard_ports+=("$port")
done
front_port=$(free_port)
servers=""
for port in "${shard_ports[@]}"; do
    servers+="        server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"$'\n'
done
"$here/render-nginx.sh" "$run_dir/nginx" "127.0.0.1:$front_port" "$servers" >"$run_dir/nginx.conf"
"$nginx" -t -q -c "$run_dir/nginx.conf" -p "$run_dir/nginx"
"$nginx" -c "$run_dir/nginx.conf" -p "$run_dir/nginx" -g "daemon off;" &
nginx_pid=$!

for i in "${!shard_ports[@]}"; do
    "$python" - "${shard_ports[$i]}" "$run_dir/shard-$i.log" <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port, log = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
    time.sleep(0.3)
sys.exit(f"shard on port {port} is not serving after 300 s; see {log}")
PY
done

cat >"$run_dir/cluster.env" <<ENV
FRONT=127.0.0.1:$front_port
REDIS_URL=$store
REDIS_PORTS=$redis_ports
REDIS_PIDS=$(IFS=,; echo "${redis_pids[*]}")
SHARD_PORTS=$(IFS=,; echo "${shard_ports[*]}")
SHARD_PIDS=$(IFS=,; echo "${shard_pids[*]}")
NGINX_PID=$nginx_pid
ENV
echo "kvshard cluster: $shards shards on $store behind nginx"
echo "front: 127.0.0.1:$front_port   (grpcurl -plaintext 127.0.0.1:$front_port list)"
echo "logs and cluster.env in $run_dir; Ctrl-C stops everything"
# Keep serving until a signal; `wait -n` returns when any child ends (a shard killed by a test is fine).
while true; do
    wait -n || true
    kill -0 "$nginx_pid" 2>/dev/null || { echo "nginx exited; stopping" >&2; stop_all; }
done
