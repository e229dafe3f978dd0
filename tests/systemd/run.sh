#!/usr/bin/env bash
# Runs tests/systemd/check.sh under a real systemd: a Debian 12 container whose PID 1 is
# systemd 252, with this checkout and its release binary mounted. Not part of the test
# command (it needs root, Docker and network access for the image); run it after changing
# the unit, the Debian package's files or the upgrade path:
#
#   cargo build --release -p llm-gateway
#   sudo tests/systemd/run.sh
#   # or the Debian package, installed with apt as a user would:
#   cargo deb -p llm-gateway --no-build && sudo DEB=$(ls target/debian/llm-gateway_*.deb) tests/systemd/run.sh
#
# The image is made once with debootstrap (no registry needed) and kept as
# llm-gateway-systemd-check:bookworm. Where the container may not have every capability
# (`--privileged` fails with "unable to apply caps" in some sandboxes), it gets each one
# this shell has.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=llm-gateway-systemd-check:bookworm
BIN=$(realpath "${GATEWAY_BIN:-target/release/llm-gateway}")
for tool in docker debootstrap; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install docker.io debootstrap)" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "no binary at $BIN: cargo build --release -p llm-gateway" >&2; exit 1; }

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  root=$(mktemp -d /tmp/systemd-root.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus curl nginx procps adduser'
  chroot "$root" sh -c 'systemctl disable nginx; systemctl mask getty@tty1.service console-getty.service systemd-logind.service' >/dev/null 2>&1
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import --change 'CMD ["/lib/systemd/systemd"]' --change 'ENV container=docker' - "$IMAGE"
  rm -rf "$root"
  trap - EXIT
fi

# Every capability in this shell's bounding set, by name (bit numbers of capability.h): what
# a container started from here can be given at most.
caps() {
  local names=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
    LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER
    SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE
    SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP
    MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ)
  local have=$((16#$(awk '/^CapBnd/ {print $2}' /proc/self/status))) i
  for i in "${!names[@]}"; do (((have >> i) & 1)) && printf -- '--cap-add %s ' "${names[$i]}"; done
}
name=llm-gateway-systemd-check-$$
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
mounts=(-v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock
  -v "$PWD:/mnt/repo:ro" -v "$BIN:/mnt/llm-gateway:ro")
if [[ -n ${DEB:-} ]]; then
  mounts+=(-v "$(realpath "$DEB"):/mnt/pkg/llm-gateway.deb:ro")
fi
if ! docker run -d --name "$name" --privileged --cgroupns=host "${mounts[@]}" "$IMAGE" >/dev/null 2>&1; then
  docker rm -f "$name" >/dev/null 2>&1 || true
  # shellcheck disable=SC2046
  docker run -d --name "$name" $(caps) --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --cgroupns=host "${mounts[@]}" "$IMAGE" >/dev/null
fi
# The host's cgroup tree is mounted read-write: systemd in the container needs its own
# subtree writable on a cgroup v1 host (the container is a throwaway test machine).
for _ in $(seq 120); do
  # Until systemd listens, `systemctl` cannot connect and answers at once.
  state=$(docker exec "$name" timeout 60 systemctl is-system-running --wait 2>/dev/null || true)
  [[ $state == running || $state == degraded ]] && break
  sleep 0.5
done
[[ $state == running || $state == degraded ]] || { echo "systemd did not come up: ${state:-no answer}" >&2; exit 1; }
echo "container: systemd $(docker exec "$name" systemctl --version | awk 'NR == 1 {print $2}'), $state"
docker exec "$name" bash /mnt/repo/tests/systemd/check.sh
