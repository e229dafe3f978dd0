#!/usr/bin/env bash
# User-space instructions per request on the hot path, counted by callgrind: repeatable to a
# fraction of a percent, unlike wall-clock figures on a shared machine. The gateway runs the
# shared harness's `gateway-equiv` (or `gateway-full`) config in front of the harness's static
# nginx upstream; the figure is the difference of two runs (N and 2N requests) divided by N,
# so start-up and shutdown cancel out.
#
#   cargo build --release -p llm-gateway
#   tests/bench/callgrind.sh                 # gateway-equiv, N=1000
#   CONF=gateway-full N=500 tests/bench/callgrind.sh
#   KEEP=1 tests/bench/callgrind.sh          # keep the callgrind.out files (callgrind_annotate)
#   BIN=/tmp/gw-before tests/bench/callgrind.sh   # another build (e.g. the one before a change)
#   STATE=redis CONF=gateway-full tests/bench/callgrind.sh   # shared state on a redis-server
#                                            # the script starts (the gateway's side of it only)
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=../shared/bench/peers
CONF=${CONF:-gateway-equiv}
N=${N:-1000}
BIN=$(realpath "${BIN:-target/release/llm-gateway}")
API_KEY=sk-bench-0123456789abcdef0123456789abcdef
BODY='{"model":"llama3.2:1b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}],"stream":false,"max_tokens":64,"temperature":0.2}'
WORK=$(mktemp -d /tmp/callgrind.XXXXXX)
UP_PORT=28500 PORT=28501 ADMIN=28502 REDIS_PORT=28503
STATE=${STATE:-local}
cleanup() {
  [[ -f $WORK/up/nginx.pid ]] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [[ -f $WORK/redis.pid ]] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
  [[ ${KEEP:-0} == 1 ]] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
for tool in valgrind nginx oha envsubst; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

mkdir -p "$WORK/up/tmp"
RUNDIR=$WORK/up PORT=$UP_PORT "$PEERS/tools/render.sh" "$PEERS/conf/upstream-nginx.conf.in" >"$WORK/up/nginx.conf"
nginx -e "$WORK/up/error.log" -p "$WORK/up" -c "$WORK/up/nginx.conf"
case $STATE in
  local) ;;
  redis)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
      --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
    for try in $(seq 51); do
      [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
      ((try < 51)) || { echo "redis-server did not start on port $REDIS_PORT" >&2; exit 1; }
      sleep 0.1
    done ;;
  *) echo "STATE: local or redis" >&2; exit 1 ;;
esac

# One run of the gateway under callgrind with $1 requests; prints its instruction count.
run() {
  local n=$1 dir=$WORK/gw-$1
  mkdir -p "$dir"
  RUNDIR=$dir PORT=$PORT UPSTREAM=127.0.0.1:$UP_PORT API_KEY=$API_KEY \
    "$PEERS/tools/render.sh" "$PEERS/conf/$CONF.yaml.in" | sed "s/\${ADMIN_PORT}/$ADMIN/" >"$dir/gateway.yaml"
  [[ $STATE == redis ]] && printf "state: { backend: redis, url: redis://127.0.0.1:%s/0, timeout: 5s }\n" "$REDIS_PORT" >>"$dir/gateway.yaml"
  printf "keys:\n  - id: bench\n    key_sha256: %s\n" "$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)" >"$dir/keys.yaml"
  (cd "$dir" && RUST_LOG=warn exec valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$BIN" --config "$dir/gateway.yaml" >"$dir/log" 2>&1) &
  local pid=$!
  for _ in $(seq 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/health" && break
    sleep 0.1
  done
  # A first request warms lazily built state (connections, metric children).
  curl -sf -o /dev/null -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
    -d "$BODY" "http://127.0.0.1:$PORT/v1/chat/completions"
  oha --no-tui -n "$n" -c 8 -m POST -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
    -d "$BODY" "http://127.0.0.1:$PORT/v1/chat/completions" >"$dir/oha.txt"
  grep -q '\[200\] '"$n"' responses' "$dir/oha.txt" || { echo "not every request got 200:" >&2; cat "$dir/oha.txt" >&2; exit 1; }
  # Under valgrind every call is slower: a call past the deadline would measure local state.
  ! grep -q "state: degraded" "$dir/log" || { echo "shared state fell back to local state:" >&2; cat "$dir/log" >&2; exit 1; }
  pkill -INT -f "callgrind-out-file=$dir/callgrind.out" || true
  wait "$pid" || true
  callgrind_annotate "$dir/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

a=$(run "$N")
b=$(run $((2 * N)))
echo "$CONF (state: $STATE): $(( (b - a) / N )) instructions per request (runs: $a for $N requests, $b for $((2 * N)))"
