//! cargo-fuzz target `manifest`: the whole check is `tests/fuzz_checks/mod.rs::manifest`, shared with
//! `tests/fuzz_corpus.rs` (which replays the saved corpus and regressions in plain `cargo test`).
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::manifest(data);
});
