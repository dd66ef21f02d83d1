//! cargo-fuzz target `manifest`: the whole check is `crates/internvl/tests/fuzz_checks/mod.rs::manifest`, shared with
//! `crates/internvl/tests/fuzz_corpus.rs` (which replays the saved corpus and regressions in plain `cargo test`).
#![no_main]

#[path = "../../crates/internvl/tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::manifest(data);
});
