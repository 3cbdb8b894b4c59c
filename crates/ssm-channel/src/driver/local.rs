//! The local connections a Port session carries: sockets with a reader and a
//! writer task each, or queues a producer in the same process fills and
//! drains itself. [`Locals`] moves bytes between them and the [`Port`] machine.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::proto::port::{ConnId, Port, PortEvent, Ready};

/// A local connection to carry over the session.
pub struct Conn {
    pub io: ConnIo,
    /// For logs: the peer address, say.
    pub label: String,
}

/// How the driver exchanges a connection's bytes.
pub enum ConnIo {
    /// A byte stream (a TCP connection, any pipe): a reader and a writer task
    /// each move its bytes to and from the driver.
    Stream { reader: Box<dyn AsyncRead + Send + Unpin>, writer: Box<dyn AsyncWrite + Send + Unpin> },
    /// Chunks in memory, from a producer in the same process (the tunnel's
    /// link): the driver takes them from `from_local` itself and hands what
    /// arrives to `to_local`, with no task or pipe in between. Either side
    /// dropping its end closes the connection.
    Queue { from_local: mpsc::Receiver<Bytes>, to_local: mpsc::Sender<Vec<u8>> },
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("label", &self.label).field("io", &self.io).finish()
    }
}

impl std::fmt::Debug for ConnIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnIo::Stream { .. } => "Stream",
            ConnIo::Queue { .. } => "Queue",
        })
    }
}

/// The local producer's ends of a [`ConnIo::Queue`] connection.
#[derive(Debug)]
pub struct QueueEnds {
    /// Bytes to send through the session.
    pub to_session: mpsc::Sender<Bytes>,
    /// Bytes that arrived through the session, in order.
    pub from_session: mpsc::Receiver<Vec<u8>>,
}

/// Chunks waiting between a [`ConnIo::Queue`] producer and the driver: the
/// same bound the reader task of a stream has (about 64 KiB of 4 KiB writes).
const QUEUE_IN: usize = 16;
/// Chunks waiting for a local writer, stream or queue.
const QUEUE_OUT: usize = 256;
/// Most bytes taken from queue connections in one turn of the driver loop
/// (a socket connection's reader task reads 16 KiB at a time).
const QUEUE_BURST: usize = 64 << 10;

impl Conn {
    pub fn from_tcp(stream: tokio::net::TcpStream) -> Conn {
        let label = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Conn { io: ConnIo::Stream { reader: Box::new(r), writer: Box::new(w) }, label }
    }

    /// A connection whose bytes the caller exchanges through the returned
    /// queues instead of a socket.
    pub fn queue(label: impl Into<String>) -> (Conn, QueueEnds) {
        let (to_session, from_local) = mpsc::channel(QUEUE_IN);
        let (to_local, from_session) = mpsc::channel(QUEUE_OUT);
        let conn = Conn { io: ConnIo::Queue { from_local, to_local }, label: label.into() };
        (conn, QueueEnds { to_session, from_session })
    }
}

/// What a local connection did.
pub(super) enum Cmd {
    Data(ConnId, Bytes),
    Eof(ConnId),
}

struct LocalConn {
    writer: mpsc::Sender<Vec<u8>>,
    /// The reader task of a [`ConnIo::Stream`].
    reader: Option<JoinHandle<()>>,
    label: String,
}

impl Drop for LocalConn {
    fn drop(&mut self) {
        // No half-close in either mode: dropping the writer channel lets the
        // writer flush and close; the reader stops here.
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

/// The local side of a Port session's driver.
pub(super) struct Locals {
    conns: HashMap<ConnId, LocalConn>,
    /// Basic mode: connections waiting for the one before them to end.
    waiting: HashMap<ConnId, Conn>,
    /// What [`ConnIo::Queue`] connections send, read by the driver itself.
    pub(super) queued: Vec<(ConnId, mpsc::Receiver<Bytes>)>,
    cmd_tx: mpsc::Sender<Cmd>,
    read_chunk: usize,
    /// Data for a local writer whose channel was full, with a sender to wait on.
    blocked: Option<(ConnId, Vec<u8>, mpsc::Sender<Vec<u8>>)>,
    ready: Option<oneshot::Sender<Ready>>,
}

impl Locals {
    pub(super) fn new(cmd_tx: mpsc::Sender<Cmd>, read_chunk: usize, ready: oneshot::Sender<Ready>) -> Self {
        Locals {
            conns: HashMap::new(),
            waiting: HashMap::new(),
            queued: Vec::new(),
            cmd_tx,
            read_chunk,
            blocked: None,
            ready: Some(ready),
        }
    }

    /// Hands the machine's events to the local connections until one of them
    /// cannot take more.
    pub(super) fn pump(&mut self, port: &mut Port) {
        while self.blocked.is_none() {
            let Some(ev) = port.poll_event() else { break };
            match ev {
                PortEvent::Ready(r) => {
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(r);
                    }
                }
                PortEvent::Data(id, d) => self.deliver(port, id, d),
                PortEvent::Closed(id) => {
                    if let Some(c) = self.forget(id) {
                        debug!(stream = id, conn = %c.label, "closed by the remote side");
                    }
                }
                PortEvent::Started(id) => {
                    if let Some(conn) = self.waiting.remove(&id) {
                        debug!(conn = %conn.label, "new connection (basic mode)");
                        self.spawn(id, conn);
                    }
                }
            }
        }
    }

    /// A chunk (or the end) of a queue connection, with what else that
    /// connection has already queued, up to [`QUEUE_BURST`] bytes, handed to
    /// the session as one write: smux frames each write on its own, so the
    /// link's 4 KiB writes one by one would make a short frame each (and the
    /// agent a short write to its target each).
    pub(super) fn take_queued(&mut self, port: &mut Port, cmd: Cmd) {
        let Cmd::Data(id, first) = cmd else { return self.handle_cmd(port, cmd) };
        let Some(at) = self.queued.iter().position(|(i, _)| *i == id) else {
            return self.handle_cmd(port, Cmd::Data(id, first));
        };
        let mut burst: Option<bytes::BytesMut> = None;
        let mut ended = false;
        while burst.as_ref().map_or(first.len(), |b| b.len()) < QUEUE_BURST {
            match self.queued[at].1.try_recv() {
                Ok(more) => burst.get_or_insert_with(|| bytes::BytesMut::from(&first[..])).extend_from_slice(&more),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        self.handle_cmd(port, Cmd::Data(id, burst.map_or(first, bytes::BytesMut::freeze)));
        if ended {
            self.handle_cmd(port, Cmd::Eof(id));
        }
    }

    /// A sender to wait on while a local writer is full.
    pub(super) fn blocked_sender(&self) -> Option<mpsc::Sender<Vec<u8>>> {
        self.blocked.as_ref().map(|(_, _, tx)| tx.clone())
    }

    /// The blocked writer has room (`Ok`) or is gone.
    pub(super) fn unblock(&mut self, permit: Result<mpsc::OwnedPermit<Vec<u8>>, ()>) {
        // Without a permit the writer went away; its data has nowhere to go.
        if let (Ok(permit), Some((_, data, _))) = (permit, self.blocked.take()) {
            permit.send(data);
        }
    }

    pub(super) fn add(&mut self, port: &mut Port, conn: Conn) {
        match port.open() {
            Some((id, true)) => {
                debug!(stream = id, conn = %conn.label, "new connection");
                self.spawn(id, conn);
            }
            Some((id, false)) => {
                debug!(conn = %conn.label, "basic mode carries one connection at a time; queued");
                self.waiting.insert(id, conn);
            }
            None => debug!(conn = %conn.label, "a connection before the handshake; dropped"),
        }
    }

    pub(super) fn handle_cmd(&mut self, port: &mut Port, cmd: Cmd) {
        match cmd {
            Cmd::Data(id, d) => {
                if self.conns.contains_key(&id) {
                    port.local_data(id, &d);
                }
            }
            Cmd::Eof(id) => {
                let Some(c) = self.forget(id) else { return };
                debug!(conn = %c.label, "local connection closed");
                port.local_eof(id);
            }
        }
    }

    fn deliver(&mut self, port: &mut Port, id: ConnId, data: Vec<u8>) {
        let Some(c) = self.conns.get(&id) else { return };
        match c.writer.try_send(data) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(data)) => {
                self.blocked = Some((id, data, c.writer.clone()));
            }
            // The local side is gone: end the connection as its writer task would.
            Err(mpsc::error::TrySendError::Closed(_)) => self.handle_cmd(port, Cmd::Eof(id)),
        }
    }

    /// Forgets a local connection (its streams or queues close with it).
    fn forget(&mut self, id: ConnId) -> Option<LocalConn> {
        self.queued.retain(|(i, _)| *i != id);
        self.conns.remove(&id)
    }

    fn spawn(&mut self, id: ConnId, conn: Conn) {
        let Conn { io, label } = conn;
        let (mut reader, mut writer) = match io {
            ConnIo::Stream { reader, writer } => (reader, writer),
            ConnIo::Queue { from_local, to_local } => {
                self.queued.push((id, from_local));
                self.conns.insert(id, LocalConn { writer: to_local, reader: None, label });
                return;
            }
        };
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(QUEUE_OUT);
        let cmd = self.cmd_tx.clone();
        let chunk = self.read_chunk;
        let reader_task = tokio::spawn(async move {
            let mut buf = vec![0u8; chunk];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = cmd.send(Cmd::Eof(id)).await;
                        return;
                    }
                    Ok(n) => {
                        if cmd.send(Cmd::Data(id, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let cmd = self.cmd_tx.clone();
        tokio::spawn(async move {
            while let Some(d) = wrx.recv().await {
                if writer.write_all(&d).await.is_err() {
                    let _ = cmd.send(Cmd::Eof(id)).await;
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        self.conns.insert(id, LocalConn { writer: wtx, reader: Some(reader_task), label });
    }
}

/// The next chunk (or end) of any [`ConnIo::Queue`] connection, taking them in
/// turn so one busy producer cannot starve the others.
pub(super) async fn next_queued(queued: &mut Vec<(ConnId, mpsc::Receiver<Bytes>)>) -> Cmd {
    std::future::poll_fn(|cx| {
        for _ in 0..queued.len() {
            let id = queued[0].0;
            let polled = queued[0].1.poll_recv(cx);
            queued.rotate_left(1);
            match polled {
                std::task::Poll::Ready(Some(b)) => return std::task::Poll::Ready(Cmd::Data(id, b)),
                std::task::Poll::Ready(None) => {
                    queued.retain(|(i, _)| *i != id);
                    return std::task::Poll::Ready(Cmd::Eof(id));
                }
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn data(cmd: Cmd) -> (ConnId, Option<Bytes>) {
        match cmd {
            Cmd::Data(id, b) => (id, Some(b)),
            Cmd::Eof(id) => (id, None),
        }
    }

    #[tokio::test]
    async fn queued_connections_take_turns_and_end_when_their_producer_goes() {
        let (a, mut a_ends) = Conn::queue("a");
        let (b, b_ends) = Conn::queue("b");
        let mut queued = Vec::new();
        for (id, conn) in [(1, a), (2, b)] {
            let ConnIo::Queue { from_local, .. } = conn.io else { panic!("a queue connection") };
            queued.push((id, from_local));
        }
        for i in 0..3u8 {
            a_ends.to_session.send(Bytes::from(vec![i])).await.expect("the driver side is open");
        }
        b_ends.to_session.send(Bytes::from_static(b"b")).await.expect("the driver side is open");
        // a has three chunks waiting, b one: b still gets its turn second.
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[0]))));
        assert_eq!(data(next_queued(&mut queued).await), (2, Some(Bytes::from_static(b"b"))));
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[1]))));
        drop(b_ends);
        assert_eq!(data(next_queued(&mut queued).await), (2, None), "b's producer is gone");
        assert_eq!(queued.len(), 1);
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[2]))));
        // Nothing waiting: pending, not an end.
        let idle = tokio::time::timeout(Duration::from_millis(20), next_queued(&mut queued)).await;
        assert!(idle.is_err());
        a_ends.to_session.send(Bytes::from_static(b"z")).await.expect("the driver side is open");
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(b"z"))));
        a_ends.from_session.close();
    }
}
