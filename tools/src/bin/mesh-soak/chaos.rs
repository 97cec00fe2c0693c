//! The faults: SIGKILL the agent and start it again; SIGKILL the API server and
//! start it again. They run while the churn and the storm go on, one fault at a
//! time: an agent that starts while the API server is away is another scenario,
//! which `--kill-during-outage` adds.
//!
//! This runs on the main thread on purpose: the harness starts the agent with
//! `PR_SET_PDEATHSIG`, which fires when the *thread* that spawned it exits, so an
//! agent restarted from a worker thread would be stopped when that thread ends.

use std::time::{Duration, Instant};

use mesh_tools::{agent::Agent, apiserver::ApiServer};
use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};

use crate::{
    clock::now_us,
    run::{Outage, Run},
};

/// How long a restarted agent may take to apply its first configuration.
const AGENT_START: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Plan {
    /// SIGKILL the agent about this often (±30%).
    pub kill_every: Duration,
    /// API server crashes, from the start.
    pub api_at: Vec<Duration>,
    /// How long the API server stays down before it is started again.
    pub api_down: Duration,
    pub kill_during_outage: bool,
    pub seed: u64,
}

/// Runs the faults until the run ends; the last one is finished first.
pub fn faults(agent: &mut Agent, api: &ApiServer, plan: &Plan, run: &Run) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut next_kill = Instant::now() + plan.kill_every.mul_f64(rng.random_range(0.7..1.3));
    let mut api_at = plan.api_at.iter().map(|d| run.started + *d).peekable();
    loop {
        let crash = api_at.peek().is_some_and(|at| *at <= next_kill);
        let at = if crash { api_at.next() } else { None }.unwrap_or(next_kill);
        if !run.sleep_until(at) {
            return;
        }
        let result = if crash {
            crash_api_server(agent, api, plan, run)
        } else {
            next_kill = Instant::now() + plan.kill_every.mul_f64(rng.random_range(0.7..1.3));
            kill_agent(agent, Duration::from_millis(rng.random_range(0..1000)), run)
        };
        if let Err(e) = result {
            return run.fail(format!("{e:#}"));
        }
    }
}

/// SIGKILL, down for `down`, then started again on its pinned state.
fn kill_agent(agent: &mut Agent, down: Duration, run: &Run) -> anyhow::Result<()> {
    let from_us = now_us();
    agent.kill()?;
    std::thread::sleep(down);
    restart(agent).map_err(|e| e.context("the agent did not come back after SIGKILL"))?;
    let to_us = now_us();
    println!(
        "   t={:>5.1}s  agent SIGKILLed, started again after {:.0} ms, applying {:.0} ms after the kill",
        run.t(),
        down.as_secs_f64() * 1000.0,
        (to_us - from_us) as f64 / 1000.0
    );
    run.note(|r| r.agent_outages.push(Outage { from_us, to_us }));
    Ok(())
}

/// Starts the agent on its pinned state and waits for its first apply.
fn restart(agent: &mut Agent) -> anyhow::Result<()> {
    // `restart` waits 20 s for the first apply; an agent still running after
    // that (waiting for its API server) gets longer. One that exited fails here.
    if agent.restart(&[]).is_err() {
        agent.wait_applied(1, AGENT_START)?;
    }
    Ok(())
}

/// SIGKILL of kube-apiserver, `api_down` without it, then started again as it
/// was (same port, certificates and etcd) until ready. With
/// `kill_during_outage`, the agent is SIGKILLed too and started while the API
/// server is away.
fn crash_api_server(
    agent: &mut Agent,
    api: &ApiServer,
    plan: &Plan,
    run: &Run,
) -> anyhow::Result<()> {
    let from_us = now_us();
    api.crash()?;
    let back = Instant::now() + plan.api_down;
    let start_api = || -> anyhow::Result<()> {
        std::thread::sleep(back.saturating_duration_since(Instant::now()));
        api.set_up(true)?;
        let to_us = now_us();
        println!(
            "   t={:>5.1}s  kube-apiserver SIGKILLed, started again after {:.1} s, ready {:.1} s after the kill",
            run.t(),
            plan.api_down.as_secs_f64(),
            (to_us - from_us) as f64 / 1e6
        );
        run.note(|r| r.api_outages.push(Outage { from_us, to_us }));
        Ok(())
    };
    if !plan.kill_during_outage {
        return start_api();
    }
    // The API server comes back on a thread of its own (its processes do not
    // depend on that thread) while this one restarts the agent.
    std::thread::scope(|s| {
        let api_back = s.spawn(start_api);
        let killed_us = now_us();
        agent.kill()?;
        std::thread::sleep(Duration::from_millis(500));
        let restarted = restart(agent);
        api_back
            .join()
            .map_err(|_| anyhow::anyhow!("starting the API server panicked"))??;
        restarted.map_err(|e| e.context("the agent started during the outage never applied"))?;
        let to_us = now_us();
        println!(
            "   t={:>5.1}s  the agent SIGKILLed during the outage and started while it lasted applied {:.0} ms after the kill",
            run.t(),
            (to_us - killed_us) as f64 / 1000.0
        );
        run.note(|r| {
            r.agent_outages.push(Outage {
                from_us: killed_us,
                to_us,
            });
        });
        Ok(())
    })
}
