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
    let _ = compile::compile(&index, &config);
    // A small table limit sends most routes through the apportioning path.
    let small = compile::Config {
        max_slots: 7,
        ..config
    };
    let _ = compile::compile(&index, &small);
});
