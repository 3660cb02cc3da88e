#!/usr/bin/env bash
# Quick saturation bench of weft-l7 (stopgap until `cargo xtask bench` gets an L7 section):
# wrk, 50 connections, 1 KB responses from an nginx backend, POST /v1/request-landing (the
# Star Wars rule) through: nothing (direct), weft-l7, and nginx as a reverse proxy with an
# equivalent `location` rule. Prints req/s, p99 and proxy CPU per request. Loopback only.
# Usage: agent/l7/bench.sh [seconds per run] [rounds]   (needs nginx, wrk; cargo xtask setup)
set -euo pipefail
secs=${1:-5}; rounds=${2:-2}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/weft-l7"
[ -x "$bin" ] || cargo build --release -p weft-l7 --manifest-path "$root/Cargo.toml"
dir=$(mktemp -d /tmp/weft-l7-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
body=$(head -c 1023 /dev/zero | tr '\0' x)
cat > "$dir/backend.conf" <<CONF
daemon off; worker_processes 1; pid $dir/backend.pid; error_log $dir/backend.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18081; keepalive_requests 1000000;
  location / { return 200 "$body\n"; } } }
CONF
cat > "$dir/proxy.conf" <<'CONF'
daemon off; worker_processes 2; pid DIR/proxy.pid; error_log DIR/proxy.err;
events { worker_connections 1024; }
http { access_log off;
  upstream backend { server 127.0.0.1:18081; keepalive 64; }
  server { listen 127.0.0.1:18082; keepalive_requests 1000000;
    location = /v1/request-landing { limit_except POST { deny all; }
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location / { return 403 "Access denied\n"; } } }
CONF
sed -i "s|DIR|$dir|g" "$dir/proxy.conf"
echo 'wrk.method = "POST"' > "$dir/post.lua"
nginx -c "$dir/backend.conf" & pids+=($!)
nginx -c "$dir/proxy.conf" & pids+=($!)
"$bin" --control "$dir/l7.sock" --listen 127.0.0.1:18083 --destination 127.0.0.1:18081 2>"$dir/l7.err" & l7=$!; pids+=($l7)
sleep 1
python3 - "$dir/l7.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.readline()
rule = {"rule": {"method": "POST", "path": "/v1/request-landing"}, "derived_from": "WeftNetworkPolicy default/rule1 ingress[0]"}
cfg = {"revision": 1, "endpoints": [{"id": 1, "name": "default/deathstar", "identity": 300,
       "addresses": ["127.0.0.1"], "ingress": [{"port": 18081, "peer": 0, "http": {"rules": [rule]}}]}]}
f.write((json.dumps({"config": cfg}) + "\n").encode()); f.flush()
assert json.loads(f.readline())["type"] == "ready"
PY
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
nginx_cpu() { local t=0; for p in $(pgrep -P "$(cat "$dir/proxy.pid")") "$(cat "$dir/proxy.pid")"; do t=$((t + $(cpu "$p"))); done; echo $t; }
tick=$(getconf CLK_TCK)
run() { # name port pid-fn
  local before after out
  before=$($3); out=$(wrk -t1 -c50 -d"${secs}s" --latency -s "$dir/post.lua" "http://127.0.0.1:$2/v1/request-landing"); after=$($3)
  local rps p99 reqs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  grep -q "Non-2xx" <<<"$out" && { echo "$1: non-2xx answers!"; grep Non-2xx <<<"$out"; }
  printf '%-8s %10s req/s  p99 %8s  proxy CPU/req %6.1f us\n' "$1" "$rps" "$p99" \
    "$(awk -v c=$((after - before)) -v t="$tick" -v n="$reqs" 'BEGIN{ if (n>0) print c / t / n * 1e6; else print 0 }')"
}
none() { echo 0; }
l7cpu() { cpu "$l7"; }
for r in $(seq "$rounds"); do
  echo "round $r ($secs s each, wrk -t1 -c50)"
  run direct 18081 none; run weft-l7 18083 l7cpu; run nginx 18082 nginx_cpu
done
