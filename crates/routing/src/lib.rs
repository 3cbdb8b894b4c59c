//! Routes for the CIDRs a tunnel carries.
//!
//! - [`RouteTable`]: list, add and delete IPv4/IPv6 routes. [`system_table`] gives the
//!   OS one (netlink on Linux, a `PF_ROUTE` socket on macOS); [`MemoryTable`] records
//!   operations and injects failures for tests.
//! - [`find_conflicts`]: what a set of CIDRs would collide with (connected networks,
//!   routes of other interfaces such as a corporate VPN, the default route), before
//!   anything is touched.
//! - [`endpoint_pins`]: host routes that keep the AWS endpoints on their original path
//!   when a routed CIDR would capture them, so the tunnel never routes itself into itself.
//! - [`RouteGuard`] and [`Journal`]: remove exactly the routes we added, on every exit
//!   path, and after a `kill -9` through [`cleanup_stale`].
//! - [`NetWatch`]: the kernel's news of address, route and link changes.

mod conflict;
pub mod darwin;
mod guard;
mod interfaces;
mod journal;
mod memory;
mod sys;
mod watch;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use conflict::{endpoint_pins, find_conflicts, lookup, Conflict, PinError};
pub use guard::{GuardError, RouteGuard};
pub use interfaces::{interfaces, Interface};
pub use journal::{
    cleanup_stale, default_run_dir, valid_name, write_json_atomic, CleanupReport, Journal, JournalError, JournalState,
    JournaledRoute,
};
pub use memory::{MemoryTable, Op};
pub use sys::system_table;
pub use watch::{ChangeKind, NetChange, NetWatch};

/// One route: a destination network reached through an interface, either directly
/// (the tunnel, a point-to-point link) or through a gateway on that interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub ifindex: u32,
}

impl Route {
    /// A route that sends `dest` straight into interface `ifindex`.
    pub fn via_interface(dest: IpNet, ifindex: u32) -> Self {
        Route { dest: dest.trunc(), gateway: None, ifindex }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(gw) => write!(f, "{} via {} (ifindex {})", self.dest, gw, self.ifindex),
            None => write!(f, "{} dev ifindex {}", self.dest, self.ifindex),
        }
    }
}

/// A route as the OS lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub route: Route,
    /// Interface name, when the OS still knows the index.
    pub ifname: String,
    /// macOS interface-scoped route (`RTF_IFSCOPE`): used only by sockets bound to that
    /// interface, so it never competes with ours.
    pub scoped: bool,
}

impl RouteEntry {
    pub fn describe(&self) -> String {
        match self.route.gateway {
            Some(gw) => format!("{} via {} dev {}", self.route.dest, gw, self.ifname),
            None => format!("{} dev {}", self.route.dest, self.ifname),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {0} already exists")]
    Exists(Route),
    #[error("route {0} does not exist")]
    NotFound(Route),
    #[error("changing routes needs root (run with sudo)")]
    PermissionDenied,
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0} routing interface answered with something we cannot read: {1}")]
    Malformed(&'static str, String),
}

impl RouteError {
    /// Map an OS error of `op` on `route` to the named variants where one fits.
    pub(crate) fn from_os(op: &'static str, route: &Route, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(nix::libc::EEXIST) => RouteError::Exists(route.clone()),
            Some(nix::libc::ESRCH) | Some(nix::libc::ENOENT) => RouteError::NotFound(route.clone()),
            Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => RouteError::PermissionDenied,
            _ => RouteError::Os { op, source },
        }
    }
}

/// The OS routing table, as far as one tunnel needs it.
pub trait RouteTable: Send {
    /// Unicast routes of the main table, IPv4 and IPv6.
    fn list(&mut self) -> Result<Vec<RouteEntry>, RouteError>;
    /// Add `route`; [`RouteError::Exists`] if the same destination is already routed
    /// the same way.
    fn add(&mut self, route: &Route) -> Result<(), RouteError>;
    /// Delete `route`; [`RouteError::NotFound`] if it is not there.
    fn delete(&mut self, route: &Route) -> Result<(), RouteError>;
}

impl<T: RouteTable + ?Sized> RouteTable for Box<T> {
    fn list(&mut self) -> Result<Vec<RouteEntry>, RouteError> {
        (**self).list()
    }
    fn add(&mut self, route: &Route) -> Result<(), RouteError> {
        (**self).add(route)
    }
    fn delete(&mut self, route: &Route) -> Result<(), RouteError> {
        (**self).delete(route)
    }
}
