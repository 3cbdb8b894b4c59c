//! A native client of the AWS Systems Manager Session Manager data channel.
//!
//! - [`codec`]: the binary frame, parsed through a checked view.
//! - [`payloads`]: the JSON payloads (handshake, acks, flags).
//! - [`session`]: the reliability layer and handshake as a sans-IO state machine.
//! - [`smux`]: smux v1, which multiplexes TCP connections in mux-mode Port sessions.
//! - [`version`]: the version rules that pick basic or mux mode.
//!
//! With the default `driver` feature: [`transport`] (the websocket), [`port`]
//! (the tokio driver of a Port session) and [`shell`] (the driver of a shell
//! session). The AWS API calls that start sessions live in `ssm-proxy`.

pub mod codec;
pub mod payloads;
#[cfg(feature = "driver")]
pub mod port;
pub mod session;
#[cfg(feature = "driver")]
pub mod shell;
pub mod smux;
#[cfg(feature = "driver")]
pub mod transport;
pub mod version;
