//! The fuzz targets' checks (`tests/fuzz_checks/mod.rs`) over every saved input: the seed and grown corpus
//! (`fuzz/corpus/<target>/`) and every crash fuzzing found (`fuzz/regressions/<target>/`). This is the part
//! of fuzzing that CI runs: stable Rust, no sanitizer, seconds. `scripts/fuzz.sh` does the fuzzing itself.

mod fuzz_checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through `check`; fails naming
/// each input whose check panicked, or when fewer than `min_files` were found or fewer than `min_accepted`
/// got past the parser (so that a moved corpus, or a schema change that makes every seed invalid, cannot
/// make this pass by checking nothing).
fn replay(target: &str, min_files: usize, min_accepted: usize, check: fn(&[u8]) -> bool) {
    let root = fuzz_checks::repo_root().join("fuzz");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file() && !is_note(p)));
    }
    files.sort();
    assert!(
        files.len() >= min_files,
        "only {} inputs for fuzz target {target} under {}/{{corpus,regressions}}/{target}, expected at least {min_files}",
        files.len(),
        root.display()
    );
    let (mut failed, mut accepted) = (Vec::new(), 0);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        match catch_unwind(AssertUnwindSafe(|| check(&data))) {
            Ok(ok) => accepted += usize::from(ok),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: {msg}", path.display()));
            }
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs fail:\n{}", failed.len(), files.len(), failed.join("\n"));
    assert!(
        accepted >= min_accepted,
        "only {accepted} of {} {target} inputs got past the parser, expected at least {min_accepted}",
        files.len()
    );
    eprintln!("{target}: {} inputs checked, {accepted} past the parser", files.len());
}

/// A regression folder may hold a README next to the reproducers.
fn is_note(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "md")
}

#[test]
fn image() {
    replay("image", 10, 6, fuzz_checks::image);
}

#[test]
fn manifest() {
    replay("manifest", 5, 5, fuzz_checks::manifest);
}

#[test]
fn stream_decode() {
    replay("stream_decode", 10, 8, fuzz_checks::stream_decode);
}

#[test]
fn prompt() {
    replay("prompt", 10, 6, fuzz_checks::prompt);
}

#[test]
fn history() {
    replay("history", 5, 3, fuzz_checks::history);
}
