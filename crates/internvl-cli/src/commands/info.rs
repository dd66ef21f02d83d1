//! `internvl info`: what a model folder holds, its files checked (sizes; checksums with --verify).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use internvl::manifest::Manifest;

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Also compare every file's SHA-256 with the manifest (reads the whole folder).
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let m = Manifest::load(&a.model)?;
    let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
    let verified = if a.verify {
        let show = std::io::stderr().is_terminal();
        Some(m.verify_checksums(|name, n| {
            if show {
                eprintln!("verified {name} ({n} bytes)");
            }
        })?)
    } else {
        None
    };
    let graphs: Vec<&str> = [Some(&m.vision.file), Some(&m.decoder.file)]
        .into_iter()
        .chain([m.vision.amx.as_ref().map(|v| &v.file), m.decoder.amx.as_ref().map(|v| &v.file)])
        .chain([m.vision.tensorrt.as_ref().map(|v| &v.file)])
        .flatten()
        .map(String::as_str)
        .collect();
    let devices = internvl::runtime::providers::devices_for(m.dtype).join(", ");
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "name": m.name, "dtype": m.dtype, "llm": m.decoder.arch, "template": m.template.name,
            "graphs": graphs, "layers": m.decoder.layers, "hidden": m.decoder.hidden, "vocab": m.decoder.vocab,
            "max_context": m.decoder.max_context, "image_size": m.image.image_size,
            "max_tiles": m.image.max_tiles, "tokens_per_tile": m.vision.tokens_per_tile,
            "files": m.files.len(), "bytes": bytes, "devices": devices, "verified_bytes": verified,
        });
        writeln!(stdout, "{v}").context("writing to stdout")?;
        return Ok(());
    }
    let lines = [
        format!("{} ({}), {} LLM, {} template", m.name, m.dtype, m.decoder.arch, m.template.name),
        format!("graphs: {}", graphs.join(", ")),
        format!(
            "decoder: {} layers, hidden {}, vocab {}, context {} tokens",
            m.decoder.layers, m.decoder.hidden, m.decoder.vocab, m.decoder.max_context
        ),
        format!(
            "images: {}x{} tiles, {}..={} per image, {} tokens each",
            m.image.image_size, m.image.image_size, m.image.min_tiles, m.image.max_tiles, m.vision.tokens_per_tile
        ),
        format!("files: {} ({:.1} MiB), sizes checked", m.files.len(), bytes as f64 / (1u64 << 20) as f64),
        match verified {
            Some(n) => format!("checksums: all {} files match ({n} bytes read)", m.files.len()),
            None => "checksums: not checked (--verify)".into(),
        },
        format!("devices: {devices} (best first); KV cache {:?}", m.decoder.kv_dtype),
    ];
    for line in lines {
        writeln!(stdout, "{line}").context("writing to stdout")?;
    }
    Ok(())
}
