#!/usr/bin/env bash
# Cost of the filter chain as it grows: empty, a per-IP limiter, auth + per-key limiter, the
# full chain (per-IP limiter, auth, policy, per-key limiter with rate, in-flight and tokens per
# minute), and the full chain with audit lines written to a file; limits so high that nothing
# is refused. Prometheus metrics are recorded in every row.
# The last two rows run the shared harness's `nginx` and `gateway-equiv` peers with their own
# configs (../shared/bench/peers/conf), three alternating rounds each after a warm-up like the
# harness's, and give the gateway's ratio to nginx in this run (medians).
# Needs wrk, taskset; nginx for the static upstream. Env: DURATION (10s), CONNS (64).
source "$(dirname "$0")/lib.sh"

UP=18434; G0=18080; G1=18081; G2=18082; G3=18083; G4=18084
KEY=sk-gw-bench-$(date +%s)
start_upstream $UP
post_lua
printf 'keys:\n  - id: bench\n    key_sha256: %s\n' "$(printf %s "$KEY" | "$GW" keys hash)" > "$RUN/keys.yaml"

HIGH="rate: 100000000/s
    burst: 1000000"
start_gateway empty $G0 $UP "  []
policy: none"
start_gateway ip $G1 $UP "  - use: ratelimit
    key: ip
    $HIGH
policy: none"
start_gateway key $G2 $UP "  - use: auth
    keys_file: $RUN/keys.yaml
  - use: ratelimit
    key: api_key
    $HIGH
policy: none"
start_gateway full $G3 $UP "  - use: ratelimit
    key: ip
    $HIGH
  - use: auth
    keys_file: $RUN/keys.yaml
  - use: policy
    max_output_tokens: 4096
  - use: ratelimit
    key: api_key
    $HIGH
    max_in_flight: 100000
    tokens_per_minute: 1000000000000"

start_gateway audited $G4 $UP "  - use: ratelimit
    key: ip
    $HIGH
  - use: auth
    keys_file: $RUN/keys.yaml
  - use: policy
    max_output_tokens: 4096
  - use: ratelimit
    key: api_key
    $HIGH
    max_in_flight: 100000
    tokens_per_minute: 1000000000000
  - use: audit
    file: $RUN/audit.jsonl"

header
AUTH="Authorization: Bearer $KEY"
read -r e_rps e_p50 e_p99 < <(measure "http://127.0.0.1:$G0/v1/chat/completions")
row "empty chain" "$e_rps" "$e_p50" "$e_p99" "$e_rps"
read -r a_rps a_p50 a_p99 < <(measure "http://127.0.0.1:$G1/v1/chat/completions")
row "per-IP limiter" "$a_rps" "$a_p50" "$a_p99" "$e_rps"
read -r b_rps b_p50 b_p99 < <(measure "http://127.0.0.1:$G2/v1/chat/completions" "$AUTH")
row "auth + per-key limiter" "$b_rps" "$b_p50" "$b_p99" "$e_rps"
read -r c_rps c_p50 c_p99 < <(measure "http://127.0.0.1:$G3/v1/chat/completions" "$AUTH")
row "IP limiter+auth+policy+key limiter" "$c_rps" "$c_p50" "$c_p99" "$e_rps"
read -r d_rps d_p50 d_p99 < <(measure "http://127.0.0.1:$G4/v1/chat/completions" "$AUTH")
row "  + audit to a file" "$d_rps" "$d_p50" "$d_p99" "$e_rps"
echo "audit lines written: $(wc -l < "$RUN/audit.jsonl"); metrics are always on (admin listener)"

# The shared harness's `gateway-equiv` and `nginx` peers, their configs as they are, in this
# run: the ratio the per-core target is judged by (../shared/bench/peers has the full harness).
PEERS_CONF=$ROOT/../shared/bench/peers/conf
if [ -f "$PEERS_CONF/gateway-equiv.yaml.in" ] && command -v nginx >/dev/null; then
  G5=18085; N5=18086
  HKEY=sk-bench-0123456789abcdef0123456789abcdef
  mkdir -p "$RUN/equiv" "$RUN/nginx-equiv/tmp"
  render "$PEERS_CONF/gateway-equiv.yaml.in" "$RUN/equiv/gateway.yaml" "$RUN/equiv" "$G5" "127.0.0.1:$UP" "$HKEY"
  sed -i "s/\${ADMIN_PORT}/$((G5 + 1000))/" "$RUN/equiv/gateway.yaml"
  printf 'keys:\n  - id: bench\n    key_sha256: %s\n' "$(printf %s "$HKEY" | sha256sum | cut -d' ' -f1)" > "$RUN/equiv/keys.yaml"
  (cd "$RUN/equiv" && RUST_LOG=warn exec taskset -c "$PROXY_CPU" "$GW" --config gateway.yaml) & PIDS+=($!)
  wait_port $G5
  render "$PEERS_CONF/nginx-bearer.conf.in" "$RUN/nginx-equiv.conf" "$RUN/nginx-equiv" "$N5" "127.0.0.1:$UP" "$HKEY"
  start_nginx "$RUN/nginx-equiv.conf" "$RUN/nginx-equiv" "$PROXY_CPU"
  wait_port $N5
  # Single runs on a shared 2-core VM move by ±20% within minutes (both peers): like the
  # harness, three alternating rounds, and the round with the median rate of each.
  NR=(); QR=()
  for _ in 1 2 3; do
    NR+=("$(measure "http://127.0.0.1:$N5/v1/chat/completions" "Authorization: Bearer $HKEY")")
    QR+=("$(measure "http://127.0.0.1:$G5/v1/chat/completions" "Authorization: Bearer $HKEY")")
  done
  median_run() { printf '%s\n' "$@" | sort -n -k1,1 | sed -n 2p; }
  read -r n_rps n_p50 n_p99 < <(median_run "${NR[@]}")
  read -r q_rps q_p50 q_p99 < <(median_run "${QR[@]}")
  echo "rounds, req/s: nginx $(printf '%s ' "${NR[@]}" | awk '{for (i = 1; i <= NF; i += 3) printf "%s ", $i}')/ gateway-equiv $(printf '%s ' "${QR[@]}" | awk '{for (i = 1; i <= NF; i += 3) printf "%s ", $i}')"
  row "nginx, the harness's rules (median of 3)" "$n_rps" "$n_p50" "$n_p99" "$n_rps"
  row "llm-gateway, same rules (gateway-equiv)" "$q_rps" "$q_p50" "$q_p99" "$n_rps"
fi
