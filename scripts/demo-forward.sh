#!/usr/bin/env bash
# The demo: ssm-proxy against the local AWS emulator. An HTTP server stands for
# a service on the instance; `ssm-proxy forward` carries a real curl download
# to it over a native Session Manager data channel, through the real AWS SDK
# (SigV4-verified by the emulator). Everything listens on 127.0.0.1 and is torn
# down on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
echo "==> building ssm-proxy and ssm-emulator"
cargo build --quiet -p ssm-proxy -p ssm-emulator
BIN=${CARGO_TARGET_DIR:-target}/debug

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_for() { # file, pattern, seconds
  for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; return 1
}

head -c $((20 * 1024 * 1024)) /dev/urandom > "$work/data.bin"
python3 -m http.server --bind 127.0.0.1 0 --directory "$work" > "$work/http.log" 2>&1 &
pids+=($!)
wait_for "$work/http.log" "Serving HTTP" 10
http_port=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$work/http.log" | head -1)
echo "==> 'instance' service: HTTP on 127.0.0.1:$http_port"

"$BIN/ssm-emulator" --listen 127.0.0.1:0 --instance i-0123456789abcdef0=127.0.0.1 > "$work/emu.out" 2> "$work/emu.log" &
pids+=($!)
wait_for "$work/emu.out" "listening on" 10
endpoint=$(sed -n 's/.*AWS_ENDPOINT_URL=\([^)]*\)).*/\1/p' "$work/emu.out")
echo "==> emulator (SSM API + ssmmessages + agent): $endpoint"

export AWS_ENDPOINT_URL=$endpoint AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
  AWS_ACCESS_KEY_ID=AKIAEMULATOR00000001 AWS_SECRET_ACCESS_KEY=emulator/secret/key/000000000000000000000
echo "==> ssm-proxy forward --instance-id i-0123456789abcdef0 --remote-port $http_port"
"$BIN/ssm-proxy" forward --instance-id i-0123456789abcdef0 --remote-port "$http_port" > "$work/fwd.out" 2> "$work/fwd.log" &
fwd=$!
pids+=($fwd)
wait_for "$work/fwd.out" "Forwarding" 30
cat "$work/fwd.out"
local_addr=$(awk '{print $2}' "$work/fwd.out")

echo "==> curl http://$local_addr/data.bin (20 MiB through the session)"
curl -sS -o "$work/got.bin" -w "    %{size_download} bytes in %{time_total} s\n" "http://$local_addr/data.bin"
want=$(sha256sum < "$work/data.bin" | cut -d' ' -f1)
got=$(sha256sum < "$work/got.bin" | cut -d' ' -f1)
echo "    sha256 sent     $want"
echo "    sha256 received $got"
[ "$want" = "$got" ] || { echo "demo: FAILED: the download differs" >&2; exit 1; }

echo "==> Ctrl-C to ssm-proxy: TerminateSession flag, then the TerminateSession API"
kill -INT "$fwd"
wait "$fwd" || true
grep -E "ended" "$work/fwd.log" | sed 's/^/    /'
echo "==> demo passed"
