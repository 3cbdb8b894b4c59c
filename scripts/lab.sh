#!/usr/bin/env bash
# The namespace lab: four network namespaces joined by veth pairs (root only).
#
#   laptop .100.2 ── .100.1 wan .102.1 ── .102.2 aws .101.1 ── .101.2 instance 10.10.0.1 ── 10.10.0.2 vpc
#   (ssm-proxy)      (router; netem-lite)    (ssm-emulator :4566)  (ec2-agent :7301, nobody)   (postgres, http, dns)
#   (addresses in 192.168.0.0/16; the laptop's default gateway is wan; the instance
#   and the vpc also share the IPv6 /64 fd10:10::/64, as fd10:10::1 and fd10:10::2)
#
# The emulator plays the AWS side and the instance's SSM agent: for the
# instance it dials from the instance namespace (--netns), so the ec2-agent
# listens on that namespace's 127.0.0.1:7301 as on a real instance, and shell
# sessions (`ssm-proxy agent install`) run there.
#
#   scripts/lab.sh up     BIN_DIR   start everything (BIN_DIR holds ssm-emulator and ec2-agent)
#   scripts/lab.sh down             stop everything, delete the namespaces and files
#   scripts/lab.sh env              the environment for running ssm-proxy in the laptop namespace
#
# LAB (default "lab") prefixes namespace, interface and file names, so a test lab
# and a demo lab can coexist. PROFILE (fast|stock) selects the emulator's pacing;
# EMULATOR_ARGS adds emulator options (faults), AGENT_ARGS the first ec2-agent's
# (limits). The vpc serves a BLOB_MIB MiB file.
# IMPAIR="DELAY_MS LOSS" (say "20 0.005") makes the laptop<->aws link slow and
# lossy both ways through netem-lite in the wan namespace (this kernel has no netem).
# LAB_TCP_CC (default cubic) is every namespace's TCP congestion control.
# SECOND_INSTANCE=1 adds a second instance, $INSTANCE2, whose ec2-agent listens
# at 192.168.101.3:7301 in the same namespace (pid in $DIR/agent2.pid); the
# emulator takes that address for its localhost.
# PROXY=1 adds a corporate proxy: tinyproxy in the wan namespace at $LAB_PROXY
# (basic auth), and takes the laptop's default route away, so that the laptop
# reaches AWS only through the proxy.
set -euo pipefail
LAB=${LAB:-lab}
DIR=/tmp/ssm-proxy-$LAB
INSTANCE=i-0123456789abcdef0
INSTANCE2=i-0fedcba9876543210
VPC=vpc-0a1b2c3d4e5f60718
ns() { echo "$LAB-$1"; }
in_ns() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }
# spawn NS LOG CMD...: a daemon in NS, detached from our stdio (callers may be
# waiting for our output to end).
spawn() { local n log; n=$(ns "$1"); log=$2; shift 2; ip netns exec "$n" setsid "$@" </dev/null >"$log" 2>&1 & }

# The vpc's web server on [::]:8080 (IPv4 too), serving the directory argv[1].
HTTP_SERVER='
import functools, http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    request_queue_size = 1024
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
print("Serving HTTP on [::]:8080", flush=True)
Server(("::", 8080), handler).serve_forever()
'

env_lines() {
  cat <<EOF
AWS_ENDPOINT_URL=http://192.168.102.2:4566
AWS_REGION=us-east-1
AWS_ACCESS_KEY_ID=AKIAEMULATOR00000001
AWS_SECRET_ACCESS_KEY=emulator/secret/key/000000000000000000000
AWS_EC2_METADATA_DISABLED=true
SSM_PROXY_RUN_DIR=$DIR/run
LAB_INSTANCE=$INSTANCE
LAB_INSTANCE2=$INSTANCE2
LAB_PROXY=http://lab:proxy-secret@192.168.100.1:3128
EOF
}

down() {
  for n in laptop wan aws instance vpc; do
    local name; name=$(ns $n)
    if ip netns list | grep -qw "$name"; then
      for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$name" 2>/dev/null || true
    fi
    rm -rf "/etc/netns/$name"
  done
  rm -rf "$DIR"
}

link() { # link NS_A IF_A ADDR_A NS_B IF_B ADDR_B
  ip link add "$2" type veth peer name "$5"
  ip link set "$2" netns "$(ns "$1")"
  ip link set "$5" netns "$(ns "$4")"
  in_ns "$1" ip addr add "$3" dev "$2"
  in_ns "$4" ip addr add "$6" dev "$5"
  in_ns "$1" ip link set "$2" up
  in_ns "$4" ip link set "$5" up
}

wait_port() { # wait_port NS HOST PORT
  for _ in $(seq 1 100); do
    if in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "lab: nothing listens on $2:$3 in $(ns "$1")" >&2
  return 1
}

impair() { # impair BIN DELAY_MS LOSS: route everything crossing wan through netem-lite
  local i="$LAB-in" o="$LAB-out"
  spawn wan "$DIR/netem.log" "$1/netem-lite" --in "$i" --out "$o" --delay-ms "$2" --loss "$3"
  for _ in $(seq 50); do in_ns wan ip link show "$o" >/dev/null 2>&1 && break; sleep 0.1; done
  in_ns wan sysctl -qw "net.ipv4.conf.$i.rp_filter=0" "net.ipv4.conf.$o.rp_filter=0"
  in_ns wan ip route add default dev "$i" table 101
  in_ns wan ip rule add iif "$LAB-w0" lookup 101 priority 100
  in_ns wan ip rule add iif "$LAB-w1" lookup 101 priority 101
}

# tinyproxy as a corporate proxy: CONNECT to any port (no ConnectPort line),
# plain http forwarded, basic auth, a log of every request.
proxy_up() {
  mkdir -p "$DIR/proxy" && chown nobody:nogroup "$DIR/proxy"
  cat > "$DIR/proxy/tinyproxy.conf" <<EOF
User nobody
Group nogroup
Listen 192.168.100.1
Port 3128
Timeout 600
MaxClients 100
Allow 192.168.100.0/24
BasicAuth lab proxy-secret
DisableViaHeader Yes
LogLevel Info
LogFile "$DIR/proxy/tinyproxy.log"
PidFile "$DIR/proxy/tinyproxy.pid"
EOF
  spawn wan "$DIR/proxy/stderr.log" tinyproxy -d -c "$DIR/proxy/tinyproxy.conf"
  wait_port laptop 192.168.100.1 3128
  in_ns laptop ip route del default
}

# Every namespace's TCP uses LAB_TCP_CC (default cubic, the default of Linux
# and of macOS) whatever this host's default is. A new namespace takes the
# host's, and a host set to BBR (as some VMs are) makes the lab's websockets
# drop to 4 segments a round trip for 200 ms every 10 s (BBR's PROBE_RTT): at
# 40 ms RTT that holds a paced SSM stream for 200-280 ms. A namespace may only
# pick an algorithm on the host's allowed list, so one missing there is added
# to it (adding permits a choice and changes no socket's algorithm). Prints
# the algorithm for `up` to set in each namespace, or nothing if it is not
# available here.
tcp_cc() {
  local cc=${LAB_TCP_CC:-cubic} allowed=/proc/sys/net/ipv4/tcp_allowed_congestion_control
  if ! grep -qw "$cc" "$allowed"; then
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$(cat "$allowed") $cc" || {
      echo "lab: TCP congestion control $cc is not available here; keeping $(sysctl -n net.ipv4.tcp_congestion_control)" >&2
      return 0
    }
  fi
  echo "$cc"
}

up() {
  local bin=$1
  down
  trap 'echo "lab: setup failed; tearing down (logs were in $DIR)" >&2; down' ERR
  mkdir -p "$DIR/run" "$DIR/www"
  chmod 755 "$DIR" "$DIR/run"
  local cc; cc=$(tcp_cc)
  for n in laptop wan aws instance vpc; do
    ip netns add "$(ns $n)"
    in_ns $n ip link set lo up
    if [ -n "$cc" ]; then in_ns $n sysctl -qw net.ipv4.tcp_congestion_control="$cc"; fi
  done
  link laptop "$LAB-l0" 192.168.100.2/24 wan "$LAB-w0" 192.168.100.1/24
  link wan "$LAB-w1" 192.168.102.1/24 aws "$LAB-a0" 192.168.102.2/24
  in_ns laptop ip route add default via 192.168.100.1
  in_ns aws ip route add 192.168.100.0/24 via 192.168.102.1
  in_ns wan sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  link aws "$LAB-a1" 192.168.101.1/24 instance "$LAB-i0" 192.168.101.2/24
  link instance "$LAB-i1" 10.10.0.1/24 vpc "$LAB-v0" 10.10.0.2/24
  in_ns vpc ip addr add 10.10.0.3/24 dev "$LAB-v0"   # a second host, for a second tunnel
  # The VPC's IPv6 /64 (a ULA) beside its IPv4 one; the instance is on it too.
  in_ns instance ip -6 addr add fd10:10::1/64 dev "$LAB-i1" nodad
  in_ns vpc ip -6 addr add fd10:10::2/64 dev "$LAB-v0" nodad
  # Unprivileged ping sockets for the agent's user, as on Amazon Linux.
  in_ns instance sysctl -qw net.ipv4.ping_group_range="0 2147483647"

  # vpc: an HTTP server with a test file, a DNS server, PostgreSQL.
  head -c $(( ${BLOB_MIB:-50} << 20 )) /dev/urandom > "$DIR/www/blob"
  sha256sum "$DIR/www/blob" | cut -d' ' -f1 > "$DIR/blob.sha256"
  # `python3 -m http.server` listens with a backlog of 5: a hundred parallel
  # requests on a busy machine overflow it, and the dropped handshakes back off
  # for tens of seconds. A real server's backlog (nginx: 511) keeps the test
  # about the tunnel.
  spawn vpc "$DIR/http.log" python3 -c "$HTTP_SERVER" "$DIR/www"
  in_ns vpc dnsmasq --no-resolv --no-hosts --bind-interfaces --listen-address=10.10.0.2 \
    --address=/db.corp.internal/10.10.0.2 --address=/db.private.lab/10.10.0.2 \
    --address=/db6.corp.internal/10.10.0.2 --address=/db6.corp.internal/fd10:10::2 --log-queries --pid-file="$DIR/dnsmasq.pid" --log-facility="$DIR/dnsmasq.log" </dev/null >/dev/null 2>&1
  local pgbin; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  mkdir -p "$DIR/pg" && chown postgres "$DIR/pg"
  runuser -u postgres -- "$pgbin/initdb" -A trust -U postgres -D "$DIR/pg/data" >"$DIR/initdb.log" 2>&1
  printf 'host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n' >> "$DIR/pg/data/pg_hba.conf"
  in_ns vpc runuser -u postgres -- "$pgbin/pg_ctl" -s -D "$DIR/pg/data" -l "$DIR/pg/log" \
    -o "-c listen_addresses=10.10.0.2,fd10:10::2 -c unix_socket_directories=$DIR/pg" start </dev/null >/dev/null 2>&1

  if [ -n "${IMPAIR:-}" ]; then impair "$bin" $IMPAIR; fi

  # The instance resolves through the vpc's DNS server (the agent reads its
  # resolv.conf; ip netns exec mounts this one over /etc/resolv.conf).
  mkdir -p "/etc/netns/$(ns instance)"
  echo "nameserver 10.10.0.2" > "/etc/netns/$(ns instance)/resolv.conf"

  # aws: the emulator. instance: the ec2-agent as nobody. The instance's VPC
  # ($VPC, told to the agent as IMDS would) has the Route 53 private zone
  # private.lab, which the vpc's DNS server serves.
  local second=()
  if [ -n "${SECOND_INSTANCE:-}" ]; then
    in_ns instance ip addr add 192.168.101.3/24 dev "$LAB-i0"
    second=(--instance "$INSTANCE2=192.168.101.3" --netns "$INSTANCE2=$(ns instance)")
  fi
  # shellcheck disable=SC2086
  spawn aws "$DIR/emulator.log" "$bin/ssm-emulator" --listen 192.168.102.2:4566 \
    --instance "$INSTANCE=127.0.0.1" --netns "$INSTANCE=$(ns instance)" "${second[@]}" --profile "${PROFILE:-fast}" \
    --hosted-zone "$VPC=private.lab" ${EMULATOR_ARGS:-}
  # shellcheck disable=SC2086
  spawn instance "$DIR/agent.log" setpriv --reuid=nobody --regid=nogroup --clear-groups \
    "$bin/ec2-agent" --listen 127.0.0.1:7301 --vpc "$VPC us-east-1" ${AGENT_ARGS:-}
  echo $! > "$DIR/agent.pid"
  if [ -n "${SECOND_INSTANCE:-}" ]; then
    spawn instance "$DIR/agent2.log" setpriv --reuid=nobody --regid=nogroup --clear-groups \
      "$bin/ec2-agent" --listen 192.168.101.3:7301 --vpc "$VPC us-east-1"
    echo $! > "$DIR/agent2.pid"
    wait_port instance 192.168.101.3 7301
  fi
  wait_port laptop 192.168.102.2 4566
  wait_port instance 127.0.0.1 7301
  wait_port vpc 10.10.0.2 8080
  wait_port vpc 10.10.0.2 5432
  # Last: it takes the laptop's way to the emulator away.
  if [ -n "${PROXY:-}" ]; then proxy_up; fi
  trap - ERR
}

case "${1:-}" in
  up) up "${2:?usage: lab.sh up BIN_DIR}" ;;
  down) down ;;
  env) env_lines ;;
  *) echo "usage: lab.sh up BIN_DIR | down | env" >&2; exit 2 ;;
esac
