//! macOS: a `PF_ROUTE` socket receives every routing message the kernel sends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::darwin::classify_change;
use crate::watch::NetChange;

pub(crate) struct Watcher {
    fd: OwnedFd,
}

impl Watcher {
    pub(crate) fn open() -> io::Result<Watcher> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::PF_ROUTE, libc::SOCK_RAW, libc::AF_UNSPEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fcntl(2) on our own descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watcher { fd })
    }

    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<Vec<NetChange>> {
        if !super::readable(self.fd.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // One message per read; the largest routing message is far below this.
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into a live buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(out),
                    // The socket buffer overflowed: messages were lost, so something changed.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        out.push(NetChange { kind: crate::watch::ChangeKind::Link, ifindex: 0 });
                        Ok(out)
                    }
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(out);
            }
            out.extend(classify_change(&buf[..n as usize]));
        }
    }
}
