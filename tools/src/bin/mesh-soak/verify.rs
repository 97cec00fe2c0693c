//! The final check: what the kernel holds against what the API server holds.
//!
//! The configuration is read back from the API server after the churn stops (not
//! from the soak's own notes, which a request that timed out could have left
//! wrong). From it, each backend's expected share follows as Istio defines it: a
//! subset gets `weight / sum(weights)`, split evenly over its ready endpoints. The
//! kernel's side comes from `mesh-agent dump --output json` (the pinned maps, slot
//! by slot) and `status` (map occupancy). They are equal when the kernel holds no
//! service port the API server lacks, every backend's share is within 1/4096 of
//! its expected share (tables are exact, or 4096 slots by largest remainder),
//! nothing else holds slots, and the slot map holds only the live tables (no
//! leaked revision).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::cluster::TARGET_PORT;

/// The final configuration, as the API server holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// (subset, weight) of the VirtualService's route.
    pub weights: Vec<(String, u64)>,
    /// (pod, address, ready) of each endpoint of the Service's EndpointSlice.
    pub endpoints: Vec<(String, IpAddr, bool)>,
    /// Each pod's `version` label (what the subsets select).
    pub versions: BTreeMap<String, String>,
    /// Every Service port of the meshed namespace (the API server's own
    /// `kubernetes` Service is one).
    pub services: BTreeSet<SocketAddr>,
}

/// The agent's largest table: smaller ones are exact, this one is within a slot
/// of every share (README, "Weighted choice in O(1)").
const MAX_SLOTS: f64 = 4096.0;

/// Where slots lead: a backend, or `None` for slots that refuse the connect.
pub type Shares = BTreeMap<Option<SocketAddr>, f64>;

/// Each backend's expected share of new connections.
pub fn expected(config: &Config, port: u16) -> Shares {
    let total: u64 = config.weights.iter().map(|(_, w)| w).sum();
    let mut shares = Shares::new();
    for (subset, weight) in config.weights.iter().filter(|(_, w)| *w > 0) {
        let share = *weight as f64 / total as f64;
        let ready: Vec<SocketAddr> = config
            .endpoints
            .iter()
            .filter(|(pod, _, ready)| *ready && config.versions.get(pod) == Some(subset))
            .map(|(_, ip, _)| SocketAddr::new(*ip, port))
            .collect();
        if ready.is_empty() {
            *shares.entry(None).or_default() += share;
        }
        for addr in &ready {
            *shares.entry(Some(*addr)).or_default() += share / ready.len() as f64;
        }
    }
    shares
}

/// What the kernel holds, from `dump --output json` and `status --output json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kernel {
    /// Every service port with a table.
    pub services: BTreeSet<SocketAddr>,
    /// The VIP's table: its size and the slots of each backend.
    pub slot_count: u32,
    pub slots: BTreeMap<Option<SocketAddr>, u32>,
    /// Entries of the slot map, and the slots of every live table.
    pub slot_entries: u64,
    pub live_slots: u64,
}

pub fn kernel(dump: &Value, status: &Value, vip: SocketAddr) -> anyhow::Result<Kernel> {
    let mut k = Kernel::default();
    for service in dump.as_array().context("dump: not a list")? {
        let addr = SocketAddr::new(
            service["vip"].as_str().context("dump: vip")?.parse()?,
            u16::try_from(service["port"].as_u64().context("dump: port")?)?,
        );
        let slot_count = u32::try_from(service["slot_count"].as_u64().context("slot_count")?)?;
        k.services.insert(addr);
        k.live_slots += u64::from(slot_count);
        if addr != vip {
            continue;
        }
        k.slot_count = slot_count;
        let backends = service["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|d| d["backends"].as_array().into_iter().flatten());
        for b in backends {
            let to = match &b["addr"] {
                Value::Null => None,
                a => Some(SocketAddr::new(
                    a["ip"].as_str().context("backend ip")?.parse()?,
                    u16::try_from(a["port"].as_u64().context("backend port")?)?,
                )),
            };
            let n = u32::try_from(b["slots"].as_u64().context("backend slots")?)?;
            *k.slots.entry(to).or_default() += n;
        }
    }
    k.slot_entries = status["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "SLOTS_V1")
        .and_then(|m| m["entries"].as_u64())
        .context("status: no SLOTS_V1 occupancy")?;
    Ok(k)
}

/// Every way the kernel differs from the configuration; empty when equal.
pub fn differences(config: &Config, kernel: &Kernel, vip: SocketAddr) -> Vec<String> {
    let mut out = Vec::new();
    for other in kernel.services.difference(&config.services) {
        out.push(format!("the kernel holds {other}, which no Service has"));
    }
    if !kernel.services.contains(&vip) {
        out.push(format!("the kernel holds no table for {vip}"));
        return out;
    }
    let expected = expected(config, TARGET_PORT);
    let size = f64::from(kernel.slot_count.max(1));
    // Measured in slots of the largest table, not of the table found: a wrong
    // three-slot table is "within a slot" of almost anything.
    let keys: BTreeSet<Option<SocketAddr>> = expected
        .keys()
        .chain(kernel.slots.keys())
        .copied()
        .collect();
    for key in keys {
        let want = expected.get(&key).copied().unwrap_or(0.0);
        let have = kernel.slots.get(&key).copied().unwrap_or(0);
        if (f64::from(have) / size - want).abs() * MAX_SLOTS >= 1.0 {
            let name = key.map_or_else(|| "refusing slots".to_owned(), |a| a.to_string());
            out.push(format!(
                "{name}: kernel {have}/{} slots ({:.2}%), configuration {:.2}%",
                kernel.slot_count,
                100.0 * f64::from(have) / size,
                100.0 * want
            ));
        }
    }
    if kernel.slot_entries != kernel.live_slots {
        out.push(format!(
            "SLOTS_V1 holds {} entries, the live tables {} slots",
            kernel.slot_entries, kernel.live_slots
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weights: &[(&str, u64)], ready: &[bool]) -> Config {
        let pods = ["a-0", "a-1", "b-0"];
        Config {
            weights: weights.iter().map(|(s, w)| ((*s).to_owned(), *w)).collect(),
            endpoints: pods
                .iter()
                .zip(ready)
                .enumerate()
                .map(|(i, (p, r))| ((*p).to_owned(), ip(i), *r))
                .collect(),
            versions: pods
                .iter()
                .map(|p| ((*p).to_owned(), p[..1].to_owned()))
                .collect(),
            services: BTreeSet::from([vip()]),
        }
    }

    fn ip(i: usize) -> IpAddr {
        IpAddr::from([10, 0, 0, 1 + i as u8])
    }

    fn at(i: usize) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip(i), TARGET_PORT))
    }

    fn vip() -> SocketAddr {
        SocketAddr::from(([10, 96, 0, 80], 5000))
    }

    #[test]
    fn a_subset_splits_its_weight_over_its_ready_endpoints() {
        let all = config(&[("a", 60), ("b", 40)], &[true, true, true]);
        assert_eq!(
            expected(&all, TARGET_PORT),
            Shares::from([(at(0), 0.3), (at(1), 0.3), (at(2), 0.4)])
        );
        let one_down = config(&[("a", 60), ("b", 40)], &[false, true, true]);
        assert_eq!(
            expected(&one_down, TARGET_PORT),
            Shares::from([(at(1), 0.6), (at(2), 0.4)])
        );
    }

    #[test]
    fn weight_zero_gets_nothing_and_no_ready_endpoint_refuses_its_share() {
        let zero = config(&[("a", 0), ("b", 5)], &[true, true, true]);
        assert_eq!(expected(&zero, TARGET_PORT), Shares::from([(at(2), 1.0)]));
        let empty = config(&[("a", 1), ("b", 3)], &[true, true, false]);
        assert_eq!(
            expected(&empty, TARGET_PORT),
            Shares::from([(at(0), 0.125), (at(1), 0.125), (None, 0.75)])
        );
    }

    fn table(slots: &[(Option<SocketAddr>, u32)]) -> Kernel {
        let count = slots.iter().map(|(_, n)| n).sum();
        Kernel {
            services: BTreeSet::from([vip()]),
            slot_count: count,
            slots: slots.iter().copied().collect(),
            slot_entries: u64::from(count),
            live_slots: u64::from(count),
        }
    }

    #[test]
    fn equal_within_a_slot_and_every_difference_named() {
        let c = config(&[("a", 60), ("b", 40)], &[true, true, true]);
        let exact = table(&[(at(0), 3), (at(1), 3), (at(2), 4)]);
        assert_eq!(differences(&c, &exact, vip()), Vec::<String>::new());
        // 4096 slots by largest remainder: one slot off is the table's own rounding.
        let thirds = config(&[("a", 2), ("b", 1)], &[true, true, true]);
        let rounded = table(&[(at(0), 1366), (at(1), 1365), (at(2), 1365)]);
        assert_eq!(differences(&thirds, &rounded, vip()), Vec::<String>::new());

        // Even balancing where the weights say 5/73: one slot each is wrong.
        let weighted = config(&[("a", 10), ("b", 73)], &[false, true, true]);
        let even = table(&[(at(1), 1), (at(2), 1)]);
        assert_eq!(differences(&weighted, &even, vip()).len(), 2);

        let wrong = table(&[(at(0), 5), (at(2), 5)]);
        assert_eq!(differences(&c, &wrong, vip()).len(), 3);
        let mut leaked = exact;
        leaked.slot_entries += 10;
        leaked
            .services
            .insert(SocketAddr::from(([10, 96, 0, 81], 80)));
        assert_eq!(differences(&c, &leaked, vip()).len(), 2);
    }

    #[test]
    fn reads_the_agents_json() -> anyhow::Result<()> {
        let dump = serde_json::json!([{
            "vip": "10.96.0.80", "port": 5000, "proto": "Tcp", "slot_count": 5,
            "destinations": [
                {"name": "v1", "weight": 3, "backends": [
                    {"addr": {"ip": "10.0.0.1", "port": TARGET_PORT}, "slots": 3, "share": 0.6}
                ]},
                {"name": "v2", "weight": 2, "backends": [{"addr": null, "slots": 2, "share": 0.4}]}
            ]
        }]);
        let status = serde_json::json!({"maps": [{"name": "SLOTS_V1", "entries": 5}]});
        assert_eq!(
            kernel(&dump, &status, vip())?,
            table(&[(at(0), 3), (None, 2)])
        );
        Ok(())
    }
}
