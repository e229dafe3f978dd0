#!/usr/bin/env bash
# Many concurrent streams through one worker: STREAMS (2000) OpenAI-style SSE generations at
# once, mock-ollama sending a chunk every 20 ms (100 chunks: 2 s per stream), through
# llm-gateway (threads: 1, empty chain) and through nginx (1 worker, proxy_buffering off),
# in one run. Prints, per proxy, the CPU seconds its core used, time to first byte and the
# gaps between reads of a stream (p50, p99, max), next to the same load straight to the mock.
# The proxies run on CPU 1; mock-ollama and the load generator (tests/mock-ollama's
# `stream-load`, one thread) share CPU 0, so at 2,000 streams (100,000 chunks a second) the
# load side is as busy as the proxy: compare the proxies with each other, within one run.
# Needs nginx and taskset. Env: STREAMS (2000), CHUNK_MS (20), CHUNKS (100).
source "$(dirname "$0")/lib.sh"
STREAMS=${STREAMS:-2000}
CHUNK_MS=${CHUNK_MS:-20}
CHUNKS=${CHUNKS:-100}
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install nginx-light" >&2; exit 1; }
ulimit -n 30000 2>/dev/null || true
(cd "$ROOT" && cargo build --release -q -p mock-ollama --bin stream-load)
LOADGEN=$ROOT/target/release/stream-load
UP=18534; GWP=18580; NGX=18581

taskset -c "$LOAD_CPU" "$MOCK" --listen "127.0.0.1:$UP" --threads 1 --chunks "$CHUNKS" \
  --chunk-delay-ms "$CHUNK_MS" --models llama3.2:1b > /dev/null & PIDS+=($!)
wait_port $UP
start_gateway streams $GWP $UP "  []
policy: none"
GW_PID=${PIDS[-1]}

mkdir -p "$RUN/nginx-st/tmp"
cat > "$RUN/st.conf" <<NGX
worker_processes 1;
worker_rlimit_nofile 30000;
pid $RUN/nginx-st/nginx.pid;
error_log $RUN/nginx-st/error.log warn;
events { worker_connections 25000; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx-st/tmp/body; proxy_temp_path $RUN/nginx-st/tmp/proxy;
  fastcgi_temp_path $RUN/nginx-st/tmp/f; uwsgi_temp_path $RUN/nginx-st/tmp/u; scgi_temp_path $RUN/nginx-st/tmp/s;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX backlog=4096;
    location / {
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGX
start_nginx "$RUN/st.conf" "$RUN/nginx-st" "$PROXY_CPU"
wait_port $NGX
sleep 0.5
NGX_WORKER=$(pgrep -P "$(cat "$RUN/nginx-st/nginx.pid")" | head -1)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F); $STREAMS streams, a chunk every $CHUNK_MS ms, $CHUNKS chunks; proxies on CPU $PROXY_CPU, mock + load on CPU $LOAD_CPU"
for who in direct llm-gateway nginx; do
  case $who in
    direct) port=$UP; pid=;;
    llm-gateway) port=$GWP; pid=$GW_PID;;
    nginx) port=$NGX; pid=$NGX_WORKER;;
  esac
  printf '%-12s ' "$who"
  taskset -c "$LOAD_CPU" "$LOADGEN" --target "127.0.0.1:$port" --streams "$STREAMS" ${pid:+--pid $pid}
  sleep 1
done
