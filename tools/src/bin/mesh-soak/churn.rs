//! Endpoint churn and weight edits, through the API server.
//!
//! Every `flip` one pod changes readiness: its Pod's Ready condition first (the
//! kubelet), then its endpoint in the EndpointSlice (the controller), which is
//! what the mesh routes by. A pod only goes not-ready while another pod of its
//! subset stays ready, so every subset always has a live, ready backend and any
//! failed connect is a real failure. Every `weights_every` flips the
//! VirtualService's weights change (0..=100 each, never both 0).
//!
//! A change is recorded only once the API server acknowledged it; a request that
//! fails (the API server is away) changes nothing here and is counted as
//! refused. The next slice update sends the whole list again, so a request that
//! timed out after all took effect is overwritten by what we believe.

use std::time::{Duration, Instant};

use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};

use crate::{
    api::ApiClient,
    clock::now_us,
    cluster::{HOST, PodInfo, SLICE},
    run::{Run, Transition},
};

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub flip: Duration,
    pub weights_every: u32,
    pub seed: u64,
}

/// Runs until the run ends.
pub fn churn(api: &ApiClient, pods: &[PodInfo], plan: Plan, run: &Run) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut ready = vec![true; pods.len()];
    let mut next = Instant::now() + plan.flip;
    let mut tick = 0u32;
    while run.sleep_until(next) {
        next += plan.flip;
        tick += 1;
        let pod = pick(pods, &ready, &mut rng);
        flip(api, pods, &mut ready, pod, run);
        if plan.weights_every > 0 && tick.is_multiple_of(plan.weights_every) {
            let v1 = rng.random_range(0..=100u64);
            let v2 = rng.random_range(u64::from(v1 == 0)..=100);
            match api.set_weights(HOST, &[("v1", v1), ("v2", v2)]) {
                Ok(()) => run.note(|r| r.weight_edits += 1),
                Err(_) => run.note(|r| r.refused += 1),
            }
        }
        // A slow API server must not turn the schedule into a burst.
        next = next.max(Instant::now());
    }
}

/// A pod that may change: any not-ready one, or a ready one whose subset keeps
/// another ready pod.
fn pick(pods: &[PodInfo], ready: &[bool], rng: &mut StdRng) -> usize {
    let may: Vec<usize> = (0..pods.len())
        .filter(|&i| {
            !ready[i]
                || (0..pods.len()).any(|j| j != i && ready[j] && pods[j].version == pods[i].version)
        })
        .collect();
    may[rng.random_range(0..may.len())]
}

fn flip(api: &ApiClient, pods: &[PodInfo], ready: &mut [bool], pod: usize, run: &Run) {
    let now_ready = !ready[pod];
    if api.set_pod_ready(&pods[pod].name, now_ready).is_err() {
        run.note(|r| r.refused += 1);
        return;
    }
    let mut next = ready.to_vec();
    next[pod] = now_ready;
    let endpoints: Vec<_> = pods
        .iter()
        .zip(&next)
        .map(|(p, r)| (p.name.as_str(), p.ip, *r))
        .collect();
    let sent_us = now_us();
    if api.set_endpoints(SLICE, &endpoints).is_err() {
        run.note(|r| r.refused += 1);
        return;
    }
    let acked_us = now_us();
    ready[pod] = now_ready;
    run.note(|r| {
        r.transitions.push(Transition {
            pod,
            ready: now_ready,
            sent_us,
            acked_us,
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_takes_the_last_ready_pod_of_a_subset() {
        let pods: Vec<PodInfo> = [("a", "v1"), ("b", "v1"), ("c", "v2")]
            .iter()
            .map(|(n, v)| PodInfo {
                name: (*n).to_owned(),
                version: (*v).to_owned(),
                ip: [10, 0, 0, 1].into(),
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            // c is alone in v2; b is the last ready v1.
            assert_eq!(pick(&pods, &[false, true, true], &mut rng), 0);
        }
    }
}
