//! Connections routed to a pod after it went not-ready.
//!
//! Not a failure: the backend still listens, and a readiness change needs time to
//! reach the kernel (API server, watch, agent, maps). A connection counts here
//! when it started after the API server acknowledged its pod's not-ready update
//! and before the next ready update was sent; its lag is the time from that
//! acknowledgement to the connect. Each is put in one bucket:
//!
//! - `agent`: an agent outage (SIGKILL to the restarted agent's first apply)
//!   overlaps the lag: nobody could update the kernel;
//! - `api`: an API server outage overlaps the lag or ended less than
//!   [`WATCH_BACKOFF`] before it (the agent's watchers reconnect with backoff);
//! - `steady`: neither, so the lag is the mesh's propagation time.

use crate::{
    run::{Outage, Transition},
    storm::Seen,
};

/// The agent's watchers back off up to 30 s (kube-runtime's default).
pub const WATCH_BACKOFF_US: u64 = 30_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Late {
    pub count: u64,
    pub max_lag_us: u64,
}

impl Late {
    fn add(&mut self, lag_us: u64) {
        self.count += 1;
        self.max_lag_us = self.max_lag_us.max(lag_us);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    pub steady: Late,
    pub agent: Late,
    pub api: Late,
}

impl Lateness {
    pub fn total(&self) -> u64 {
        self.steady.count + self.agent.count + self.api.count
    }
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
    let mut changes: Vec<Vec<(u64, &Transition)>> = vec![Vec::new(); pods];
    for t in transitions {
        let at = if t.ready { t.sent_us } else { t.acked_us };
        if let Some(c) = changes.get_mut(t.pod) {
            c.push((at, t));
        }
    }
    for c in &mut changes {
        c.sort_by_key(|(at, _)| *at);
    }
    let mut out = Lateness::default();
    for &packed in connections {
        let (t, pod) = Seen::unpack(packed);
        let Some(c) = changes.get(pod) else { continue };
        let i = c.partition_point(|(at, _)| *at <= t);
        let Some((_, last)) = i.checked_sub(1).map(|i| c[i]) else {
            continue;
        };
        if last.ready {
            continue;
        }
        let (from, lag) = (last.acked_us, t - last.acked_us);
        if agent.iter().any(|o| o.from_us <= t && o.to_us >= from) {
            out.agent.add(lag);
        } else if api
            .iter()
            .any(|o| o.from_us <= t && o.to_us + WATCH_BACKOFF_US >= from)
        {
            out.api.add(lag);
        } else {
            out.steady.add(lag);
        }
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
                    max_lag_us: 2_000
                },
                ..Lateness::default()
            }
        );
    }

    #[test]
    fn outages_take_the_blame_when_they_overlap() {
        let transitions = [change(0, false, 1_000, 1_000)];
        let connections = [at(2_000, 0)];
        let agent = [Outage {
            from_us: 1_500,
            to_us: 1_800,
        }];
        let late = classify(&connections, &transitions, 1, &agent, &[]);
        assert_eq!(late.agent.count, 1);
        // An API server back 10 s before the update: its watchers may still wait.
        let transitions = [change(0, false, 20_000_000, 20_000_000)];
        let api = [Outage {
            from_us: 7_000_000,
            to_us: 10_000_000,
        }];
        let late = classify(&[at(20_000_100, 0)], &transitions, 1, &[], &api);
        assert_eq!((late.api.count, late.api.max_lag_us), (1, 100));
    }
}
