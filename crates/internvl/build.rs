//! Puts ONNX Runtime's shared library beside the built binaries (target/<profile>/), where the
//! runtime looks for it, so `cargo run` and `cargo test` work without environment variables.
//! The library comes from the onnxruntime wheel in the workspace's .venv (scripts/setup.sh).

use std::path::{Path, PathBuf};

const LIB: &str = "libonnxruntime.so.1.31.1";

fn find_in_venv(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv/lib");
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        let p = entry.path().join("site-packages/onnxruntime/capi").join(LIB);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ORT_LIB_SOURCE");
    // This crate is crates/internvl in the workspace; .venv is at the workspace's root.
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let venv = crate_dir.ancestors().find_map(find_in_venv);
    let src = std::env::var_os("ORT_LIB_SOURCE").map(PathBuf::from).or(venv);
    let Some(src) = src else {
        println!("cargo:warning={LIB} not found in .venv; run scripts/setup.sh or put it beside the binary");
        return;
    };
    println!("cargo:rerun-if-changed={}", src.display());
    // OUT_DIR is target/<profile>/build/<pkg>/out.
    let Some(profile_dir) =
        std::env::var_os("OUT_DIR").map(PathBuf::from).and_then(|o| o.ancestors().nth(3).map(Path::to_path_buf))
    else {
        return;
    };
    let dst = profile_dir.join(LIB);
    let stale = match (std::fs::metadata(&src), std::fs::metadata(&dst)) {
        (Ok(a), Ok(b)) => a.len() != b.len(),
        _ => true,
    };
    if stale {
        if let Err(e) = std::fs::copy(&src, &dst) {
            println!("cargo:warning=copying {} to {}: {e}", src.display(), dst.display());
        }
    }
}
