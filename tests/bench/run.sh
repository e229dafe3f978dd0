#!/usr/bin/env bash
# Proxy cost with an empty chain: the same load straight to the upstream, through llm-gateway
# (one worker thread = the per-core figure) and through nginx (one worker) doing the same job.
#   tests/bench/run.sh                 # upstream: static nginx if installed, else mock-ollama
#   UPSTREAM=mock tests/bench/run.sh   # upstream: mock-ollama
# Needs wrk and taskset; nginx for the nginx rows. Env: DURATION (10s), CONNS (64).
source "$(dirname "$0")/lib.sh"

UP=18434; GWP=18080; NGX=18081
start_upstream $UP
start_gateway empty $GWP $UP "  []
policy: none"
post_lua
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
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX backlog=4096;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGX
  start_nginx "$RUN/px.conf" "$RUN/nginx-px" "$PROXY_CPU"
  wait_port $NGX
fi

header
read -r d_rps d_p50 d_p99 < <(measure "http://127.0.0.1:$UP/v1/chat/completions")
row "direct to upstream" "$d_rps" "$d_p50" "$d_p99" "$d_rps"
read -r g_rps g_p50 g_p99 < <(measure "http://127.0.0.1:$GWP/v1/chat/completions")
row "llm-gateway, empty chain" "$g_rps" "$g_p50" "$g_p99" "$d_rps"
if [ $have_nginx = 1 ]; then
  read -r n_rps n_p50 n_p99 < <(measure "http://127.0.0.1:$NGX/v1/chat/completions")
  row "nginx proxy_pass" "$n_rps" "$n_p50" "$n_p99" "$d_rps"
  printf "llm-gateway / nginx: %.2f\n" "$(echo "$g_rps / $n_rps" | bc -l)"
fi
