//! Outlier detection's decisions (DestinationRule `outlierDetection`, at L4):
//! which backends of which service are ejected, from the kernel's counts of
//! failed and successful connects (`kernel::backend_counters`). Pure: the agent feeds it
//! counts and the time, and hands the ejected set to compile, which leaves
//! those backends out of the service's tables.
//!
//! Envoy's rules, as Istio configures them: a backend whose failures in a row
//! reach the threshold is ejected at once, for `baseEjectionTime` times the
//! number of times it was ejected (at most 300 s, Envoy's
//! `max_ejection_time`), while the share already ejected is below
//! `maxEjectionPercent` (so one can always go unless it is 0); it returns at
//! the first sweep (every `interval`) after its time; each sweep that finds
//! a returned backend without new failures lowers its ejection count by one.
//! With fewer healthy backends than `minHealthPercent`, none is left out.
//!
//! What the kernel counts (`mesh-ebpf`'s `outlier`), per connect of a meshed
//! client to a watched backend: a failure when it ends before ESTABLISHED
//! (refused, unreachable, timed out), or when it is established and then
//! reset before the backend sent a byte (an accept-then-RST server: a crashed
//! worker, an `SO_LINGER` 0 close); a success when it reaches ESTABLISHED,
//! taken back if it is then reset before data (what else looks like such a
//! reset to the kernel: its module's doc). So between two reads the
//! successes may go down: their change is signed.
//!
//! "In a row" from per-CPU counts: between two reads, a backend with new
//! failures and no net new success adds them to its run; a net new success
//! ends the run. Interleaved failures and successes within one read (a
//! second) count as successes: a flapping backend is not ejected, as Envoy
//! would rarely see it fail N times in a row either. The one approximation
//! of the resets: a connect established before a read and reset before data
//! after it was a success in that read (it ended the run there) and is a
//! failure in the next.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crate::{
    compile::{BackendAddr, Outlier, OutlierPool, OutlierWatch},
    kernel::backend_counters::Counts,
    model::NamespacedName,
};

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Detector {
    services: BTreeMap<OutlierPool, Service>,
}

#[derive(Debug)]
struct Service {
    policy: Outlier,
    next_sweep: Instant,
    backends: BTreeMap<BackendAddr, Backend>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Backend {
    /// The kernel's counts at the last read (`None`: not read yet: zero).
    last: Option<Counts>,
    /// Failures in a row.
    consecutive: u64,
    /// Times ejected (lowered while it behaves).
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Failures seen since the last sweep.
    failed_since_sweep: bool,
}

/// One watched backend, for `mesh-agent dump` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendRecord {
    pub service: NamespacedName,
    /// The subset judged on its own (a DestinationRule subset with its own
    /// outlier detection), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub backend: BackendAddr,
    pub failures: u64,
    pub successes: u64,
    pub consecutive: u64,
    pub ejections: u32,
    /// Milliseconds until it returns (`None`: not ejected).
    pub ejected_for_ms: Option<u64>,
}

impl Detector {
    /// Follows what compile says is watched: new services and backends start
    /// clean, those gone are forgotten, a changed policy applies from now.
    pub fn watch(&mut self, watches: &BTreeMap<OutlierPool, OutlierWatch>, now: Instant) {
        self.services.retain(|name, _| watches.contains_key(name));
        for (name, watch) in watches {
            let service = self
                .services
                .entry(name.clone())
                .or_insert_with(|| Service {
                    policy: watch.policy,
                    next_sweep: now + watch.policy.interval,
                    backends: BTreeMap::new(),
                });
            if service.policy != watch.policy {
                service.policy = watch.policy;
                service.next_sweep = now + watch.policy.interval;
            }
            service
                .backends
                .retain(|b, state| watch.backends.contains(b) || state.ejected_until.is_some());
            for b in &watch.backends {
                service.backends.entry(*b).or_default();
            }
        }
    }

    /// Whether no service is watched.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Every backend watched, across services.
    pub fn watched(&self) -> BTreeSet<BackendAddr> {
        self.services
            .values()
            .flat_map(|s| s.backends.keys().copied())
            .collect()
    }

    /// Reads the kernel's counts at `now`: ejects what reached its threshold,
    /// returns at each service's sweep what served its time. Returns whether
    /// the ejected set changed.
    pub fn judge(&mut self, now: Instant, counts: &BTreeMap<BackendAddr, Counts>) -> bool {
        let mut changed = false;
        for service in self.services.values_mut() {
            changed |= service.judge(now, counts);
        }
        changed
    }

    /// The backends to leave out, per service (none for a service whose
    /// healthy share fell below `minHealthPercent`).
    pub fn ejected(&self) -> BTreeMap<OutlierPool, BTreeSet<BackendAddr>> {
        self.services
            .iter()
            .filter_map(|(name, s)| {
                let out: BTreeSet<BackendAddr> = s
                    .backends
                    .iter()
                    .filter(|(_, b)| b.ejected_until.is_some())
                    .map(|(a, _)| *a)
                    .collect();
                // Per family, as the tables are.
                let healthy_enough = |v4: bool| {
                    let total = s.backends.keys().filter(|a| a.ip.is_ipv4() == v4).count() as u64;
                    let out = out.iter().filter(|a| a.ip.is_ipv4() == v4).count() as u64;
                    total == 0
                        || (total - out) * 100 / total >= u64::from(s.policy.min_health_percent)
                };
                let out: BTreeSet<BackendAddr> = out
                    .iter()
                    .filter(|a| healthy_enough(a.ip.is_ipv4()))
                    .copied()
                    .collect();
                (!out.is_empty()).then(|| (name.clone(), out))
            })
            .collect()
    }

    pub fn records(
        &self,
        now: Instant,
        counts: &BTreeMap<BackendAddr, Counts>,
    ) -> Vec<BackendRecord> {
        self.services
            .iter()
            .flat_map(|(name, s)| {
                s.backends.iter().map(move |(addr, b)| {
                    let c = counts.get(addr).copied().unwrap_or_default();
                    BackendRecord {
                        service: name.service.clone(),
                        subset: name.subset.clone(),
                        backend: *addr,
                        failures: c.failures,
                        successes: c.successes,
                        consecutive: b.consecutive,
                        ejections: b.ejections,
                        ejected_for_ms: b
                            .ejected_until
                            .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    }
                })
            })
            .collect()
    }
}

impl Service {
    fn judge(&mut self, now: Instant, counts: &BTreeMap<BackendAddr, Counts>) -> bool {
        let mut changed = false;
        for (addr, b) in &mut self.backends {
            let Some(now_counts) = counts.get(addr).copied() else {
                continue;
            };
            // The kernel's entry starts at zero when the backend is first
            // watched: failures before the first read count.
            let last = b.last.replace(now_counts).unwrap_or_default();
            let failed = now_counts.failures.saturating_sub(last.failures);
            // Signed: a connect reset before any byte takes back its success,
            // which an earlier read may have seen.
            let succeeded = now_counts.successes.wrapping_sub(last.successes) as i64;
            if succeeded > 0 {
                b.consecutive = 0;
            } else {
                b.consecutive += failed;
            }
            b.failed_since_sweep |= failed > 0;
        }
        // Ejections, at once: the most failing first, within the share of
        // the backends of its family (a dual-stack pod is one backend per
        // family, as a service port's table is one per family).
        let mut due: Vec<(u64, BackendAddr)> = self
            .backends
            .iter()
            .filter(|(_, b)| b.ejected_until.is_none() && b.consecutive >= self.policy.threshold)
            .map(|(a, b)| (b.consecutive, *a))
            .collect();
        due.sort_by(|x, y| y.cmp(x));
        for (_, addr) in due {
            let family: Vec<&Backend> = self
                .backends
                .iter()
                .filter(|(a, _)| a.ip.is_ipv4() == addr.ip.is_ipv4())
                .map(|(_, b)| b)
                .collect();
            let ejected = family.iter().filter(|b| b.ejected_until.is_some()).count();
            if ejected * 100 / family.len().max(1) >= self.policy.max_ejection_percent as usize {
                continue;
            }
            if let Some(b) = self.backends.get_mut(&addr) {
                b.ejections += 1;
                let time = (self.policy.base_ejection * b.ejections).min(MAX_EJECTION);
                b.ejected_until = Some(now + time);
                b.consecutive = 0;
                changed = true;
            }
        }
        // Returns, at sweeps.
        if now >= self.next_sweep {
            self.next_sweep = now + self.policy.interval;
            for b in self.backends.values_mut() {
                match b.ejected_until {
                    Some(until) if until <= now => {
                        b.ejected_until = None;
                        b.consecutive = 0;
                        changed = true;
                    }
                    Some(_) => {}
                    None if !b.failed_since_sweep => b.ejections = b.ejections.saturating_sub(1),
                    None => {}
                }
                b.failed_since_sweep = false;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use mesh_common::OutlierStats;

    use super::*;

    fn backend(n: u8) -> BackendAddr {
        BackendAddr {
            ip: IpAddr::from([10, 244, 0, n]),
            port: 5000,
        }
    }

    fn web() -> OutlierPool {
        OutlierPool {
            service: NamespacedName::new("prod", "web"),
            subset: None,
        }
    }

    fn policy(max_ejection_percent: u32) -> Outlier {
        Outlier {
            threshold: 3,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(2),
            max_ejection_percent,
            min_health_percent: 0,
        }
    }

    /// A detector watching backends 1..=n of `web`.
    fn detector(n: u8, policy: Outlier, t0: Instant) -> Detector {
        let mut d = Detector::default();
        let watch = OutlierWatch {
            policy,
            backends: (1..=n).map(backend).collect(),
        };
        d.watch(&BTreeMap::from([(web(), watch)]), t0);
        d
    }

    /// Kernel counts: (backend, failures, successes).
    fn counts(of: &[(u8, u64, u64)]) -> BTreeMap<BackendAddr, Counts> {
        of.iter()
            .map(|&(b, failures, successes)| {
                (
                    backend(b),
                    Counts {
                        failures,
                        successes,
                    },
                )
            })
            .collect()
    }

    fn ejected(d: &Detector) -> Vec<BackendAddr> {
        d.ejected()
            .get(&web())
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    #[test]
    fn failures_in_a_row_eject_at_the_threshold_and_the_backend_returns_after_its_time() {
        let t0 = Instant::now();
        let mut d = detector(4, policy(100), t0);
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(!d.judge(t0, &counts(&[(1, 0, 0), (2, 0, 0)])));
        // Two failures, a success, two failures: no run of three.
        assert!(!d.judge(s(0), &counts(&[(1, 2, 0), (2, 0, 5)])));
        assert!(!d.judge(s(0), &counts(&[(1, 2, 1), (2, 0, 9)])));
        assert!(!d.judge(s(0), &counts(&[(1, 4, 1), (2, 0, 9)])));
        assert_eq!(ejected(&d), []);
        // A third in a row: out at once, for 2 s (base x 1).
        assert!(d.judge(s(0), &counts(&[(1, 5, 1), (2, 0, 9)])));
        assert_eq!(ejected(&d), [backend(1)]);
        assert!(!d.judge(s(1), &counts(&[(1, 5, 1)])), "not yet");
        // Back at the first sweep after its time; failing again, out for 4 s.
        assert!(d.judge(s(2), &counts(&[(1, 5, 1)])));
        assert_eq!(ejected(&d), []);
        assert!(d.judge(s(2), &counts(&[(1, 8, 1)])));
        let record = d.records(s(2), &counts(&[(1, 8, 1)]));
        assert_eq!(record[0].ejections, 2);
        assert_eq!(record[0].ejected_for_ms, Some(4000));
    }

    #[test]
    fn a_connect_reset_before_data_fails_and_takes_its_success_back() {
        let t0 = Instant::now();
        let mut d = detector(2, policy(100), t0);
        d.judge(t0, &counts(&[(1, 0, 0)]));
        // Established: a success, seen by this read.
        d.judge(t0, &counts(&[(1, 0, 1)]));
        // Then reset before data: +1 failure, -1 success. In the run.
        d.judge(t0, &counts(&[(1, 1, 0)]));
        assert_eq!(d.records(t0, &counts(&[(1, 1, 0)]))[0].consecutive, 1);
        // Two more connects established and reset within one read: +2, no
        // net success.
        assert!(d.judge(t0, &counts(&[(1, 3, 0)])));
        assert_eq!(ejected(&d), [backend(1)]);
        // A reset and a real success in one window: the run ends.
        let mut d = detector(2, policy(100), t0);
        d.judge(t0, &counts(&[(1, 2, 0)]));
        d.judge(t0, &counts(&[(1, 3, 1)]));
        assert_eq!(d.records(t0, &counts(&[(1, 3, 1)]))[0].consecutive, 0);
    }

    #[test]
    fn per_cpu_counts_sum_and_differ_with_wrapping() {
        // A success counted on CPU 0, taken back (reset before data) on CPU 1,
        // whose own count wraps below zero.
        let cpus = [
            OutlierStats {
                failures: 0,
                successes: 5,
            },
            OutlierStats {
                failures: 2,
                successes: 0u64.wrapping_sub(2),
            },
        ];
        let sum = cpus.iter().fold(Counts::default(), Counts::plus_cpu);
        assert_eq!(
            sum,
            Counts {
                failures: 2,
                successes: 3
            }
        );
        let t0 = Instant::now();
        let mut d = detector(2, policy(100), t0);
        d.judge(t0, &counts(&[(1, 0, 5), (2, 0, 0)]));
        d.judge(t0, &BTreeMap::from([(backend(1), sum)]));
        assert_eq!(d.records(t0, &counts(&[]))[0].consecutive, 2);
        // The sum itself below zero (a connect established before its backend
        // was watched, reset after): one success later is a net +1.
        d.judge(t0, &counts(&[(2, 1, u64::MAX)]));
        assert_eq!(d.records(t0, &counts(&[]))[1].consecutive, 1);
        d.judge(t0, &counts(&[(2, 1, 0)]));
        assert_eq!(d.records(t0, &counts(&[]))[1].consecutive, 0);
    }

    #[test]
    fn max_ejection_percent_lets_one_go_while_the_share_out_is_below_it() {
        let t0 = Instant::now();
        let all_failing = counts(&[(1, 9, 0), (2, 9, 0), (3, 9, 0), (4, 9, 0)]);
        for (percent, out) in [(0, 0), (10, 1), (25, 1), (26, 2), (50, 2), (100, 4)] {
            let mut d = detector(4, policy(percent), t0);
            d.judge(t0, &counts(&[(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]));
            d.judge(t0, &all_failing);
            assert_eq!(ejected(&d).len(), out, "maxEjectionPercent {percent}");
        }
    }

    #[test]
    fn below_min_health_percent_nothing_is_left_out() {
        let t0 = Instant::now();
        let mut p = policy(100);
        p.min_health_percent = 60;
        let mut d = detector(4, p, t0);
        d.judge(t0, &counts(&[(1, 0, 0), (2, 0, 0)]));
        d.judge(t0, &counts(&[(1, 3, 0), (2, 0, 0)]));
        assert_eq!(ejected(&d), [backend(1)], "75% healthy");
        d.judge(t0, &counts(&[(1, 3, 0), (2, 3, 0)]));
        assert_eq!(ejected(&d), [], "50% healthy: all serve");
    }

    #[test]
    fn a_backend_no_longer_watched_is_forgotten_once_back() {
        let t0 = Instant::now();
        let mut d = detector(2, policy(100), t0);
        d.judge(t0, &counts(&[(1, 0, 0)]));
        d.judge(t0, &counts(&[(1, 3, 0)]));
        d.watch(&BTreeMap::new(), t0);
        assert_eq!(d.watched(), BTreeSet::new());
        assert!(d.ejected().is_empty());
    }

    #[test]
    fn the_ejected_share_is_counted_within_a_family() {
        let t0 = Instant::now();
        let v6 = |n: u16| BackendAddr {
            ip: IpAddr::from([0xfd00, 0x10, 0x244, 0, 0, 0, 0, n]),
            port: 5000,
        };
        let mut d = Detector::default();
        let backends: BTreeSet<BackendAddr> = (1..=4).map(backend).chain((1..=4).map(v6)).collect();
        let watch = OutlierWatch {
            policy: policy(25),
            backends,
        };
        d.watch(&BTreeMap::from([(web(), watch)]), t0);
        d.judge(t0, &counts(&[(1, 3, 0), (2, 4, 0)]));
        assert_eq!(ejected(&d), [backend(2)], "one of the four IPv4 backends");
    }
}
