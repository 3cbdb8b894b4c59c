#!/usr/bin/env bash
# The demo (Linux, root): the whole tunnel against the local AWS emulator, in the
# four-namespace lab of scripts/lab.sh. `ssm-proxy start` runs in "laptop" and routes
# 10.10.0.0/16 through the emulated Session Manager to the real ec2-agent in
# "instance", which `ssm-proxy agent install` first puts there through a shell
# session; plain psql, curl, dig and ping then reach the servers in "vpc".
# Everything is torn down on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: needs root (network namespaces, a TUN device); try: sudo make demo" >&2; exit 1; }
bash scripts/ensure-deps.sh
echo "==> building ssm-proxy, ec2-agent and ssm-emulator"
cargo build --quiet --locked -p ssm-proxy -p ec2-agent -p ssm-emulator
BIN=$(realpath "${CARGO_TARGET_DIR:-target}/debug")
export LAB=demo BLOB_MIB=${BLOB_MIB:-50}
daemon=
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  bash scripts/lab.sh down
}
trap cleanup EXIT INT TERM

echo "==> namespaces laptop, aws (emulator), instance (ec2-agent as nobody), vpc (PostgreSQL, HTTP, DNS)"
bash scripts/lab.sh up "$BIN"
envs=$(bash scripts/lab.sh env | xargs)
laptop() { ip netns exec demo-laptop env $envs "$@"; }
DIR=/tmp/ssm-proxy-demo

echo "==> [laptop] ssm-proxy agent install --instance-id i-0123456789abcdef0 --agent-port 7302 (through SSM;"
echo "    the lab has no systemd, hence --no-systemd, and a prefix of its own)"
laptop "$BIN/ssm-proxy" agent install --instance-id i-0123456789abcdef0 --agent-port 7302 \
  --no-systemd --prefix "$DIR/instance-root" 2>&1 | sed 's/^/    /'
echo "==> [laptop] sudo ssm-proxy start --instance-id i-0123456789abcdef0 --cidr 10.10.0.0/16 --agent-port 7302"
laptop "$BIN/ssm-proxy" start --instance-id i-0123456789abcdef0 --cidr 10.10.0.0/16 --agent-port 7302 --name demo \
  > "$DIR/daemon.out" 2> "$DIR/daemon.log" &
daemon=$!
for _ in $(seq 300); do grep -q ' up: ' "$DIR/daemon.out" 2>/dev/null && break; sleep 0.1; done
grep ' up: ' "$DIR/daemon.out" || { echo "demo: the tunnel did not come up:" >&2; cat "$DIR/daemon.log" >&2; exit 1; }
echo "==> [laptop] ip route"
laptop ip route | sed 's/^/    /'

echo "==> [laptop] psql -h 10.10.0.2 -U postgres -c 'select version()'"
laptop psql -h 10.10.0.2 -U postgres -tAc "select 'PostgreSQL says: ' || version()" | sed 's/^/    /'
echo "==> [laptop] curl http://10.10.0.2:8080/blob (${BLOB_MIB} MiB)"
laptop curl -sS -o "$DIR/got" -w "    %{size_download} bytes in %{time_total} s (%{speed_download} B/s)\n" http://10.10.0.2:8080/blob
echo "    sha256 served   $(cat "$DIR/blob.sha256")"
echo "    sha256 received $(sha256sum "$DIR/got" | cut -d' ' -f1)"
[ "$(cat "$DIR/blob.sha256")" = "$(sha256sum "$DIR/got" | cut -d' ' -f1)" ] || { echo "demo: FAILED: download differs" >&2; exit 1; }
echo "==> [laptop] dig @10.10.0.2 db.corp.internal"
laptop dig +short +time=3 +tries=1 @10.10.0.2 db.corp.internal | sed 's/^/    /'
echo "==> [laptop] ping -c 3 10.10.0.2"
laptop ping -c 3 -i 0.2 10.10.0.2 | tail -2 | sed 's/^/    /'
echo "==> [laptop] ssm-proxy status (as an ordinary user)"
laptop runuser -u nobody -- "$BIN/ssm-proxy" status | sed 's/^/    /'
echo "==> [laptop] sudo ssm-proxy stop"
laptop "$BIN/ssm-proxy" stop | sed 's/^/    /'
wait "$daemon" || true
daemon=
echo "==> [laptop] ip route (the tunnel's route is gone)"
laptop ip route | sed 's/^/    /'
echo "==> demo done; tearing the lab down"
