//! `internvl embed`: an image's vision features (the vision graph's output) as .npy.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use internvl::error::{ErrorKind, WithKind};
use internvl::files::OutputRules;
use internvl::limits::MAX_VISION_BATCH;
use internvl::manifest::Manifest;
use internvl::media::image::{load_image, preprocess, ImageConfig};
use internvl::model::vision;
use internvl::npy;

use crate::args::{positive, tiles, RuntimeArgs};

#[derive(Args)]
pub struct EmbedArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// Most tiles (1..=40; default from the model).
    #[arg(long, allow_negative_numbers = true, value_parser = tiles())]
    pub max_tiles: Option<u32>,
    #[arg(long)]
    pub exif: bool,
    /// .npy file to write ([tiles, tokens_per_tile, hidden] float32).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH as u64))]
    pub vision_batch: usize,
    #[command(flatten)]
    pub rt: RuntimeArgs,
    /// Timing and the vision graph used, and ONNX Runtime's own warnings, on stderr.
    #[arg(long)]
    pub verbose: bool,
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    internvl::runtime::show_runtime_logs(a.verbose);
    let rules = OutputRules { inputs: vec![&a.image], model_dir: Some(&a.model), force: a.force };
    rules.check(&a.out, "--out")?;
    let m = Manifest::load(&a.model)?;
    let img = load_image(&a.image, a.exif)?;
    let cfg = ImageConfig { max_tiles: a.max_tiles.unwrap_or(m.image.max_tiles), ..m.image.clone() };
    let tiles = preprocess(&img, &cfg)?;
    let rt = internvl::runtime::resolve(&m, &a.rt.options())?;
    let encoder = vision::VisionEncoder::load(&m, &rt).kind(ErrorKind::Model)?;
    let t0 = std::time::Instant::now();
    let rows = encoder.encode(&tiles.data, tiles.count, a.vision_batch)?;
    if a.verbose {
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "{} tiles through {} in {ms:.0} ms ({:.0} ms/tile)",
            tiles.count,
            encoder.file,
            ms / tiles.count as f64
        );
    }
    npy::write_f32(&a.out, &[tiles.count, m.vision.tokens_per_tile, m.vision.embed_dim], &rows)
}
