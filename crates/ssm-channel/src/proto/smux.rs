//! smux protocol version 1 (github.com/xtaci/smux), the multiplexer mux-mode
//! Port sessions run over the data channel's byte stream, as a sans-IO engine.
//!
//! Frame: `ver:u8=1 | cmd:u8 | len:u16 LE | sid:u32 LE | data[len]`
//! (`frame.go`). Commands SYN 0, FIN 1, PSH 2, NOP 3; UPD (4) exists only in
//! version 2 and, like any other unknown command or version, is a protocol
//! error that ends the whole session (`session.go` recvLoop).
//!
//! The plugin is the client (stream ids 3, 5, 7, ...; the counter starts at 1
//! and is bumped by 2 before each use), the agent the server. There is no
//! half-close: FIN closes a stream both ways.
//!
//! Queued frames leave as smux's `shaperLoop` sends them (`session.go`,
//! `stream.go` v1 `Write`: `writeFrameInternal(frame, deadline,
//! numWritten)`): fewest frames written by its stream first, so streams share
//! the byte stream fairly whatever order their data came in. SYN and NOP go
//! first; a FIN goes after its stream's data.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;

pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// smux `DefaultConfig().MaxFrameSize`.
pub const DEFAULT_MAX_FRAME: usize = 32 * 1024;
/// smux `DefaultConfig().KeepAliveInterval`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Syn = 0,
    Fin = 1,
    Psh = 2,
    Nop = 3,
}

impl Cmd {
    fn from_u8(v: u8) -> Option<Cmd> {
        Some(match v {
            0 => Cmd::Syn,
            1 => Cmd::Fin,
            2 => Cmd::Psh,
            3 => Cmd::Nop,
            _ => return None,
        })
    }
}

/// A smux stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("smux frame with version {0} (expected 1)")]
    BadVersion(u8),
    #[error("smux frame with unknown command {0}")]
    BadCommand(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxEvent {
    /// The peer opened a stream (SYN).
    Opened(StreamId),
    Data(StreamId, Vec<u8>),
    /// The peer closed a stream (FIN). The stream is gone.
    Closed(StreamId),
}

/// Writes one frame header.
pub fn encode_header(cmd: Cmd, len: u16, sid: StreamId, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.push(cmd as u8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&sid.0.to_le_bytes());
}

/// A frame waiting in the shaper: smaller `prio` first, then older.
#[derive(Debug)]
struct Queued {
    prio: u64,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.prio, self.seq) == (other.prio, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.prio, self.seq).cmp(&(other.prio, other.seq))
    }
}

#[derive(Debug)]
pub struct Mux {
    role: Role,
    next_id: u32,
    max_frame: usize,
    keepalive: bool,
    next_nop: Option<Instant>,
    streams: HashMap<StreamId, ()>,
    /// Bytes received but not yet forming a whole frame.
    inbuf: Vec<u8>,
    /// Frames waiting for their turn, and the bytes in them.
    shaper: BinaryHeap<Reverse<Queued>>,
    shaper_bytes: usize,
    shaper_seq: u64,
    /// Frames each open stream has queued (smux's `numWritten`).
    written: HashMap<StreamId, u64>,
    /// Output already taken from the shaper: the rest of a frame in progress.
    out: BytesMut,
    events: VecDeque<MuxEvent>,
}

impl Mux {
    /// `keepalive`: send a NOP every 10 s (needed by agents that run smux keepalive).
    /// We never close the session for lack of incoming frames: the data channel
    /// has its own liveness.
    pub fn new(role: Role, keepalive: bool) -> Self {
        Mux {
            role,
            next_id: 1,
            max_frame: DEFAULT_MAX_FRAME,
            keepalive,
            next_nop: None,
            streams: HashMap::new(),
            inbuf: Vec::new(),
            shaper: BinaryHeap::new(),
            shaper_bytes: 0,
            shaper_seq: 0,
            written: HashMap::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
        }
    }

    /// Caps PSH frames below smux's 32 KiB so streams interleave finely.
    pub fn with_max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame.clamp(1, u16::MAX as usize);
        self
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_open(&self, sid: StreamId) -> bool {
        self.streams.contains_key(&sid)
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Client side: opens a stream (SYN) and returns its id.
    pub fn open(&mut self) -> StreamId {
        self.next_id += 2;
        let sid = StreamId(self.next_id);
        self.streams.insert(sid, ());
        self.push_frame(0, Cmd::Syn, sid, &[]);
        sid
    }

    /// Queues data on an open stream; returns false if the stream is not open.
    pub fn write(&mut self, sid: StreamId, data: &[u8]) -> bool {
        if !self.streams.contains_key(&sid) {
            return false;
        }
        for chunk in data.chunks(self.max_frame) {
            let n = self.written.entry(sid).or_default();
            let prio = *n;
            *n += 1;
            self.push_frame(prio, Cmd::Psh, sid, chunk);
        }
        true
    }

    /// Closes a stream (FIN) if it is open.
    pub fn close(&mut self, sid: StreamId) {
        if self.streams.remove(&sid).is_some() {
            let prio = self.written.remove(&sid).unwrap_or(0);
            self.push_frame(prio, Cmd::Fin, sid, &[]);
        }
    }

    fn push_frame(&mut self, prio: u64, cmd: Cmd, sid: StreamId, data: &[u8]) {
        let mut frame = Vec::with_capacity(HEADER_LEN + data.len());
        encode_header(cmd, data.len() as u16, sid, &mut frame);
        frame.extend_from_slice(data);
        self.shaper_seq += 1;
        self.shaper_bytes += frame.len();
        self.shaper.push(Reverse(Queued { prio, seq: self.shaper_seq, frame }));
    }

    /// Bytes waiting to go to the peer.
    pub fn pending_output(&self) -> usize {
        self.out.len() + self.shaper_bytes
    }

    /// Takes up to `max` bytes of output (frames are not aligned to these chunks).
    pub fn take_output(&mut self, max: usize) -> BytesMut {
        while self.out.len() < max {
            let Some(Reverse(q)) = self.shaper.pop() else { break };
            self.shaper_bytes -= q.frame.len();
            self.out.extend_from_slice(&q.frame);
        }
        let n = max.min(self.out.len());
        self.out.split_to(n)
    }

    /// Feeds bytes from the peer, in order, split anywhere.
    pub fn handle_input(&mut self, mut bytes: &[u8]) -> Result<(), MuxError> {
        // Fast path: parse straight from `bytes` when nothing is pending.
        if !self.inbuf.is_empty() {
            self.inbuf.extend_from_slice(bytes);
            let buf = std::mem::take(&mut self.inbuf);
            let used = self.parse(&buf)?;
            self.inbuf = buf[used..].to_vec();
            return Ok(());
        }
        let used = self.parse(bytes)?;
        bytes = &bytes[used..];
        self.inbuf.extend_from_slice(bytes);
        Ok(())
    }

    /// Parses whole frames; returns the bytes consumed.
    fn parse(&mut self, buf: &[u8]) -> Result<usize, MuxError> {
        let mut at = 0;
        while buf.len() - at >= HEADER_LEN {
            let h = &buf[at..at + HEADER_LEN];
            if h[0] != VERSION {
                return Err(MuxError::BadVersion(h[0]));
            }
            let cmd = Cmd::from_u8(h[1]).ok_or(MuxError::BadCommand(h[1]))?;
            let len = u16::from_le_bytes([h[2], h[3]]) as usize;
            let sid = StreamId(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
            if buf.len() - at < HEADER_LEN + len {
                break;
            }
            let data = &buf[at + HEADER_LEN..at + HEADER_LEN + len];
            at += HEADER_LEN + len;
            match cmd {
                Cmd::Nop => {}
                Cmd::Syn => {
                    // A SYN for an existing id is ignored (session.go).
                    if self.streams.insert(sid, ()).is_none() {
                        self.events.push_back(MuxEvent::Opened(sid));
                    }
                }
                Cmd::Fin => {
                    if self.streams.remove(&sid).is_some() {
                        self.written.remove(&sid);
                        self.events.push_back(MuxEvent::Closed(sid));
                    }
                }
                Cmd::Psh => {
                    // PSH for an unknown stream is thrown away.
                    if self.streams.contains_key(&sid) && !data.is_empty() {
                        self.events.push_back(MuxEvent::Data(sid, data.to_vec()));
                    }
                }
            }
        }
        Ok(at)
    }

    pub fn poll_event(&mut self) -> Option<MuxEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.keepalive {
            self.next_nop
        } else {
            None
        }
    }

    /// Arms or fires the keepalive NOP.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.keepalive {
            return;
        }
        match self.next_nop {
            Some(t) if now >= t => {
                self.push_frame(0, Cmd::Nop, StreamId(0), &[]);
                self.next_nop = Some(now + KEEPALIVE_INTERVAL);
            }
            Some(_) => {}
            None => self.next_nop = Some(now + KEEPALIVE_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_ids_start_at_3_and_frames_match_smux_layout() {
        let mut c = Mux::new(Role::Client, false);
        let a = c.open();
        let b = c.open();
        assert_eq!((a, b), (StreamId(3), StreamId(5)));
        assert!(c.write(a, b"hi"));
        c.close(a);
        let bytes = c.take_output(usize::MAX);
        assert_eq!(
            bytes,
            [
                [1, 0, 0, 0, 3, 0, 0, 0].as_slice(),   // SYN 3
                &[1, 0, 0, 0, 5, 0, 0, 0],             // SYN 5
                &[1, 2, 2, 0, 3, 0, 0, 0, b'h', b'i'], // PSH 3 "hi"
                &[1, 1, 0, 0, 3, 0, 0, 0],             // FIN 3
            ]
            .concat()
        );
        assert!(!c.write(a, b"late"), "writing to a closed stream is refused");
    }

    #[test]
    fn server_sees_open_data_close() {
        let mut c = Mux::new(Role::Client, false);
        let mut s = Mux::new(Role::Server, false);
        let sid = c.open();
        c.write(sid, b"abc");
        c.close(sid);
        s.handle_input(&c.take_output(usize::MAX)).expect("valid");
        assert_eq!(s.poll_event(), Some(MuxEvent::Opened(sid)));
        assert_eq!(s.poll_event(), Some(MuxEvent::Data(sid, b"abc".to_vec())));
        assert_eq!(s.poll_event(), Some(MuxEvent::Closed(sid)));
        assert_eq!(s.open_streams(), 0);
    }

    #[test]
    fn unknown_command_and_version_are_errors() {
        let mut s = Mux::new(Role::Server, false);
        assert_eq!(s.handle_input(&[1, 4, 0, 0, 0, 0, 0, 0]), Err(MuxError::BadCommand(4)));
        let mut s = Mux::new(Role::Server, false);
        assert_eq!(s.handle_input(&[2, 0, 0, 0, 3, 0, 0, 0]), Err(MuxError::BadVersion(2)));
    }

    #[test]
    fn psh_for_unknown_stream_is_dropped_and_duplicate_syn_ignored() {
        let mut s = Mux::new(Role::Server, false);
        s.handle_input(&[1, 2, 1, 0, 9, 0, 0, 0, b'x']).expect("valid");
        assert_eq!(s.poll_event(), None);
        s.handle_input(&[1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0]).expect("valid");
        assert_eq!(s.poll_event(), Some(MuxEvent::Opened(StreamId(3))));
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn keepalive_nops_every_interval_only_when_enabled() {
        let t0 = Instant::now();
        let mut m = Mux::new(Role::Client, true);
        m.handle_timeout(t0);
        assert_eq!(m.poll_timeout(), Some(t0 + KEEPALIVE_INTERVAL));
        m.handle_timeout(t0 + KEEPALIVE_INTERVAL);
        assert_eq!(m.take_output(usize::MAX), vec![1, 3, 0, 0, 0, 0, 0, 0]);
        let mut off = Mux::new(Role::Client, false);
        off.handle_timeout(t0);
        assert_eq!(off.poll_timeout(), None);
    }

    proptest! {
        /// Any split of the byte stream yields the same events.
        #[test]
        fn deframer_copes_with_any_split(
            writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 1..8),
            cuts in proptest::collection::vec(1usize..700, 1..50),
            max_frame in 1usize..5000,
        ) {
            let mut c = Mux::new(Role::Client, false).with_max_frame(max_frame);
            let sid = c.open();
            for w in &writes { c.write(sid, w); }
            c.close(sid);
            let stream = c.take_output(usize::MAX);
            let mut s = Mux::new(Role::Server, false);
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + cut).min(stream.len());
                s.handle_input(&stream[at..end]).expect("valid");
                at = end;
            }
            let mut got = Vec::new();
            let mut closed = false;
            while let Some(ev) = s.poll_event() {
                match ev {
                    MuxEvent::Data(_, d) => got.extend(d),
                    MuxEvent::Closed(_) => closed = true,
                    MuxEvent::Opened(_) => {}
                }
            }
            prop_assert_eq!(got, writes.concat());
            prop_assert!(closed);
        }
    }

    /// smux's shaper: a stream that queued much is overtaken by one that
    /// queued little, and a FIN stays behind its stream's data.
    #[test]
    fn streams_share_output_by_frames_written() {
        let mut m = Mux::new(Role::Server, false).with_max_frame(4);
        m.handle_input(&[1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0]).expect("two SYNs");
        while m.poll_event().is_some() {}
        m.write(StreamId(3), b"aaaaaaaaaaaa"); // three frames
        m.close(StreamId(3));
        m.write(StreamId(5), b"bbbbbbbb"); // two frames
        let out = m.take_output(usize::MAX);
        let mut order = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u16::from_le_bytes([out[at + 2], out[at + 3]]) as usize;
            order.push((out[at + 1], out[at + 4]));
            at += HEADER_LEN + len;
        }
        let (psh, fin) = (Cmd::Psh as u8, Cmd::Fin as u8);
        assert_eq!(order, vec![(psh, 3), (psh, 5), (psh, 3), (psh, 5), (psh, 3), (fin, 3)]);
        assert_eq!(m.pending_output(), 0);
    }
}
