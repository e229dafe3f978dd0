#!/usr/bin/env bash
# The release image for real: builds docker/Dockerfile and runs the gateway service the way
# docker/compose.yaml does (its config and a keys file mounted, the state volume, Ollama on
# an internal network of its own, the port published on loopback), with the repository's
# mock model server standing in for Ollama. Not part of the test command (it needs Docker
# and the base images); run it after changing the Dockerfile or the compose files:
#
#   cargo build --release -p mock-ollama
#   tests/docker/run.sh
#
# Exit 1 on any failed check.
set -uo pipefail
cd "$(dirname "$0")/../.."
# docker/Dockerfile.dockerignore (this Dockerfile's own ignore file) needs BuildKit.
export DOCKER_BUILDKIT=1
IMAGE=${IMAGE:-llm-gateway:check}
MOCK=$(realpath "${MOCK_BIN:-target/release/mock-ollama}")
PORT=${PORT:-18080}
P=llm-gateway-check-$$
failed=0
check() { if "${@:2}"; then echo "ok   $1"; else echo "FAIL $1"; failed=1; fi; }
cleanup() {
  docker rm -f "$P-gateway" "$P-ollama" "$P-bad" >/dev/null 2>&1
  docker network rm "$P-models" "$P-front" >/dev/null 2>&1
  docker volume rm "$P-state" >/dev/null 2>&1
  rm -rf "$WORK"
}
WORK=$(mktemp -d /tmp/docker-check.XXXXXX)
trap cleanup EXIT
command -v docker >/dev/null || { echo "needs docker" >&2; exit 1; }
[[ -x $MOCK ]] || { echo "no mock server at $MOCK: cargo build --release -p mock-ollama" >&2; exit 1; }

echo "== build"
docker build -q -f docker/Dockerfile -t "$IMAGE" . >/dev/null || { echo "FAIL docker build"; exit 1; }
echo "ok   docker build -f docker/Dockerfile"
uid=$(docker run --rm --entrypoint id "$IMAGE" -u)
check "runs as a non-root user (uid $uid)" bash -c "[[ '$uid' =~ ^[1-9][0-9]*$ ]]"
files=$(docker run --rm --entrypoint find "$IMAGE" /etc/llm-gateway -type f) &&
  check "no config, keys or htpasswd inside the image" test -z "$files" ||
  check "/etc/llm-gateway exists in the image" false
check "the image has a HEALTHCHECK on /health" bash -c \
  "docker image inspect -f '{{.Config.Healthcheck.Test}}' '$IMAGE' | grep -q /health"

echo "== run as compose does"
docker network create --internal "$P-models" >/dev/null
docker network create "$P-front" >/dev/null
docker volume create "$P-state" >/dev/null
docker run -d --name "$P-ollama" --network "$P-models" --network-alias ollama \
  -v "$MOCK:/usr/local/bin/mock-ollama:ro" --entrypoint /usr/local/bin/mock-ollama \
  debian:bookworm-slim --listen 0.0.0.0:11434 --models llama3.2:1b >/dev/null
docker run --rm "$IMAGE" keys new --id check --name check >"$WORK/key.txt"
KEY=$(sed -n 2p "$WORK/key.txt")
[[ $KEY == sk-* ]] || { echo "FAIL no key from \`keys new\`"; exit 1; }
{ echo "keys:"; sed -n '4,$p' "$WORK/key.txt"; } >"$WORK/keys.yaml"
chmod 0644 "$WORK/keys.yaml"
docker create --name "$P-gateway" --network "$P-models" -p "127.0.0.1:$PORT:8080" \
  -v "$PWD/docker/gateway.yaml:/etc/llm-gateway/gateway.yaml:ro" -v "$WORK/keys.yaml:/etc/llm-gateway/keys.yaml:ro" \
  -v "$P-state:/var/lib/llm-gateway" -e LLM_GATEWAY_STATE=/var/lib/llm-gateway "$IMAGE" >/dev/null
docker network connect "$P-front" "$P-gateway"
docker start "$P-gateway" >/dev/null
chat() {
  curl -s -o /dev/null -w '%{http_code}' -m 10 -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
    -d '{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":false}' \
    "http://127.0.0.1:$PORT/v1/chat/completions"
}
for _ in $(seq 100); do [[ $(chat "$KEY") == 200 ]] && break; sleep 0.2; done
check "a request with the key reaches Ollama through the gateway (200)" test "$(chat "$KEY")" = 200
check "a request without a valid key is refused (401)" test "$(chat sk-wrong)" = 401
check "Ollama is reachable from the gateway's network only (internal, nothing published)" bash -c \
  "docker network inspect -f '{{.Internal}}' $P-models | grep -qx true && docker inspect -f '{{.State.Running}}' $P-ollama | grep -qx true && test -z \"\$(docker port $P-ollama)\""
echo "waiting for the first health check (interval 30 s)…"
health=starting
for _ in $(seq 45); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$P-gateway")
  [[ $health != starting ]] && break
  sleep 1
done
check "the container reports healthy (got: $health)" test "$health" = healthy
docker exec "$P-gateway" cat /var/lib/llm-gateway/audit.jsonl >"$WORK/audit.jsonl" 2>/dev/null
check "audit lines land in the state volume" grep -q '"status":200' "$WORK/audit.jsonl"
check "and hold no key" bash -c "test -s '$WORK/audit.jsonl' && ! grep -qF '$KEY' '$WORK/audit.jsonl'"
check "docker stop ends it cleanly (drained, exit 0)" \
  bash -c "docker stop -t 30 $P-gateway >/dev/null && test \"\$(docker inspect -f '{{.State.ExitCode}}' $P-gateway)\" = 0"

echo "== all interfaces without TLS and without allow_insecure"
sed '/allow_insecure: true/d' docker/gateway.yaml >"$WORK/insecure.yaml"
chmod 0644 "$WORK/insecure.yaml"
timeout 30 docker run --name "$P-bad" -v "$WORK/insecure.yaml:/etc/llm-gateway/gateway.yaml:ro" \
  -v "$WORK/keys.yaml:/etc/llm-gateway/keys.yaml:ro" "$IMAGE" >"$WORK/bad.log" 2>&1
code=$(docker inspect -f '{{.State.ExitCode}} {{.State.Running}}' "$P-bad")
check "the gateway refuses to start (exit code, running: $code)" bash -c "[[ '$code' =~ ^[1-9][0-9]*' false'$ ]]"
check "and says why" grep -q "allow_insecure" "$WORK/bad.log"
sed 's/^/    /' "$WORK/bad.log" | head -3

if ((failed)); then echo "docker check: FAILED"; exit 1; fi
echo "docker check: passed"
