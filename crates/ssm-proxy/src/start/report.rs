//! What `status` reports about a running tunnel: read fresh from the link's
//! counters on each ask, with a line per member session when striped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use forwarder::dns::SplitDns;

use super::{Plan, StartArgs, STALL};
use crate::daemon::control::{Counter, MemberStatus, Status};
use crate::daemon::link::ClientHandle;
use crate::daemon::platform::TunnelDevice;
use crate::daemon::uplink::LinkState;

/// What `status` reports, read fresh from the link's counters on each ask.
pub(super) fn status_fn(
    args: &StartArgs,
    plan: &Plan,
    region: &str,
    device: &impl TunnelDevice,
    handle: &Arc<ClientHandle>,
    link_state: &Arc<Mutex<LinkState>>,
    split_dns: Option<Arc<SplitDns>>,
) -> impl Fn() -> Status + Send + Sync + 'static {
    let (handle, link_state) = (handle.clone(), link_state.clone());
    let started_at = Instant::now();
    let peer = plan.ipv4.peer;
    let base = Status {
        name: args.name().to_string(),
        pid: std::process::id(),
        region: region.to_string(),
        cidrs: plan.cidrs.iter().map(ToString::to_string).collect(),
        interface: device.name().to_string(),
        addresses: device.addresses().iter().map(|a| a.addr().to_string()).collect(),
        ..Status::default()
    };
    let sessions_wanted = args.sessions();
    let last_in = Mutex::new((Instant::now(), Vec::<u64>::new()));
    move || {
        let ls = link_state.lock().map(|s| s.clone()).unwrap_or_default();
        let l = ls.live.lock().map(|l| l.clone()).unwrap_or_default();
        let q = handle.queue.stats();
        let lead = &handle.members[0];
        let rtt = lead.rtt_us.load(Ordering::Relaxed);
        let ((sp, sb), (rp, rb)) = handle.totals();
        let r = handle.reseq.stats();
        let state = match (&ls.renewing, l.stalled_since.map(|t| t.elapsed())) {
            (Some((attempt, _)), _) => format!("reconnecting (new session, attempt {attempt})"),
            _ if !l.connected => "reconnecting".into(),
            (_, Some(d)) if d >= STALL => format!("stalled (no answer for {} s)", d.as_secs()),
            _ => "connected".into(),
        };
        let members = member_status(&handle, &ls, &state, &l, &last_in, started_at);
        Status {
            state,
            last_error: ls.renewing.as_ref().map(|(_, e)| e.clone()),
            instance_id: ls.instance_id.clone(),
            instances: ls.candidates.clone(),
            session_id: ls.session_id.clone(),
            agent: ls.agent.clone(),
            new_sessions: ls.new_sessions,
            failovers: ls.failovers,
            rotations: ls.rotations,
            uptime_secs: started_at.elapsed().as_secs(),
            sent: Counter { packets: sp, bytes: sb },
            received: Counter { packets: rp, bytes: rb },
            rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
            channel_srtt_ms: l.stats.srtt.as_secs_f64() * 1000.0,
            messages_sent: l.stats.transmissions(),
            messages_distinct: l.stats.messages_sent,
            retransmissions: l.stats.retransmissions,
            resend_ratio: l.stats.resend_ratio(),
            reconnects: ls.earlier_reconnects + ls.new_sessions + l.reconnects,
            dropped_codel: q.dropped_codel,
            dropped_overflow: q.dropped_overflow,
            dropped_device: handle.device_drops.load(Ordering::Relaxed),
            flows_reset: handle.flows_reset.load(Ordering::Relaxed),
            queue_delay_ms: q.last_delay.as_secs_f64() * 1000.0,
            queue_delay_max_ms: q.max_delay.as_secs_f64() * 1000.0,
            dns_domains: split_dns.iter().flat_map(|d| d.domains().iter().map(ToString::to_string)).collect(),
            dns_server: split_dns.as_ref().map(|_| peer.to_string()),
            dns_forwarded: split_dns.as_ref().map_or(0, |d| d.forwarded.load(Ordering::Relaxed)),
            dns_refused: split_dns.as_ref().map_or(0, |d| d.refused.load(Ordering::Relaxed)),
            window_bytes: lead.window.load(Ordering::Relaxed),
            in_flight_bytes: lead.in_flight.load(Ordering::Relaxed),
            sessions_wanted,
            members,
            striping_note: ls.striping_note.clone(),
            reordered: r.held,
            reorder_skipped: r.skipped,
            reorder_bound_ms: handle.reseq.bound().as_secs_f64() * 1000.0,
            ..base.clone()
        }
    }
}

/// Each member session's figures; `last_in` holds the previous call's time
/// and received bytes, for the rate in.
fn member_status(
    handle: &ClientHandle,
    ls: &LinkState,
    lead_state: &str,
    lead_live: &ssm_channel::port::Live,
    last_in: &Mutex<(Instant, Vec<u64>)>,
    started_at: Instant,
) -> Vec<MemberStatus> {
    let mut last = last_in.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let since = if last.1.is_empty() { started_at } else { last.0 };
    let secs = now.duration_since(since).as_secs_f64().max(1e-3);
    let mut received = Vec::new();
    let members = handle
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || *i <= ls.members.len())
        .map(|(i, m)| {
            let (state, session_id, live, replacements) = match i {
                0 => (lead_state.to_string(), ls.session_id.clone(), lead_live.clone(), ls.new_sessions + ls.rotations),
                _ => {
                    let ms = &ls.members[i - 1];
                    let live = ms.live.lock().map(|l| l.clone()).unwrap_or_default();
                    // Carried, but its websocket is down and being resumed.
                    let state = if ms.state == "connected" && !live.connected {
                        "reconnecting".to_string()
                    } else {
                        ms.state.clone()
                    };
                    (state, ms.session_id.clone(), live, ms.replacements)
                }
            };
            let rb = m.received.read().1;
            let before = last.1.get(i).copied().unwrap_or(0);
            received.push(rb);
            let rtt = m.rtt_us.load(Ordering::Relaxed);
            MemberStatus {
                member: i + 1,
                state,
                session_id,
                sent_bytes: m.sent.read().1,
                received_bytes: rb,
                rate_out: m.rate.load(Ordering::Relaxed),
                rate_in: (rb.saturating_sub(before) as f64 / secs) as u64,
                rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
                window_bytes: m.window.load(Ordering::Relaxed),
                retransmissions: live.stats.retransmissions,
                replacements,
            }
        })
        .collect();
    *last = (now, received);
    members
}
