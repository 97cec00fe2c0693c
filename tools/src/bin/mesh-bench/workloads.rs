//! The workloads, and running them: every (variant, workload) once per round, one
//! `mesh-load` client per measurement.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use mesh_tools::load::{Measurement, Workload};
use rand::{SeedableRng as _, seq::SliceRandom as _};

use crate::variants::{Topology, Variant, load_bin};

/// One table of the report: a `mesh-load` workload and its message size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Load {
    Crr64,
    Rr64,
    Rr1k,
    Bulk,
}

impl Load {
    pub(crate) fn all() -> [Load; 4] {
        [Load::Crr64, Load::Rr64, Load::Rr1k, Load::Bulk]
    }

    fn args(self) -> (Workload, usize) {
        match self {
            Load::Crr64 => (Workload::Crr, 64),
            Load::Rr64 => (Workload::Rr, 64),
            Load::Rr1k => (Workload::Rr, 1024),
            Load::Bulk => (Workload::Bulk, 0),
        }
    }

    /// The workload in a few words (a table cell).
    pub(crate) fn short(self) -> &'static str {
        match self {
            Load::Crr64 => "new connection, 64 B",
            Load::Rr64 => "request/response, 64 B",
            Load::Rr1k => "request/response, 1 KiB",
            Load::Bulk => "bulk",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            Load::Crr64 => "New connection per request (connect, 64 B request, 64 B answer, close)",
            Load::Rr64 => "Request/response on a kept-alive connection, 64 B",
            Load::Rr1k => "Request/response on a kept-alive connection, 1 KiB",
            Load::Bulk => "Bulk throughput, one connection",
        }
    }
}

impl Topology {
    /// Every (variant, workload) once per round, in a new random order each round.
    pub(crate) fn run(
        &self,
        rounds: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<BTreeMap<(usize, Load), Vec<Measurement>>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d65_7368);
        let mut results: BTreeMap<(usize, Load), Vec<Measurement>> = BTreeMap::new();
        let mut order: Vec<(usize, Load)> = (0..self.variants.len())
            .flat_map(|v| Load::all().map(move |l| (v, l)))
            .collect();
        for round in 0..rounds {
            order.shuffle(&mut rng);
            eprintln!("round {}/{rounds}: {} runs", round + 1, order.len());
            for &(v, load) in &order {
                let m = self.measure(&self.variants[v], load, warmup, duration)?;
                results.entry((v, load)).or_default().push(m);
            }
        }
        Ok(results)
    }

    fn measure(
        &self,
        variant: &Variant,
        load: Load,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Measurement> {
        let (workload, size) = load.args();
        let child = mesh_tools::spawn_in_pod(
            &load_bin()?,
            self.ns(&variant.ns)?,
            variant.cgroup.map(|i| &self.cgroups[i]),
            &[
                "--cpu",
                variant.placement.client_cpu(),
                "run",
                "--target",
                &variant.target,
                "--workload",
                match workload {
                    Workload::Crr => "crr",
                    Workload::Rr => "rr",
                    Workload::Bulk => "bulk",
                },
                "--size",
                &size.to_string(),
                "--warmup-ms",
                &warmup.as_millis().to_string(),
                "--duration-ms",
                &duration.as_millis().to_string(),
            ],
        );
        let out = child?.wait_with_output()?;
        let text = String::from_utf8(out.stdout)?;
        let line = text.lines().last().context("mesh-load printed nothing")?;
        Ok(serde_json::from_str(line)?)
    }
}
