//! A native client of the AWS Systems Manager Session Manager data channel.
//!
//! - [`codec`]: the binary frame, parsed through a checked view.
//! - [`payloads`]: the JSON payloads (handshake, acks, flags).
//! - [`session`]: the reliability layer and handshake as a sans-IO state machine.
//! - [`smux`]: smux v1, which multiplexes TCP connections in mux-mode Port sessions.
//! - [`version`]: the version rules that pick basic or mux mode.

pub mod codec;
pub mod payloads;
pub mod session;
pub mod smux;
pub mod version;
pub mod aws;
pub mod transport;
pub mod port;
