//! `internvl bench`: the figures users compare runtimes by, over several runs (median, min, max).
//!
//! Synthetic inputs (a generated image, random tiles) so the command needs nothing but a model folder;
//! costs do not depend on pixel or weight values. `scripts/bench_pytorch.py` runs the PyTorch reference
//! on the same checkpoint and prints ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Args;
use image::RgbImage;
use serde::Serialize;

use internvl::engine::{Content, Engine, EngineConfig, Params};
use internvl::error::{ErrorKind, WithKind};
use internvl::limits::{MAX_NEW_TOKENS, MAX_PREFILL_CHUNK, MAX_VISION_BATCH};
use internvl::media::Media;
use internvl::model::decoder::RowInput;
use internvl::model::decoder::DEFAULT_PREFILL_CHUNK;
use internvl::model::vision;
use internvl::model::Model;
use internvl::runtime::RuntimeOptions;

use crate::args::{positive, RuntimeArgs};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runs: usize,
    pub vision_batch: usize,
    pub decode_tokens: usize,
    pub prefill_chunk: usize,
    /// Context lengths at which one decode step is timed (those beyond the model's context are skipped).
    pub decode_curve: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Stat { median, min: v[0], max: v[n - 1] }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// The vision and decoder graphs that ran (`--attention` picks between portable and AMX ones).
    pub graphs: [String; 2],
    pub device: String,
    pub threads: usize,
    pub runs: usize,
    pub load_ms: Stat,
    pub vision_ms_per_tile_batch1: Stat,
    pub vision_batch: usize,
    pub vision_ms_per_tile_batched: Stat,
    pub ttft_1tile_ms: Stat,
    pub ttft_7tile_ms: Stat,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: Stat,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: Stat,
    /// (context length, ms per decode step) at each point of `BenchOptions::decode_curve`.
    pub decode_curve_ms: Vec<(usize, Stat)>,
    pub peak_rss_mb: f64,
    pub weight_mb: f64,
}

/// A deterministic picture with structure at every scale (the content does not change the cost).
/// A synthetic image as a request brings it (its key from its pixels: no file bytes).
fn synthetic_media(image: RgbImage) -> Media {
    let sha256 = internvl::media::sha256(image.as_raw());
    Media::Pixels { sha256, image: std::sync::Arc::new(image) }
}

pub fn synthetic_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        image::Rgb([(x * 255 / width.max(1)) as u8, (y * 255 / height.max(1)) as u8, (h >> 24) as u8])
    })
}

fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.ends_with(".data") || n.ends_with(".onnx") || n.ends_with(".bin")
                })
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run(dir: &Path, rt: &RuntimeOptions, o: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    ensure!(o.runs >= 1, "--runs must be at least 1");
    let ctx = internvl::manifest::Manifest::load(dir)?.decoder.max_context;
    if o.decode_tokens >= ctx {
        let msg = format!("decode_tokens {} must be below the model's context of {ctx} tokens", o.decode_tokens);
        return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Usage);
    }
    let threads = internvl::runtime::thread_count(rt.threads);
    let mut loads = Vec::new();
    let mut model = None;
    for _ in 0..o.runs {
        drop(model.take());
        let t = Instant::now();
        model = Some(Model::load(dir, rt)?);
        loads.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let Some(model) = model else { anyhow::bail!("--runs must be at least 1") };
    log(&format!("load: {:.0} ms", Stat::of(loads.clone()).median));

    // Vision: random normalised tiles, one at a time and in batches.
    let size = model.manifest.image.image_size as usize;
    let n = o.vision_batch.max(1);
    let mut seed = 0x2545_f491_u32;
    let pixels: Vec<f32> = (0..n * 3 * size * size)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect();
    let (mut v1, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let t = Instant::now();
        model.encode_tiles(&pixels, n, 1)?;
        v1.push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
        let t = Instant::now();
        model.encode_tiles(&pixels, n, n)?;
        vb.push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
    }
    log(&format!(
        "vision: {:.0} ms/tile at batch 1, {:.0} at batch {n}",
        Stat::of(v1.clone()).median,
        Stat::of(vb.clone()).median
    ));

    let model = std::sync::Arc::new(model);
    model.set_media_cache_bytes(0); // every run encodes its image
    let cfg = EngineConfig { rows: 1, vision_batch: o.vision_batch, prefill_chunk: o.prefill_chunk, exact: false };
    let mut engine = Engine::new(std::sync::Arc::clone(&model), cfg)?;
    let mut ask = |images: Vec<RgbImage>, prompt: &str, max_new_tokens: usize| {
        let images = images.into_iter().map(synthetic_media).collect();
        let content = Content { question: prompt.to_string(), images, ..Content::default() };
        let params = Params { ignore_eos: true, ..Params::new(max_new_tokens) };
        engine.generate(content, params, &mut |_| Ok(()))
    };
    // Time to first token: 448x448 -> 1 tile; 1344x896 -> 3x2 grid + thumbnail = 7 tiles.
    let (mut t1, mut t7, mut pf) = (Vec::new(), Vec::new(), Vec::new());
    let mut prefill_tokens = 0;
    for _ in 0..o.runs {
        let out = ask(vec![synthetic_image(448, 448)], "Describe the image.", 1)?;
        ensure!(out.tiles == 1, "bench image gave {} tiles, expected 1", out.tiles);
        t1.push(out.timings.first_token_ms);
        pf.push(out.timings.prefill_tokens_per_s);
        prefill_tokens = out.prompt_tokens;
        let out = ask(vec![synthetic_image(1344, 896)], "Describe the image.", 1)?;
        ensure!(out.tiles == 7, "bench image gave {} tiles, expected 7", out.tiles);
        t7.push(out.timings.first_token_ms);
    }
    log(&format!(
        "time to first token: {:.0} ms (1 tile), {:.0} ms (7 tiles)",
        Stat::of(t1.clone()).median,
        Stat::of(t7.clone()).median
    ));

    let mut dec = Vec::new();
    for _ in 0..o.runs {
        let out = ask(Vec::new(), "Write a long story about a lighthouse keeper.", o.decode_tokens)?;
        dec.push(out.timings.decode_tokens_per_s);
    }
    log(&format!("decode: {:.2} tokens/s", Stat::of(dec.clone()).median));

    // Decode cost against context: 16 steps after a cache of L positions, per run.
    let hidden = model.manifest.decoder.hidden;
    let max_context = model.manifest.decoder.max_context;
    let row: Vec<f32> = (0..hidden).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut curve = Vec::new();
    for &len in &o.decode_curve {
        if len + 16 >= max_context {
            log(&format!("decode step at {len} context: skipped, past the model's context of {max_context} tokens"));
            continue;
        }
        let mut per_step = Vec::new();
        for _ in 0..o.runs {
            let dec = model.decoder();
            let mut cache = dec.synthetic_cache(len, 16)?;
            let input = [RowInput { row: 0, embeds: &row }];
            dec.step(&mut cache, &input, false)?; // warm-up
            let t = Instant::now();
            for _ in 0..15 {
                dec.step(&mut cache, &input, false)?;
            }
            per_step.push(t.elapsed().as_secs_f64() * 1e3 / 15.0);
        }
        log(&format!("decode step at {len} tokens of context: {:.1} ms", Stat::of(per_step.clone()).median));
        curve.push((len, Stat::of(per_step)));
    }

    Ok(BenchReport {
        model: dir.display().to_string(),
        graphs: model.graph_files().map(String::from),
        device: rt.device.name().to_string(),
        threads,
        runs: o.runs,
        load_ms: Stat::of(loads),
        vision_ms_per_tile_batch1: Stat::of(v1),
        vision_batch: n,
        vision_ms_per_tile_batched: Stat::of(vb),
        ttft_1tile_ms: Stat::of(t1),
        ttft_7tile_ms: Stat::of(t7),
        prefill_tokens,
        prefill_tokens_per_s: Stat::of(pf),
        decode_tokens: o.decode_tokens,
        decode_tokens_per_s: Stat::of(dec),
        decode_curve_ms: curve,
        peak_rss_mb: peak_rss_mb(),
        weight_mb: weight_bytes(dir) as f64 / (1024.0 * 1024.0),
    })
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Repetitions of each measurement (median, min and max are reported).
    #[arg(long, allow_negative_numbers = true, default_value_t = 3, value_parser = positive(1000))]
    pub runs: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH as u64))]
    pub vision_batch: usize,
    /// Tokens per decode measurement (at least 2: the rate is of the steps after the first token).
    #[arg(long, allow_negative_numbers = true, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=MAX_NEW_TOKENS as u64))]
    pub decode_tokens: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = positive(MAX_PREFILL_CHUNK as u64))]
    pub prefill_chunk: usize,
    /// Context lengths at which a decode step is timed (comma-separated; the flag alone skips them).
    #[arg(long, allow_negative_numbers = true, value_delimiter = ',', num_args = 0.., default_value = "256,1024,2048,4096,8192", value_parser = positive(1 << 21))]
    pub decode_curve: Vec<usize>,
    #[command(flatten)]
    pub rt: RuntimeArgs,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    const MAX_CURVE_POINTS: usize = 64;
    if a.decode_curve.len() > MAX_CURVE_POINTS {
        let msg = format!("--decode-curve has {} points; at most {MAX_CURVE_POINTS}", a.decode_curve.len());
        return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Usage);
    }
    let rt = a.rt.options();
    let opts = BenchOptions {
        runs: a.runs,
        vision_batch: a.vision_batch,
        decode_tokens: a.decode_tokens,
        prefill_chunk: a.prefill_chunk,
        decode_curve: a.decode_curve,
    };
    let r = run(&a.model, &rt, &opts, &mut |line| eprintln!("[bench] {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let row = |name: &str, s: &Stat, unit: &str| {
        println!("{name:<34} {:>10.2} {:>10.2} {:>10.2}  {unit}", s.median, s.min, s.max);
    };
    println!("{} ({}) on {} ({} threads), {} runs", r.model, r.graphs.join(", "), r.device, r.threads, r.runs);
    println!("{:<34} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    row("model load", &r.load_ms, "ms");
    row("vision, batch 1", &r.vision_ms_per_tile_batch1, "ms/tile");
    row(&format!("vision, batch {}", r.vision_batch), &r.vision_ms_per_tile_batched, "ms/tile");
    row("time to first token, 1 tile", &r.ttft_1tile_ms, "ms");
    row("time to first token, 7 tiles", &r.ttft_7tile_ms, "ms");
    row(&format!("prefill ({} tokens)", r.prefill_tokens), &r.prefill_tokens_per_s, "tokens/s");
    row(&format!("decode ({} tokens)", r.decode_tokens), &r.decode_tokens_per_s, "tokens/s");
    for (len, s) in &r.decode_curve_ms {
        row(&format!("decode step at {len} context"), s, "ms");
    }
    println!(
        "{:<34} {:>10.0}  MiB (weights {:.0} MiB, ratio {:.2})",
        "peak RSS",
        r.peak_rss_mb,
        r.weight_mb,
        r.peak_rss_mb / r.weight_mb.max(1.0)
    );
    Ok(())
}
