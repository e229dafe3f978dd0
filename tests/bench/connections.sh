#!/usr/bin/env bash
# Memory under connection floods, llm-gateway against nginx in one run: RSS for 1k and 10k idle
# keep-alive connections (each after one request), 500 slowloris connections, and 1,000
# concurrent slow streams (mock-ollama, 100 ms between chunks), and RSS after they close.
# One worker each (gateway `threads: 1`, nginx `worker_processes 1`); the worker's RSS is read.
# Needs nginx and python3.
source "$(dirname "$0")/lib.sh"
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install nginx-light" >&2; exit 1; }
ulimit -n 30000 2>/dev/null || true
MOCK_PORT=18434 GW_PORT=18480 NGINX_PORT=18481
"$MOCK" --listen 127.0.0.1:$MOCK_PORT --chunks 20 --chunk-delay-ms 100 >/dev/null 2>&1 &
PIDS+=($!)
wait_port $MOCK_PORT

cat > "$RUN/gw.yaml" <<YAML
listen:
  - addr: 127.0.0.1:$GW_PORT
server: { threads: 1 }
admin: { enabled: false }
backends:
  - { name: mock, url: "http://127.0.0.1:$MOCK_PORT", kind: ollama }
routing: { discovery: { enabled: false }, health: { enabled: false } }
YAML
"$GW" --config "$RUN/gw.yaml" >"$RUN/gw.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
wait_port $GW_PORT

mkdir -p "$RUN/nginx/tmp"
cat > "$RUN/nginx/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 30000;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log;
events { worker_connections 25000; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx/tmp; proxy_temp_path $RUN/nginx/tmp;
  fastcgi_temp_path $RUN/nginx/tmp; uwsgi_temp_path $RUN/nginx/tmp; scgi_temp_path $RUN/nginx/tmp;
  keepalive_timeout 75s;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location = /health { default_type application/json; return 200 '{"status":"ok"}'; }
    location / { proxy_pass http://127.0.0.1:$MOCK_PORT; proxy_buffering off; proxy_http_version 1.1; }
  }
}
CONF
nginx -c "$RUN/nginx/nginx.conf" -p "$RUN/nginx"
NGINX_PIDFILES+=("$RUN/nginx/nginx.pid")
wait_port $NGINX_PORT
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat "$RUN/nginx/nginx.pid")" | head -1)

echo "# $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for who in gateway nginx; do
  if [ $who = gateway ]; then port=$GW_PORT pid=$GW_PID; else port=$NGINX_PORT pid=$NGINX_WORKER; fi
  echo "## $who"
  python3 "$ROOT/tests/bench/idle_conns.py" $port $pid 1000
  python3 "$ROOT/tests/bench/idle_conns.py" $port $pid 10000
  python3 "$ROOT/tests/bench/idle_conns.py" $port $pid 500 --slowloris
  python3 "$ROOT/tests/bench/idle_conns.py" $port $pid 1000 --streams
done
