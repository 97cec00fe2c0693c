//! Network namespaces as pods on one node: a `node` namespace holds a bridge, and
//! each pod namespace is joined to it by a veth pair. Nothing touches the host's
//! own network namespace, and no namespace has a route off the node, so traffic
//! that is not rewritten (a VIP, say) fails locally with ENETUNREACH.

use std::{fs::File, net::IpAddr, path::PathBuf};

use anyhow::Context as _;

use crate::sh;

/// IPv4 pod subnet, as a /24 prefix: pods get `POD_NET4.N`.
pub const POD_NET4: &str = "10.244.0";
/// IPv6 pod subnet prefix: pods get `POD_NET6::N`.
pub const POD_NET6: &str = "fd00:10:244";

/// One named network namespace; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `program ARGS` inside this namespace (`ip netns exec`), e.g. a
    /// kube-proxy stand-in's iptables rule, which goes away with the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A handle for `setns`.
    pub fn open(&self) -> anyhow::Result<File> {
        File::open(self.path()).with_context(|| format!("opening netns {}", self.name))
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> anyhow::Result<()> {
        let file = self.open()?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(())
    }

    /// A counter from `/proc/net/snmp` (e.g. `Tcp` `OutSegs`) inside this namespace.
    pub fn snmp(&self, group: &str, field: &str) -> anyhow::Result<u64> {
        let out = sh(
            "ip",
            &["netns", "exec", &self.name, "cat", "/proc/net/snmp"],
        )?;
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{group}:")))
            .collect();
        let (names, values) = (
            lines.first().context("no header")?,
            lines.get(1).context("no values")?,
        );
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .context("no such field")?;
        Ok(values
            .split_whitespace()
            .nth(i)
            .context("short line")?
            .parse()?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A pod: its namespace and addresses.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
}

/// A node: a bridge namespace and the pods joined to it. Dropping it deletes every
/// namespace (and with them every veth).
#[derive(Debug)]
pub struct Node {
    prefix: String,
    pub bridge: Netns,
    pub pods: Vec<Pod>,
}

impl Node {
    pub fn new() -> anyhow::Result<Self> {
        crate::sweep_stale();
        let prefix = crate::unique("mt");
        let bridge = Netns::create(&format!("{prefix}-node"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        Ok(Node {
            prefix,
            bridge,
            pods: Vec::new(),
        })
    }

    /// Adds a pod with host number `host` (1..=254): `10.244.0.<host>` and
    /// `fd00:10:244::<host>`.
    pub fn add_pod(&mut self, name: &str, host: u8) -> anyhow::Result<&Pod> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let veth = format!("v{host}");
        self.bridge.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.bridge
            .ip(&["link", "set", &veth, "master", "br0", "up"])?;
        let ipv4 = format!("{POD_NET4}.{host}");
        let ipv6 = format!("{POD_NET6}::{host}");
        ns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ns,
            ipv4: ipv4.parse()?,
            ipv6: ipv6.parse()?,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}
