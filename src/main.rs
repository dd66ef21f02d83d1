//! The `internvl` command line: parses flags, prints, maps errors to one line and a non-zero exit.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use internvl::bench::{self, BenchOptions};
use internvl::decoder::DEFAULT_PREFILL_CHUNK;
use internvl::image::{load_image, preprocess, tile_images, ImageConfig, MAX_TILES};
use internvl::manifest::Manifest;
use internvl::prompt::Turn;
use internvl::runtime::{AttentionKernels, Device, RuntimeOptions};
use internvl::sampling::SamplingOptions;
use internvl::{npy, vision, InternVL, Request};

#[derive(Parser)]
#[command(name = "internvl", version, about = "Run InternVL vision-language models exported to ONNX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about an image (or text only), streaming the answer to stdout.
    Run(RunArgs),
    /// Converse on stdin, one question per line, keeping the KV cache between turns.
    Chat(ChatArgs),
    /// Write the exact float32 tensor the vision graph receives for an image.
    Preprocess(PreprocessArgs),
    /// Write an image's embeddings: the vision graph's output, the rows the LLM receives per tile.
    Embed(EmbedArgs),
    /// Measure load, vision, time to first token, prefill and decode speed, peak memory.
    Bench(BenchArgs),
    /// Print the token ids of a text (one JSON list per input line of --file, or of --text).
    Tokenize(TokenizeArgs),
}

#[derive(Args)]
struct TokenizeArgs {
    /// An exported model folder (its manifest names the tokenizer).
    #[arg(long, conflicts_with = "tokenizer")]
    model: Option<PathBuf>,
    /// A tokenizer.json directly, e.g. one the exporter converted (instead of --model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, conflicts_with = "file")]
    text: Option<String>,
    /// A JSON list of strings; prints a JSON list of id lists.
    #[arg(long, conflicts_with = "decode")]
    file: Option<PathBuf>,
    /// The reverse: a JSON list of id lists; prints, for each, `{"text": ..., "answer": ...}`: the decoded
    /// text and the answer the reference would return for those generated ids (with --model, its
    /// manifest's skipped ids and separator).
    #[arg(long, conflicts_with = "text")]
    decode: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// Repetitions of each measurement (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = vision::DEFAULT_BATCH)]
    vision_batch: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Context lengths at which a decode step is timed (comma-separated; the flag alone skips them).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "256,1024,2048,4096,8192")]
    decode_curve: Vec<usize>,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What `run` and `chat` share: the model, the images, and how to generate.
#[derive(Args)]
struct GenArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    model: PathBuf,
    /// Image file (PNG, JPEG, WebP, BMP, GIF, TIFF); repeat for several images; omit for text only.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Replace the template's system prompt; "" drops the system block.
    #[arg(long)]
    system: Option<String>,
    /// Most tiles per image (1..=40; default from the model, 12).
    #[arg(long)]
    max_tiles: Option<u32>,
    /// Apply the EXIF orientation tag (the reference ignores it).
    #[arg(long)]
    exif: bool,
    /// Most tokens to generate (default from the model, 1024); also bounded by the context.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy (default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Tiles per vision-graph run.
    #[arg(long, default_value_t = vision::DEFAULT_BATCH)]
    vision_batch: usize,
    /// Prompt positions per prefill run (bounds attention memory on long prompts).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Timing figures on stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    gen: GenArgs,
    #[arg(long)]
    prompt: String,
    /// Earlier turns: a JSON list of {"user": ..., "assistant": ...}, oldest first.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Print one JSON object (text, token ids, counts, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Teacher forcing: answer with these token ids (a JSON list) instead of sampling.
    #[arg(long)]
    force_tokens: Option<PathBuf>,
    /// With --force-tokens: write the logits before each forced id to this .npy ([ids, vocab] float32).
    #[arg(long, requires = "force_tokens")]
    logits_out: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct RuntimeArgs {
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Intra-op threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Attention kernels: `auto` = this crate's AMX ones where the model folder and the CPU allow it.
    #[arg(long, value_enum, default_value_t = AttentionKernels::Auto)]
    attention: AttentionKernels,
}

impl RuntimeArgs {
    fn options(&self) -> RuntimeOptions {
        RuntimeOptions { device: self.device, threads: self.threads, attention: self.attention }
    }
}

#[derive(Args)]
struct PreprocessArgs {
    #[arg(long)]
    image: PathBuf,
    #[arg(long, default_value_t = 12)]
    max_tiles: u32,
    #[arg(long, default_value_t = 1)]
    min_tiles: u32,
    #[arg(long)]
    exif: bool,
    /// .npy file to write ([tiles, 3, 448, 448] float32).
    #[arg(long)]
    out: PathBuf,
    /// Also write each tile as a PNG into this folder.
    #[arg(long)]
    png: Option<PathBuf>,
}

#[derive(Args)]
struct EmbedArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    image: PathBuf,
    /// Most tiles (1..=40; default from the model).
    #[arg(long)]
    max_tiles: Option<u32>,
    #[arg(long)]
    exif: bool,
    /// .npy file to write ([tiles, tokens_per_tile, hidden] float32).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = vision::DEFAULT_BATCH)]
    vision_batch: usize,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Timing and the vision graph used, on stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("error: {first} (see internvl --help)");
            return ExitCode::from(2);
        }
    };
    let res = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Preprocess(a) => preprocess_cmd(a),
        Command::Embed(a) => embed_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Tokenize(a) => tokenize_cmd(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

impl GenArgs {
    /// Checks the flags, decodes the images (a bad image fails before the model spends seconds loading),
    /// then loads the model.
    fn load(&self, progress: bool) -> Result<(InternVL, Vec<image::RgbImage>, Request)> {
        let sampling = SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate()?;
        if let Some(n) = self.max_tiles {
            anyhow::ensure!((1..=MAX_TILES).contains(&n), "--max-tiles {n} must be between 1 and {MAX_TILES}");
        }
        let images = self.image.iter().map(|p| load_image(p, self.exif)).collect::<Result<Vec<_>>>()?;
        let opts = self.rt.options();
        let model = InternVL::load(&self.model, &opts, progress)?;
        let req = Request {
            images: Vec::new(),
            prompt: String::new(),
            history: Vec::new(),
            system: self.system.clone(),
            max_tiles: self.max_tiles,
            max_new_tokens: self.max_new_tokens.unwrap_or(model.manifest.generation.max_new_tokens),
            sampling,
            vision_batch: self.vision_batch,
            prefill_chunk: self.prefill_chunk,
            ignore_stop: false,
            forced: None,
        };
        Ok((model, images, req))
    }
}

fn print_timings(out: &internvl::Output) {
    let t = &out.timings;
    eprintln!(
        "load {:.0} ms | {} tiles: preprocess {:.0} ms, vision {:.0} ms ({:.0} ms/tile) | prefill {} tokens {:.0} ms ({:.1} tok/s) | first token {:.0} ms | decode {} tokens {:.0} ms ({:.2} tok/s) | {}",
        t.load_ms,
        out.tiles,
        t.preprocess_ms,
        t.vision_ms,
        if out.tiles > 0 { t.vision_ms / out.tiles as f64 } else { 0.0 },
        out.prompt_tokens,
        t.prefill_ms,
        t.prefill_tokens_per_s,
        t.first_token_ms,
        out.generated_tokens,
        t.decode_ms,
        t.decode_tokens_per_s,
        out.finish_reason
    );
}

fn run(a: RunArgs) -> Result<()> {
    let history = match &a.history {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading history file {}", p.display()))?;
            serde_json::from_str::<Vec<Turn>>(&text).with_context(|| {
                format!("history file {}: expected a JSON list of {{\"user\": ..., \"assistant\": ...}}", p.display())
            })?
        }
        None => Vec::new(),
    };
    let forced = match &a.force_tokens {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let ids = serde_json::from_str::<Vec<u32>>(&text)
                .with_context(|| format!("--force-tokens {}: expected a JSON list of token ids", p.display()))?;
            anyhow::ensure!(!ids.is_empty(), "--force-tokens {}: no ids", p.display());
            Some(ids)
        }
        None => None,
    };
    let progress = std::io::stderr().is_terminal() && !a.json;
    let (mut model, images, mut req) = a.gen.load(progress)?;
    if let Some(ids) = &forced {
        let vocab = model.manifest.decoder.vocab;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            anyhow::bail!("--force-tokens: id {bad} outside the vocabulary ({vocab})");
        }
    }
    req.images = images;
    req.prompt = a.prompt;
    req.history = history;
    req.forced = forced;
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let out = model.generate(&req, &mut |piece| {
        if !json {
            stdout.write_all(piece.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")?;
        }
        Ok(())
    })?;
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&out)?).context("writing to stdout")?;
    } else {
        writeln!(stdout).context("writing to stdout")?;
    }
    if a.gen.verbose {
        print_timings(&out);
    }
    if let Some(path) = &a.logits_out {
        let vocab = model.manifest.decoder.vocab;
        npy::write_f32(path, &[out.logits.len(), vocab], &out.logits.concat())?;
    }
    Ok(())
}

/// Interactive conversation on stdin: one question per line, answers streamed; the KV cache is kept
/// between turns. `/image PATH` attaches an image to the next question, `/reset` starts over.
fn chat(a: ChatArgs) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let (mut model, mut images, req) = a.gen.load(std::io::stderr().is_terminal())?;
    let mut conv = model.new_conversation()?;
    let mut stdout = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if std::io::stdin().read_line(&mut line).context("reading stdin")? == 0 {
            return Ok(());
        }
        let q = line.trim_end_matches(['\n', '\r']);
        if q.trim().is_empty() {
            continue;
        }
        if let Some(path) = q.strip_prefix("/image ") {
            match load_image(std::path::Path::new(path.trim()), a.gen.exif) {
                Ok(img) => images.push(img),
                Err(e) => eprintln!("error: {}", one_line(&e)),
            }
            continue;
        }
        if q.trim() == "/reset" {
            conv = model.new_conversation()?;
            continue;
        }
        let out = model.chat(&mut conv, q, &images, &req, &mut |piece| {
            stdout.write_all(piece.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")
        });
        images.clear();
        writeln!(stdout).context("writing to stdout")?;
        match out {
            Ok(out) if a.gen.verbose => print_timings(&out),
            Ok(_) => {}
            // Bad input for this turn: say so and keep the conversation (or start over if it was hit).
            Err(e) => {
                eprintln!("error: {}", one_line(&e));
                if conv.is_broken() {
                    eprintln!("starting a new conversation");
                    conv = model.new_conversation()?;
                }
            }
        }
    }
}

/// anyhow's chain on one line: "context: cause: cause".
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn preprocess_cmd(a: PreprocessArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=MAX_TILES).contains(&a.max_tiles),
        "--max-tiles {} must be between 1 and {MAX_TILES}",
        a.max_tiles
    );
    anyhow::ensure!(
        (1..=a.max_tiles).contains(&a.min_tiles),
        "--min-tiles {} must be between 1 and --max-tiles",
        a.min_tiles
    );
    let img = load_image(&a.image, a.exif)?;
    let cfg = ImageConfig { max_tiles: a.max_tiles, min_tiles: a.min_tiles, ..ImageConfig::default() };
    let tiles = preprocess(&img, &cfg)?;
    let s = tiles.size as usize;
    npy::write_f32(&a.out, &[tiles.count, 3, s, s], &tiles.data)?;
    if let Some(dir) = a.png {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (images, _) = tile_images(&img, &cfg)?;
        for (i, t) in images.iter().enumerate() {
            let p = dir.join(format!("tile_{i:02}.png"));
            t.save(&p).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    eprintln!("{} tiles (grid {}x{}) -> {}", tiles.count, tiles.grid.0, tiles.grid.1, a.out.display());
    Ok(())
}

fn embed_cmd(a: EmbedArgs) -> Result<()> {
    let m = Manifest::load(&a.model)?;
    if let Some(n) = a.max_tiles {
        anyhow::ensure!((1..=MAX_TILES).contains(&n), "--max-tiles {n} must be between 1 and {MAX_TILES}");
    }
    let img = load_image(&a.image, a.exif)?;
    let cfg = ImageConfig { max_tiles: a.max_tiles.unwrap_or(m.image.max_tiles), ..m.image.clone() };
    let tiles = preprocess(&img, &cfg)?;
    let mut encoder = vision::VisionEncoder::load(&m, &a.rt.options())?;
    let t0 = std::time::Instant::now();
    let rows = encoder.encode(&tiles.data, tiles.count, a.vision_batch, &indicatif::ProgressBar::hidden())?;
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

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let rt = a.rt.options();
    let opts = BenchOptions {
        runs: a.runs,
        vision_batch: a.vision_batch,
        decode_tokens: a.decode_tokens,
        prefill_chunk: a.prefill_chunk,
        decode_curve: a.decode_curve,
    };
    let r = bench::run(&a.model, &rt, &opts, &mut |line| eprintln!("[bench] {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let row = |name: &str, s: &bench::Stat, unit: &str| {
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

fn tokenize_cmd(a: TokenizeArgs) -> Result<()> {
    use internvl::tokenizer::{answer_text, Tokenizer};
    let (tok, split_at) = match (&a.model, &a.tokenizer) {
        (Some(dir), None) => {
            let m = internvl::manifest::Manifest::load(dir)?;
            let answer = &m.tokenizer.answer;
            (Tokenizer::load(&m.path(&m.tokenizer.file))?.decoding_as(answer), answer.split_at.clone())
        }
        (None, Some(file)) => (Tokenizer::load(file)?, None),
        _ => anyhow::bail!("give exactly one of --model and --tokenizer"),
    };
    let encode = |t: &str| tok.encode(t, true);
    let out = match (&a.text, &a.file, &a.decode) {
        (_, _, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let items: Vec<Vec<u32>> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON list of lists of token ids", f.display()))?;
            let mut out = Vec::with_capacity(items.len());
            for (i, ids) in items.iter().enumerate() {
                let text = tok.decode(ids).with_context(|| format!("{}: list {i}", f.display()))?;
                let answer = answer_text(&text, split_at.as_deref());
                out.push(serde_json::json!({ "text": text, "answer": answer }));
            }
            serde_json::to_string(&out)?
        }
        (Some(t), _, None) => serde_json::to_string(&encode(t)?)?,
        (None, Some(f), None) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let items: Vec<String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON list of strings", f.display()))?;
            serde_json::to_string(&items.iter().map(|t| encode(t)).collect::<Result<Vec<_>>>()?)?
        }
        (None, None, None) => anyhow::bail!("give --text, --file or --decode"),
    };
    println!("{out}");
    Ok(())
}
