//! An in-memory [`Device`] for tests: what the tunnel writes comes out of the
//! [`MemoryPeer`], and what the peer injects is what the tunnel reads.

use std::io;

use tokio::sync::{mpsc, Mutex};

use crate::Device;

#[derive(Debug)]
pub struct MemoryDevice {
    name: String,
    mtu: u16,
    inbound: Mutex<mpsc::Receiver<Vec<u8>>>,
    outbound: mpsc::Sender<Vec<u8>>,
}

/// The "operating system" side of a [`MemoryDevice`].
#[derive(Debug)]
pub struct MemoryPeer {
    /// Packets to hand to the tunnel (as if applications sent them).
    pub to_tunnel: mpsc::Sender<Vec<u8>>,
    /// Packets the tunnel wrote (as if delivered to applications).
    pub from_tunnel: mpsc::Receiver<Vec<u8>>,
}

impl MemoryDevice {
    /// A device whose queues hold `capacity` packets each way.
    pub fn pair(name: &str, mtu: u16, capacity: usize) -> (MemoryDevice, MemoryPeer) {
        let (to_tunnel, inbound) = mpsc::channel(capacity);
        let (outbound, from_tunnel) = mpsc::channel(capacity);
        (
            MemoryDevice { name: name.to_string(), mtu, inbound: Mutex::new(inbound), outbound },
            MemoryPeer { to_tunnel, from_tunnel },
        )
    }
}

impl Device for MemoryDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn mtu(&self) -> u16 {
        self.mtu
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let packet = self.inbound.lock().await.recv().await;
        let packet = packet.ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "memory peer closed"))?;
        if packet.len() > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "packet larger than the read buffer"));
        }
        buf[..packet.len()].copy_from_slice(&packet);
        Ok(packet.len())
    }

    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        if packet.len() > self.mtu as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "packet larger than the MTU"));
        }
        self.outbound
            .send(packet.to_vec())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "memory peer closed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_cross_both_ways() {
        let (dev, mut peer) = MemoryDevice::pair("mem0", 1400, 4);
        peer.to_tunnel.send(vec![0x45, 1, 2]).await.expect("inject");
        let mut buf = [0u8; 1500];
        let n = dev.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], &[0x45, 1, 2]);
        dev.send(&[0x60, 9]).await.expect("send");
        assert_eq!(peer.from_tunnel.recv().await, Some(vec![0x60, 9]));
        assert!(dev.send(&vec![0x45; 1401]).await.is_err(), "over the MTU");
        drop(peer);
        assert_eq!(dev.recv(&mut buf).await.expect_err("closed").kind(), io::ErrorKind::BrokenPipe);
    }
}
