//! One client's flow table, without I/O: what each packet from the client
//! asks for (into the TCP stack, a dial with its SYN held until the
//! destination answers, a UDP or ping socket, a refusal), and which UDP and
//! ping flows have gone idle. The session ([`crate::session`]) owns the
//! sockets and does what [`FlowTable::classify`] says.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::warn;

use crate::packet::{Parsed, Unreachable, L4};
use crate::policy::{Policy, Verdict};
use crate::stack::{flow_key, FlowKey};

/// A `ping` of the client: its address, the destination, its identifier.
pub type EchoKey = (IpAddr, IpAddr, u16);

/// What to do with one packet from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A segment of a flow the TCP stack carries.
    ToStack,
    /// Nothing: a SYN repeated while its destination is being dialled (the
    /// first one is kept), or a reset for a flow we do not know.
    Ignore,
    /// A new TCP flow: dial `target` and hold the SYN until it answers;
    /// then call [`FlowTable::dialled`].
    Dial { key: FlowKey, target: SocketAddr },
    /// Refused or unknown: answer the client so it fails fast.
    Refuse(Refusal),
    /// A UDP datagram of flow `key`; open a socket to the address first when
    /// one is given (a new flow), then [`FlowTable::udp_opened`].
    Udp { key: FlowKey, open: Option<SocketAddr> },
    /// An echo request of `key`; open a ping socket first when `open`, then
    /// [`FlowTable::echo_opened`].
    Echo { key: EchoKey, open: bool },
    /// A protocol we do not forward.
    Drop,
}

/// How a packet is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// TCP: a reset.
    Reset,
    /// An ICMP destination unreachable of this kind.
    Unreachable(Unreachable),
}

impl Refusal {
    /// What tells the client, about its packet `raw` (parsed as `p`): a reset
    /// or an ICMP destination unreachable; `None` when none can be built.
    pub fn reply(self, raw: &[u8], p: &Parsed<'_>) -> Option<Vec<u8>> {
        match self {
            Refusal::Reset => crate::packet::tcp_reset(p),
            Refusal::Unreachable(kind) => crate::packet::unreachable(raw, p, kind),
        }
    }
}

/// The flow table's settings, from the agent's configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub policy: Policy,
    /// The instance's own resolvers: DNS to the client's tunnel resolver goes to the first.
    pub resolvers: Vec<IpAddr>,
    pub max_tcp_flows: usize,
    /// UDP flows (each an open socket) at once; a new one beyond is refused
    /// with ICMP administratively prohibited.
    pub max_udp_flows: usize,
    /// UDP and ping flows idle this long (ms) are closed.
    pub idle_ms: u64,
}

/// One client's flows: see the module documentation.
#[derive(Debug)]
pub struct FlowTable {
    limits: Limits,
    /// The client's tunnel resolver addresses (from its HELLO).
    dns: Vec<IpAddr>,
    /// TCP flows whose destination is being dialled.
    connecting: HashSet<FlowKey>,
    /// UDP and ping flows, with when each last carried a datagram (ms).
    udp: HashMap<FlowKey, Arc<AtomicU64>>,
    echo: HashMap<EchoKey, Arc<AtomicU64>>,
    /// Packets refused by the policy.
    pub denied: u64,
    /// Flows sent to the instance's resolver.
    pub dns_queries: u64,
}

impl FlowTable {
    pub fn new(limits: Limits, dns: Vec<IpAddr>) -> Self {
        FlowTable {
            limits,
            dns,
            connecting: HashSet::new(),
            udp: HashMap::new(),
            echo: HashMap::new(),
            denied: 0,
            dns_queries: 0,
        }
    }

    /// The client came back with a new HELLO: its resolver addresses may differ.
    pub fn set_dns(&mut self, dns: Vec<IpAddr>) {
        self.dns = dns;
    }

    /// DNS to the client's tunnel resolver address (HELLO option 3).
    pub fn is_tunnel_resolver(&self, dst: SocketAddr) -> bool {
        dst.port() == 53 && self.dns.contains(&dst.ip())
    }

    pub fn udp_flows(&self) -> usize {
        self.udp.len()
    }

    /// What `p` asks for. `tcp_known`: the stack carries its TCP flow;
    /// `tcp_flows`: how many flows the stack carries. `now` reads the ms
    /// since the session began; only UDP and ping packets need it, so TCP
    /// (the bulk) does not read the clock.
    pub fn classify(&mut self, p: &Parsed<'_>, tcp_known: bool, tcp_flows: usize, now: impl FnOnce() -> u64) -> Action {
        match p.l4 {
            L4::Tcp { sport, dport, syn, ack, rst, .. } => {
                let key = flow_key(p.src, sport, p.dst, dport);
                if tcp_known {
                    Action::ToStack
                } else if self.connecting.contains(&key) {
                    Action::Ignore
                } else if syn && !ack {
                    self.new_tcp(p, key, tcp_flows)
                } else if rst {
                    Action::Ignore
                } else {
                    // A segment of a connection we do not know (agent restarted, say).
                    Action::Refuse(Refusal::Reset)
                }
            }
            L4::Udp { sport, dport, .. } => {
                let key = flow_key(p.src, sport, p.dst, dport);
                if let Some(last) = self.udp.get(&key) {
                    last.store(now(), Ordering::Relaxed);
                    return Action::Udp { key, open: None };
                }
                let target = match self.target(p, key.1, "UDP flow") {
                    Ok(target) => target,
                    Err(r) => return Action::Refuse(r),
                };
                if self.udp.len() >= self.limits.max_udp_flows {
                    warn!(dst = %key.1, "too many UDP flows for this client; refused");
                    return Action::Refuse(Refusal::Unreachable(Unreachable::Prohibited));
                }
                Action::Udp { key, open: Some(target) }
            }
            L4::EchoRequest { id, .. } => {
                if let Err(r) = self.permitted(p, "ping") {
                    return Action::Refuse(r);
                }
                let key = (p.src, p.dst, id);
                match self.echo.get(&key) {
                    Some(last) => {
                        last.store(now(), Ordering::Relaxed);
                        Action::Echo { key, open: false }
                    }
                    None => Action::Echo { key, open: true },
                }
            }
            L4::Other(_) => Action::Drop,
        }
    }

    fn new_tcp(&mut self, p: &Parsed<'_>, key: FlowKey, tcp_flows: usize) -> Action {
        let target = match self.target(p, key.1, "TCP connection") {
            Ok(t) => t,
            Err(r) => return Action::Refuse(r),
        };
        if tcp_flows + self.connecting.len() >= self.limits.max_tcp_flows {
            warn!(dst = %key.1, "too many TCP connections for this client; refused");
            return Action::Refuse(Refusal::Reset);
        }
        self.connecting.insert(key);
        Action::Dial { key, target }
    }

    /// The dial of `key` ended (either way): its SYN is no longer held.
    pub fn dialled(&mut self, key: &FlowKey) {
        self.connecting.remove(key);
    }

    /// A UDP flow's socket is open: returns its last-activity clock, for the
    /// socket's receiver to move on each reply.
    pub fn udp_opened(&mut self, key: FlowKey, now: u64) -> Arc<AtomicU64> {
        self.udp.entry(key).or_insert_with(|| Arc::new(AtomicU64::new(now))).clone()
    }

    /// A UDP flow's socket could not be opened: forget the flow.
    pub fn udp_closed(&mut self, key: &FlowKey) {
        self.udp.remove(key);
    }

    /// A ping socket is open: as [`FlowTable::udp_opened`].
    pub fn echo_opened(&mut self, key: EchoKey, now: u64) -> Arc<AtomicU64> {
        self.echo.entry(key).or_insert_with(|| Arc::new(AtomicU64::new(now))).clone()
    }

    /// A ping socket failed: the next request opens another.
    pub fn echo_closed(&mut self, key: &EchoKey) {
        self.echo.remove(key);
    }

    /// Forgets the UDP and ping flows idle for the configured time at `now`
    /// and returns them, for their sockets to be closed.
    pub fn expire(&mut self, now: u64) -> (Vec<FlowKey>, Vec<EchoKey>) {
        let idle = self.limits.idle_ms;
        let stale = |last: &Arc<AtomicU64>| now.saturating_sub(last.load(Ordering::Relaxed)) >= idle;
        let udp: Vec<FlowKey> = self.udp.iter().filter(|(_, l)| stale(l)).map(|(k, _)| *k).collect();
        let echo: Vec<EchoKey> = self.echo.iter().filter(|(_, l)| stale(l)).map(|(k, _)| *k).collect();
        for k in &udp {
            self.udp.remove(k);
        }
        for k in &echo {
            self.echo.remove(k);
        }
        (udp, echo)
    }

    /// Where a new flow to `dst` really goes. DNS sent to the client's tunnel
    /// resolver address goes to the instance's own resolver, whatever the
    /// policy says about that address (it is often link-local,
    /// 169.254.169.253); anything else goes where it is addressed if the
    /// policy allows.
    fn target(&mut self, p: &Parsed<'_>, dst: SocketAddr, what: &str) -> Result<SocketAddr, Refusal> {
        if self.is_tunnel_resolver(dst) {
            if let Some(&resolver) = self.limits.resolvers.first() {
                self.dns_queries += 1;
                return Ok(SocketAddr::new(resolver, 53));
            }
            warn!(src = %p.src, "DNS through the tunnel asked for, but this instance has no resolver in /etc/resolv.conf");
            return Err(Refusal::Unreachable(Unreachable::Host));
        }
        self.permitted(p, what).map(|()| dst)
    }

    /// The policy for a new flow; a refusal is counted and logged.
    fn permitted(&mut self, p: &Parsed<'_>, what: &str) -> Result<(), Refusal> {
        let verdict = self.limits.policy.check(p.dst);
        if verdict == Verdict::Allow {
            return Ok(());
        }
        self.denied += 1;
        match &verdict {
            Verdict::Denied(net) => {
                warn!(src = %p.src, dst = %p.dst, "{what} refused: destination in the deny-list ({net})")
            }
            _ => warn!(src = %p.src, dst = %p.dst, "{what} refused: destination outside the allowed ranges"),
        }
        Err(if matches!(p.l4, L4::Tcp { .. }) { Refusal::Reset } else { Refusal::Unreachable(Unreachable::Prohibited) })
    }
}

#[cfg(test)]
mod tests;
