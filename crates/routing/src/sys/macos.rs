//! macOS: routes through a `PF_ROUTE` socket, listing through `sysctl(NET_RT_DUMP)`.
//! The message format lives in [`crate::darwin`], where it is unit-tested on Linux.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::ifname;
use crate::darwin::{self, RTF_IFSCOPE, RTM_ADD, RTM_DELETE};
use crate::{Route, RouteEntry, RouteError, RouteTable};

pub(crate) struct RoutingSocket {
    fd: OwnedFd,
    seq: i32,
}

impl RoutingSocket {
    pub(crate) fn open() -> Result<Self, RouteError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::PF_ROUTE, libc::SOCK_RAW, libc::AF_UNSPEC) };
        if raw < 0 {
            return Err(RouteError::Os { op: "open a routing socket", source: io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // We never read the kernel's broadcast of routing changes; stop it queueing up.
        // SAFETY: shutdown(2) on our own descriptor.
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
        Ok(RoutingSocket { fd, seq: 0 })
    }

    fn send(&mut self, kind: u8, op: &'static str, route: &Route) -> Result<(), RouteError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = darwin::route_message(kind, self.seq, route);
        // SAFETY: writes `msg.len()` bytes from a live buffer to our descriptor.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            return Err(RouteError::from_os(op, route, io::Error::last_os_error()));
        }
        if n as usize != msg.len() {
            return Err(RouteError::Os {
                op,
                source: io::Error::new(io::ErrorKind::WriteZero, "short routing-socket write"),
            });
        }
        Ok(())
    }
}

/// `sysctl {CTL_NET, PF_ROUTE, 0, AF_UNSPEC, NET_RT_DUMP, 0}`: the whole table.
fn dump() -> io::Result<Vec<u8>> {
    let mut mib = [libc::CTL_NET, libc::PF_ROUTE, 0, libc::AF_UNSPEC, libc::NET_RT_DUMP, 0];
    for _ in 0..5 {
        let mut len: libc::size_t = 0;
        // SAFETY: size query with a null buffer.
        let rc = unsafe {
            libc::sysctl(mib.as_mut_ptr(), mib.len() as u32, std::ptr::null_mut(), &mut len, std::ptr::null_mut(), 0)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The table may grow between the two calls: leave room, retry on ENOMEM.
        len += len / 4 + 4096;
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` has `len` writable bytes; the kernel updates `len` to what it wrote.
        let rc = unsafe {
            libc::sysctl(mib.as_mut_ptr(), mib.len() as u32, buf.as_mut_ptr().cast(), &mut len, std::ptr::null_mut(), 0)
        };
        if rc == 0 {
            buf.truncate(len);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOMEM) {
            return Err(err);
        }
    }
    Err(io::Error::other("the routing table kept growing while being read"))
}

impl RouteTable for RoutingSocket {
    fn list(&mut self) -> Result<Vec<RouteEntry>, RouteError> {
        let buf = dump().map_err(|source| RouteError::Os { op: "list routes", source })?;
        let routes = darwin::parse_dump(&buf).map_err(|e| RouteError::Malformed("PF_ROUTE", e.to_string()))?;
        Ok(routes
            .into_iter()
            .filter(|d| d.route.ifindex != 0)
            .map(|d| RouteEntry { ifname: ifname(d.route.ifindex), scoped: d.flags & RTF_IFSCOPE != 0, route: d.route })
            .collect())
    }

    fn add(&mut self, route: &Route) -> Result<(), RouteError> {
        self.send(RTM_ADD, "add route", route)
    }

    fn delete(&mut self, route: &Route) -> Result<(), RouteError> {
        self.send(RTM_DELETE, "delete route", route)
    }
}
