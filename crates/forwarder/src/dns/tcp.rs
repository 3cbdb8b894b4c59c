//! The split-DNS filter for DNS over TCP (RFC 7766: each message after a
//! two-byte big-endian length), applied by the ec2-agent to the stream a
//! client sends to its tunnel resolver: queries in the client's domains go on
//! to the instance's resolver, any other is answered REFUSED by the agent and
//! never reaches the VPC. Pure: bytes in, pieces out.

use super::{in_domains, refusal, Domain};

/// What to do with one complete message of the client's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Send on to the resolver (length prefix included).
    Forward(Vec<u8>),
    /// Send back to the client (a framed REFUSED answer).
    Answer(Vec<u8>),
}

#[derive(Debug)]
pub struct TcpFilter {
    domains: Vec<Domain>,
    buf: Vec<u8>,
    pub refused: u64,
}

impl TcpFilter {
    pub fn new(domains: Vec<Domain>) -> TcpFilter {
        TcpFilter { domains, buf: Vec::new(), refused: 0 }
    }

    /// Take `bytes` of the client's stream; every message completed by them
    /// comes out in order. A partial message waits for the rest.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 2 {
            let len = u16::from_be_bytes([self.buf[at], self.buf[at + 1]]) as usize;
            if self.buf.len() - at < 2 + len {
                break;
            }
            let framed = &self.buf[at..at + 2 + len];
            let msg = &framed[2..];
            if in_domains(&self.domains, msg) {
                out.push(Piece::Forward(framed.to_vec()));
            } else {
                self.refused += 1;
                // Not even a DNS header: nothing to answer, and nothing to forward.
                if let Some(reply) = refusal(msg).filter(|r| r.len() <= u16::MAX as usize) {
                    let mut answer = (reply.len() as u16).to_be_bytes().to_vec();
                    answer.extend_from_slice(&reply);
                    out.push(Piece::Answer(answer));
                }
            }
            at += 2 + len;
        }
        self.buf.drain(..at);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Packet, Question, CLASS, QCLASS, QTYPE, TYPE};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let body = p.build_bytes_vec().expect("build");
        [(body.len() as u16).to_be_bytes().to_vec(), body].concat()
    }

    fn filter() -> TcpFilter {
        TcpFilter::new(vec![Domain::parse("corp.internal").expect("domain")])
    }

    #[test]
    fn names_in_the_domains_pass_and_others_are_refused_in_order() {
        let mut f = filter();
        let (a, b, c) = (query(1, "db.corp.internal"), query(2, "www.example.com"), query(3, "x.corp.internal"));
        let out = f.push(&[a.clone(), b.clone(), c.clone()].concat());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Piece::Forward(a));
        assert_eq!(out[2], Piece::Forward(c));
        let Piece::Answer(refused) = &out[1] else { panic!("{out:?}") };
        let reply = Packet::parse(&refused[2..]).expect("a DNS answer");
        assert_eq!((reply.id(), reply.rcode()), (2, simple_dns::RCODE::Refused));
        assert_eq!(u16::from_be_bytes([refused[0], refused[1]]) as usize, refused.len() - 2);
        assert_eq!(f.refused, 1);
    }

    #[test]
    fn messages_split_anywhere_come_out_whole() {
        let first = query(7, "db.corp.internal");
        let stream = [first.clone(), query(8, "evil.example")].concat();
        for cut in 0..stream.len() {
            let mut f = filter();
            let mut out = f.push(&stream[..cut]);
            out.extend(f.push(&stream[cut..]));
            assert_eq!(out.len(), 2, "cut at {cut}");
            assert_eq!(out[0], Piece::Forward(first.clone()), "cut at {cut}");
            assert!(matches!(out[1], Piece::Answer(_)), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_neither_forwarded_nor_answered() {
        let mut f = filter();
        assert_eq!(f.push(&[0, 3, 1, 2, 3]), vec![]);
        assert_eq!(f.refused, 1);
    }
}
