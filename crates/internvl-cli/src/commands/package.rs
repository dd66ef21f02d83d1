//! `internvl package`: one archive an edge server unpacks and runs with no Python and no Rust: this
//! binary, ONNX Runtime's library beside it (the GPU build and its provider libraries with `--gpu`), the
//! model folder, a short README with the run and serve commands, and `SHA256SUMS` over every file
//! (`sha256sum -c SHA256SUMS` in the unpacked folder; the model's own files are also checked by
//! `internvl info --verify`).
//!
//! Every model file is hashed as it is archived and compared with the manifest, so a damaged folder
//! never becomes a bundle; the archive is written beside `--out` and renamed into place when complete.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use sha2::{Digest, Sha256};

use internvl::error::{ErrorKind, WithKind};
use internvl::manifest::Manifest;
use internvl::runtime::{self, providers, Device, ORT_LIBRARY};

use crate::notices::spinner;

pub struct PackageOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    /// A folder holding ONNX Runtime's GPU build (what `scripts/gpu_bundle.sh` writes).
    pub gpu: Option<PathBuf>,
}

/// What went into the archive.
pub struct Packed {
    pub root: String,
    pub files: usize,
    pub bytes: u64,
}

struct Entry {
    source: PathBuf,
    /// Path inside the archive's top folder.
    name: String,
    mode: u32,
    /// The manifest's SHA-256, for the model's files.
    expected: Option<String>,
}

pub fn write_bundle(o: &PackageOptions) -> Result<Packed> {
    let m = Manifest::load(&o.model)?;
    // The name becomes the archive's folder names: nothing that could climb out of where it is unpacked.
    let safe = !m.name.is_empty()
        && m.name != "."
        && m.name != ".."
        && m.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
    if !safe {
        return Err(anyhow!(
            "{}: the manifest's name {:?} is not a plain folder name (letters, digits, . _ - +); re-export it",
            o.model.display(),
            m.name
        ))
        .kind(ErrorKind::Model);
    }
    let exe = std::env::current_exe().context("locating the running binary")?;
    let libs = match &o.gpu {
        Some(dir) => {
            let missing: Vec<&str> = [ORT_LIBRARY]
                .into_iter()
                .chain(providers::missing_libraries(dir, Device::Tensorrt))
                .filter(|lib| !dir.join(lib).is_file())
                .collect();
            if !missing.is_empty() {
                return Err(anyhow!(
                    "--gpu {}: missing {} (scripts/gpu_bundle.sh writes them)",
                    dir.display(),
                    missing.join(", ")
                ))
                .kind(ErrorKind::Usage);
            }
            [ORT_LIBRARY]
                .into_iter()
                .chain(providers::provider_libraries(Device::Tensorrt).iter().copied())
                .map(|lib| dir.join(lib))
                .collect()
        }
        None => vec![runtime::library()?],
    };
    let models = format!("models/{}", m.name);
    let mut entries = vec![Entry { source: exe, name: "internvl".into(), mode: 0o755, expected: None }];
    for lib in libs {
        let name = lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The CPU library is found under its versioned name beside the binary.
        let name = if o.gpu.is_none() { ORT_LIBRARY.to_string() } else { name };
        entries.push(Entry { source: lib, name, mode: 0o644, expected: None });
    }
    entries.push(Entry {
        source: m.path("manifest.json"),
        name: format!("{models}/manifest.json"),
        mode: 0o644,
        expected: None,
    });
    for (file, entry) in &m.files {
        entries.push(Entry {
            source: m.path(file),
            name: format!("{models}/{file}"),
            mode: 0o644,
            expected: Some(entry.sha256.to_ascii_lowercase()),
        });
    }
    let root = format!("internvl-{}", m.name);
    let readme = readme(&m, &models, o.gpu.is_some());
    let mut sums = String::new();
    let (mut count, mut bytes) = (0usize, 0u64);
    internvl::files::write_atomic(&o.out, |w| {
        let gz = flate2::write::GzEncoder::new(w, flate2::Compression::new(6));
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        for e in &entries {
            let file = std::fs::File::open(&e.source)
                .map_err(|err| std::io::Error::other(format!("{}: {err}", e.source.display())))?;
            let size = file.metadata()?.len();
            let mut reader = Hashing { inner: file, hasher: Sha256::new() };
            append(&mut tar, &format!("{root}/{}", e.name), e.mode, size, &mut reader)?;
            let digest = hex(reader.hasher.finalize().as_slice());
            if e.expected.as_ref().is_some_and(|want| *want != digest) {
                return Err(std::io::Error::other(format!(
                    "{} does not match its checksum in the manifest (damaged, or swapped with another export's file); not packaged",
                    e.source.display()
                )));
            }
            sums.push_str(&format!("{digest}  {}\n", e.name));
            count += 1;
            bytes += size;
        }
        let readme_sum = hex(Sha256::digest(readme.as_bytes()).as_slice());
        sums.push_str(&format!("{readme_sum}  README.txt\n"));
        append(&mut tar, &format!("{root}/README.txt"), 0o644, readme.len() as u64, &mut readme.as_bytes())?;
        append(&mut tar, &format!("{root}/SHA256SUMS"), 0o644, sums.len() as u64, &mut sums.as_bytes())?;
        let mut gz = tar.into_inner()?;
        gz.flush()?;
        gz.finish()?;
        Ok(())
    })
    .kind(ErrorKind::Input)?;
    Ok(Packed { root, files: count + 2, bytes })
}

fn append(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    mode: u32,
    size: u64,
    data: &mut impl Read,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    tar.append_data(&mut h, path, data)
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn readme(m: &Manifest, models: &str, gpu: bool) -> String {
    let devices = providers::devices_for(m.dtype).join(", ");
    let gpu_note = if gpu {
        "\nThis is the GPU build of ONNX Runtime: the machine needs an NVIDIA driver (r580+), CUDA 13 and cuDNN 9\n\
         (TensorRT 10 for --device tensorrt) on LD_LIBRARY_PATH; `./internvl devices` says which providers start.\n"
    } else {
        ""
    };
    format!(
        "internvl {version}: {name} ({dtype}, {arch} LLM, {template} template); runs on: {devices}\n\
         \n\
         Everything here runs from this folder; no Python, no Rust, no network.\n\
         \n\
         Ask about an image:\n  ./internvl run --model {models} --image photo.jpg --prompt \"Describe the image.\"\n\
         Ask about a video (needs FFmpeg's ffprobe / ffmpeg, e.g. apt install ffmpeg):\n  ./internvl run --model {models} --video clip.mp4 --prompt \"What happens?\"\n\
         Converse on stdin:\n  ./internvl chat --model {models}\n\
         Serve the OpenAI API (POST /v1/chat/completions):\n  ./internvl serve --model {models} --host 0.0.0.0 --port 8080 --api-key KEY\n\
         Check the files:\n  sha256sum -c SHA256SUMS\n  ./internvl info --model {models} --verify\n{gpu_note}",
        version = env!("CARGO_PKG_VERSION"),
        name = m.name,
        dtype = m.dtype,
        arch = m.decoder.arch,
        template = m.template.name,
    )
}

/// Where `--out` may go: not inside the model folder, not over an existing file without `--force`.
pub fn check_out(o: &PackageOptions, force: bool) -> Result<()> {
    let rules = internvl::files::OutputRules { inputs: vec![o.model.as_path()], model_dir: Some(&o.model), force };
    rules.check(&o.out, "--out")?;
    if let Some(dir) = &o.gpu {
        if !dir.is_dir() {
            return Err(anyhow!("--gpu {}: not a folder", dir.display())).kind(ErrorKind::Usage);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct PackageArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    pub model: PathBuf,
    /// The archive to write (.tar.gz).
    #[arg(long)]
    pub out: PathBuf,
    /// Bundle ONNX Runtime's GPU build from this folder (what scripts/gpu_bundle.sh writes) instead of
    /// the CPU library beside this binary.
    #[arg(long)]
    pub gpu: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

pub fn package(a: PackageArgs) -> Result<()> {
    let o = PackageOptions { model: a.model, out: a.out, gpu: a.gpu };
    check_out(&o, a.force)?;
    let bar = spinner(std::io::stderr().is_terminal(), "packaging (checking every file's checksum)");
    let packed = write_bundle(&o)?;
    bar.finish_and_clear();
    let size = std::fs::metadata(&o.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {}: {} files ({:.1} MiB, {:.1} MiB compressed) under {}/; unpack with tar -xzf and see {}/README.txt",
        o.out.display(),
        packed.files,
        packed.bytes as f64 / (1u64 << 20) as f64,
        size as f64 / (1u64 << 20) as f64,
        packed.root,
        packed.root
    );
    Ok(())
}
