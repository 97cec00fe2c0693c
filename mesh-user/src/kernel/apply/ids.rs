//! Small ids (service tables, backend counters), reused after release.

use std::collections::BTreeSet;

/// Small ids, reused after release.
#[derive(Debug)]
pub(super) struct IdPool {
    next: u32,
    max: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    pub(super) fn new(max: u32) -> Self {
        Self {
            next: 0,
            max,
            free: BTreeSet::new(),
        }
    }

    pub(super) fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// How many ids can still be taken.
    pub(super) fn available(&self) -> usize {
        (self.max.saturating_sub(self.next) as usize) + self.free.len()
    }

    /// Marks `id` as taken (adopted from a previous agent).
    pub(super) fn reserve(&mut self, id: u32) {
        if id >= self.max {
            return;
        }
        while self.next <= id {
            self.free.insert(self.next);
            self.next += 1;
        }
        self.free.remove(&id);
    }

    /// Returns an id; giving one twice is harmless (it is handed out once).
    pub(super) fn give(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_ids_are_never_handed_out_again() {
        let mut pool = IdPool::new(10);
        pool.reserve(3);
        pool.reserve(1);
        let taken: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(taken, [0, 2, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn ids_are_reused() {
        let mut pool = IdPool::new(2);
        assert_eq!(
            (pool.take(), pool.take(), pool.take()),
            (Some(0), Some(1), None)
        );
        assert_eq!(pool.available(), 0);
        pool.give(0);
        pool.give(0);
        assert_eq!(pool.available(), 1);
        assert_eq!((pool.take(), pool.take()), (Some(0), None));
    }
}
