#!/usr/bin/env bash
# Type-check (clippy, -D warnings) the whole workspace for aarch64 and x86_64 macOS
# on this Linux machine, with no Mac SDK: Debian's rustc-web (>= 1.94) with its std
# source (-Zbuild-std) and zig as the target C compiler for crates with C parts (ring).
# macOS cannot run here; this plus unit tests of the pure macOS logic is the safety net.
#
# Cold: about 13 minutes per target on 2 cores (the AWS SDK dominates); warm: seconds.
# Any change of RUSTFLAGS, MACOSX_DEPLOYMENT_TARGET, the zig path or CARGO_TARGET_DIR
# forces a full rebuild, so all of them are fixed here.
# Env: TARGETS (default both), MACOS_TARGET_DIR (default target/macos-cross), ZIGENV.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${TARGETS:-"aarch64-apple-darwin x86_64-apple-darwin"}
if ! /usr/bin/rustc -V 2>/dev/null | grep -qE '^rustc 1\.(9[4-9]|1[0-9][0-9])\.'; then
  echo "check-macos: installing Debian's rustc-web toolchain (needed: rustc >= 1.94 with std source)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rustc-web cargo-web rust-web-src rust-web-clippy >/dev/null
fi
ZIGENV=${ZIGENV:-/opt/ssm-proxy-zigbuild}
# shellcheck source=scripts/zig-env.sh
. scripts/zig-env.sh
ensure_zig check-macos
# Debian's cargo and clippy first, so they match Debian's rustc and its std source.
export PATH="$ZIGENV/bin:/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 MACOSX_DEPLOYMENT_TARGET=11.0
export CARGO_TARGET_DIR=${MACOS_TARGET_DIR:-$PWD/target/macos-cross}
for t in $TARGETS; do
  echo "check-macos: $t" >&2
  cargo-zigbuild clippy --locked -Zbuild-std=std,panic_abort --target "$t" --workspace --all-targets -- -D warnings
done
echo "check-macos: ok ($TARGETS)"
