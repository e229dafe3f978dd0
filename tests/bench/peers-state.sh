# The full chain with shared state on Redis, as a peer of the shared harness, beside the same
# chain on local state (`gateway-full` from ../shared/bench/peers/peers.d/gateway.sh):
#   EXTRA_PEERS="../shared/bench/peers/peers.d/gateway.sh tests/bench/peers-state.sh" \
#     ONLY="gateway-full gateway-full-redis" STREAM=0 ../shared/bench/peers/run-peers.sh
# (`gateway-full-redis-unix`, below: the same through Redis's Unix socket.)
# redis-server runs on the load generator's core (CPU 0; REDIS_CPU moves it to a core of its
# own where the machine has one; REDIS_NICE, e.g. -10, gives it priority over the load
# generator on a shared core, to see how much of the latency is waiting for that core: a
# negative value needs root or CAP_SYS_NICE, without which nice warns and changes nothing),
# without persistence, as a child of
# the peer (so the harness counts it as the peer's, not as foreign load; it is left running
# after the harness stops the peer: `pkill redis-server`).
gw_redis_port=$((28092 + 1000 + 7))
gw_redis_cpu=${REDIS_CPU:-0}
gw_redis_nice=${REDIS_NICE:-0}
add_peer gateway-full-redis 28092 \
  '{ taskset -c '"$gw_redis_cpu"' nice -n '"$gw_redis_nice"' redis-server --port '"$gw_redis_port"' --bind 127.0.0.1 --save "" --appendonly no --dir "$RUNDIR" >"$RUNDIR/redis.log" 2>&1 & } &&
   until redis-cli -p '"$gw_redis_port"' ping >/dev/null 2>&1; do sleep 0.1; done &&
   GW_CONF=gateway-full.yaml.in && "$TOOLS/render.sh" "$CONF/$GW_CONF" | sed "s/\${ADMIN_PORT}/$((PORT+1000))/" > "$RUNDIR/gateway.yaml" &&
   printf "state: { backend: redis, url: redis://127.0.0.1:'"$gw_redis_port"'/0 }\n" >> "$RUNDIR/gateway.yaml" &&
   printf "keys:\n  - id: bench\n    key_sha256: %s\n" "$(printf %s "$API_KEY" | sha256sum | cut -d" " -f1)" > "$RUNDIR/keys.yaml" &&
   cd "$RUNDIR" && RUST_LOG=warn exec "$GATEWAY_BIN" --config "$RUNDIR/gateway.yaml"' \
  "$BEARER" "$gw_version (full chain, state: redis)"

# The same over Redis's Unix socket (`state.url: unix://...`): no TCP on either side.
add_peer gateway-full-redis-unix 28094 \
  '{ taskset -c '"$gw_redis_cpu"' nice -n '"$gw_redis_nice"' redis-server --port 0 --unixsocket "$RUNDIR/redis.sock" --unixsocketperm 700 --save "" --appendonly no --dir "$RUNDIR" >"$RUNDIR/redis.log" 2>&1 & } &&
   until redis-cli -s "$RUNDIR/redis.sock" ping >/dev/null 2>&1; do sleep 0.1; done &&
   GW_CONF=gateway-full.yaml.in && "$TOOLS/render.sh" "$CONF/$GW_CONF" | sed "s/\${ADMIN_PORT}/$((PORT+1000))/" > "$RUNDIR/gateway.yaml" &&
   printf "state: { backend: redis, url: \"unix://$RUNDIR/redis.sock\" }\n" >> "$RUNDIR/gateway.yaml" &&
   printf "keys:\n  - id: bench\n    key_sha256: %s\n" "$(printf %s "$API_KEY" | sha256sum | cut -d" " -f1)" > "$RUNDIR/keys.yaml" &&
   cd "$RUNDIR" && RUST_LOG=warn exec "$GATEWAY_BIN" --config "$RUNDIR/gateway.yaml"' \
  "$BEARER" "$gw_version (full chain, state: redis unix)"
