# Shared helpers for the benchmark scripts (sourced, not run).
# Provides: RUN (scratch dir, removed on exit), start_bg, wait_port, render, start_nginx,
# start_upstream, start_gateway, measure, row.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
RUN=$(mktemp -d /tmp/llm-gw-bench.XXXXXX)
PIDS=()
NGINX_PIDFILES=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "${NGINX_PIDFILES[@]}"; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
# The shared side-by-side harness's layout (../shared/bench/peers): the proxy under test on
# CPU 1, load generator and upstream on CPU 0 (and on the cores above 1, where there are any).
cores=$(nproc)
PROXY_CPU=$(( cores > 1 ? 1 : 0 ))
LOAD_CPU=0
[ "$cores" -gt 2 ] && LOAD_CPU="0,2-$((cores - 1))"

(cd "$ROOT" && cargo build --release -q -p llm-gateway -p mock-ollama)
GW=$ROOT/target/release/llm-gateway
MOCK=$ROOT/target/release/mock-ollama

wait_port() {
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; exit 1
}

# render TEMPLATE OUT RUNDIR PORT [UPSTREAM] [API_KEY]
render() {
  mkdir -p "$3/tmp"
  sed -e "s|\${RUNDIR}|$3|g" -e "s|\${PORT}|$4|g" -e "s|\${UPSTREAM}|${5:-}|g" -e "s|\${API_KEY}|${6:-bench-key}|g" "$1" > "$2"
}

# start_nginx CONF RUNDIR CPU
start_nginx() {
  taskset -c "$3" nginx -c "$1" -p "$2" -e "$2/error.log"
  NGINX_PIDFILES+=("$2/nginx.pid")
}

# start_upstream PORT: the static nginx upstream when nginx exists and UPSTREAM=nginx (default
# when available), else mock-ollama. Sets MODEL.
start_upstream() {
  local kind=${UPSTREAM:-$(command -v nginx >/dev/null && echo nginx || echo mock)}
  if [ "$kind" = nginx ]; then
    render "$ROOT/../shared/bench/upstream-nginx.conf.in" "$RUN/up.conf" "$RUN/nginx-up" "$1"
    start_nginx "$RUN/up.conf" "$RUN/nginx-up" "$LOAD_CPU"
    MODEL="llama3.2:1b"
  else
    taskset -c "$LOAD_CPU" "$MOCK" --listen "127.0.0.1:$1" --threads 1 --models llama3.2:1b > /dev/null & PIDS+=($!)
    MODEL="llama3.2:1b"
  fi
  UPSTREAM_KIND=$kind
  wait_port "$1"
}

# start_gateway NAME PORT UPSTREAM_PORT FILTERS_YAML
start_gateway() {
  cat > "$RUN/gw-$1.yaml" <<YAML
listen: [ { addr: 127.0.0.1:$2 } ]
admin: { addr: 127.0.0.1:$(( $2 + 1000 )) }
backends: [ { name: bench, url: 'http://127.0.0.1:$3', kind: ollama } ]
server: { threads: 1 }
filters:
$4
YAML
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$GW" --config "$RUN/gw-$1.yaml" & PIDS+=($!)
  wait_port "$2"
}

post_lua() {
  cat > "$RUN/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"$MODEL","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}],"stream":false,"max_tokens":64,"temperature":0.2}'
LUA
}

# measure URL [HEADER] → prints "rps p50_ms p99_ms". Like the shared harness, WARMUP (3 s) of
# unrecorded load first: a cold gateway (no backend connections, allocator and page cache not
# yet grown) measured at once reads about a quarter low.
measure() {
  local hdr=()
  [ -n "${2:-}" ] && hdr=(-H "$2")
  [ "${WARMUP:-3}" = 0 ] || taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARMUP:-3}s" --timeout 30s "${hdr[@]}" -s "$RUN/post.lua" "$1" >/dev/null 2>&1
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --timeout 30s --latency "${hdr[@]}" -s "$RUN/post.lua" "$1" 2>&1 | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /Non-2xx/ { bad = $NF }
    END { if (bad != "") print "WARNING: non-2xx responses: " bad > "/dev/stderr"; printf "%.1f %.3f %.3f\n", rps, p50, p99 }'
}

header() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F); upstream: $UPSTREAM_KIND; $CONNS connections, $DURATION per row; proxies on CPU $PROXY_CPU, load+upstream on CPU $LOAD_CPU"
  printf "%-40s %10s %9s %9s %8s\n" "path" "req/s" "p50 ms" "p99 ms" "ratio"
}

# row LABEL RPS P50 P99 BASE_RPS
row() {
  printf "%-40s %10s %9s %9s %8.2f\n" "$1" "$2" "$3" "$4" "$(echo "$2 / $5" | bc -l)"
}
