//! Changes to the machine's network that can break or reroute connections
//! already open: an address added or removed, a route changed, an interface
//! going up or down. `start` uses them to check its websocket at once instead
//! of waiting for a timeout (a new Wi-Fi, a VPN coming up, a cable pulled).
//!
//! Linux: an rtnetlink socket joined to the link, address and route groups.
//! macOS: a `PF_ROUTE` socket, which receives every routing message; the
//! classification is [`crate::darwin::classify_change`].

use std::fmt;
use std::time::Duration;

use crate::RouteError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Address,
    Route,
    Link,
}

/// One change, on the interface with this index (0: not known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetChange {
    pub kind: ChangeKind,
    pub ifindex: u32,
}

impl fmt::Display for NetChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ChangeKind::Address => "address",
            ChangeKind::Route => "route",
            ChangeKind::Link => "link state",
        };
        match self.ifindex {
            0 => write!(f, "{what} change"),
            i => write!(f, "{what} change on {}", crate::sys::ifname(i)),
        }
    }
}

/// A subscription to the kernel's network change messages.
pub struct NetWatch {
    inner: crate::sys::Watcher,
    ignore: u32,
}

impl fmt::Debug for NetWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetWatch").field("ignore", &self.ignore).finish_non_exhaustive()
    }
}

impl NetWatch {
    /// Subscribe. Changes on interface `ignore` (the tunnel's own device, whose
    /// routes we add ourselves) are left out.
    pub fn open(ignore: u32) -> Result<NetWatch, RouteError> {
        let inner = crate::sys::Watcher::open()
            .map_err(|source| RouteError::Os { op: "subscribe to network changes", source })?;
        Ok(NetWatch { inner, ignore })
    }

    /// The changes that arrive within `timeout` (an empty list when none did).
    /// Returns as soon as there is at least one, with all already queued.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<NetChange>, RouteError> {
        let all = self.inner.wait(timeout).map_err(|source| RouteError::Os { op: "read network changes", source })?;
        Ok(all.into_iter().filter(|c| c.ifindex != self.ignore || c.ifindex == 0).collect())
    }
}
