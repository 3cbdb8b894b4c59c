//! The OS routing table.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "linux")]
mod watch_linux;
#[cfg(target_os = "macos")]
mod watch_macos;

#[cfg(target_os = "linux")]
pub(crate) use watch_linux::Watcher;
#[cfg(target_os = "macos")]
pub(crate) use watch_macos::Watcher;

/// Elsewhere: no change is ever reported.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub(crate) struct Watcher;

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
impl Watcher {
    pub(crate) fn open() -> std::io::Result<Watcher> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "only Linux and macOS are supported"))
    }

    pub(crate) fn wait(&mut self, _: std::time::Duration) -> std::io::Result<Vec<crate::watch::NetChange>> {
        Ok(Vec::new())
    }
}

use crate::{RouteError, RouteTable};

/// The routing table of this machine (of the current network namespace on Linux).
pub fn system_table() -> Result<Box<dyn RouteTable>, RouteError> {
    #[cfg(target_os = "linux")]
    return Ok(Box::new(linux::NetlinkTable::open()?));
    #[cfg(target_os = "macos")]
    return Ok(Box::new(macos::RoutingSocket::open()?));
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    return Err(RouteError::Os {
        op: "open the routing table",
        source: std::io::Error::new(std::io::ErrorKind::Unsupported, "only Linux and macOS are supported"),
    });
}

/// Whether `fd` has something to read within `timeout` (a signal counts as
/// nothing yet): how both network watchers wait for the kernel.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn readable(fd: std::os::fd::BorrowedFd<'_>, timeout: std::time::Duration) -> std::io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Interface name for an index, or `ifN` when the OS no longer knows it.
pub(crate) fn ifname(index: u32) -> String {
    nix::net::if_::if_indextoname(index).ok().and_then(|c| c.into_string().ok()).unwrap_or_else(|| format!("if{index}"))
}
