//! A stand-in for kube-proxy where a test needs a Service VIP routed without
//! our data plane: one iptables DNAT rule in the host's `nat OUTPUT` chain, as
//! kube-proxy's iptables mode writes for a ClusterIP, removed on drop. Only
//! locally generated connects to the VIP:port match, and they end on loopback:
//! nothing leaves the machine.

use std::net::SocketAddr;

#[derive(Debug)]
pub struct ServiceDnat {
    spec: Vec<String>,
}

impl ServiceDnat {
    /// Routes TCP connects to `vip` to `to`.
    pub fn tcp(vip: SocketAddr, to: SocketAddr) -> anyhow::Result<Self> {
        let spec = [
            "OUTPUT",
            "-t",
            "nat",
            "-p",
            "tcp",
            "-d",
            &format!("{}/32", vip.ip()),
            "--dport",
            &vip.port().to_string(),
            "-m",
            "comment",
            "--comment",
            &crate::unique("mesh-test-"),
            "-j",
            "DNAT",
            "--to-destination",
            &to.to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        iptables("-A", &spec)?;
        Ok(Self { spec })
    }
}

fn iptables(verb: &str, spec: &[String]) -> anyhow::Result<String> {
    let mut args = vec![verb];
    args.extend(spec.iter().map(String::as_str));
    crate::sh("iptables", &args)
}

impl Drop for ServiceDnat {
    fn drop(&mut self) {
        if let Err(e) = iptables("-D", &self.spec) {
            eprintln!("removing the test's DNAT rule: {e}");
        }
    }
}
