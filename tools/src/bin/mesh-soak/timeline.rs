//! Connections routed to a pod after it went not-ready.
//!
//! Not a failure: the backend still listens, and a readiness change needs time to
//! reach the kernel (API server, watch, agent, maps). A connection counts here
//! when it started after the API server acknowledged its pod's not-ready update
//! and before the next ready update of that pod was sent; its lag is the time
//! from that acknowledgement to the connect. An update's lag is the lag of its
//! last such connection: how long the pod kept getting new connections.
//!
//! Each connection, and each update (by its last connection), is put in one
//! bucket:
//!
//! - `agent`: an agent outage (SIGKILL to the restarted agent's first apply)
//!   overlaps the lag: nobody could update the kernel;
//! - `api`: an API server outage overlaps the lag or ended less than
//!   [`WATCH_BACKOFF_US`] before it (the agent's watchers reconnect with backoff);
//! - `steady`: neither, so the lag is the mesh's propagation time.

use std::collections::BTreeMap;

use crate::{
    run::{Outage, Transition},
    storm::Seen,
};

/// The agent's watchers back off up to 30 s (kube-runtime's default).
pub const WATCH_BACKOFF_US: u64 = 30_000_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Late {
    /// Connections.
    pub count: u64,
    /// The lag of each update with late connections, sorted.
    pub updates: Vec<u64>,
}

impl Late {
    /// The `q` quantile of the updates' lags (nearest rank), in µs.
    pub fn quantile(&self, q: f64) -> u64 {
        let Some(last) = self.updates.len().checked_sub(1) else {
            return 0;
        };
        self.updates[((last as f64) * q).round() as usize]
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    pub steady: Late,
    pub agent: Late,
    pub api: Late,
    /// Not-ready updates in all.
    pub not_ready_updates: usize,
}

impl Lateness {
    pub fn total(&self) -> u64 {
        self.steady.count + self.agent.count + self.api.count
    }

    fn bucket(&mut self, b: Bucket) -> &mut Late {
        match b {
            Bucket::Steady => &mut self.steady,
            Bucket::Agent => &mut self.agent,
            Bucket::Api => &mut self.api,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bucket {
    Steady,
    Agent,
    Api,
}

pub fn classify(
    connections: &[u64],
    transitions: &[Transition],
    pods: usize,
    agent: &[Outage],
    api: &[Outage],
) -> Lateness {
    // Per pod, the times its state changes for this purpose: a not-ready update
    // counts from its acknowledgement, a ready one from its sending.
    let mut changes: Vec<Vec<(u64, usize)>> = vec![Vec::new(); pods];
    for (i, t) in transitions.iter().enumerate() {
        let at = if t.ready { t.sent_us } else { t.acked_us };
        if let Some(c) = changes.get_mut(t.pod) {
            c.push((at, i));
        }
    }
    for c in &mut changes {
        c.sort_unstable();
    }
    let bucket = |from: u64, t: u64| {
        if agent.iter().any(|o| o.from_us <= t && o.to_us >= from) {
            Bucket::Agent
        } else if api
            .iter()
            .any(|o| o.from_us <= t && o.to_us + WATCH_BACKOFF_US >= from)
        {
            Bucket::Api
        } else {
            Bucket::Steady
        }
    };
    let mut out = Lateness {
        not_ready_updates: transitions.iter().filter(|t| !t.ready).count(),
        ..Lateness::default()
    };
    // Per update: the lag of its last late connection, and that one's bucket.
    let mut last: BTreeMap<usize, (u64, Bucket)> = BTreeMap::new();
    for &packed in connections {
        let (t, pod) = Seen::unpack(packed);
        let Some(c) = changes.get(pod) else { continue };
        let Some(&(_, i)) = c
            .partition_point(|(at, _)| *at <= t)
            .checked_sub(1)
            .map(|n| &c[n])
        else {
            continue;
        };
        let update = &transitions[i];
        if update.ready {
            continue;
        }
        let lag = t - update.acked_us;
        let b = bucket(update.acked_us, t);
        out.bucket(b).count += 1;
        let entry = last.entry(i).or_insert((lag, b));
        if lag >= entry.0 {
            *entry = (lag, b);
        }
    }
    for (lag, b) in last.into_values() {
        out.bucket(b).updates.push(lag);
    }
    for b in [Bucket::Steady, Bucket::Agent, Bucket::Api] {
        out.bucket(b).updates.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64, pod: usize) -> u64 {
        (t << 8) | pod as u64
    }

    fn change(pod: usize, ready: bool, sent_us: u64, acked_us: u64) -> Transition {
        Transition {
            pod,
            ready,
            sent_us,
            acked_us,
        }
    }

    #[test]
    fn only_connections_between_not_ready_and_ready_again_count() {
        let transitions = [
            change(0, false, 1_000, 1_010),
            change(0, true, 5_000, 5_010),
        ];
        let connections = [
            at(900, 0),   // before
            at(1_005, 0), // while the update was in flight: not counted
            at(1_050, 0), // 40 µs after the acknowledgement
            at(3_010, 0), // 2 ms after
            at(5_005, 0), // ready again sent: not counted
            at(3_000, 1), // another pod
        ];
        let late = classify(&connections, &transitions, 2, &[], &[]);
        assert_eq!(
            late,
            Lateness {
                steady: Late {
                    count: 2,
                    updates: vec![2_000],
                },
                not_ready_updates: 1,
                ..Lateness::default()
            }
        );
    }

    #[test]
    fn outages_take_the_blame_when_they_overlap() {
        let transitions = [change(0, false, 1_000, 1_000)];
        let agent = [Outage {
            from_us: 1_500,
            to_us: 1_800,
        }];
        let late = classify(&[at(1_200, 0), at(2_000, 0)], &transitions, 1, &agent, &[]);
        assert_eq!((late.steady.count, late.agent.count), (1, 1));
        // The update is counted once, where its last connection falls.
        assert_eq!(
            (late.steady.updates.len(), late.agent.updates),
            (0, vec![1_000])
        );
        // An API server back 10 s before the update: its watchers may still wait.
        let transitions = [change(0, false, 20_000_000, 20_000_000)];
        let api = [Outage {
            from_us: 7_000_000,
            to_us: 10_000_000,
        }];
        let late = classify(&[at(20_000_100, 0)], &transitions, 1, &[], &api);
        assert_eq!((late.api.count, late.api.updates.clone()), (1, vec![100]));
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let late = Late {
            count: 5,
            updates: vec![1, 2, 3, 4, 100],
        };
        assert_eq!((late.quantile(0.5), late.quantile(1.0)), (3, 100));
        assert_eq!(Late::default().quantile(0.99), 0);
    }
}
