//! What the soak's threads share: when to stop, and the record of what was done
//! to the cluster and when (on the storm's clock, [`crate::clock`]).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::clock::now_us;

/// Set by SIGINT or SIGTERM once [`stop_on_signals`] ran.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT (Ctrl-C) and SIGTERM set [`INTERRUPTED`] instead of ending the
/// process, so the guards can clean up.
pub fn stop_on_signals() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

#[derive(Debug)]
pub struct Run {
    pub started: Instant,
    pub started_us: u64,
    pub deadline: Instant,
    /// A thread that cannot go on (an agent that does not come back) ends the run.
    pub abort: AtomicBool,
    pub record: Mutex<Record>,
}

/// One readiness change of a pod, as the API server took it (EndpointSlice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub pod: usize,
    pub ready: bool,
    /// Before the slice update was sent, and when the API server acknowledged it.
    pub sent_us: u64,
    pub acked_us: u64,
}

/// A time without an agent (from SIGKILL to the restarted agent's first apply),
/// or without an API server (from the stop to ready again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub from_us: u64,
    pub to_us: u64,
}

#[derive(Debug, Default)]
pub struct Record {
    pub transitions: Vec<Transition>,
    pub weight_edits: u64,
    /// Churn requests that failed (the API server away, or slow): not applied.
    pub refused: u64,
    pub agent_outages: Vec<Outage>,
    pub api_outages: Vec<Outage>,
    /// Why the run ended early, if it did.
    pub fatal: Option<String>,
}

impl Run {
    pub fn new(duration: Duration) -> Self {
        let started = Instant::now();
        Run {
            started,
            started_us: now_us(),
            deadline: started + duration,
            abort: AtomicBool::new(false),
            record: Mutex::new(Record::default()),
        }
    }

    /// Whether the churn goes on.
    pub fn live(&self) -> bool {
        Instant::now() < self.deadline && !self.stopped()
    }

    /// Interrupted or aborted.
    pub fn stopped(&self) -> bool {
        INTERRUPTED.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed)
    }

    /// Sleeps until `until` in short steps; false if the run ended meanwhile.
    pub fn sleep_until(&self, until: Instant) -> bool {
        while Instant::now() < until {
            if !self.live() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
        self.live()
    }

    pub fn note(&self, f: impl FnOnce(&mut Record)) {
        if let Ok(mut r) = self.record.lock() {
            f(&mut r);
        }
    }

    /// Ends the run because of `why` (unless Ctrl-C already did: then the
    /// failure is likely its echo, e.g. a script that got the SIGINT too).
    pub fn fail(&self, why: String) {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return;
        }
        eprintln!("soak: {why}");
        self.note(|r| {
            r.fatal.get_or_insert(why);
        });
        self.abort.store(true, Ordering::Relaxed);
    }

    /// Seconds since the start, for the log lines.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// A line every 10 s until the run ends.
pub fn progress(run: &Run, storm: &crate::storm::Reader) {
    let mut next = run.started + Duration::from_secs(10);
    while run.sleep_until(next) {
        next += Duration::from_secs(10);
        let (flips, edits, kills, restarts) = run.record.lock().map_or((0, 0, 0, 0), |r| {
            (
                r.transitions.len(),
                r.weight_edits,
                r.agent_outages.len(),
                r.api_outages.len(),
            )
        });
        println!(
            "   t={:>5.1}s  connections {:>8}  failed {:>3}  flips {flips:>4}  weight edits {edits:>3}  agent restarts {kills:>3}  API server restarts {restarts}",
            run.t(),
            storm.made.load(Ordering::Relaxed),
            storm.failed.load(Ordering::Relaxed),
        );
    }
}
