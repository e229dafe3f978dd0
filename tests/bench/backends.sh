#!/usr/bin/env bash
# Routing cost: llm-gateway in front of one backend versus three (default `usage` strategy,
# and round-robin), same load. The backends are static nginx upstreams (or mock-ollama with
# UPSTREAM=mock), all on the load generator's CPU, so the proxy is what is measured.
# Needs wrk, taskset (and nginx unless UPSTREAM=mock). Env: DURATION (10s), CONNS (64).
source "$(dirname "$0")/lib.sh"

UP1=18434; UP2=18435; UP3=18436; G1=18080; G3=18081; GR=18082
start_upstream $UP1
kind=$UPSTREAM_KIND
for port in $UP2 $UP3; do
  if [ "$kind" = nginx ]; then
    render "$ROOT/../shared/bench/upstream-nginx.conf.in" "$RUN/up$port.conf" "$RUN/nginx-up$port" "$port"
    start_nginx "$RUN/up$port.conf" "$RUN/nginx-up$port" "$LOAD_CPU"
  else
    taskset -c "$LOAD_CPU" "$MOCK" --listen "127.0.0.1:$port" --threads 1 --models llama3.2:1b > /dev/null & PIDS+=($!)
  fi
  wait_port $port
done
post_lua

gateway_with() { # name port strategy backends...
  local name=$1 port=$2 strategy=$3; shift 3
  local list=""
  for p in "$@"; do list="$list  - { name: up$p, url: 'http://127.0.0.1:$p', kind: ollama }
"; done
  cat > "$RUN/gw-$name.yaml" <<YAML
listen: [ { addr: 127.0.0.1:$port } ]
admin: { addr: 127.0.0.1:$(( port + 1000 )) }
server: { threads: 1 }
policy: none
routing: { strategy: $strategy, discovery: { enabled: false, interval: 1h }, health: { interval: 5s } }
backends:
$list
YAML
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$GW" --config "$RUN/gw-$name.yaml" & PIDS+=($!)
  wait_port "$port"
}
gateway_with one $G1 usage $UP1
gateway_with three $G3 usage $UP1 $UP2 $UP3
gateway_with three-rr $GR round-robin $UP1 $UP2 $UP3

header
read -r a_rps a_p50 a_p99 < <(measure "http://127.0.0.1:$G1/v1/chat/completions")
row "one backend" "$a_rps" "$a_p50" "$a_p99" "$a_rps"
read -r b_rps b_p50 b_p99 < <(measure "http://127.0.0.1:$G3/v1/chat/completions")
row "three backends, usage" "$b_rps" "$b_p50" "$b_p99" "$a_rps"
read -r c_rps c_p50 c_p99 < <(measure "http://127.0.0.1:$GR/v1/chat/completions")
row "three backends, round-robin" "$c_rps" "$c_p50" "$c_p99" "$a_rps"
