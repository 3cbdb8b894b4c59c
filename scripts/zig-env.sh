# Sourced by check-macos.sh and dist.sh: zig (PyPI ziglang) and cargo-zigbuild,
# pinned, in a venv at $ZIGENV (installed there when missing). The caller puts
# $ZIGENV/bin first in PATH: cargo-zigbuild finds zig through that python.
ensure_zig() { # ensure_zig WHO
  if [ ! -x "$ZIGENV/bin/cargo-zigbuild" ]; then
    echo "$1: installing zig and cargo-zigbuild into $ZIGENV" >&2
    python3 -m venv "$ZIGENV"
    "$ZIGENV/bin/pip" install -q ziglang==0.17.1 cargo-zigbuild==0.24.0
  fi
}
