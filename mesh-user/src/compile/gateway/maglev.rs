//! Weighted Maglev for the gateway's clients outside the node (tc, per packet):
//! Katran's V2 accumulator (docs/gateway-research.md §3). Pure: the table
//! depends only on the backends' addresses, their weights and the table size,
//! so it is the same after an agent restart and on every node.
//!
//! - Backends are sorted by their address bytes (IP octets, then the port, big
//!   endian) before building, so the input order does not matter.
//! - Each backend's preference list is `offset + i * skip (mod M)`, with offset
//!   and skip from FNV-1a (64 bit, two fixed seeds) of its address bytes,
//!   finished with murmur3's 64-bit mix. M is prime and `1 <= skip < M`, so
//!   every list visits every slot.
//! - Turns: every backend adds its weight to an accumulator each round; while
//!   the accumulator reaches the largest weight it takes its next free
//!   preferred slot and pays the largest weight back. Slots come out in
//!   proportion to weight.

use std::{collections::BTreeMap, hash::Hasher as _, net::IpAddr};

use crate::compile::{BackendAddr, DestinationPlan};

/// Table sizes we use (Cilium's list): primes, each about twice the last.
pub const PRIMES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];
/// The default table size.
pub const DEFAULT_SIZE: u32 = 16381;
/// Slots per backend at least, so that removing one backend moves about its
/// own share of flows (Maglev paper, §5.3; Cilium's advice).
pub const SLOTS_PER_BACKEND: u64 = 100;

/// FNV-1a key (offset basis) for a backend's offset.
const SEED_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a key for a backend's skip: another fixed basis.
const SEED_SKIP: u64 = 0x6c62_272e_07bb_0142;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "{backends} backends need a Maglev table of at least {needed} slots; the largest is {max}"
    )]
    TooManyBackends {
        backends: usize,
        needed: u64,
        max: u32,
    },
}

/// The smallest listed prime that is at least `DEFAULT_SIZE` and
/// `SLOTS_PER_BACKEND` slots per backend.
pub fn table_size(backends: usize) -> Result<u32, MaglevError> {
    let needed = (backends as u64 * SLOTS_PER_BACKEND).max(u64::from(DEFAULT_SIZE));
    PRIMES
        .iter()
        .copied()
        .find(|&p| u64::from(p) >= needed)
        .ok_or(MaglevError::TooManyBackends {
            backends,
            needed,
            max: PRIMES[PRIMES.len() - 1],
        })
}

/// The bytes a backend is known by: IP octets then port, big endian.
fn key_bytes(b: &BackendAddr) -> Vec<u8> {
    let mut out = match b.ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend_from_slice(&b.port.to_be_bytes());
    out
}

fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::with_key(seed);
    h.write(bytes);
    // murmur3's fmix64: FNV's low bits alone are weak for keys that differ in
    // their last byte (consecutive pod addresses).
    mesh_common::fmix64(h.finish())
}

/// Weighted backends of one family from a port's destinations: each
/// destination's weight shared evenly by its backends (scaled to integers),
/// a backend named by several destinations summing its shares; weight 0 out.
pub fn weighted(destinations: &[DestinationPlan], v4: bool) -> Vec<(BackendAddr, u64)> {
    const SCALE: u64 = 1_000_000;
    let mut out: BTreeMap<BackendAddr, u64> = BTreeMap::new();
    for d in destinations {
        let members: Vec<&BackendAddr> =
            d.backends.iter().filter(|b| b.ip.is_ipv4() == v4).collect();
        if members.is_empty() || d.weight == 0 {
            continue;
        }
        let each = d.weight.saturating_mul(SCALE) / members.len() as u64;
        for b in members {
            *out.entry(*b).or_default() += each;
        }
    }
    out.into_iter().filter(|(_, w)| *w > 0).collect()
}

/// The table: `size` slots (a prime), each a backend. Empty when no backend
/// has weight.
pub fn build(backends: &[(BackendAddr, u64)], size: u32) -> Vec<BackendAddr> {
    let mut list: Vec<(Vec<u8>, BackendAddr, u64)> = backends
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(b, w)| (key_bytes(b), *b, *w))
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list.dedup_by(|a, b| a.0 == b.0);
    let m = u64::from(size);
    if list.is_empty() || m < 2 {
        return Vec::new();
    }
    let offset: Vec<u64> = list
        .iter()
        .map(|(k, ..)| hash(SEED_OFFSET, k) % m)
        .collect();
    let skip: Vec<u64> = list
        .iter()
        .map(|(k, ..)| hash(SEED_SKIP, k) % (m - 1) + 1)
        .collect();
    let wmax = list.iter().map(|(.., w)| *w).max().unwrap_or(1);
    let mut next = vec![0u64; list.len()];
    let mut acc = vec![0u64; list.len()];
    let mut table: Vec<Option<usize>> = vec![None; size as usize];
    let mut filled = 0u64;
    while filled < m {
        for b in 0..list.len() {
            acc[b] += list[b].2;
            if acc[b] < wmax {
                continue;
            }
            acc[b] -= wmax;
            loop {
                let c = ((offset[b] + next[b] * skip[b]) % m) as usize;
                next[b] += 1;
                if table[c].is_none() {
                    table[c] = Some(b);
                    break;
                }
            }
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    table.into_iter().map(|b| list[b.unwrap_or(0)].1).collect()
}

#[cfg(test)]
mod tests {
    use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};

    use super::*;

    fn b(last: u8) -> BackendAddr {
        BackendAddr {
            ip: IpAddr::from([10, 244, 0, last]),
            port: 5000,
        }
    }

    fn shares(table: &[BackendAddr]) -> BTreeMap<BackendAddr, f64> {
        let mut out = BTreeMap::new();
        for s in table {
            *out.entry(*s).or_default() += 1.0 / table.len() as f64;
        }
        out
    }

    #[test]
    fn sizes_are_listed_primes_with_a_hundred_slots_per_backend() {
        assert_eq!(table_size(4), Ok(16381));
        assert_eq!(table_size(163), Ok(16381));
        assert_eq!(table_size(164), Ok(32749));
        assert_eq!(table_size(200), Ok(32749));
        assert_eq!(table_size(1310), Ok(131_071));
        assert!(matches!(
            table_size(1311),
            Err(MaglevError::TooManyBackends { .. })
        ));
    }

    #[test]
    fn eighty_twenty_over_four_backends_within_one_percent() {
        let destinations = vec![
            DestinationPlan {
                name: "v1".into(),
                weight: 80,
                backends: vec![b(11), b(12), b(13)],
            },
            DestinationPlan {
                name: "v2".into(),
                weight: 20,
                backends: vec![b(14)],
            },
        ];
        let weighted = weighted(&destinations, true);
        let table = build(&weighted, DEFAULT_SIZE);
        assert_eq!(table.len(), DEFAULT_SIZE as usize);
        let s = shares(&table);
        for (backend, expected) in [
            (b(11), 0.8 / 3.0),
            (b(12), 0.8 / 3.0),
            (b(13), 0.8 / 3.0),
            (b(14), 0.2),
        ] {
            let got = s.get(&backend).copied().unwrap_or_default();
            assert!(
                (got - expected).abs() < 0.01,
                "{backend}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_its_share() {
        let mut rng = StdRng::seed_from_u64(7);
        let flows: Vec<u32> = (0..10_000).map(|_| rng.random()).collect();
        for n in [4u8, 10, 50] {
            let all: Vec<(BackendAddr, u64)> = (1..=n).map(|i| (b(i), 1)).collect();
            let size = table_size(all.len()).expect("a listed size");
            let before = build(&all, size);
            let after = build(&all[1..], size);
            let moved = flows
                .iter()
                .filter(|&&h| {
                    let slot = (h % size) as usize;
                    before[slot] != after[slot]
                })
                .count();
            let bound = 1.0 / f64::from(n) + 0.02;
            let frac = moved as f64 / flows.len() as f64;
            assert!(frac <= bound, "n={n}: moved {frac} > {bound}");
        }
    }

    #[test]
    fn the_table_does_not_depend_on_input_order() {
        let mut all: Vec<(BackendAddr, u64)> = (1..=20).map(|i| (b(i), u64::from(i))).collect();
        let one = build(&all, 4093);
        all.reverse();
        assert_eq!(build(&all, 4093), one);
        all.swap(3, 11);
        assert_eq!(build(&all, 4093), one);
    }

    #[test]
    fn families_are_kept_apart_and_weight_zero_is_out() {
        let v6 = BackendAddr {
            ip: std::net::Ipv6Addr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]).into(),
            port: 1,
        };
        let destinations = vec![
            DestinationPlan {
                name: "a".into(),
                weight: 100,
                backends: vec![b(1), v6],
            },
            DestinationPlan {
                name: "b".into(),
                weight: 0,
                backends: vec![b(2)],
            },
        ];
        assert_eq!(weighted(&destinations, true), vec![(b(1), 100_000_000)]);
        assert_eq!(weighted(&destinations, false), vec![(v6, 100_000_000)]);
        assert!(build(&[], 251).is_empty());
    }
}
