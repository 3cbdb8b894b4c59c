#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine, skipping
# whatever is already there. Run as root (or with sudo).
set -euo pipefail
need=()
command -v cargo >/dev/null || { echo "ensure-deps: cargo is missing; install Rust (rustup) first" >&2; exit 1; }
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v make >/dev/null || need+=(make)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
# The namespace lab: real servers and clients.
command -v psql >/dev/null || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v nc >/dev/null || need+=(netcat-openbsd)
command -v setpriv >/dev/null || need+=(util-linux)
command -v tinyproxy >/dev/null || need+=(tinyproxy)
# `service install`'s unit is checked with systemd-analyze verify.
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-deps: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
