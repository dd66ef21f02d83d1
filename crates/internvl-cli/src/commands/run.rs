//! `internvl run`: one answer to a prompt about images, a video or text, streamed to stdout (or one JSON
//! object), with teacher forcing for quality measurements.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use internvl::error::{ErrorKind, WithKind};
use internvl::files::{self, OutputRules};
use internvl::limits::MAX_LOGITS_BYTES;
use internvl::{npy, Content, Engine};

use crate::args::{GenArgs, Loaded};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub gen: GenArgs,
    #[arg(long)]
    pub prompt: String,
    /// Earlier turns: a JSON list of {"user": ..., "assistant": ...}, oldest first.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Print one JSON object (text, token ids, counts, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Teacher forcing: answer with these token ids (a JSON list) instead of sampling.
    #[arg(long)]
    pub force_tokens: Option<PathBuf>,
    /// With --force-tokens: write the logits before each forced id to this .npy ([ids, vocab] float32).
    #[arg(long, requires = "force_tokens")]
    pub logits_out: Option<PathBuf>,
    /// Replace an existing --logits-out file.
    #[arg(long)]
    pub force: bool,
}

pub(crate) fn print_timings(out: &internvl::Output) {
    let t = &out.timings;
    eprintln!(
        "load {:.0} ms | {} tiles: preprocess {:.0} ms, vision {:.0} ms ({:.0} ms/tile) | prefill {} tokens {:.0} ms ({:.1} tok/s) | first token {:.0} ms | decode {} tokens {:.0} ms ({:.2} tok/s) | {}",
        t.load_ms,
        out.tiles,
        t.preprocess_ms,
        t.vision_ms,
        if out.tiles > 0 { t.vision_ms / out.tiles as f64 } else { 0.0 },
        out.prompt_tokens - out.cached_tokens,
        t.prefill_ms,
        t.prefill_tokens_per_s,
        t.first_token_ms,
        out.generated_tokens,
        t.decode_ms,
        t.decode_tokens_per_s,
        out.finish_reason
    );
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut inputs: Vec<&Path> = a.gen.image.iter().map(PathBuf::as_path).collect();
    inputs.extend(a.gen.video.video.as_deref());
    inputs.extend(a.history.as_deref());
    inputs.extend(a.force_tokens.as_deref());
    if let Some(path) = &a.logits_out {
        let rules = OutputRules { inputs, model_dir: Some(&a.gen.model), force: a.force };
        rules.check(path, "--logits-out")?;
    }
    let history = match &a.history {
        Some(p) => internvl::text::prompt::load_history(p)?,
        None => Vec::new(),
    };
    let forced = match &a.force_tokens {
        Some(p) => {
            let text = files::read_text(p, files::MAX_TEXT_FILE, "--force-tokens file").kind(ErrorKind::Input)?;
            let ids = serde_json::from_str::<Vec<u32>>(&text)
                .with_context(|| format!("--force-tokens {}: expected a JSON list of token ids", p.display()))
                .kind(ErrorKind::Input)?;
            if ids.is_empty() {
                return Err(anyhow::anyhow!("--force-tokens {}: no ids", p.display())).kind(ErrorKind::Input);
            }
            Some(ids)
        }
        None => None,
    };
    let progress = std::io::stderr().is_terminal() && !a.json;
    let Loaded { model, images, mut params, engine, video } = a.gen.load(progress)?;
    if let Some(ids) = &forced {
        let (vocab, ctx) = (model.manifest.decoder.vocab, model.manifest.decoder.max_context);
        let bad = ids.iter().find(|&&id| id as usize >= vocab);
        let logits_bytes = (ids.len() as u64).saturating_mul(vocab as u64 * 4);
        let why = match bad {
            Some(bad) => Some(format!("id {bad} outside the vocabulary ({vocab})")),
            None if ids.len() >= ctx => Some(format!("{} ids, more than the context of {ctx}", ids.len())),
            None if a.logits_out.is_some() && logits_bytes > MAX_LOGITS_BYTES => Some(format!(
                "{} ids would make {logits_bytes} bytes of --logits-out ({vocab} floats each), more than the limit of {MAX_LOGITS_BYTES}",
                ids.len()
            )),
            None => None,
        };
        if let Some(why) = why {
            return Err(anyhow::anyhow!("--force-tokens: {why}")).kind(ErrorKind::Input);
        }
    }
    params.forced = forced;
    params.keep_logits = a.logits_out.is_some();
    let question = match &video {
        Some(v) => internvl::text::prompt::video_question(&a.prompt, v.frame_indices.len()),
        None => a.prompt,
    };
    let content = Content { system: a.gen.system.clone(), history, question, images };
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let mut engine = Engine::new(Arc::clone(&model), engine)?;
    let out = engine.generate(content, params, &mut |piece| {
        if !json {
            stdout.write_all(piece.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")?;
        }
        Ok(())
    })?;
    if json {
        let mut value = serde_json::to_value(&out)?;
        if let (Some(v), Some(map)) = (&video, value.as_object_mut()) {
            map.insert("video".into(), serde_json::to_value(v)?);
        }
        writeln!(stdout, "{value}").context("writing to stdout")?;
    } else {
        writeln!(stdout).context("writing to stdout")?;
    }
    if a.gen.verbose {
        print_timings(&out);
    }
    if let Some(path) = &a.logits_out {
        let vocab = model.manifest.decoder.vocab;
        npy::write_f32_rows(path, vocab, &out.logits)?;
    }
    Ok(())
}
