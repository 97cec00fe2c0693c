//! The summary block, and whether the soak passed.

use std::fmt::Write as _;

use crate::{
    run::{Outage, Record},
    settle::Final,
    storm::Seen,
    timeline::{Late, Lateness},
};

#[derive(Debug)]
pub struct Summary<'a> {
    pub seconds: f64,
    pub seed: u64,
    /// The start, on the storm's clock.
    pub started_us: u64,
    pub pods: Vec<String>,
    pub seen: &'a Seen,
    pub accepted: Vec<u64>,
    pub record: &'a Record,
    pub late: Lateness,
    /// `None`: the run was interrupted or aborted, so nothing was checked.
    pub last: Option<Final>,
}

impl Summary<'_> {
    pub fn passed(&self) -> bool {
        self.seen.failures.is_empty()
            && self.record.fatal.is_none()
            && self.last.as_ref().is_some_and(|f| f.differences.is_empty())
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let r = self.record;
        let made = self.seen.connections.len() as u64;
        let _ = writeln!(
            s,
            "\n== Soak summary ({:.0} s, seed {})",
            self.seconds, self.seed
        );
        row(
            &mut s,
            "connections made",
            made,
            &format!("{:.0}/s", made as f64 / self.seconds.max(1.0)),
        );
        row(
            &mut s,
            "failed connects to live backends",
            self.seen.failures.len() as u64,
            &errors(self.seen),
        );
        for (t, e) in self.seen.failures.iter().take(10) {
            let _ = writeln!(
                s,
                "     t={:>8.3}s  {e}{}",
                t.saturating_sub(self.started_us) as f64 / 1e6,
                self.during(*t)
            );
        }
        row(
            &mut s,
            "routed to a pod after it went not-ready",
            self.late.total(),
            &format!(
                "after {} of {} not-ready updates; each update's last one, ms after the API server acknowledged it:",
                self.late.steady.updates.len()
                    + self.late.agent.updates.len()
                    + self.late.api.updates.len(),
                self.late.not_ready_updates
            ),
        );
        for (name, late) in [
            ("steady", &self.late.steady),
            ("agent restarting", &self.late.agent),
            ("API server restarting", &self.late.api),
        ] {
            lateness(&mut s, name, late);
        }
        row(
            &mut s,
            "readiness flips",
            r.transitions.len() as u64,
            "pods/status, then the EndpointSlice",
        );
        row(
            &mut s,
            "weight edits",
            r.weight_edits,
            &format!(
                "VirtualService patches; {} churn requests refused while the API server was away",
                r.refused
            ),
        );
        row(
            &mut s,
            "agent SIGKILLs survived",
            r.agent_outages.len() as u64,
            &outages(&r.agent_outages, "kill to first apply"),
        );
        row(
            &mut s,
            "API server restarts survived",
            r.api_outages.len() as u64,
            &outages(&r.api_outages, "SIGKILL to ready"),
        );
        let mut answered = vec![0u64; self.pods.len()];
        for &c in &self.seen.connections {
            if let Some(n) = answered.get_mut(Seen::unpack(c).1) {
                *n += 1;
            }
        }
        let _ = writeln!(
            s,
            "   per pod: answered (the client's count) / accepted (the backend's)"
        );
        for (i, pod) in self.pods.iter().enumerate() {
            let _ = writeln!(
                s,
                "     {pod:<14} {:>9} / {}",
                answered[i],
                self.accepted.get(i).copied().unwrap_or(0)
            );
        }
        match &self.last {
            None => {
                let _ = writeln!(
                    s,
                    "   {:<42}{:>9}  (the run ended early)",
                    "final kernel state == configuration", "unchecked"
                );
            }
            Some(f) => final_state(&mut s, f),
        }
        if let Some(why) = &r.fatal {
            let _ = writeln!(s, "   ended early: {why}");
        }
        let _ = writeln!(
            s,
            "   result: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        s
    }
}

fn row(s: &mut String, label: &str, value: u64, note: &str) {
    let _ = writeln!(s, "   {label:<42}{value:>9}  {note}");
}

impl Summary<'_> {
    /// Which fault, if any, was under way at `t` (or ended within a second).
    fn during(&self, t: u64) -> String {
        let r = self.record;
        let faults = r
            .agent_outages
            .iter()
            .map(|o| ("agent out", o))
            .chain(r.api_outages.iter().map(|o| ("API server out", o)));
        let mut out = String::new();
        for (what, o) in faults.filter(|(_, o)| o.from_us <= t && t <= o.to_us + 1_000_000) {
            let _ = write!(
                out,
                "  ({what} {:.3}..{:.3} s)",
                o.from_us.saturating_sub(self.started_us) as f64 / 1e6,
                o.to_us.saturating_sub(self.started_us) as f64 / 1e6
            );
        }
        out
    }
}

fn errors(seen: &Seen) -> String {
    if seen.failures.is_empty() {
        return "every backend listened throughout and every subset kept a ready pod".to_owned();
    }
    let by: Vec<String> = seen
        .errors()
        .iter()
        .map(|(e, n)| format!("{e} {n}"))
        .collect();
    by.join(", ")
}

fn lateness(s: &mut String, name: &str, late: &Late) {
    let ms = |us: u64| us as f64 / 1000.0;
    let _ = writeln!(
        s,
        "     {name:<22}{:>9} connections, {:>5} updates: median {:.0}, p99 {:.0}, max {:.0}",
        late.count,
        late.updates.len(),
        ms(late.quantile(0.5)),
        ms(late.quantile(0.99)),
        ms(late.quantile(1.0))
    );
}

fn outages(o: &[Outage], what: &str) -> String {
    let Some(max) = o.iter().map(|o| o.to_us - o.from_us).max() else {
        return String::new();
    };
    let mean = o.iter().map(|o| o.to_us - o.from_us).sum::<u64>() / o.len() as u64;
    format!(
        "{what}: {:.2} s on average, {:.2} s at most",
        mean as f64 / 1e6,
        max as f64 / 1e6
    )
}

fn final_state(s: &mut String, f: &Final) {
    let equal = f.differences.is_empty();
    let _ = writeln!(
        s,
        "   {:<42}{:>9}  {} {:.0} ms after the churn stopped",
        "final kernel state == configuration",
        if equal { "yes" } else { "NO" },
        if equal { "equal" } else { "still different" },
        f.waited_ms
    );
    let weights: Vec<String> = f
        .config
        .weights
        .iter()
        .map(|(subset, w)| format!("{subset} {w}"))
        .collect();
    let ready: Vec<&str> = f
        .config
        .endpoints
        .iter()
        .filter(|(_, _, r)| *r)
        .map(|(p, _, _)| p.as_str())
        .collect();
    let _ = writeln!(
        s,
        "     configuration: weights {}; ready: {}",
        weights.join(", "),
        ready.join(", ")
    );
    let slots: Vec<String> = f
        .kernel
        .slots
        .iter()
        .map(|(to, n)| {
            let to = to.map_or_else(|| "refused".to_owned(), |a| a.ip().to_string());
            format!("{to} {n}")
        })
        .collect();
    let _ = writeln!(
        s,
        "     kernel: {} slots: {}; slot map {} entries",
        f.kernel.slot_count,
        slots.join(", "),
        f.kernel.slot_entries
    );
    for d in &f.differences {
        let _ = writeln!(s, "     differs: {d}");
    }
    if !equal {
        for said in f.agent_said.iter().take(10) {
            let _ = writeln!(s, "     the agent said: {said}");
        }
    }
}
