//! Devices that carry whole IP packets (IPv4 and IPv6) between the OS and the tunnel.
//!
//! - [`TunDevice`]: Linux TUN or macOS utun, with its addresses and MTU set up.
//! - [`MemoryDevice`]: the same interface over channels, for tests.
//! - [`af`]: the macOS utun family header; [`address`]: picking interface addresses.

pub mod address;
pub mod af;
mod memory;
#[cfg(any(target_os = "linux", target_os = "macos"))]
mod tun;

use std::future::Future;
use std::io;

pub use address::{allocate_v4, ula, V4Pair, DEFAULT_V4_RANGE};
pub use memory::{MemoryDevice, MemoryPeer};
#[cfg(any(target_os = "linux", target_os = "macos"))]
pub use tun::{TunConfig, TunDevice};

/// Default MTU of the tunnel interface. Packets travel inside a reliable byte stream,
/// so any size fits the SSM path; 1400 keeps a full-size packet within two 1024-byte
/// SSM messages with room for framing, and below the 1500 bytes that applications
/// probing the path MTU through the tunnel expect to be safe on the far side.
pub const DEFAULT_MTU: u16 = 1400;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("creating a tunnel device needs root (run with sudo)")]
    PermissionDenied,
    #[error("this system has no TUN support ({0}); on Linux load it with `modprobe tun`")]
    NoTunSupport(#[source] io::Error),
    #[error("could not {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A device that reads and writes bare IP packets. `recv` and `send` take `&self` so
/// one task can read while another writes.
pub trait Device: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn mtu(&self) -> u16;
    /// Wait for the next packet the OS routes into the tunnel; returns its length.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Hand one packet to the OS, as if it arrived on this interface.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}
