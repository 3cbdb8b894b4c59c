//! The OS device: a Linux TUN (`IFF_TUN | IFF_NO_PI`, never persistent, so it goes away
//! with the process) or a macOS utun (the 4-byte family header handled by [`crate::af`]),
//! both created and driven through `tun-rs`.

use std::io;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{Device, TunnelError, V4Pair};

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct TunConfig {
    /// Interface name; `None` lets the OS choose (`tunN` on Linux, `utunN` on macOS,
    /// where names cannot be chosen at all).
    pub name: Option<String>,
    pub ipv4: V4Pair,
    pub ipv6: Option<Ipv6Net>,
    pub mtu: u16,
}

/// A TUN/utun device carrying bare IP packets.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    name: String,
    index: u32,
    mtu: u16,
    addresses: Vec<IpNet>,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("mtu", &self.mtu)
            .field("addresses", &self.addresses)
            .finish()
    }
}

fn classify(e: io::Error) -> TunnelError {
    match e.raw_os_error() {
        // EPERM, EACCES
        Some(1) | Some(13) => TunnelError::PermissionDenied,
        // ENOENT (no /dev/net/tun), ENODEV (no driver)
        Some(2) | Some(19) => TunnelError::NoTunSupport(e),
        _ => TunnelError::Io { op: "create the tunnel device", source: e },
    }
}

impl TunDevice {
    pub fn create(config: &TunConfig) -> Result<TunDevice, TunnelError> {
        let mut builder = tun_rs::DeviceBuilder::new()
            .mtu(config.mtu)
            .ipv4(config.ipv4.local, 32u8, Some(config.ipv4.peer))
            .enable(true);
        if let Some(name) = &config.name {
            builder = builder.name(name.clone());
        }
        #[cfg(target_os = "macos")]
        if let Some(v6) = config.ipv6 {
            builder = builder.ipv6(v6.addr(), v6.prefix_len());
        }
        #[cfg(target_os = "macos")]
        {
            // Keep the family header (we check it in `af`) and add no routes of our own:
            // routes belong to the `routing` crate and its journal.
            builder = builder.with(|b| {
                b.associate_route(false).packet_information(true);
            });
        }
        let dev = builder.build_async().map_err(classify)?;
        let name = dev.name().map_err(|e| TunnelError::Io { op: "read the device name", source: e })?;
        #[cfg(target_os = "linux")]
        if let Some(v6) = config.ipv6 {
            // We own the only address on a point-to-point link: duplicate address
            // detection would only keep IPv6 unusable for its first second or two.
            let dad = format!("/proc/sys/net/ipv6/conf/{name}/accept_dad");
            if let Err(e) = std::fs::write(&dad, "0") {
                tracing::debug!("could not turn off DAD on {name}: {e}");
            }
            dev.add_address_v6(v6.addr(), v6.prefix_len())
                .map_err(|e| TunnelError::Io { op: "add the IPv6 address", source: e })?;
        }
        let index = dev.if_index().map_err(|e| TunnelError::Io { op: "read the device index", source: e })?;
        let mut addresses = vec![IpNet::V4(Ipv4Net::from(config.ipv4.local))];
        addresses.extend(config.ipv6.map(IpNet::V6));
        Ok(TunDevice { dev, name, index, mtu: config.mtu, addresses })
    }

    /// The OS interface index, for routes.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    pub fn local_v4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a {
            IpNet::V4(n) => Some(n.addr()),
            IpNet::V6(_) => None,
        })
    }
}

impl Device for TunDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn mtu(&self) -> u16 {
        self.mtu
    }

    #[cfg(not(target_os = "macos"))]
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    #[cfg(target_os = "macos")]
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::IoSliceMut;
        loop {
            let mut header = [0u8; crate::af::HEADER_LEN];
            let n = {
                let mut bufs = [IoSliceMut::new(&mut header), IoSliceMut::new(buf)];
                self.dev.recv_vectored(&mut bufs).await?
            };
            let Some(len) = n.checked_sub(crate::af::HEADER_LEN) else {
                tracing::warn!(bytes = n, "utun frame shorter than its header; dropped");
                continue;
            };
            match crate::af::check(header, &buf[..len]) {
                Ok(()) => return Ok(len),
                Err(e) => tracing::warn!("utun frame dropped: {e}"),
            }
        }
    }

    #[cfg(not(target_os = "macos"))]
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let n = self.dev.send(packet).await?;
        short_write(n, packet.len())
    }

    #[cfg(target_os = "macos")]
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        use std::io::IoSlice;
        let header = crate::af::header_for(packet).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let n = self.dev.send_vectored(&[IoSlice::new(&header), IoSlice::new(packet)]).await?;
        short_write(n, packet.len() + crate::af::HEADER_LEN)
    }
}

fn short_write(written: usize, expected: usize) -> io::Result<()> {
    if written == expected {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, format!("device took {written} of {expected} bytes")))
    }
}
