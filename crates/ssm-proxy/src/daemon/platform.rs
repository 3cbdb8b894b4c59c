//! What the daemon needs from the machine, behind one trait, so that its
//! start and teardown run on in-memory fakes in tests: the routing table,
//! the interfaces, the tunnel device, the run directory and the DNS backend.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ipnet::IpNet;
use routing::{Interface, RouteTable};
use tunnel::{Device, TunConfig, TunDevice};

use super::dns;

/// The tunnel device as the daemon uses it: a [`Device`] with an interface
/// index (for routes) and addresses (for `status`).
pub trait TunnelDevice: Device {
    fn index(&self) -> u32;
    fn addresses(&self) -> Vec<IpNet>;
}

impl TunnelDevice for TunDevice {
    fn index(&self) -> u32 {
        TunDevice::index(self)
    }
    fn addresses(&self) -> Vec<IpNet> {
        TunDevice::addresses(self).to_vec()
    }
}

/// The machine: the real one ([`System`]) or a test's.
pub trait Platform {
    type Device: TunnelDevice;
    fn route_table(&self) -> anyhow::Result<Box<dyn RouteTable>>;
    fn interfaces(&self) -> anyhow::Result<Vec<Interface>>;
    fn create_device(&self, config: &TunConfig) -> anyhow::Result<Arc<Self::Device>>;
    /// Where journals, locks and the control socket live.
    fn run_dir(&self) -> PathBuf;
    /// How this machine routes DNS by domain.
    fn dns_backend(&self) -> dns::Backend;
}

/// This machine, as root.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Platform for System {
    type Device = TunDevice;

    fn route_table(&self) -> anyhow::Result<Box<dyn RouteTable>> {
        routing::system_table().context("cannot open the routing table")
    }

    fn interfaces(&self) -> anyhow::Result<Vec<Interface>> {
        routing::interfaces().context("cannot list network interfaces")
    }

    fn create_device(&self, config: &TunConfig) -> anyhow::Result<Arc<TunDevice>> {
        Ok(Arc::new(TunDevice::create(config)?))
    }

    fn run_dir(&self) -> PathBuf {
        routing::default_run_dir()
    }

    fn dns_backend(&self) -> dns::Backend {
        dns::detect(std::path::Path::new("/"))
    }
}
