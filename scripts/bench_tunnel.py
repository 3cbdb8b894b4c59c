#!/usr/bin/env python3
"""Tunnel benchmark in the namespace lab (root): throughput, request/response rate
and ping latency, idle and under a bulk download, for

  direct   plain kernel routing laptop -> wan -> aws -> instance -> vpc (the floor),
  tunnel   ssm-proxy through the emulator (`fast` and `stock` profiles),
  openvpn  OpenVPN 2.6 in TCP mode laptop -> instance, packets over one TCP stream,
           and the same through a user-space TCP relay (socat) in the aws
           namespace: as many user-space hops as the tunnel (daemon, emulator,
           ec2-agent), to tell the cost of a hop from the cost of our code,

on the clean link and on a 40 ms RTT link (netem-lite, 20 ms each way). Prints a
Markdown table. Numbers, not asserts. "tunnel fast" and "tunnel stock" use one
SSM session; "tunnel stock x4" stripes over four.

  sudo scripts/bench_tunnel.py [--seconds 10] [--bin target/release] [--quick]
                               [--paths "tunnel fast,tunnel stock x4"] [--links clean]
                               [--costs] [--striped [--json FILE]] [--emulator-rt]

--striped measures striped sessions instead: the stock profile with 1, 2, 4 and
8 sessions (--sessions "1,2,4,8") on both links: one TCP flow's download, four
flows' download, and ping p50/p99 idle and under the one-flow download; then,
per link, the same pings on the direct path under a download capped at the
fastest tunnel's rate (what the lab itself adds to a ping); the rows also go
to FILE as JSON (scripts/plot_striping.py draws the tunnel's).

--emulator-rt runs the emulator at real-time priority (SCHED_FIFO). It plays
AWS's side and the instance's agent, which have machines of their own; here
they share two cores with the laptop's daemon, iperf3 and netem-lite, and the
scheduler keeps one session's pacing loop waiting 5-11 ms now and then, which
a paced session turns into a queue for one round trip (README). Rows measured
so carry "emulator_rt" in the JSON.

--costs adds, for tunnel paths, what one pgbench transaction costs each of the
three processes on the way (daemon, emulator, ec2-agent): system calls and
context switches, counted with `perf stat` during one more pgbench run.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = "bench"
DIR = f"/tmp/ssm-proxy-{LAB}"
# Run the emulator (AWS's side and the instance's agent) at real-time priority
# (--emulator-rt): as if it had a machine of its own.
EMULATOR_RT = False


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stdout}{r.stderr}")
    return r.stdout


def ns(which):
    return f"{LAB}-{which}"


def inn(which, cmd):
    return ["ip", "netns", "exec", ns(which)] + cmd


def lab_env():
    out = sh(["bash", f"{ROOT}/scripts/lab.sh", "env"], env={**os.environ, "LAB": LAB})
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def lab_up(bin_dir, profile, impair):
    env = {**os.environ, "LAB": LAB, "PROFILE": profile, "BLOB_MIB": "1"}
    if impair:
        env["IMPAIR"] = impair
    sh(["bash", f"{ROOT}/scripts/lab.sh", "up", bin_dir], env=env, stdin=subprocess.DEVNULL)
    if EMULATOR_RT:
        pids = sh(["pgrep", "-f", "ssm-emulator --listen"], check=False).split()
        if not pids:
            raise RuntimeError("--emulator-rt: no emulator running")
        for pid in pids:
            sh(["chrt", "--fifo", "--all-tasks", "--pid", "50", pid])
    # iperf3 server and pgbench tables in the vpc.
    subprocess.Popen(inn("vpc", ["iperf3", "-s", "-B", "10.10.0.2", "-D"]), stdout=subprocess.DEVNULL)
    sh(inn("vpc", ["pgbench", "-i", "-q", "-h", "10.10.0.2", "-U", "postgres", "postgres"]))
    time.sleep(0.5)


def lab_down():
    sh(["bash", f"{ROOT}/scripts/lab.sh", "down"], env={**os.environ, "LAB": LAB}, check=False)


@contextlib.contextmanager
def lab(bin_dir, profile, impair):
    """The lab up for the body of a `with`, and down after it however it ends."""
    lab_up(bin_dir, profile, impair)
    try:
        yield
    finally:
        lab_down()


def pings(count, interval):
    out = sh(inn("laptop", ["ping", "-c", str(count), "-i", str(interval), "-W", "5", "10.10.0.2"]), check=False)
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    if not times:
        return None
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return p(0.5), p(0.99), count - len(times)


def iperf(seconds, reverse, flows=1):
    args = ["iperf3", "-c", "10.10.0.2", "-t", str(seconds), "-J", "-P", str(flows)] + (["-R"] if reverse else [])
    for _ in range(3):  # the server takes one test at a time and may still be closing the last
        out = sh(inn("laptop", args), check=False)
        m = re.search(r'"sum_received":\s*{[^}]*"bits_per_second":\s*([\d.e+]+)', out)
        if m:
            return float(m.group(1)) / 1e6
        time.sleep(2)
    return None


def rr_rate(seconds):
    """Request/response rate over one TCP connection: pgbench select-only."""
    out = sh(inn("laptop", ["pgbench", "-h", "10.10.0.2", "-U", "postgres", "-n", "-S", "-c", "1", "-T", str(seconds),
                            "postgres"]), check=False)
    m = re.search(r"tps = ([\d.]+)", out)
    return float(m.group(1)) if m else None


def process_costs(seconds, daemon_pid):
    """Syscalls and context switches per pgbench transaction, per process on the tunnel's path."""
    pids = {"daemon": str(daemon_pid)}
    for name, pattern in (("emulator", "ssm-emulator --listen"), ("ec2-agent", "ec2-agent --listen 127.0.0.1")):
        found = sh(["pgrep", "-f", pattern], check=False).split()
        if found:
            pids[name] = found[0]
    perfs = {name: subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches",
                                     "-p", pid, "--", "sleep", str(seconds + 1)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, pid in pids.items()}
    time.sleep(0.5)
    tps = rr_rate(seconds)
    out = {}
    for name, perf in perfs.items():
        counts = {}
        for line in perf.communicate()[1].splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2]] = float(f[0])
        out[name] = counts
    if not tps:
        return None
    tx = tps * seconds
    return {name: (c.get("raw_syscalls:sys_enter", 0) / tx, c.get("context-switches", 0) / tx)
            for name, c in out.items()}, tps


def pings_idle_and_under_bulk(seconds, rate=None):
    """Ping percentiles idle, then during a one-flow iperf3 download (capped at
    `rate` Mbit/s if given)."""
    # 100 pings a second, so that a p99 is the 10th-worst of 1,000 under the
    # download (of 200, it was the 2nd-worst, and moved by several ms from run
    # to run) and the 5th-worst of 500 idle.
    idle = pings(500, 0.01)
    cap = ["-b", f"{rate:.1f}M"] if rate else []
    bulk = subprocess.Popen(inn("laptop", ["iperf3", "-c", "10.10.0.2", "-R", "-t", str(seconds + 4)] + cap),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    loaded = pings(max(500, seconds * 100), 0.01)
    bulk.wait()
    time.sleep(1)
    return idle, loaded


def measure(seconds):
    idle, loaded = pings_idle_and_under_bulk(seconds)
    down = iperf(seconds, True)
    up = iperf(seconds, False)
    rr = rr_rate(seconds)
    return {"down": down, "up": up, "rr": rr, "idle": idle, "loaded": loaded}


def measure_striped(seconds):
    idle, loaded = pings_idle_and_under_bulk(seconds)
    down1 = iperf(seconds, True)
    down4 = iperf(seconds, True, flows=4)
    return {"down1": down1, "down4": down4, "idle": idle, "loaded": loaded}


def tunnel_path(what):
    """("fast" | "stock", sessions) of a path named "tunnel PROFILE" or "tunnel PROFILE xN"."""
    parts = what.split()
    sessions = int(parts[2][1:]) if len(parts) > 2 else 1
    return parts[1], sessions


def start_tunnel(bin_dir, sessions=1):
    env = {**os.environ, **lab_env()}
    log = open(f"{DIR}/daemon.log", "w")
    # Builds from before striping know no --sessions (and use one session).
    helps = subprocess.run([f"{bin_dir}/ssm-proxy", "start", "--help"], capture_output=True, text=True).stdout
    striping = ["--sessions", str(sessions)] if "--sessions" in helps else []
    p = subprocess.Popen(inn("laptop", [f"{bin_dir}/ssm-proxy", "start", "--instance-id", "i-0123456789abcdef0",
                                        "--cidr", "10.10.0.0/16", "--name", "bench"] + striping),
                         env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()
    if " up: " not in line:
        raise RuntimeError("tunnel did not come up: " + open(f"{DIR}/daemon.log").read())
    return p


def stop_tunnel(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)


def route_direct(add):
    op = "add" if add else "del"
    sh(inn("laptop", ["ip", "route", op, "10.10.0.0/16", "via", "192.168.100.1"]))
    sh(inn("wan", ["ip", "route", op, "10.10.0.0/16", "via", "192.168.102.2"]))
    sh(inn("wan", ["ip", "route", op, "192.168.101.0/24", "via", "192.168.102.2"]))
    sh(inn("aws", ["ip", "route", op, "10.10.0.0/16", "via", "192.168.101.2"]))
    sh(inn("instance", ["ip", "route", op, "192.168.100.0/24", "via", "192.168.101.1"]))
    sh(inn("vpc", ["ip", "route", op, "192.168.100.0/24", "via", "10.10.0.1"]))
    sh(inn("vpc", ["ip", "route", op, "10.8.0.0/24", "via", "10.10.0.1"]))
    for n in ("aws", "instance"):
        sh(inn(n, ["sysctl", "-qw", f"net.ipv4.ip_forward={1 if add else 0}"]))


RELAY = "192.168.102.2"


def openvpn(add, relayed=False):
    """OpenVPN server on the instance, client on the laptop; `relayed`: the
    client's TCP connection goes through socat in the aws namespace."""
    key = f"{DIR}/ovpn.key"
    if add:
        sh(["openvpn", "--genkey", "secret", key])
        common = ["openvpn", "--dev", "ovpn0", "--dev-type", "tun", "--secret", key, "--cipher", "AES-256-CBC",
                  "--auth", "SHA256", "--daemon", "--verb", "1"]
        sh(inn("instance", common + ["--proto", "tcp-server", "--local", "192.168.101.2", "--ifconfig", "10.8.0.1",
                                     "10.8.0.2", "--log", f"{DIR}/ovpn-server.log"]))
        remote = "192.168.101.2"
        if relayed:
            remote = RELAY
            subprocess.Popen(inn("aws", ["socat", f"TCP-LISTEN:1194,bind={RELAY},reuseaddr,nodelay",
                                         "TCP:192.168.101.2:1194,nodelay"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1)
        sh(inn("laptop", common + ["--proto", "tcp-client", "--remote", remote, "--ifconfig", "10.8.0.2",
                                   "10.8.0.1", "--route", "10.10.0.0", "255.255.0.0", "--log",
                                   f"{DIR}/ovpn-client.log"]))
        for _ in range(100):
            if "10.10.0.0/16" in sh(inn("laptop", ["ip", "route"])) and \
                    subprocess.run(inn("laptop", ["ping", "-c", "1", "-W", "1", "10.10.0.2"]),
                                   capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("openvpn did not come up: " + open(f"{DIR}/ovpn-client.log").read())
    for n in ("laptop", "instance"):
        sh(inn(n, ["pkill", "-f", "openvpn --dev ovpn0"]), check=False)
    sh(inn("aws", ["pkill", "-f", "socat TCP-LISTEN:1194"]), check=False)
    time.sleep(0.5)


def fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def fmt_ping(p):
    return "-" if p is None else f"{p[0]:.1f} / {p[1]:.1f}" + (f" ({p[2]} lost)" if p[2] else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="clean link and fast profile only")
    ap.add_argument("--paths", help="comma-separated subset of: direct, openvpn-tcp, openvpn-tcp relayed, "
                                    "tunnel fast, tunnel stock")
    ap.add_argument("--links", help="comma-separated subset of: clean, 40ms")
    ap.add_argument("--costs", action="store_true",
                    help="per pgbench transaction: syscalls and context switches of each process (perf stat)")
    ap.add_argument("--striped", action="store_true", help="striped sessions through the stock profile")
    ap.add_argument("--sessions", default="1,2,4,8", help="with --striped: the session counts")
    ap.add_argument("--json", help="with --striped: write the rows here too")
    ap.add_argument("--emulator-rt", action="store_true",
                    help="run the emulator at real-time priority (SCHED_FIFO 50), as if AWS's side and the "
                         "instance's agent had a machine of their own instead of sharing this one's cores")
    a = ap.parse_args()
    global EMULATOR_RT
    EMULATOR_RT = a.emulator_rt
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces)")
    subprocess.run(["bash", f"{ROOT}/scripts/ensure-deps.sh"], check=True)
    missing = [pkg for tool, pkg in (("iperf3", "iperf3"), ("openvpn", "openvpn"), ("socat", "socat"))
               if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    bin_dir = os.path.abspath(a.bin)
    for b in ("ssm-proxy", "ec2-agent", "ssm-emulator", "netem-lite"):
        if not os.path.exists(os.path.join(bin_dir, b)):
            sys.exit(f"bench: {b} is missing in {bin_dir}: cargo build --release --bins")
    links = [("clean", "")] if a.quick else [("clean", ""), ("40 ms RTT", "20 0")]
    if a.links:
        want = a.links.replace(" ", "").split(",")
        links = [l for l in [("clean", ""), ("40 ms RTT", "20 0")] if l[0].split(" ")[0] + ("ms" if l[1] else "") in want
                 or l[0] in want]
    if a.striped:
        return striped(bin_dir, links, a)
    paths = ["direct", "openvpn-tcp", "openvpn-tcp relayed", "tunnel fast"] + ([] if a.quick else ["tunnel stock"])
    if a.paths:
        paths = [p.strip() for p in a.paths.split(",")]
    rows = []
    costs = []
    try:
        for link, impair in links:
            for what in paths:
                profile, sessions = tunnel_path(what) if what.startswith("tunnel") else ("fast", 1)
                print(f"bench: {what} on the {link} link...", file=sys.stderr)
                with lab(bin_dir, profile, impair):
                    if what == "direct":
                        route_direct(True)
                        r = measure(a.seconds)
                    elif what.startswith("openvpn-tcp"):
                        route_direct(True)
                        sh(inn("laptop", ["ip", "route", "del", "10.10.0.0/16"]))
                        openvpn(True, relayed=what.endswith("relayed"))
                        r = measure(a.seconds)
                        openvpn(False)
                    else:
                        p = start_tunnel(bin_dir, sessions)
                        r = measure(a.seconds)
                        if a.costs:
                            costs.append((link, what, process_costs(a.seconds, p.pid)))
                        # The tunnel's own counters (drops, queue, retransmissions) explain odd rows.
                        st = subprocess.run(inn("laptop", [f"{bin_dir}/ssm-proxy", "status"]), capture_output=True,
                                            text=True, env={**os.environ, **lab_env()})
                        print(f"bench: {what} on the {link} link, tunnel status:\n{st.stdout}{st.stderr}", file=sys.stderr)
                        stop_tunnel(p)
                    rows.append((link, what, r))
    finally:
        lab_down()
    print("| link | path | download Mbit/s | upload Mbit/s | TCP req/resp per s | ping idle p50 / p99 ms | ping under bulk p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for link, what, r in rows:
        print(f"| {link} | {what} | {fmt(r['down'])} | {fmt(r['up'])} | {fmt(r['rr'], '{:.0f}')} | "
              f"{fmt_ping(r['idle'])} | {fmt_ping(r['loaded'])} |")
    if costs:
        print()
        print("| link | path | pgbench tps (perf attached) | syscalls per transaction | context switches per transaction |")
        print("|---|---|---|---|---|")
        for link, what, c in costs:
            if c is None:
                print(f"| {link} | {what} | - | - | - |")
                continue
            per, tps = c
            sc = ", ".join(f"{n} {v[0]:.1f}" for n, v in per.items())
            cs = ", ".join(f"{n} {v[1]:.2f}" for n, v in per.items())
            print(f"| {link} | {what} | {tps:.0f} | {sc} | {cs} |")


def striped(bin_dir, links, a):
    counts = [int(n) for n in a.sessions.split(",")]
    # Rows measured with the emulator at real-time priority say so.
    mark = {"emulator_rt": True} if EMULATOR_RT else {}
    rows = []
    try:
        for link, impair in links:
            for n in counts:
                print(f"bench: stock profile, {n} sessions, {link} link...", file=sys.stderr)
                with lab(bin_dir, "stock", impair):
                    p = start_tunnel(bin_dir, n)
                    time.sleep(2)  # every member up
                    r = measure_striped(a.seconds)
                    st = subprocess.run(inn("laptop", [f"{bin_dir}/ssm-proxy", "status"]), capture_output=True,
                                        text=True, env={**os.environ, **lab_env()})
                    print(f"bench: {n} sessions on the {link} link, tunnel status:\n{st.stdout}{st.stderr}",
                          file=sys.stderr)
                    stop_tunnel(p)
                    rows.append({"link": link, "sessions": n, **r, **mark})
            # The lab's own share of a ping's wait: the direct path (no tunnel)
            # under a download as fast as the fastest striped one.
            fastest = max((r["down1"] or 0 for r in rows if r["link"] == link), default=0)
            if fastest:
                print(f"bench: direct path at {fastest:.1f} Mbit/s, {link} link...", file=sys.stderr)
                with lab(bin_dir, "stock", impair):
                    route_direct(True)
                    idle, loaded = pings_idle_and_under_bulk(a.seconds, rate=fastest)
                    rows.append({"link": link, "path": "direct", "rate": fastest, "idle": idle, "loaded": loaded,
                                 **mark})
    finally:
        lab_down()
    base = {row["link"]: row["down1"] for row in rows if row.get("sessions") == 1 and row["down1"]}
    print("| link | sessions | one flow down Mbit/s | x one session | four flows down Mbit/s | "
          "ping idle p50 / p99 ms | ping under one-flow download p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("path") == "direct":
            print(f"| {r['link']} | direct, no tunnel, download capped at {r['rate']:.1f} | - | - | - | "
                  f"{fmt_ping(r['idle'])} | {fmt_ping(r['loaded'])} |")
            continue
        ratio = r["down1"] / base[r["link"]] if r["down1"] and base.get(r["link"]) else None
        print(f"| {r['link']} | {r['sessions']} | {fmt(r['down1'])} | {fmt(ratio, '{:.2f}')} | {fmt(r['down4'])} | "
              f"{fmt_ping(r['idle'])} | {fmt_ping(r['loaded'])} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
