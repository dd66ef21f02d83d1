//! The binary's tests' helpers: the shared fixtures and folders (the library's `tests/common`), and
//! running `internvl` with its one-line errors.
#![allow(dead_code)] // each test binary uses its own subset

#[path = "../../../internvl/tests/common/mod.rs"]
mod shared;

use std::path::Path;
use std::process::{Command, Output};

pub use shared::*;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_internvl"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("spawning internvl")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Non-zero exit, exactly one line on stderr that mentions `needle`, and no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "error must be one line: {err:?}");
    assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
}

pub fn run_model(model: &Path, image: Option<&Path>, extra: &[&str]) -> Output {
    let mut args =
        vec!["run".to_string(), "--model".into(), model.display().to_string(), "--prompt".into(), "Hi".into()];
    if let Some(i) = image {
        args.extend(["--image".into(), i.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    bin().args(&args).output().unwrap()
}
