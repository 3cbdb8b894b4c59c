#!/usr/bin/env bash
# Release binaries in dist/: ssm-proxy and ec2-agent, statically linked (musl),
# for x86_64 and aarch64 Linux, one tar.gz per target, and SHA256SUMS.
# zig (through cargo-zigbuild) is the C compiler and linker for every target,
# so nothing else is needed for the cross build (ring has C parts).
#
# macOS binaries are not built here: a Linux machine has no macOS SDK to link
# the Security and CoreFoundation frameworks against. release.yml builds them
# on a macOS runner; `make check-macos` type-checks them here.
#
# Env: DIST_TARGETS (default both musl targets), DIST_DIR (default dist), ZIGENV.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${DIST_TARGETS:-"x86_64-unknown-linux-musl aarch64-unknown-linux-musl"}
OUT=${DIST_DIR:-dist}
# The same zig as check-macos.sh when root; a user cache otherwise (CI runners).
if [ "$(id -u)" = 0 ]; then ZIGENV=${ZIGENV:-/opt/ssm-proxy-zigbuild}; else ZIGENV=${ZIGENV:-$HOME/.cache/ssm-proxy-zigbuild}; fi
# shellcheck source=scripts/zig-env.sh
. scripts/zig-env.sh
ensure_zig dist
# The venv first: cargo-zigbuild finds zig through its python (ziglang).
export PATH="$ZIGENV/bin:$PATH"
command -v rustup >/dev/null || { echo "dist: needs rustup (for the musl standard libraries)" >&2; exit 1; }
version=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "ssm-proxy"))')
mkdir -p "$OUT/agents"
for t in $TARGETS; do
  echo "dist: $t" >&2
  rustup target add "$t" >/dev/null
  cargo-zigbuild build --release --locked --target "$t" -p ssm-proxy -p ec2-agent
  bin="target/$t/release"
  for b in ssm-proxy ec2-agent; do
    # Static, or it is not the binary we promise.
    if ! file "$bin/$b" | grep -q "static"; then
      echo "dist: $bin/$b is not statically linked: $(file -b "$bin/$b")" >&2
      exit 1
    fi
  done
  # `ssm-proxy agent install` sends ec2-agent-linux-ARCH found next to itself.
  cp "$bin/ec2-agent" "$OUT/agents/ec2-agent-linux-${t%%-*}"
  ls -l "$bin/ssm-proxy" "$bin/ec2-agent" | awk '{printf "dist:   %s %.1f MiB\n", $NF, $5 / 1048576}' >&2
done
# Each archive: its ssm-proxy and ec2-agent, and the agents of every built
# architecture for installing on instances of another one.
agents=$(cd "$OUT/agents" && pwd)
for t in $TARGETS; do
  tar -czf "$OUT/ssm-proxy-$version-$t.tar.gz" -C "target/$t/release" ssm-proxy ec2-agent \
    -C "$agents" $(cd "$agents" && ls) -C "$PWD" LICENSE README.md packaging/ec2-agent.service
done
# The one this machine can run, run.
host="$(uname -m)-unknown-linux-musl"
if [[ " $TARGETS " == *" $host "* ]]; then
  "target/$host/release/ssm-proxy" --version
  "target/$host/release/ec2-agent" --version
fi
(cd "$OUT" && sha256sum ./*.tar.gz | sed 's| \./| |' > SHA256SUMS && cat SHA256SUMS)
