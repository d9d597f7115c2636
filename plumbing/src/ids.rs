//! Pools of host ids handed out one at a time and given back on drop: each VM's own uid
//! (the microVM launcher) and each sandbox's range of mapped ids (the sandbox launcher), so
//! that no two running environments share a host identity.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

/// A pool of numbers, for a `static`.
#[derive(Debug)]
pub struct IdPool {
    ids: Range<u32>,
    taken: Mutex<BTreeSet<u32>>,
}

/// Every number of the pool is held by a running environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub size: usize,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "all {} ids are in use", self.size)
    }
}

impl std::error::Error for Exhausted {}

impl IdPool {
    pub const fn new(ids: Range<u32>) -> Self {
        Self {
            ids,
            taken: Mutex::new(BTreeSet::new()),
        }
    }

    /// The lowest free number, held until the lease is dropped.
    pub fn take(&'static self) -> Result<IdLease, Exhausted> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(id) = self.ids.clone().find(|id| !taken.contains(id)) else {
            return Err(Exhausted {
                size: self.ids.len(),
            });
        };
        taken.insert(id);
        Ok(IdLease { pool: self, id })
    }
}

/// One number of an [`IdPool`], given back on drop.
#[derive(Debug)]
pub struct IdLease {
    pool: &'static IdPool,
    id: u32,
}

impl IdLease {
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for IdLease {
    fn drop(&mut self) {
        self.pool
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_held_and_come_back_on_drop() {
        static POOL: IdPool = IdPool::new(10..12);
        let a = POOL.take().unwrap();
        let b = POOL.take().unwrap();
        assert_eq!((a.id(), b.id()), (10, 11));
        assert_eq!(POOL.take().unwrap_err(), Exhausted { size: 2 });
        drop(a);
        assert_eq!(POOL.take().unwrap().id(), 10);
    }
}
