#!/usr/bin/env bash
# Renders deploy/nginx/kvshard.conf.template to stdout: render-nginx.sh RUN_DIR LISTEN SHARD_LINES
#   RUN_DIR      where nginx keeps its pid, logs and temp files (created)
#   LISTEN       address:port (or port) nginx listens on for gRPC
#   SHARD_LINES  upstream lines, e.g. "server 127.0.0.1:50051 max_fails=1 fail_timeout=5s;" one per shard
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: render-nginx.sh RUN_DIR LISTEN SHARD_LINES" >&2; exit 2; }
template=$(cat "$(dirname "$0")/nginx/kvshard.conf.template")
mkdir -p "$1"
out=${template//@RUN_DIR@/$1}
out=${out//@LISTEN@/$2}
printf '%s\n' "${out//@SHARDS@/${3%$'\n'}}"
