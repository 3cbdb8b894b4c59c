//! A native client of the AWS Systems Manager Session Manager data channel.
//!
//! [`proto`] is the protocol, pure and sans-IO: the frame codec, the JSON
//! payloads, the reliability layer and handshake ([`session`]), smux, the
//! version rules, and the Port session's state machine ([`proto::port`]),
//! which the fuzz targets and the pair harness drive on a simulated clock.
//!
//! With the default `driver` feature, [`driver`] runs them on tokio: the
//! websocket ([`transport`]), the Port session's loop ([`port`]) and the shell
//! session's ([`shell`]). The AWS API calls that start sessions live in
//! `ssm-proxy`.

pub mod proto;
pub use proto::{codec, payloads, session, smux, version};

#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "driver")]
pub use driver::{port, proxy, shell, transport};
