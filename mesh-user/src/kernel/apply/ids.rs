//! Small ids (service tables, backend counters), reused after release.

use std::collections::BTreeSet;

/// An id [`IdPool::take`] handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Taken {
    pub(super) id: u32,
    /// Out before: given back, or a gap below an adopted id.
    pub(super) reused: bool,
}

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

    /// An id, and whether it was out before (given back, or a gap below an
    /// adopted id): the kernel's counters may hold counts of its last holder.
    pub(super) fn take(&mut self) -> Option<Taken> {
        if let Some(id) = self.free.pop_first() {
            return Some(Taken { id, reused: true });
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            Taken {
                id: self.next - 1,
                reused: false,
            }
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
        let taken: Vec<(u32, bool)> = std::iter::from_fn(|| pool.take())
            .map(|t| (t.id, t.reused))
            .collect();
        // The gaps below an adopted id may have counted for a previous agent.
        assert_eq!(
            taken,
            [
                (0, true),
                (2, true),
                (4, false),
                (5, false),
                (6, false),
                (7, false),
                (8, false),
                (9, false)
            ]
        );
    }

    #[test]
    fn ids_are_reused() {
        let mut pool = IdPool::new(2);
        let id = |t: Option<Taken>| t.map(|t| (t.id, t.reused));
        assert_eq!(
            (id(pool.take()), id(pool.take()), id(pool.take())),
            (Some((0, false)), Some((1, false)), None)
        );
        assert_eq!(pool.available(), 0);
        pool.give(0);
        pool.give(0);
        assert_eq!(pool.available(), 1);
        assert_eq!((id(pool.take()), id(pool.take())), (Some((0, true)), None));
    }
}
