#!/usr/bin/env bash
# The systemd unit under a real systemd: runs inside a machine or container whose PID 1 is
# systemd (tests/systemd/run.sh starts one with Docker), with the repository at /mnt/repo and
# the binary at /mnt/llm-gateway. Installs the gateway the way the Debian package does, then
# checks start (Type=notify), the sandbox, reload (SIGHUP), upgrades in place
# (`systemctl kill -s USR2`) under steady load, a failed upgrade, and stop. Exit 1 on any
# failed check; needs curl, nginx and ps in that machine.
set -uo pipefail
failed=0
say() { printf '\n== %s\n' "$*"; }
check() { # check DESCRIPTION COMMAND...
  if "${@:2}"; then echo "ok   $1"; else echo "FAIL $1"; failed=1; fi
}
R=/mnt/repo
unit() { systemctl show -p "$1" --value llm-gateway; }

# With /mnt/pkg/llm-gateway.deb (`cargo deb`): installed as a user would, `apt install`.
# Without: the binary, unit and /etc/llm-gateway installed by hand the way the package does.
DEB=/mnt/pkg/llm-gateway.deb
if [[ -f $DEB ]]; then
  say "apt install ./llm-gateway_*.deb"
  check "the package installs" apt-get install -y -qq "$DEB"
  check "it puts the unit where systemd finds it" systemctl cat llm-gateway.service
  check "installing started nothing" bash -c "! systemctl is-active -q llm-gateway && ! curl -s -m 1 -o /dev/null http://127.0.0.1:8080/"
else
  install -m 0755 /mnt/llm-gateway /usr/bin/llm-gateway
  mkdir -p /etc/llm-gateway
  cp "$R/conf/debian/gateway.yaml" /etc/llm-gateway/gateway.yaml
  cp "$R/conf/debian/keys.yaml" /etc/llm-gateway/keys.yaml
  sh "$R/conf/debian/postinst" configure >/dev/null 2>&1
  install -m 0644 "$R/conf/llm-gateway.service" /etc/systemd/system/llm-gateway.service
  systemctl daemon-reload
fi
UNIT_FILE=$(systemctl show -p FragmentPath --value llm-gateway)
# The load below is one client's steady stream of requests: no rate limit in its way.
sed -i 's|rate: 60/m|rate: 1000000/m|; s|burst: 10$|burst: 100000|' /etc/llm-gateway/gateway.yaml
# add_key ID: a new key in keys.yaml (as its comments say to); prints the key.
add_key() {
  llm-gateway keys new --id "$1" --name "$1" >"/tmp/key-$1.txt"
  sed -i '/^keys: \[\]$/c keys:' /etc/llm-gateway/keys.yaml
  sed -n '4,$p' "/tmp/key-$1.txt" >>/etc/llm-gateway/keys.yaml
  sed -n 2p "/tmp/key-$1.txt"
}
K1=$(add_key admin)

# The model server: fixed answers on Ollama's port.
mkdir -p /tmp/up/tmp
cat >/tmp/up/nginx.conf <<'NGINX'
worker_processes 1;
pid /tmp/up/nginx.pid;
error_log /tmp/up/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path /tmp/up/tmp;
  default_type application/json;
  server {
    listen 127.0.0.1:11434;
    location = / { default_type text/plain; return 200 'Ollama is running'; }
    location = /api/version { return 200 '{"version":"0.5.7"}'; }
    location = /api/tags { return 200 '{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b"}]}'; }
    location = /v1/chat/completions {
      return 200 '{"id":"c1","object":"chat.completion","created":1,"model":"llama3.2:1b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}';
    }
  }
}
NGINX
nginx -c /tmp/up/nginx.conf
chat() {
  curl -s -o /dev/null -w '%{http_code}' -m 5 -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
    -d '{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":false}' \
    http://127.0.0.1:8080/v1/chat/completions
}
# load FILE: requests one after another until /tmp/load.stop exists; FILE gets
# "answered failed codes…".
load() {
  local ok=0 bad=0 codes="" c
  while [[ ! -e /tmp/load.stop ]]; do
    c=$(chat "$K1")
    if [[ $c == 200 ]]; then ok=$((ok + 1)); else bad=$((bad + 1)); codes="$codes $c"; fi
  done
  echo "$ok $bad$codes" >"$1"
}

say "start (Type=notify)"
check "postinst made the service user" getent passwd llm-gateway
check "the config is root:llm-gateway 0640" test "$(stat -c %U:%G:%a /etc/llm-gateway/gateway.yaml)" = root:llm-gateway:640
check "systemctl enable --now succeeds" systemctl enable --now llm-gateway
check "the unit is active" test "$(unit ActiveState)" = active
check "it runs as llm-gateway" test "$(ps -o user= -p "$(unit MainPID)")" = llm-gateway
check "state and log folders are llm-gateway 0700" test \
  "$(stat -c %U:%a /var/lib/llm-gateway /var/log/llm-gateway | sort -u)" = llm-gateway:700
check "/health answers" curl -sf -m 2 -o /dev/null http://127.0.0.1:9091/health
check "a request with the key is proxied (200)" test "$(chat "$K1")" = 200
check "a request without a valid key is refused (401)" test "$(chat sk-wrong)" = 401

say "sandbox"
exposure=$(systemd-analyze security llm-gateway --no-pager | awk '/Overall exposure level/ {print $(NF-2)}')
echo "systemd-analyze security: $exposure"
check "exposure at most 2.5" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.5) }'
check "systemd-analyze verify passes" systemd-analyze verify "$UNIT_FILE"
pid=$(unit MainPID)
check "the service's mount namespace can be entered" nsenter -t "$pid" -m test -d /var/lib/llm-gateway
check "the service cannot write its config (ProtectSystem=strict)" \
  bash -c "nsenter -t $pid -m touch /etc/llm-gateway/x 2>&1 | grep -q 'Read-only file system'"
touch /root/llm-gateway-marker
check "the service does not see /root (ProtectHome)" bash -c "! nsenter -t $pid -m test -e /root/llm-gateway-marker"

say "reload (SIGHUP)"
pid=$(unit MainPID)
K2=$(add_key second)
check "a key not yet loaded is refused" test "$(chat "$K2")" = 401
systemctl reload llm-gateway
sleep 0.5
check "after reload the new key works" test "$(chat "$K2")" = 200
check "reload kept the process" test "$(unit MainPID)" = "$pid"

say "upgrades in place under load (systemctl kill -s USR2, three times)"
audit=/var/log/llm-gateway/audit.jsonl
before=$(wc -l <"$audit")
rm -f /tmp/load.stop
load /tmp/load.txt &
loader=$!
sleep 1
for i in 1 2 3; do
  check "upgrade $i: under load" kill -0 "$loader"
  old=$(unit MainPID)
  systemctl kill -s USR2 llm-gateway
  new=$old
  for _ in $(seq 60); do
    sleep 0.2
    new=$(unit MainPID)
    [[ $new != "$old" && ! -d /proc/$old ]] && break
  done
  check "upgrade $i: a new main process ($old -> $new)" test "$new" != "$old"
  check "upgrade $i: the old process is gone" test ! -d "/proc/$old"
  check "upgrade $i: the new process is systemd's own child" test "$(ps -o ppid= -p "$new" | tr -d ' ')" = 1
  check "upgrade $i: the unit stays active" test "$(unit ActiveState)" = active
done
sleep 1
touch /tmp/load.stop
wait "$loader"
read -r ok bad codes </tmp/load.txt
echo "load during the upgrades: $ok answered 200, $bad did not ${codes:-}"
check "no request failed during the upgrades" test "$bad" = 0
check "requests were served throughout" test "$ok" -gt 50
check "no restart" test "$(unit NRestarts)" = 0

say "an upgrade that fails leaves the running process serving"
cp /etc/llm-gateway/gateway.yaml /tmp/gateway.yaml.good
echo "bogus_key: 1" >>/etc/llm-gateway/gateway.yaml
pid=$(unit MainPID)
systemctl kill -s USR2 llm-gateway
sleep 2
check "same main process" test "$(unit MainPID)" = "$pid"
check "still serving" test "$(chat "$K1")" = 200
check "the journal says it failed" bash -c "journalctl -u llm-gateway --no-pager | grep -q 'ended before taking the sockets over'"
check "and why" bash -c "journalctl -u llm-gateway --no-pager | grep -q 'unknown field .bogus_key.'"
cp /tmp/gateway.yaml.good /etc/llm-gateway/gateway.yaml

say "stop after the upgrades: drained and flushed, not killed"
check "systemctl stop succeeds" systemctl stop llm-gateway
check "the stop ended in success" test "$(unit Result)" = success
check "nothing was SIGKILLed" bash -c "! journalctl -u llm-gateway --no-pager | grep -q SIGKILL"
check "systemd never lost track of its main process" bash -c "! journalctl -u llm-gateway --no-pager | grep -q 'not our child'"
lines=$(($(wc -l <"$audit") - before))
echo "audit lines since the load began: $lines (requests answered under load: $ok, then 1 more)"
check "every request answered under load has its audit line" test "$lines" -ge "$ok"
check "no raw key in the audit log" bash -c "test -s $audit && ! grep -qF -e '$K1' -e '$K2' $audit"

say "journal (last lines)"
journalctl -u llm-gateway --no-pager | grep -v pingora_core | tail -8
echo
if ((failed)); then echo "systemd check: FAILED"; exit 1; fi
echo "systemd check: passed"
