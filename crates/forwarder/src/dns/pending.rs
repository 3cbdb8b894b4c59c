//! The queries one DNS flow is waiting on at the agent, so that a resolver
//! that is gone is answered SERVFAIL rather than silence: when the resolver's
//! socket reports an error (its port closed, its host unreachable) every
//! waiting query gets a SERVFAIL at once, and a query with no answer within
//! a deadline gets one then. Without I/O: the agent's flow feeds it.

use std::collections::VecDeque;

use simple_dns::{PacketFlag, RCODE};

/// Queries remembered per flow, at most; the oldest is forgotten beyond it
/// (it then gets no SERVFAIL, as before this existed).
pub const MAX_PENDING: usize = 64;

/// One flow's unanswered queries, oldest first: (sent at, in ms; the query).
#[derive(Debug, Default)]
pub struct Pending {
    queries: VecDeque<(u64, Vec<u8>)>,
}

impl Pending {
    /// `query` was sent to the resolver at `now_ms`. Not a DNS query: ignored.
    pub fn sent(&mut self, query: &[u8], now_ms: u64) {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return;
        }
        if self.queries.len() == MAX_PENDING {
            self.queries.pop_front();
        }
        self.queries.push_back((now_ms, query.to_vec()));
    }

    /// The resolver answered `reply`: its query no longer waits.
    pub fn answered(&mut self, reply: &[u8]) {
        if reply.len() < 2 {
            return;
        }
        let id = [reply[0], reply[1]];
        if let Some(i) = self.queries.iter().position(|(_, q)| q[..2] == id) {
            self.queries.remove(i);
        }
    }

    /// The resolver is unreachable: a SERVFAIL for every waiting query.
    pub fn fail_all(&mut self) -> Vec<Vec<u8>> {
        self.queries.drain(..).filter_map(|(_, q)| servfail(&q)).collect()
    }

    /// A SERVFAIL for each query sent before `now_ms - after_ms`.
    pub fn expire(&mut self, now_ms: u64, after_ms: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.queries.front() {
            if now_ms.saturating_sub(*at) < after_ms {
                break;
            }
            if let Some((_, q)) = self.queries.pop_front() {
                out.extend(servfail(&q));
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.queries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }
}

/// A SERVFAIL answer to `query` (its id and questions echoed, recursion
/// available as a resolver's would say), or `None` if it does not parse.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    super::error_reply(query, RCODE::ServerFailure, PacketFlag::RESPONSE | PacketFlag::RECURSION_AVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Packet, Question, CLASS, QCLASS, QTYPE, TYPE};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().expect("query")
    }

    fn rcode_and_id(reply: &[u8]) -> (RCODE, u16, String) {
        let p = Packet::parse(reply).expect("reply parses");
        assert!(p.has_flags(PacketFlag::RESPONSE));
        (p.rcode(), p.id(), p.questions[0].qname.to_string())
    }

    #[test]
    fn an_unreachable_resolver_fails_every_waiting_query() {
        let mut p = Pending::default();
        p.sent(&query(1, "db.corp.internal"), 0);
        p.sent(&query(2, "api.corp.internal"), 10);
        p.sent(&query(3, "web.corp.internal"), 20);
        let mut answer = query(2, "api.corp.internal");
        answer[2] |= 0x80;
        p.answered(&answer);
        let fails: Vec<_> = p.fail_all().iter().map(|r| rcode_and_id(r)).collect();
        assert_eq!(
            fails,
            vec![
                (RCODE::ServerFailure, 1, "db.corp.internal".to_string()),
                (RCODE::ServerFailure, 3, "web.corp.internal".to_string())
            ]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn a_query_unanswered_past_the_deadline_gets_a_servfail_then() {
        let mut p = Pending::default();
        p.sent(&query(7, "a.example"), 1_000);
        p.sent(&query(8, "b.example"), 2_500);
        assert!(p.expire(3_999, 3_000).is_empty());
        let first: Vec<_> = p.expire(4_000, 3_000).iter().map(|r| rcode_and_id(r).1).collect();
        assert_eq!(first, vec![7]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.expire(6_000, 3_000).len(), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn responses_and_garbage_are_not_remembered_and_memory_is_bounded() {
        let mut p = Pending::default();
        let mut answer = query(1, "a.example");
        answer[2] |= 0x80;
        p.sent(&answer, 0);
        p.sent(b"short", 0);
        assert!(p.is_empty());
        for id in 0..(MAX_PENDING as u16 + 10) {
            p.sent(&query(id, "a.example"), u64::from(id));
        }
        assert_eq!(p.len(), MAX_PENDING);
        // The oldest ten were forgotten.
        assert_eq!(rcode_and_id(&p.fail_all()[0]).1, 10);
        // A query that does not parse gets no SERVFAIL (and no panic).
        p.sent(&[0u8; 12], 0);
        let mut bad = vec![0u8; 12];
        bad[5] = 1; // one question, none there
        p.sent(&bad, 0);
        assert_eq!(p.fail_all().len(), 1, "the empty query is answered, the broken one is not");
    }
}
