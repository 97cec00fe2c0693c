//! Validation and compile from arbitrary objects: YAML text parsed as the file
//! source does, into the index as a snapshot, then revalidate and compile.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_user::{
    compile,
    index::Index,
    source::{Event, Sourced, file},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (objects, diagnostics) = file::parse(std::path::Path::new("fuzz.yaml"), &text);
    let mut index = Index::default();
    index.apply_event(Event::Snapshot {
        objects: objects
            .into_iter()
            .map(|object| Sourced {
                origin: "fuzz.yaml".to_owned(),
                object,
            })
            .collect(),
        diagnostics,
    });
    let config = compile::Config::default();
    index.revalidate(&config.cluster_domain);
    let compiled = compile::compile(&index, &config);
    // The gateway ports' tables, for a node address and a router listening.
    let node = [std::net::IpAddr::from([192, 0, 2, 1])];
    let router = compiled
        .gateways
        .iter()
        .map(|p| {
            let addrs = compile::gateway::RouterAddrs {
                v4: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 40000))),
                v6: None,
            };
            (p.port, addrs)
        })
        .collect();
    let _ = compile::gateway::service_plans(&compiled.gateways, &node, &router, 64);
    // A small table limit sends most routes through the apportioning path.
    let small = compile::Config {
        max_slots: 7,
        ..config
    };
    let _ = compile::compile(&index, &small);
});
