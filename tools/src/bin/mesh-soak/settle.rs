//! After the churn: wait (bounded) until the kernel equals the configuration
//! the API server holds, then say whether it does (see [`crate::verify`]).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    api::ApiClient,
    cluster::{Cluster, HOST, SLICE, VIP},
    verify::{self, Config, Kernel},
};

/// The final check's outcome.
#[derive(Debug)]
pub struct Final {
    pub config: Config,
    pub kernel: Kernel,
    /// Empty when the kernel equals the configuration.
    pub differences: Vec<String>,
    /// From the end of the churn to equal (or to giving up).
    pub waited_ms: f64,
    /// The running agent's errors and warnings, to explain a difference.
    pub agent_said: Vec<String>,
}

/// Polls until the kernel equals the configuration the API server holds, or
/// `settle` passes.
pub fn final_check(
    cluster: &Cluster,
    api: &ApiClient,
    since: Instant,
    settle: Duration,
) -> anyhow::Result<Final> {
    let vip: SocketAddr = VIP.parse()?;
    let config = api.config(HOST, SLICE)?;
    let agent = &cluster.agent;
    loop {
        let dump = serde_json::from_str(&agent.cli(&["dump", "--output", "json"])?)?;
        let status = serde_json::from_str(&agent.cli(&["status", "--output", "json"])?)?;
        let kernel = verify::kernel(&dump, &status, vip)?;
        let mut differences = verify::differences(&config, &kernel, vip);
        // Equal maps with no agent behind them would not stay equal.
        if !matches!(agent.http_get("/healthz"), Ok((200, _))) {
            differences.push("the agent does not answer /healthz".to_owned());
        }
        if differences.is_empty() || since.elapsed() > settle {
            let mut said: Vec<String> = agent.messages("ERROR");
            said.extend(agent.messages("WARN"));
            let mut seen = BTreeSet::new();
            said.retain(|m| seen.insert(m.clone()));
            return Ok(Final {
                config,
                kernel,
                differences,
                waited_ms: since.elapsed().as_secs_f64() * 1000.0,
                agent_said: said,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
