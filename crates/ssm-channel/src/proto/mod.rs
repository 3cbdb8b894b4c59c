//! The protocol without I/O: bytes and time in, bytes, events and deadlines out.
//!
//! - [`codec`]: the binary frame, parsed through a checked view.
//! - [`payloads`]: the JSON payloads (handshake, acks, flags).
//! - [`session`]: the reliability layer and handshake.
//! - [`smux`]: smux v1, which multiplexes TCP connections in mux-mode Port sessions.
//! - [`version`]: the version rules that pick basic or mux mode.
//! - [`port`]: a Port session: local connections over smux or basic mode.

pub mod codec;
pub mod payloads;
pub mod port;
pub mod session;
pub mod smux;
pub mod version;
