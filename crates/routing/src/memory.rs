//! An in-memory routing table for tests: records every operation and fails on demand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Route, RouteEntry, RouteError, RouteTable};

/// One operation a [`MemoryTable`] saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    List,
    Add(Route),
    Delete(Route),
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<RouteEntry>,
    ops: Vec<Op>,
    /// Fail the n-th add (0-based count of adds so far) with the given errno.
    fail_add_at: HashMap<usize, i32>,
    fail_delete_at: HashMap<usize, i32>,
    adds: usize,
    deletes: usize,
}

/// Cloning shares the table, so a test can keep a handle while a guard owns another.
#[derive(Clone, Debug, Default)]
pub struct MemoryTable {
    state: Arc<Mutex<State>>,
}

impl MemoryTable {
    pub fn new(entries: Vec<RouteEntry>) -> Self {
        let table = MemoryTable::default();
        table.lock().entries = entries;
        table
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Make the `nth` add from now on (0 = the next one) fail with `errno`.
    pub fn fail_add(&self, nth: usize, errno: i32) {
        let mut s = self.lock();
        let at = s.adds + nth;
        s.fail_add_at.insert(at, errno);
    }

    /// Make the `nth` delete from now on fail with `errno`.
    pub fn fail_delete(&self, nth: usize, errno: i32) {
        let mut s = self.lock();
        let at = s.deletes + nth;
        s.fail_delete_at.insert(at, errno);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    pub fn entries(&self) -> Vec<RouteEntry> {
        self.lock().entries.clone()
    }
}

impl RouteTable for MemoryTable {
    fn list(&mut self) -> Result<Vec<RouteEntry>, RouteError> {
        let mut s = self.lock();
        s.ops.push(Op::List);
        Ok(s.entries.clone())
    }

    fn add(&mut self, route: &Route) -> Result<(), RouteError> {
        let mut s = self.lock();
        s.ops.push(Op::Add(route.clone()));
        let n = s.adds;
        s.adds += 1;
        if let Some(errno) = s.fail_add_at.remove(&n) {
            return Err(RouteError::from_os("add route", route, std::io::Error::from_raw_os_error(errno)));
        }
        if s.entries.iter().any(|e| e.route.dest == route.dest && e.route.ifindex == route.ifindex) {
            return Err(RouteError::Exists(route.clone()));
        }
        s.entries.push(RouteEntry { route: route.clone(), ifname: format!("if{}", route.ifindex), scoped: false });
        Ok(())
    }

    fn delete(&mut self, route: &Route) -> Result<(), RouteError> {
        let mut s = self.lock();
        s.ops.push(Op::Delete(route.clone()));
        let n = s.deletes;
        s.deletes += 1;
        if let Some(errno) = s.fail_delete_at.remove(&n) {
            return Err(RouteError::from_os("delete route", route, std::io::Error::from_raw_os_error(errno)));
        }
        let before = s.entries.len();
        s.entries.retain(|e| &e.route != route);
        if s.entries.len() == before {
            return Err(RouteError::NotFound(route.clone()));
        }
        Ok(())
    }
}
