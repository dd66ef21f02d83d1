//! What the end-to-end and hostile-input tests share: the fixtures, the binary, scratch folders and
//! model folders broken in one way.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or reuses, when up to date) the fixtures; every test needs them, none may skip without them.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("build/fixtures");
        let status = Command::new(root().join(".venv/bin/python"))
            .arg(root().join("tests/fixtures.py"))
            .arg(&dir)
            .status()
            .expect("running tests/fixtures.py (run scripts/setup.sh first)");
        assert!(status.success(), "tests/fixtures.py failed");
        dir
    })
}

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

/// An empty scratch folder `build/test-tmp/NAME`.
pub fn tmp(name: &str) -> PathBuf {
    let d = root().join("build/test-tmp").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the model folder (large files linked, not copied) to break in one way.
pub fn model_copy(name: &str) -> PathBuf {
    folder_copy(&fixtures().join("model"), name)
}

pub fn folder_copy(src: &Path, name: &str) -> PathBuf {
    let dst = tmp(name);
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

pub fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("manifest.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}
