//! The route journal: a file per daemon under the run directory that lists every route
//! the daemon added, written *before* each add, so that after a crash or `kill -9`
//! [`cleanup_stale`] can remove exactly those routes and nothing else.
//!
//! Liveness is an exclusive `flock` on `<name>.lock`, held for the daemon's lifetime:
//! the kernel drops it when the process dies, whatever the cause, so "the lock can be
//! taken" means "the owner is gone". That is immune to pid reuse.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{Route, RouteError, RouteTable};

/// Where daemons keep journals and control sockets: `$SSM_PROXY_RUN_DIR`, else
/// `/var/run/ssm-proxy`.
pub fn default_run_dir() -> PathBuf {
    std::env::var_os("SSM_PROXY_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/run/ssm-proxy"))
}

const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournaledRoute {
    pub route: Route,
    /// The interface name at the time of the add; cleanup deletes a route only if the
    /// table still shows it on an interface of this name.
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalState {
    pub version: u32,
    pub name: String,
    pub pid: u32,
    /// Unix seconds.
    pub started: u64,
    pub interface: Option<String>,
    pub routes: Vec<JournaledRoute>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("invalid tunnel name {0:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'")]
    BadName(String),
    #[error("a tunnel named {name:?} is already running (its lock {lock} is held)")]
    InUse { name: String, lock: PathBuf },
    #[error("{path} must be a directory owned by uid {uid} and writable only by it; fix or remove it")]
    UnsafeDir { path: PathBuf, uid: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a journal we can read ({reason}); left in place")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

/// Whether `name` may name a tunnel (and so its files): 1-64 letters, digits,
/// '.', '_' or '-', not starting with '.'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Create `dir` (0755) if needed and check nobody else can write into it.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), JournalError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    let uid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(JournalError::UnsafeDir { path: dir.to_path_buf(), uid });
    }
    Ok(())
}

/// Take the exclusive lock on `path`, making sure the file we locked is still the one
/// at `path` (a finishing owner unlinks it after unlocking).
fn lock(path: &Path) -> Result<Option<Flock<File>>, JournalError> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io_err(path))?;
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(JournalError::Io { path: path.to_path_buf(), source: e.into() }),
        };
        let same = match fs::metadata(path) {
            Ok(on_disk) => {
                let held = locked.metadata().map_err(io_err(path))?;
                on_disk.ino() == held.ino() && on_disk.dev() == held.dev()
            }
            Err(_) => false,
        };
        if same {
            return Ok(Some(locked));
        }
    }
}

fn read_state(path: &Path) -> Result<Option<JournalState>, JournalError> {
    match fs::read(path) {
        Ok(bytes) => {
            let state: JournalState = serde_json::from_slice(&bytes)
                .map_err(|e| JournalError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
            if state.version != VERSION {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("version {} (this build reads {VERSION})", state.version),
                });
            }
            Ok(Some(state))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::Io { path: path.to_path_buf(), source: e }),
    }
}

fn write_state(path: &Path, state: &JournalState) -> Result<(), JournalError> {
    write_json_atomic(path, state).map_err(|(p, source)| JournalError::Io { path: p, source })
}

/// Replace `path` with `value` as JSON (mode 0644), atomically: written to
/// `<path>.tmp`, synced, renamed over. On failure, the file that failed.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fn fail(p: &Path) -> impl FnOnce(std::io::Error) -> (PathBuf, std::io::Error) + '_ {
        move |e| (p.to_path_buf(), e)
    }
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp).map_err(fail(&tmp))?;
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| (tmp.clone(), e.into()))?;
    f.write_all(&bytes).map_err(fail(&tmp))?;
    f.sync_all().map_err(fail(&tmp))?;
    fs::rename(&tmp, path).map_err(fail(path))
}

/// The live journal of one running daemon.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
    state: JournalState,
}

impl Journal {
    /// Claim `name` in `dir`. Fails with [`JournalError::InUse`] while another live
    /// process holds it. A journal left by a dead owner is returned as the second value:
    /// the caller must clean it (see [`cleanup_stale`]) before adding routes.
    pub fn open(dir: &Path, name: &str) -> Result<(Journal, Option<JournalState>), JournalError> {
        if !valid_name(name) {
            return Err(JournalError::BadName(name.to_string()));
        }
        prepare_dir(dir)?;
        let lock_path = dir.join(format!("{name}.lock"));
        let path = dir.join(format!("{name}.journal"));
        let Some(lock) = lock(&lock_path)? else {
            return Err(JournalError::InUse { name: name.to_string(), lock: lock_path });
        };
        let leftover = read_state(&path)?.filter(|s| !s.routes.is_empty());
        let state = JournalState {
            version: VERSION,
            name: name.to_string(),
            pid: std::process::id(),
            started: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            interface: None,
            routes: leftover.as_ref().map(|s| s.routes.clone()).unwrap_or_default(),
        };
        let journal = Journal { path, lock_path, _lock: lock, state };
        journal.save()?;
        Ok((journal, leftover))
    }

    fn save(&self) -> Result<(), JournalError> {
        write_state(&self.path, &self.state)
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }

    pub fn set_interface(&mut self, name: &str) -> Result<(), JournalError> {
        self.state.interface = Some(name.to_string());
        self.save()
    }

    /// Record a route about to be added. Call before the add: a crash in between
    /// leaves an entry cleanup finds absent and skips.
    pub fn record_add(&mut self, route: &JournaledRoute) -> Result<(), JournalError> {
        if !self.state.routes.contains(route) {
            self.state.routes.push(route.clone());
        }
        self.save()
    }

    /// Forget a route that is gone (deleted, or found absent).
    pub fn record_removed(&mut self, route: &Route) -> Result<(), JournalError> {
        self.state.routes.retain(|r| &r.route != route);
        self.save()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // A journal that still lists routes stays for `cleanup`; the lock goes with us.
        if self.state.routes.is_empty() {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// What [`cleanup_stale`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Names of dead daemons whose journals were processed and removed.
    pub journals: Vec<String>,
    /// Routes deleted.
    pub removed: Vec<JournaledRoute>,
    /// Journaled routes that were no longer in the table (the kernel removes routes
    /// through a TUN device when the device dies with its process).
    pub already_gone: Vec<JournaledRoute>,
    /// Routes that could not be deleted; their journals are kept.
    pub failed: Vec<(JournaledRoute, String)>,
    /// Live daemons, left alone.
    pub running: Vec<String>,
    /// Journals that could not be read, left in place.
    pub unreadable: Vec<String>,
}

/// Delete the leftover routes of every dead daemon in `dir` (or only of `only`).
pub fn cleanup_stale(dir: &Path, table: &mut dyn RouteTable, only: Option<&str>) -> Result<CleanupReport, RouteError> {
    let mut report = CleanupReport::default();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(RouteError::Os { op: "read the run directory", source: e }),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".journal")).map(str::to_string))
        .filter(|n| valid_name(n) && only.is_none_or(|o| o == n))
        .collect();
    names.sort();
    for name in names {
        let lock_path = dir.join(format!("{name}.lock"));
        let path = dir.join(format!("{name}.journal"));
        let held = match lock(&lock_path) {
            Ok(Some(l)) => l,
            Ok(None) => {
                report.running.push(name);
                continue;
            }
            Err(e) => {
                report.unreadable.push(format!("{name}: {e}"));
                continue;
            }
        };
        let state = match read_state(&path) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                report.unreadable.push(e.to_string());
                continue;
            }
        };
        let table_now = table.list()?;
        let mut kept = Vec::new();
        for jr in state.routes.iter().rev() {
            let present = table_now.iter().any(|e| e.route == jr.route && e.ifname == jr.ifname);
            if !present {
                report.already_gone.push(jr.clone());
                continue;
            }
            match table.delete(&jr.route) {
                Ok(()) => report.removed.push(jr.clone()),
                Err(RouteError::NotFound(_)) => report.already_gone.push(jr.clone()),
                Err(e) => {
                    report.failed.push((jr.clone(), e.to_string()));
                    kept.push(jr.clone());
                }
            }
        }
        if kept.is_empty() {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(&lock_path);
            report.journals.push(name);
        } else {
            kept.reverse();
            let left = JournalState { routes: kept, ..state };
            if let Err(e) = write_state(&path, &left) {
                report.unreadable.push(e.to_string());
            }
        }
        drop(held);
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
