//! Routes that live exactly as long as the guard: journaled before each add, deleted
//! in reverse order when the guard is dropped or [`RouteGuard::remove_all`] is called.

use crate::{Journal, JournalError, JournaledRoute, Route, RouteError, RouteTable};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("could not journal the route: {0}")]
    Journal(#[from] JournalError),
}

/// Owns the routes one daemon added.
pub struct RouteGuard {
    table: Box<dyn RouteTable>,
    journal: Option<Journal>,
    added: Vec<JournaledRoute>,
}

impl std::fmt::Debug for RouteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteGuard").field("added", &self.added).field("journal", &self.journal).finish()
    }
}

impl RouteGuard {
    /// A guard over `table`; with a journal, every route is recorded there first.
    pub fn new(table: Box<dyn RouteTable>, journal: Option<Journal>) -> Self {
        RouteGuard { table, journal, added: Vec::new() }
    }

    /// Add `route` (through interface `ifname`), journaling it first. On failure nothing
    /// stays behind: the journal entry is withdrawn again.
    pub fn add(&mut self, route: Route, ifname: &str) -> Result<(), GuardError> {
        let jr = JournaledRoute { route, ifname: ifname.to_string() };
        if let Some(j) = self.journal.as_mut() {
            j.record_add(&jr)?;
        }
        if let Err(e) = self.table.add(&jr.route) {
            if let Some(j) = self.journal.as_mut() {
                j.record_removed(&jr.route)?;
            }
            return Err(e.into());
        }
        tracing::debug!(route = %jr.route, ifname, "route added");
        self.added.push(jr);
        Ok(())
    }

    /// Routes added so far, in order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.added.iter().map(|r| &r.route)
    }

    pub fn table(&mut self) -> &mut dyn RouteTable {
        self.table.as_mut()
    }

    /// Delete every route this guard added, newest first. Routes already gone count as
    /// removed; the errors of the others are returned and their journal entries stay
    /// for `ssm-proxy cleanup`.
    pub fn remove_all(&mut self) -> Vec<(Route, RouteError)> {
        let mut errors = Vec::new();
        while let Some(jr) = self.added.pop() {
            match self.table.delete(&jr.route) {
                Ok(()) | Err(RouteError::NotFound(_)) => {
                    tracing::debug!(route = %jr.route, "route removed");
                    if let Some(j) = self.journal.as_mut() {
                        if let Err(e) = j.record_removed(&jr.route) {
                            tracing::warn!("journal update failed: {e}");
                        }
                    }
                }
                Err(e) => errors.push((jr.route, e)),
            }
        }
        errors
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        for (route, e) in self.remove_all() {
            tracing::error!("could not remove route {route}: {e}; `sudo ssm-proxy cleanup` will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryTable, Op};

    fn route(dest: &str) -> Route {
        Route::via_interface(dest.parse().expect("test CIDR"), 9)
    }

    #[test]
    fn drop_removes_in_reverse_order() {
        let table = MemoryTable::new(vec![]);
        {
            let mut g = RouteGuard::new(Box::new(table.clone()), None);
            g.add(route("10.0.0.0/8"), "tun0").expect("add");
            g.add(route("172.16.0.0/12"), "tun0").expect("add");
            assert_eq!(table.entries().len(), 2);
        }
        assert_eq!(table.entries(), vec![]);
        assert_eq!(
            table.ops(),
            vec![
                Op::Add(route("10.0.0.0/8")),
                Op::Add(route("172.16.0.0/12")),
                Op::Delete(route("172.16.0.0/12")),
                Op::Delete(route("10.0.0.0/8")),
            ]
        );
    }

    #[test]
    fn failed_add_is_not_removed_later_and_leaves_no_journal_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = MemoryTable::new(vec![]);
        table.fail_add(1, nix::libc::EEXIST);
        let (journal, _) = Journal::open(dir.path(), "t").expect("journal");
        let mut g = RouteGuard::new(Box::new(table.clone()), Some(journal));
        g.add(route("10.0.0.0/8"), "tun0").expect("add");
        let err = g.add(route("172.16.0.0/12"), "tun0").expect_err("injected failure");
        assert!(matches!(err, GuardError::Route(RouteError::Exists(_))), "{err}");
        let state = g.journal.as_ref().expect("journal").state().clone();
        assert_eq!(state.routes.len(), 1);
        drop(g);
        assert!(!table.ops().contains(&Op::Delete(route("172.16.0.0/12"))));
        assert!(!dir.path().join("t.journal").exists(), "journal removed once empty");
    }

    #[test]
    fn failed_delete_keeps_the_journal_for_cleanup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = MemoryTable::new(vec![]);
        let (journal, _) = Journal::open(dir.path(), "t").expect("journal");
        let mut g = RouteGuard::new(Box::new(table.clone()), Some(journal));
        g.add(route("10.0.0.0/8"), "tun0").expect("add");
        g.add(route("172.16.0.0/12"), "tun0").expect("add");
        table.fail_delete(0, nix::libc::EBUSY);
        let errors = g.remove_all();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, route("172.16.0.0/12"));
        drop(g);
        let text = std::fs::read_to_string(dir.path().join("t.journal")).expect("journal kept");
        assert!(text.contains("172.16.0.0/12") && !text.contains("10.0.0.0/8"), "{text}");
    }

    #[test]
    fn route_already_gone_counts_as_removed() {
        let table = MemoryTable::new(vec![]);
        let mut g = RouteGuard::new(Box::new(table.clone()), None);
        g.add(route("10.0.0.0/8"), "tun0").expect("add");
        table.fail_delete(0, nix::libc::ESRCH);
        assert!(g.remove_all().is_empty());
    }
}
