#!/usr/bin/env bash
# Authentication (and policy) cost: API keys vs htpasswd basic auth (bcrypt cost 12) with a warm
# verified-credential cache, against the empty chain and against nginx, which checks keys with
# a `map` and pays bcrypt on every request with `auth_basic`.
# Needs wrk, taskset, nginx. Env: DURATION (10s), CONNS (64).
source "$(dirname "$0")/lib.sh"
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install nginx-light" >&2; exit 1; }

UP=18434; G0=18080; GK=18082; GB=18083; NK=18084; NB=18085
KEY=sk-gw-bench-$(date +%s)
start_upstream $UP
post_lua

printf 'keys:\n  - id: bench\n    key_sha256: %s\n' "$(printf %s "$KEY" | "$GW" keys hash)" > "$RUN/keys.yaml"
printf 'benchpw\n' | "$GW" hash-password --user bench --cost 12 > "$RUN/htpasswd"
chmod 755 "$RUN"; chmod 644 "$RUN/htpasswd"   # nginx workers run as an unprivileged user
BASIC="Authorization: Basic $(printf 'bench:benchpw' | base64)"

GP=18086
start_gateway empty $G0 $UP "  []
policy: none"
start_gateway keys $GK $UP "  - use: auth
    keys_file: $RUN/keys.yaml
policy: none"
start_gateway basic $GB $UP "  - use: auth
    htpasswd: $RUN/htpasswd
policy: none"
start_gateway keys-policy $GP $UP "  - use: auth
    keys_file: $RUN/keys.yaml
  - use: policy
    max_output_tokens: 4096"

# nginx with the shared hardened config (key via map), and the same with auth_basic instead.
render "$ROOT/../shared/bench/nginx-equivalent.conf.in" "$RUN/nk.conf" "$RUN/nginx-k" $NK "127.0.0.1:$UP" "$KEY"
start_nginx "$RUN/nk.conf" "$RUN/nginx-k" "$PROXY_CPU"
sed -e '/if ($api_key_ok = 0) {/,+2d' \
    -e "s|listen 127.0.0.1:$NK backlog=4096;|listen 127.0.0.1:$NB backlog=4096; auth_basic \"bench\"; auth_basic_user_file $RUN/htpasswd;|" \
    -e "s|$RUN/nginx-k|$RUN/nginx-b|g" "$RUN/nk.conf" > "$RUN/nb.conf"
mkdir -p "$RUN/nginx-b/tmp"
start_nginx "$RUN/nb.conf" "$RUN/nginx-b" "$PROXY_CPU"
wait_port $NK; wait_port $NB

# Warm the verified-credential cache (the first request pays bcrypt once).
curl -s -o /dev/null -H "$BASIC" -d '{"model":"'"$MODEL"'","stream":false}' "http://127.0.0.1:$GB/api/chat"

header
read -r e_rps e_p50 e_p99 < <(measure "http://127.0.0.1:$G0/v1/chat/completions")
row "llm-gateway, empty chain" "$e_rps" "$e_p50" "$e_p99" "$e_rps"
read -r k_rps k_p50 k_p99 < <(measure "http://127.0.0.1:$GK/v1/chat/completions" "Authorization: Bearer $KEY")
row "llm-gateway, API key" "$k_rps" "$k_p50" "$k_p99" "$e_rps"
read -r b_rps b_p50 b_p99 < <(measure "http://127.0.0.1:$GB/v1/chat/completions" "$BASIC")
row "llm-gateway, basic (bcrypt 12, cached)" "$b_rps" "$b_p50" "$b_p99" "$e_rps"
read -r p_rps p_p50 p_p99 < <(measure "http://127.0.0.1:$GP/v1/chat/completions" "Authorization: Bearer $KEY")
row "llm-gateway, API key + policy" "$p_rps" "$p_p50" "$p_p99" "$e_rps"
read -r nk_rps nk_p50 nk_p99 < <(measure "http://127.0.0.1:$NK/v1/chat/completions" "Authorization: Bearer $KEY")
row "nginx, key via map (+limits, log)" "$nk_rps" "$nk_p50" "$nk_p99" "$e_rps"
# bcrypt blocks nginx's only worker for every request: with 64 connections no response
# arrives within the run at all, so this row uses 4 connections.
read -r nb_rps nb_p50 nb_p99 < <(CONNS=4 measure "http://127.0.0.1:$NB/v1/chat/completions" "$BASIC")
row "nginx, auth_basic (bcrypt 12, 4 conns)" "$nb_rps" "$nb_p50" "$nb_p99" "$e_rps"
printf "cached basic / API key: %.2f (target >= 0.90)\n" "$(echo "$b_rps / $k_rps" | bc -l)"
