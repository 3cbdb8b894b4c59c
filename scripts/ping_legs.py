#!/usr/bin/env python3
"""Where a ping's time goes through the tunnel: the way up (laptop to vpc) and
the way down (vpc to laptop), idle and under a one-flow bulk download, from
tcpdump in the laptop's and the vpc's namespaces (one machine, one clock).

  sudo scripts/ping_legs.py [--bin target/release] [--sessions 4] [--link 40ms]
                            [--profile stock] [--count 400] [--emulator-rt]

Brings the bench's namespace lab up (scripts/bench_tunnel.py), starts a tunnel
with that many sessions, sends COUNT pings 50 ms apart idle and then under an
iperf3 download, and prints p50 / p90 / p99 / max of each leg and of the whole
round trip. Numbers, not asserts. tcpdump may miss some packets under load; the
pings it saw at both ends are the ones counted (n=).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tunnel as b  # noqa: E402

ECHO = re.compile(r"([\d.]+) .*ICMP echo (request|reply), id \d+, seq (\d+)")


def capture(which):
    """tcpdump in `which`'s namespace, into a file (a pipe left unread fills and loses packets)."""
    out = open(f"{b.DIR}/legs-{which}.txt", "w+")
    return subprocess.Popen(b.inn(which, ["tcpdump", "-i", "any", "-n", "-tt", "-l", "icmp"]),
                            stdout=out, stderr=subprocess.DEVNULL, text=True), out


def events(capturing):
    """(kind, seq) -> first time seen, from a tcpdump that is stopped here."""
    proc, out = capturing
    proc.terminate()
    proc.wait()
    with out:
        out.seek(0)
        lines = out.read().splitlines()
    seen = {}
    for line in lines:
        m = ECHO.match(line)
        if m:
            seen.setdefault((m.group(2), int(m.group(3))), float(m.group(1)))
    return seen


def quantiles(values):
    v = sorted(values)
    if not v:
        return "no pings seen at both ends"
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]
    return f"p50 {q(0.5):.1f} p90 {q(0.9):.1f} p99 {q(0.99):.1f} max {v[-1]:.1f} ms (n={len(v)})"


def legs(count, loaded):
    laptop, vpc = capture("laptop"), capture("vpc")
    time.sleep(1)
    bulk = None
    try:
        if loaded:
            bulk = subprocess.Popen(b.inn("laptop", ["iperf3", "-c", "10.10.0.2", "-R", "-t", str(count * 0.05 + 6)]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(3)
        b.sh(b.inn("laptop", ["ping", "-c", str(count), "-i", "0.05", "-W", "5", "10.10.0.2"]), check=False)
    finally:
        if bulk:
            bulk.kill()
            bulk.wait()
        time.sleep(0.5)
        at_laptop, at_vpc = events(laptop), events(vpc)
    up, down, rtt = [], [], []
    for (kind, seq), sent in at_laptop.items():
        keys = [("request", seq), ("reply", seq)]
        if kind != "request" or not all(k in at_vpc for k in keys) or ("reply", seq) not in at_laptop:
            continue
        up.append((at_vpc[("request", seq)] - sent) * 1e3)
        down.append((at_laptop[("reply", seq)] - at_vpc[("reply", seq)]) * 1e3)
        rtt.append((at_laptop[("reply", seq)] - sent) * 1e3)
    what = "under download" if loaded else "idle"
    for name, values in (("round trip", rtt), ("way up", up), ("way down", down)):
        print(f"{what:15} {name:10} {quantiles(values)}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(b.ROOT, "target/release"))
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--link", choices=["clean", "40ms"], default="40ms")
    ap.add_argument("--profile", choices=["fast", "stock"], default="stock")
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--emulator-rt", action="store_true", help="the emulator at real-time priority (bench_tunnel.py)")
    a = ap.parse_args()
    b.EMULATOR_RT = a.emulator_rt
    if os.geteuid() != 0:
        sys.exit("ping_legs.py: needs root (network namespaces)")
    missing = [t for t in ("tcpdump", "iperf3", "ping") if not shutil.which(t)]
    if missing:
        sys.exit(f"ping_legs.py: needs {', '.join(missing)} (apt-get install tcpdump iperf3 iputils-ping)")
    os.makedirs(b.DIR, exist_ok=True)
    impair = "20 0" if a.link == "40ms" else ""
    print(f"{a.profile} profile, {a.sessions} sessions, {a.link} link, {a.count} pings 50 ms apart", flush=True)
    with b.lab(a.bin, a.profile, impair):
        tunnel = b.start_tunnel(a.bin, a.sessions)
        try:
            time.sleep(2)
            legs(a.count, loaded=False)
            legs(a.count, loaded=True)
        finally:
            b.stop_tunnel(tunnel)


if __name__ == "__main__":
    main()
