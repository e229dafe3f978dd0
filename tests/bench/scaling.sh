#!/usr/bin/env bash
# Scaling across cores: nginx with the shared harness's rules (nginx-bearer.conf.in) and
# llm-gateway with the same rules (gateway-equiv.yaml.in), each with 1, 2, 4… workers pinned
# to as many cores, in one run. Prints max req/s at CONNS keep-alive connections and the
# proxy's CPU µs per request (all its threads, from /proc). Meant for a machine with cores to
# spare for the load generator and the upstream (the 2-core project machine has none):
#
#   cargo build --release -p llm-gateway
#   THREADS="1 2 4" PROXY_CPUS=1,2,3,4 UP_CPUS=5-8 LOAD_CPUS=9-15 tests/bench/scaling.sh
#
# Env: PEERS (the harness, ../shared/bench/peers), GATEWAY_BIN, DURATION (8 s), WARMUP (3 s),
# CONNS (256), UP_WORKERS (4), LOAD_THREADS (4). Needs nginx, wrk, envsubst and taskset.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=${PEERS:-../shared/bench/peers}
GW=$(realpath "${GATEWAY_BIN:-target/release/llm-gateway}")
THREADS=${THREADS:-1 2 4}
PROXY_CPUS=${PROXY_CPUS:-1,2,3,4}
UP_CPUS=${UP_CPUS:-5-8}
LOAD_CPUS=${LOAD_CPUS:-9-15}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-256}
UP_WORKERS=${UP_WORKERS:-4}
LOAD_THREADS=${LOAD_THREADS:-4}
API_KEY=sk-bench-0123456789abcdef0123456789abcdef
UP_PORT=28600 PORT=28601 ADMIN=28602
RUN=$(mktemp -d /tmp/scaling.XXXXXX)
PEER_PID=
cleanup() {
  [[ -n $PEER_PID ]] && kill "$PEER_PID" 2>/dev/null
  [[ -f $RUN/up/nginx.pid ]] && kill "$(cat "$RUN/up/nginx.pid")" 2>/dev/null
  rm -rf "$RUN"
}
trap cleanup EXIT
for tool in nginx wrk envsubst taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

render() { RUNDIR=$1 PORT=$2 UPSTREAM=127.0.0.1:$UP_PORT API_KEY=$API_KEY "$PEERS/tools/render.sh" "$3"; }
wait_port() {
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2
  exit 1
}
# Utime + stime of a process and its children (nginx's workers), in clock ticks.
ticks() {
  local t=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
# The first N CPUs of a taskset list such as 1,2,3,4 or 1-4.
first_cpus() {
  local n=$1 list=() part
  IFS=, read -ra parts <<<"$PROXY_CPUS"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then list+=($(seq "${part%-*}" "${part#*-}")); else list+=("$part"); fi
  done
  ((n <= ${#list[@]})) || { echo "PROXY_CPUS has fewer than $n CPUs" >&2; exit 1; }
  local IFS=,
  echo "${list[*]:0:n}"
}

mkdir -p "$RUN/up/tmp"
render "$RUN/up" "$UP_PORT" "$PEERS/conf/upstream-nginx.conf.in" |
  sed "s/^worker_processes 1;/worker_processes $UP_WORKERS;/" >"$RUN/up/nginx.conf"
taskset -c "$UP_CPUS" nginx -e "$RUN/up/error.log" -p "$RUN/up" -c "$RUN/up/nginx.conf"
wait_port "$UP_PORT"

# start PEER N CPUS: starts the peer in the foreground of a background job → PEER_PID.
start() {
  local dir=$RUN/$1-$2
  rm -rf "$dir"
  mkdir -p "$dir/tmp"
  if [[ $1 == nginx ]]; then
    render "$dir" "$PORT" "$PEERS/conf/nginx-bearer.conf.in" |
      sed "s/^worker_processes 1;/worker_processes $2;/" >"$dir/nginx.conf"
    taskset -c "$3" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" -g "daemon off;" &
  else
    render "$dir" "$PORT" "$PEERS/conf/gateway-equiv.yaml.in" |
      sed -e "s/\${ADMIN_PORT}/$ADMIN/" -e "s/^  threads: 1$/  threads: $2/" >"$dir/gateway.yaml"
    printf "keys:\n  - id: bench\n    key_sha256: %s\n" "$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)" >"$dir/keys.yaml"
    (cd "$dir" && RUST_LOG=warn exec taskset -c "$3" "$GW" --config "$dir/gateway.yaml" >"$dir/log" 2>&1) &
  fi
  PEER_PID=$!
  wait_port "$PORT"
}
stop() {
  kill -TERM "$PEER_PID" 2>/dev/null || true
  wait "$PEER_PID" 2>/dev/null || true
  PEER_PID=
}
load() {
  BENCH_AUTH="Bearer $API_KEY" taskset -c "$LOAD_CPUS" wrk -t"$LOAD_THREADS" -c"$CONNS" -d"$1s" \
    --timeout 10s -s "$PEERS/tools/chat.lua" "http://127.0.0.1:$PORT"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u '+%F %H:%M UTC')"
echo "proxy CPUs from $PROXY_CPUS, upstream nginx ($UP_WORKERS workers) on $UP_CPUS, wrk -t$LOAD_THREADS -c$CONNS on $LOAD_CPUS, ${DURATION} s per row"
printf "%-14s %8s %10s %14s %10s\n" peer workers "req/s" "CPU µs/req" "non-2xx"
hz=$(getconf CLK_TCK)
for n in $THREADS; do
  cpus=$(first_cpus "$n")
  for peer in nginx gateway-equiv; do
    start "$peer" "$n" "$cpus"
    load "$WARMUP" >/dev/null
    t0=$(ticks "$PEER_PID")
    out=$(load "$DURATION")
    t1=$(ticks "$PEER_PID")
    stop
    rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
    req=$(awk '/requests in/{print $1}' <<<"$out")
    bad=$(awk '/Non-2xx/{print $NF}' <<<"$out")
    printf "%-14s %8s %10.0f %14.1f %10s\n" "$peer" "$n" "$rps" \
      "$(awk -v t=$((t1 - t0)) -v hz="$hz" -v r="$req" 'BEGIN{print r ? t / hz * 1e6 / r : 0}')" "${bad:-0}"
  done
done
