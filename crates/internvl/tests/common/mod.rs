//! What the library's and the binary's tests share: the fixtures, scratch folders and model folders
//! broken in one way (the binary's tests add their helpers in `crates/internvl-cli/tests/common`).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The workspace's root (every crate is `crates/<name>`): where `build/`, `.venv` and `tests/` are.
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).unwrap_or(here).to_path_buf()
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
