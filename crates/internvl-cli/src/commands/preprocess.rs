//! `internvl preprocess`: the exact float32 tiles the vision graph receives for an image or a video.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use internvl::cancel::Cancel;
use internvl::error::{ErrorKind, WithKind};
use internvl::files::{self, OutputRules};
use internvl::media::image::{load_image, preprocess as tiles_of, tile_images, ImageConfig};
use internvl::media::video;
use internvl::npy;

use crate::args::{tiles, VideoArgs};

#[derive(Args)]
pub struct PreprocessArgs {
    #[arg(long, required_unless_present = "video", conflicts_with = "video")]
    pub image: Option<PathBuf>,
    /// Instead of --image: a video's sampled frames as tiles, one per frame (the frame indices and what
    /// was read are printed on stdout as JSON).
    #[command(flatten)]
    pub video: VideoArgs,
    #[arg(long, allow_negative_numbers = true, default_value_t = 12, value_parser = tiles())]
    pub max_tiles: u32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1, value_parser = tiles())]
    pub min_tiles: u32,
    #[arg(long)]
    pub exif: bool,
    /// .npy file to write ([tiles, 3, 448, 448] float32).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each tile as a PNG (`tile_00.png`, ...) into this folder, which must exist.
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
}

pub fn preprocess(a: PreprocessArgs) -> Result<()> {
    if a.min_tiles > a.max_tiles {
        let msg = format!("--min-tiles {} must not exceed --max-tiles {}", a.min_tiles, a.max_tiles);
        return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Usage);
    }
    let input = a.image.as_deref().or(a.video.video.as_deref()).context("give --image or --video")?;
    let rules = OutputRules { inputs: vec![input], model_dir: None, force: a.force };
    rules.check(&a.out, "--out")?;
    if a.video.video.is_some() {
        return preprocess_video(&a);
    }
    if let Some(dir) = &a.png {
        if !dir.is_dir() {
            let msg = format!("--png {}: not an existing folder", dir.display());
            return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Usage);
        }
    }
    let img = load_image(input, a.exif)?;
    let cfg = ImageConfig { max_tiles: a.max_tiles, min_tiles: a.min_tiles, ..ImageConfig::default() };
    let tiles = tiles_of(&img, &cfg)?;
    let pngs = match &a.png {
        Some(dir) => {
            let paths: Vec<PathBuf> = (0..tiles.count).map(|i| dir.join(format!("tile_{i:02}.png"))).collect();
            let rules = OutputRules { inputs: vec![input, &a.out], model_dir: None, force: a.force };
            for p in &paths {
                rules.check(p, "--png")?;
            }
            paths
        }
        None => Vec::new(),
    };
    let s = tiles.size as usize;
    npy::write_f32(&a.out, &[tiles.count, 3, s, s], &tiles.data)?;
    if !pngs.is_empty() {
        let (images, _) = tile_images(&img, &cfg)?;
        for (t, p) in images.iter().zip(&pngs) {
            files::write_atomic(p, |w| t.write_to(w, image::ImageFormat::Png).map_err(std::io::Error::other))?;
        }
    }
    eprintln!("{} tiles (grid {}x{}) -> {}", tiles.count, tiles.grid.0, tiles.grid.1, a.out.display());
    Ok(())
}

/// `preprocess --video`: the frames' tiles as the engine feeds them to the vision graph.
fn preprocess_video(a: &PreprocessArgs) -> Result<()> {
    let cfg = ImageConfig { max_tiles: 1, min_tiles: 1, ..ImageConfig::default() };
    let path = a.video.video.as_deref().context("--video")?;
    let v = video::load(path, &a.video.sampling()?, cfg.image_size, &Cancel::new())?;
    let mut data = Vec::new();
    for frame in &v.frames {
        data.extend(tiles_of(frame, &cfg)?.data);
    }
    let s = cfg.image_size as usize;
    npy::write_f32(&a.out, &[v.frames.len(), 3, s, s], &data)?;
    writeln!(std::io::stdout(), "{}", serde_json::to_string(&v.info)?).context("writing to stdout")
}
