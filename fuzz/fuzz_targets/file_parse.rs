//! A file of the file source: YAML text, parsed and converted to typed objects
//! (`source::file::parse`, which runs `TryFrom<Document> for Resource`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_user::source::file;

fuzz_target!(|data: &[u8]| {
    // The source rejects files that are not UTF-8 before parsing; lossy text
    // still lets every input reach the parser.
    let text = String::from_utf8_lossy(data);
    let _ = file::parse(std::path::Path::new("fuzz.yaml"), &text);
});
