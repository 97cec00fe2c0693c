//! `mesh-agent`: command line. anyhow lives here, at the edge.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_user::{
    agent,
    cli::{self, inspect},
    compile,
    kernel::{pin::PinDir, scope::Scope},
    source::SourceSpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "eBPF service-mesh data plane node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once, at start")]
enum Command {
    /// Load the kernel programs into a cgroup and keep their maps in step with the source.
    Run {
        /// Where objects come from: file:DIR (a folder of YAML manifests, watched) or kubernetes.
        #[arg(long, env = "MESH_SOURCE")]
        source: SourceSpec,
        /// The cgroup v2 directory to attach to: with --mesh-scope pods, the pods'
        /// root (default: kubepods.slice or kubepods at the top of a cgroup v2
        /// mount, found by itself); with --mesh-scope cgroup (required then),
        /// every process in it and below is meshed.
        #[arg(long, env = "MESH_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Which processes are meshed: `pods`, Istio's scope (pods of this node in a
        /// namespace the --namespace-selector matches, not opted out with
        /// sidecar.istio.io/inject=false, not on the host network; their cgroups are
        /// found below --cgroup), or `cgroup` (every process below --cgroup).
        /// Default: pods with --source kubernetes, cgroup with a folder.
        #[arg(long, env = "MESH_SCOPE", value_enum)]
        mesh_scope: Option<ScopeArg>,
        /// This node's name (the DaemonSet sets it from the downward API): for
        /// --mesh-scope pods, Services' `internalTrafficPolicy: Local`, and
        /// topology preferences (the zone label of its Node).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// With --source kubernetes: a kubeconfig (else KUBECONFIG, ~/.kube/config, or in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// With --source kubernetes: label selector of the mesh's namespaces.
        #[arg(long, default_value = "istio-injection=enabled")]
        namespace_selector: String,
        #[command(flatten)]
        compile: CompileArgs,
        /// Serve /healthz, /readyz and /metrics here ("off": nowhere).
        #[arg(long, env = "MESH_METRICS_ADDR", default_value = "127.0.0.1:9090")]
        metrics_addr: String,
        /// Who may read /metrics (it names every service and backend): anyone who
        /// can connect, or bearer tokens the API server authorizes for `get /metrics`.
        #[arg(long, env = "MESH_METRICS_AUTH", value_enum, default_value = "none")]
        metrics_auth: mesh_user::telemetry::auth::MetricsAuth,
        /// Log format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// Do not short-circuit same-node pod-to-pod TCP (sockops + sk_msg); every
        /// byte then goes through the TCP/IP stack.
        #[arg(long, env = "MESH_NO_REDIRECT")]
        no_redirect: bool,
        #[command(flatten)]
        state: StateArgs,
        /// Load this kernel object instead of the embedded one (a staged upgrade).
        #[arg(long, env = "MESH_EBPF_OBJECT")]
        ebpf_object: Option<PathBuf>,
        /// Capacities of some maps instead of the built-in ones, as
        /// NAME=ENTRIES[,NAME=ENTRIES...] (e.g. SLOTS_V1=4194304). A pinned map of
        /// another capacity is replaced and refilled. Kernel memory: every map
        /// 16 B per entry of capacity (rounded up to a power of two) from load;
        /// then per entry present 96 B (SERVICES_V1, SLOTS_V1) and 88 B + 8 B
        /// per possible CPU (BACKEND_STATS_V1, SERVICE_STATS_V1: only backends
        /// and services dialled from this node); the LRUs are preallocated:
        /// REVNAT_V1 80 B, AFFINITY_V1 96 B per entry of capacity. Defaults
        /// hold 10k services / 100k endpoints; `mesh-agent status` shows what
        /// each map takes (docs/design.md, "Kernel memory of the maps").
        #[arg(long, env = "MESH_MAP_CAPACITY", default_value = "")]
        map_capacity: mesh_user::kernel::loader::MapCapacities,
        /// The cgroup v2 directory whose processes' connects to gateway ports on
        /// the node's addresses (127.0.0.1, ::1, the node's IPs) are served by
        /// the gateway: `auto` (the top of the cgroup v2 mount holding --cgroup:
        /// every process of the node), a path, or `off` (no gateway).
        #[arg(long, env = "MESH_GATEWAY_CGROUP", default_value = "auto")]
        gateway_cgroup: String,
        /// The network devices whose clients (outside the node) reach the
        /// gateway's kernel-served ports on the node's addresses, translated
        /// per packet in tc: NAME[,NAME...], `auto` (every non-loopback,
        /// non-bridge interface holding one of the node's addresses) or
        /// `none`. Needs IP forwarding on in the agent's network namespace.
        #[arg(long, env = "MESH_GATEWAY_DEVICE", default_value = "auto")]
        gateway_device: mesh_user::kernel::ingress::Devices,
        /// The socket mark (SO_MARK) of the gateway router's connections to
        /// backends, by which the same-node shortcut joins them to backends on
        /// this node; 0: not joined. Pick one no rule of the node matches: the
        /// default has no bit of kube-proxy's 0xc000, Cilium's 0xf00 or
        /// Calico's 0xffff0000.
        #[arg(long, env = "MESH_ROUTER_MARK", default_value = "0x1057", value_parser = parse_mark)]
        router_mark: u32,
    },
    /// Detach and unpin everything the agent pinned (nothing else); stop the agent first.
    Cleanup {
        #[command(flatten)]
        state: StateArgs,
        /// Clean up even while an agent runs on this --pin-dir (it keeps running,
        /// with nothing attached, until stopped).
        #[arg(long)]
        force: bool,
        /// Then wait for SIGTERM: the uninstall DaemonSet's container
        /// (manifests/uninstall), Running once its node is clean, with no image
        /// but the agent's.
        #[arg(long)]
        then_wait: bool,
    },
    /// Programs attached, map occupancy, services and backends, last sync.
    Status {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Each service port as the kernel holds it: VIP:port, route, destinations,
    /// weights, backends and their slot shares.
    Dump {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Which route applies to VIP:PORT and why, and each backend's share.
    Explain {
        /// The service address, e.g. 10.96.0.80:80 or [fd00::80]:80.
        target: std::net::SocketAddr,
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Validate a source and print the tables it compiles to, without touching the kernel.
    Check {
        #[arg(long)]
        source: SourceSpec,
        /// Compile as the agent of this node would (its Node in the folder
        /// gives the zone: `internalTrafficPolicy: Local`, topology hints,
        /// locality load balancing).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        #[command(flatten)]
        compile: CompileArgs,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ScopeArg {
    Pods,
    Cgroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Where the agent keeps its state.
#[derive(Debug, clap::Args)]
struct StateArgs {
    /// Our directory in bpffs: maps and program links pinned there outlive the agent.
    #[arg(long, env = "MESH_PIN_DIR", default_value = "/sys/fs/bpf/mesh")]
    pin_dir: PathBuf,
    /// Where the agent records what it applied (for status, dump, explain).
    #[arg(long, env = "MESH_RUN_DIR", default_value = "/run/mesh")]
    run_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct CompileArgs {
    /// The cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The labels of this node's gateway: Istio Gateways whose `selector` these
    /// satisfy are served here (KEY=VALUE[,KEY=VALUE...]).
    #[arg(
        long,
        env = "MESH_GATEWAY_LABELS",
        default_value = "istio=ingressgateway"
    )]
    gateway_labels: String,
    /// The namespace the gateway counts as running in (VirtualService
    /// `exportTo`, server hosts `./host`).
    #[arg(long, env = "MESH_GATEWAY_NAMESPACE", default_value = "istio-system")]
    gateway_namespace: String,
}

impl CompileArgs {
    fn config(&self) -> anyhow::Result<compile::Config> {
        let mut labels = std::collections::BTreeMap::new();
        for pair in self
            .gateway_labels
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--gateway-labels: {pair:?} is not KEY=VALUE"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(compile::Config {
            cluster_domain: self.cluster_domain.clone(),
            gateway: compile::gateway::GatewayConfig {
                labels,
                namespace: self.gateway_namespace.clone(),
            },
            ..Default::default()
        })
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per CPU),
/// and memory freed in one is reused only by the threads of that arena: the
/// file source's parse threads left their transient memory resident beside
/// the objects they made (10 000 Services: 119 MiB resident with two arenas,
/// 97 MiB with one; docs/design.md, "Memory"). The agent's work is one event
/// loop; one arena serves it.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a tunable; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            mut source,
            cgroup,
            mesh_scope,
            node_name,
            kubeconfig,
            namespace_selector,
            metrics_addr,
            compile,
            log_format,
            no_redirect,
            state,
            ebpf_object,
            map_capacity,
            metrics_auth,
            gateway_cgroup,
            gateway_device,
            router_mark,
        } => {
            init_logging(&log_format);
            let kubernetes = matches!(source, SourceSpec::Kubernetes(_));
            let scope = match (mesh_scope, kubernetes) {
                (Some(ScopeArg::Cgroup), _) | (None, false) => Scope::Cgroup,
                (Some(ScopeArg::Pods), _) | (None, true) => Scope::Pods {
                    node: node_name.clone().context(
                        "--mesh-scope pods needs this node's name: --node-name or NODE_NAME",
                    )?,
                },
            };
            let cgroup = match (cgroup, &scope) {
                (Some(cgroup), _) => cgroup,
                (None, Scope::Pods { .. }) => mesh_user::kernel::pod_cgroups::detect_root()?,
                (None, Scope::Cgroup) => {
                    anyhow::bail!("--mesh-scope cgroup needs --cgroup (or MESH_CGROUP)")
                }
            };
            let gateway_cgroup = match gateway_cgroup.as_str() {
                "off" => None,
                "auto" => Some(
                    mesh_user::kernel::own_cgroup::tree_root_of(&cgroup).with_context(|| {
                        format!(
                            "--gateway-cgroup auto: {} is not on cgroup v2; give a path or off",
                            cgroup.display()
                        )
                    })?,
                ),
                path => Some(PathBuf::from(path)),
            };
            let mut compile = compile.config()?;
            // internalTrafficPolicy Local and zone preferences are decided per node.
            compile.node_name.clone_from(&node_name);
            if let SourceSpec::Kubernetes(options) = &mut source {
                options.kubeconfig = kubeconfig;
                options.namespace_selector = namespace_selector;
                options.node_name = node_name;
            }
            limit_malloc_arenas();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(2)
                .build()?;
            runtime.block_on(async {
                let metrics_addr = match metrics_addr.as_str() {
                    "off" => None,
                    addr => Some(addr.parse().with_context(|| {
                        format!("--metrics-addr {addr:?}: expected IP:PORT or off")
                    })?),
                };
                let config = agent::Config {
                    source,
                    cgroup,
                    compile,
                    metrics_addr,
                    redirect: !no_redirect,
                    pin_dir: state.pin_dir,
                    run_dir: state.run_dir,
                    ebpf_object,
                    map_capacity,
                    metrics_auth,
                    scope,
                    gateway_cgroup,
                    gateway_devices: gateway_device,
                    router_mark,
                };
                agent::run(config, shutdown_signal())
                    .await
                    .context("mesh-agent run")
            })
        }
        Command::Check {
            source,
            node_name,
            compile,
        } => {
            let SourceSpec::File(dir) = source else {
                anyhow::bail!("check reads a folder: --source file:DIR");
            };
            let mut config = compile.config()?;
            config.node_name = node_name;
            let checked = cli::check::check(&dir, &config);
            print!("{}", checked.report);
            if checked.errors {
                anyhow::bail!("{} contains errors", dir.display());
            }
            Ok(())
        }
        Command::Status { state, output } => {
            let s = inspect::status(&PinDir::new(&state.pin_dir), &state.run_dir)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                inspect::print_status(&s);
            }
            Ok(())
        }
        Command::Dump { state, output } => {
            let d = inspect::dump(&PinDir::new(&state.pin_dir), &state.run_dir, None)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                inspect::print_dump(&d);
            }
            Ok(())
        }
        Command::Explain {
            target,
            state,
            output,
        } => {
            let d = inspect::dump(&PinDir::new(&state.pin_dir), &state.run_dir, Some(target))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                inspect::print_explain(target, &d);
            }
            Ok(())
        }
        Command::Cleanup {
            state,
            force,
            then_wait,
        } => {
            init_logging("text");
            let removed = cli::cleanup(&PinDir::new(&state.pin_dir), &state.run_dir, force)
                .with_context(|| format!("cleaning up {}", state.pin_dir.display()))?;
            println!(
                "unpinned {} objects under {}",
                removed.len(),
                state.pin_dir.display()
            );
            if then_wait {
                use nix::sys::signal::{SigSet, Signal};
                let mut stop = SigSet::empty();
                stop.add(Signal::SIGTERM);
                stop.add(Signal::SIGINT);
                stop.thread_block()?;
                println!("clean; waiting for SIGTERM");
                stop.wait()?;
            }
            Ok(())
        }
    }
}

fn init_logging(format: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: `kubectl logs` and files would
    // show the escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `--router-mark`: hexadecimal (`0x...`) or decimal.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a mark (0x... or decimal): {e}"))
}
