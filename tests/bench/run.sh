#!/usr/bin/env bash
# Proxy-cost benchmark: the same load straight to the upstream, through llm-gateway (empty
# chain, one worker thread = the per-core figure) and through nginx (one worker) doing the
# same job, all in one run so the ratios are comparable.
#
#   tests/bench/run.sh                 # upstream: mock-ollama (release build)
#   UPSTREAM=nginx tests/bench/run.sh  # upstream: the static nginx from ../shared/bench
#
# Needs: wrk, taskset (util-linux); nginx for the nginx rows. Env: DURATION (10s), CONNS (64).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
UPSTREAM=${UPSTREAM:-mock}
RUN=$(mktemp -d /tmp/llm-gw-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -f "$RUN/nginx-up/nginx.pid" ] && kill "$(cat "$RUN/nginx-up/nginx.pid")" 2>/dev/null; [ -f "$RUN/nginx-px/nginx.pid" ] && kill "$(cat "$RUN/nginx-px/nginx.pid")" 2>/dev/null; rm -rf "$RUN"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cores=$(nproc)
PROXY_CPU=0; LOAD_CPU=$(( cores > 1 ? 1 : 0 ))
[ "$cores" -gt 2 ] && LOAD_CPU="1-$((cores - 1))"

cargo build --release -q -p llm-gateway -p mock-ollama
GW=$ROOT/target/release/llm-gateway
MOCK=$ROOT/target/release/mock-ollama

UP_PORT=18434; GW_PORT=18080; NGX_PORT=18081

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

render() { # template out rundir port upstream
  mkdir -p "$3/tmp"
  sed -e "s|\${RUNDIR}|$3|g" -e "s|\${PORT}|$4|g" -e "s|\${UPSTREAM}|${5:-}|g" -e "s|\${API_KEY}|bench-key|g" "$1" > "$2"
}

if [ "$UPSTREAM" = nginx ]; then
  render "$ROOT/../shared/bench/upstream-nginx.conf.in" "$RUN/up.conf" "$RUN/nginx-up" "$UP_PORT"
  taskset -c "$LOAD_CPU" nginx -c "$RUN/up.conf" -p "$RUN/nginx-up" -e "$RUN/nginx-up/error.log"
  MODEL="llama3.2:1b"
else
  taskset -c "$LOAD_CPU" "$MOCK" --listen 127.0.0.1:$UP_PORT --threads 1 > /dev/null & PIDS+=($!)
  MODEL="llama3.1:8b"
fi
wait_port $UP_PORT

cat > "$RUN/gateway.yaml" <<YAML
listen: [ { addr: 127.0.0.1:$GW_PORT } ]
backends: [ { name: bench, url: 'http://127.0.0.1:$UP_PORT', kind: ollama } ]
server: { threads: 1 }
filters: []
YAML
RUST_LOG=warn taskset -c $PROXY_CPU "$GW" --config "$RUN/gateway.yaml" & PIDS+=($!)
wait_port $GW_PORT

have_nginx=0
if command -v nginx >/dev/null; then
  have_nginx=1
  mkdir -p "$RUN/nginx-px/tmp"
  cat > "$RUN/px.conf" <<NGX
worker_processes 1;
pid $RUN/nginx-px/nginx.pid;
error_log $RUN/nginx-px/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx-px/tmp/body; proxy_temp_path $RUN/nginx-px/tmp/proxy;
  fastcgi_temp_path $RUN/nginx-px/tmp/f; uwsgi_temp_path $RUN/nginx-px/tmp/u; scgi_temp_path $RUN/nginx-px/tmp/s;
  client_max_body_size 1m; client_body_buffer_size 1m;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX_PORT backlog=4096;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGX
  taskset -c $PROXY_CPU nginx -c "$RUN/px.conf" -p "$RUN/nginx-px" -e "$RUN/nginx-px/error.log"
  wait_port $NGX_PORT
fi

cat > "$RUN/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"$MODEL","messages":[{"role":"user","content":"Why is the sky blue? Answer in one sentence."}],"stream":false}'
LUA

# Prints "rps p50_ms p99_ms" for one wrk run.
measure() {
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$RUN/post.lua" "$1" 2>&1 | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /Non-2xx/ { bad = $NF }
    END { if (bad != "") print "non-2xx responses: " bad > "/dev/stderr"; printf "%.0f %.3f %.3f\n", rps, p50, p99 }'
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); upstream: $UPSTREAM; $CONNS connections, $DURATION each; proxies pinned to CPU $PROXY_CPU, load+upstream on CPU $LOAD_CPU"
read -r d_rps d_p50 d_p99 < <(measure "http://127.0.0.1:$UP_PORT/v1/chat/completions")
read -r g_rps g_p50 g_p99 < <(measure "http://127.0.0.1:$GW_PORT/v1/chat/completions")
printf "%-28s %10s %9s %9s %10s\n" "path" "req/s" "p50 ms" "p99 ms" "vs direct"
printf "%-28s %10s %9s %9s %10s\n" "direct to upstream" "$d_rps" "$d_p50" "$d_p99" "1.00"
printf "%-28s %10s %9s %9s %10.2f\n" "llm-gateway (empty chain)" "$g_rps" "$g_p50" "$g_p99" "$(echo "$g_rps / $d_rps" | bc -l)"
if [ $have_nginx = 1 ]; then
  read -r n_rps n_p50 n_p99 < <(measure "http://127.0.0.1:$NGX_PORT/v1/chat/completions")
  printf "%-28s %10s %9s %9s %10.2f\n" "nginx proxy_pass (1 worker)" "$n_rps" "$n_p50" "$n_p99" "$(echo "$n_rps / $d_rps" | bc -l)"
  printf "llm-gateway / nginx: %.2f\n" "$(echo "$g_rps / $n_rps" | bc -l)"
fi
