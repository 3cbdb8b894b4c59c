//! What the emulated agent does on the instance itself: connections dialled
//! from the instance's network namespace (the real agent runs there, so a Port
//! session's "localhost" is the instance's loopback), and the shell plugin's
//! process in a pseudo terminal, as `agent/session/shell/shell_unix.go` runs
//! it: `sh` (or `sh -c COMMAND` for InteractiveCommands) with
//! `TERM=xterm-256color`, `LANG=C.UTF-8` when unset, output read in pieces of
//! at most 1024 bytes. Unlike the real agent, which runs the shell as
//! `ssm-user` (a user with passwordless sudo), the emulator runs it as its own
//! user (root in the namespace lab).

use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::channel::PAYLOAD_SIZE;
use super::{Released, TargetEvent};

/// Dials `host:port` from inside the network namespace `netns` (a file such as
/// /run/netns/NAME), or from the emulator's own namespace.
pub async fn dial(host: &str, port: u16, netns: Option<&Path>) -> io::Result<TcpStream> {
    let Some(ns) = netns else { return TcpStream::connect((host, port)).await };
    let (ns, host) = (ns.to_path_buf(), host.to_owned());
    let (tx, rx) = tokio::sync::oneshot::channel();
    // setns moves only the calling thread: one of its own, ended after the dial.
    std::thread::spawn(move || {
        let dialed = (|| -> io::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(&ns)?;
            enter_netns(ns.as_raw_fd())?;
            let addr = (host.as_str(), port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address")))?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(dialed);
    });
    let s = rx.await.map_err(|_| io::Error::other("the dialling thread died"))??;
    TcpStream::from_std(s)
}

/// Moves the calling thread (or a child between fork and exec) into a network
/// namespace. Async-signal-safe: one system call.
#[cfg(target_os = "linux")]
fn enter_netns(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag; no memory is involved.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn enter_netns(_fd: RawFd) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "network namespaces exist only on Linux"))
}

/// A running shell. Dropping it kills the shell (as the agent does when the
/// session is terminated); what the shell started in the background stays.
pub struct Shell {
    /// Shared with the thread that reaps it, so a reaped pid is never signalled.
    child: Arc<Mutex<std::process::Child>>,
    master: std::fs::File,
    input: std::sync::mpsc::Sender<Vec<u8>>,
}

impl Shell {
    /// Starts `program` (the instance's `sh`) in a new pseudo terminal. Its output arrives as
    /// [`TargetEvent::ShellOutput`], its end as [`TargetEvent::ShellExited`];
    /// each write to its terminal, once it returned, as [`Released`].
    pub fn spawn(
        program: &str,
        command: Option<&str>,
        netns: Option<&Path>,
        events: mpsc::Sender<TargetEvent>,
        released: mpsc::UnboundedSender<Released>,
    ) -> io::Result<Shell> {
        let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
        // Neither end may leak into the shell's children (the agent it starts in
        // the background, say): a leaked terminal would outlive the shell.
        for fd in [&pty.master, &pty.slave] {
            set_cloexec(fd)?;
        }
        let mut cmd = Command::new(program);
        if let Some(c) = command {
            cmd.args(["-c", c]);
        }
        cmd.env("TERM", "xterm-256color");
        if std::env::var_os("LANG").is_none() {
            cmd.env("LANG", "C.UTF-8");
        }
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
        let ns: Option<OwnedFd> = netns.map(std::fs::File::open).transpose()?.map(OwnedFd::from);
        let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls: setsid,
        // ioctl and setns on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Make the terminal (now stdin) the session's controlling terminal.
                #[allow(clippy::useless_conversion)]
                if libc::ioctl(0, libc::TIOCSCTTY.into(), 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = ns_fd {
                    enter_netns(fd)?;
                }
                Ok(())
            });
        }
        let child = Arc::new(Mutex::new(cmd.spawn()?));
        drop(cmd); // our copies of the terminal's slave end
        drop(ns);
        let master = std::fs::File::from(pty.master);

        let mut reader = master.try_clone()?;
        let out = events.clone();
        let reaped = child.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; PAYLOAD_SIZE];
            // EIO once the shell and everything holding the terminal are gone.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if out.blocking_send(TargetEvent::ShellOutput(buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            let status = loop {
                match reaped.lock().unwrap_or_else(|p| p.into_inner()).try_wait() {
                    Ok(Some(s)) => break s.to_string(),
                    Ok(None) => {}
                    Err(e) => break e.to_string(),
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let _ = out.blocking_send(TargetEvent::ShellExited(status));
        });

        let mut writer = master.try_clone()?;
        let (input, typed) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            // The agent's write to the terminal blocks while the terminal's input
            // queue is full. A write that failed (the shell is gone) is released
            // too, so the data channel never waits on a dead terminal.
            let mut failed = false;
            for d in typed {
                failed = failed || writer.write_all(&d).is_err();
                if released.send(Released(d.len())).is_err() {
                    break;
                }
            }
        });
        Ok(Shell { child, master, input })
    }

    /// Types `data` at the shell.
    pub fn write(&self, data: Vec<u8>) -> bool {
        self.input.send(data).is_ok()
    }

    /// SetSize: the terminal's window size.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
        #[allow(clippy::useless_conversion)]
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ.into(), &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}
