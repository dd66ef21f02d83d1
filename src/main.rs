//! The `internvl` command line: parses flags, prints, maps errors to one line and a non-zero exit.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

mod cli;

use cli::bench::{self, BenchOptions};
use internvl::decoder::DEFAULT_PREFILL_CHUNK;
use internvl::error::{ErrorKind, WithKind};
use internvl::files::{self, OutputRules};
use internvl::image::{image_dimensions, load_image, preprocess, tile_count, tile_images, ImageConfig, MAX_TILES};
use internvl::manifest::Manifest;
use internvl::runtime::{AttentionKernels, Device, GpuOptions, RuntimeOptions, MAX_THREADS};
use internvl::sampling::{self, SamplingOptions};
use internvl::video::{self, Sampling, VideoInfo, DEFAULT_FRAMES, MAX_FRAMES};
use internvl::{npy, vision, Content, Conversation, Engine, EngineConfig, Media, Model, Params};
use std::sync::Arc;

/// Flag bounds, checked by the parser so a bad value is a usage error naming the flag.
fn positive(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

fn tiles() -> clap::builder::RangedU64ValueParser<u32> {
    clap::builder::RangedU64ValueParser::<u32>::new().range(1..=u64::from(MAX_TILES))
}

fn threads() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_THREADS as u64)
}

/// A float flag checked by the library's rule for its parameter, so the parser's message names the flag.
fn checked(rule: fn(f32) -> Result<()>) -> impl Fn(&str) -> std::result::Result<f32, String> + Clone {
    move |s| {
        let v: f32 = s.trim().parse().map_err(|e| format!("{e}"))?;
        rule(v).map_err(|e| e.to_string())?;
        Ok(v)
    }
}

/// Most tiles per vision run: one tile already fills the cores (vision::DEFAULT_BATCH).
const MAX_VISION_BATCH: u64 = 64;
/// Most prompt positions per prefill run: the largest context a manifest may declare (a larger chunk
/// than the prompt is the whole prompt in one run).
const MAX_PREFILL_CHUNK: u64 = 1 << 21;
/// Generation is also bounded by the context; this keeps the number itself sane.
const MAX_NEW_TOKENS: u64 = 1 << 21;

#[derive(Parser)]
#[command(
    name = "internvl",
    version,
    about = "Run InternVL vision-language models exported to ONNX",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 usage (flags, output paths), 3 bad input (image, prompt, history), 4 model folder."
)]
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
    /// Describe a model folder and check its files (sizes always; checksums with --verify).
    Info(InfoArgs),
    /// Serve the OpenAI Chat Completions API (streaming, images, many clients) from one loaded model.
    Serve(ServeArgs),
    /// Say which execution providers this binary's ONNX Runtime has and whether their libraries are beside it.
    Devices(DevicesArgs),
    /// Write one .tar.gz an edge server unpacks and runs: this binary, ONNX Runtime, the model folder,
    /// a README and SHA256SUMS.
    Package(PackageArgs),
}

#[derive(Args)]
struct PackageArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    model: PathBuf,
    /// The archive to write (.tar.gz).
    #[arg(long)]
    out: PathBuf,
    /// Bundle ONNX Runtime's GPU build from this folder (what scripts/gpu_bundle.sh writes) instead of
    /// the CPU library beside this binary.
    #[arg(long)]
    gpu: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DevicesArgs {
    /// Exit non-zero unless ONNX Runtime is a GPU build with every provider library beside it (the GPU
    /// bundle's layout check; needs no GPU).
    #[arg(long)]
    bundle_check: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 = any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests answered at once (continuous batching; one KV-cache row each).
    #[arg(long, allow_negative_numbers = true, default_value_t = 4, value_parser = positive(256))]
    parallel: usize,
    /// Requests that may wait for a free row; more get 429 with Retry-After.
    #[arg(long, allow_negative_numbers = true, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the API key from this file (first line), so it stays out of the process list.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Largest request body in bytes (base64 images included); larger ones get 413.
    #[arg(long, allow_negative_numbers = true, default_value_t = internvl::server::DEFAULT_BODY_LIMIT, value_parser = positive(1 << 30))]
    body_limit: usize,
    /// Allow `file://` image URLs for files under this folder.
    #[arg(long)]
    media_root: Option<PathBuf>,
    /// Fetch http(s) image URLs (public addresses only, each redirect checked; off by default).
    #[arg(long)]
    allow_remote_media: bool,
    /// With --allow-remote-media: only from this host (repeat for several).
    #[arg(long, requires = "allow_remote_media")]
    allow_media_host: Vec<String>,
    /// With --allow-remote-media: also hosts on loopback, private and link-local networks.
    #[arg(long, requires = "allow_remote_media")]
    allow_private_media: bool,
    /// Seconds a remote image may take to fetch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    media_timeout: u64,
    /// Decoded image pixels all admitted requests may hold at once (3 bytes each; default: four images
    /// at Pillow's decompression-bomb limit, 2.1 GB); past it: 429.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4 * internvl::image::MAX_IMAGE_PIXELS, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 40)))]
    max_pixels_in_flight: u64,
    /// Largest remote image in bytes.
    #[arg(long, allow_negative_numbers = true, default_value_t = 32 << 20, value_parser = positive(internvl::files::MAX_IMAGE_FILE))]
    media_max_bytes: usize,
    /// Bytes of vision features kept for repeated images (0 = no cache).
    #[arg(long, allow_negative_numbers = true, default_value_t = internvl::model::DEFAULT_MEDIA_CACHE_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=(1u64 << 40)))]
    vision_cache_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM / SIGINT.
    #[arg(long, allow_negative_numbers = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    grace_period: u64,
    /// Seconds between SSE keep-alive comments (while an image encodes, for example).
    #[arg(long, allow_negative_numbers = true, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    keep_alive: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Quantised models: every answer equal to its solo `internvl run` (decode steps one request per call
    /// and no prompt reuse across requests; slower). fp32 answers are equal regardless.
    #[arg(long)]
    exact: bool,
    /// ONNX Runtime's own warnings on stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    model: PathBuf,
    /// Also compare every file's SHA-256 with the manifest (reads the whole folder).
    #[arg(long)]
    verify: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
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
    #[arg(long, allow_negative_numbers = true, default_value_t = 3, value_parser = positive(1000))]
    runs: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH))]
    vision_batch: usize,
    /// Tokens per decode measurement (at least 2: the rate is of the steps after the first token).
    #[arg(long, allow_negative_numbers = true, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=MAX_NEW_TOKENS))]
    decode_tokens: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = positive(MAX_PREFILL_CHUNK))]
    prefill_chunk: usize,
    /// Context lengths at which a decode step is timed (comma-separated; the flag alone skips them).
    #[arg(long, allow_negative_numbers = true, value_delimiter = ',', num_args = 0.., default_value = "256,1024,2048,4096,8192", value_parser = positive(1 << 21))]
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
    #[arg(long, conflicts_with = "video")]
    image: Vec<PathBuf>,
    #[command(flatten)]
    video: VideoArgs,
    /// Replace the template's system prompt; "" drops the system block.
    #[arg(long)]
    system: Option<String>,
    /// Most tiles per image (1..=40; default from the model, 12). Video frames are one tile each.
    #[arg(long, allow_negative_numbers = true, value_parser = tiles(), conflicts_with = "video")]
    max_tiles: Option<u32>,
    /// Apply the EXIF orientation tag (the reference ignores it).
    #[arg(long)]
    exif: bool,
    /// Most tokens to generate (default from the model, 1024); also bounded by the context.
    #[arg(long, allow_negative_numbers = true, value_parser = positive(MAX_NEW_TOKENS))]
    max_new_tokens: Option<usize>,
    /// 0 = greedy (default).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.0, value_parser = checked(sampling::check_temperature))]
    temperature: f32,
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, value_parser = checked(sampling::check_top_p))]
    top_p: f32,
    /// 0 = off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    top_k: usize,
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, value_parser = checked(sampling::check_repetition_penalty))]
    repetition_penalty: f32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Timing figures, and ONNX Runtime's own warnings, on stderr.
    #[arg(long)]
    verbose: bool,
}

/// A video's frames as the model card's `load_video` takes them.
#[derive(Args, Clone)]
struct VideoArgs {
    /// Video file: MP4, MOV, MKV, WebM, AVI, ... (H.264, H.265, VP9, AV1 and every codec of the FFmpeg
    /// installed: its `ffprobe` / `ffmpeg` programs are run), or an animated GIF / WebP (no FFmpeg
    /// needed). --frames frames, one tile each, asked about as `Frame-N: <image>` lines.
    #[arg(long)]
    video: Option<PathBuf>,
    /// Frames taken from --video, at the middle of equal segments (the model card's `num_segments`).
    #[arg(long, requires = "video", allow_negative_numbers = true, default_value_t = DEFAULT_FRAMES,
          value_parser = positive(MAX_FRAMES as u64))]
    frames: usize,
    /// Start of the part of --video to sample, in seconds (with --video-end; the card's `bound`).
    #[arg(long, requires_all = ["video", "video_end"], allow_negative_numbers = true)]
    video_start: Option<f64>,
    /// End of the part of --video to sample, in seconds.
    #[arg(long, requires_all = ["video", "video_start"], allow_negative_numbers = true)]
    video_end: Option<f64>,
}

impl VideoArgs {
    /// The frames asked for, checked (a usage error naming the flags).
    fn sampling(&self) -> Result<Sampling> {
        let sampling = Sampling { frames: self.frames, bound: self.video_start.zip(self.video_end) };
        sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("--frames / --video-start / --video-end: {e}"))
            .kind(ErrorKind::Usage)?;
        Ok(sampling)
    }

    /// The sampled frames, after checking that their tiles fit the model's context (before decoding).
    fn load(&self, m: &Manifest) -> Result<Option<video::Video>> {
        let Some(path) = &self.video else { return Ok(None) };
        let sampling = self.sampling()?;
        let (ctx, positions) = (m.decoder.max_context, self.frames * m.vision.tokens_per_tile);
        if positions >= ctx {
            let msg = format!(
                "--frames {}: the frames need {positions} positions but the model's context is {ctx} tokens",
                self.frames
            );
            return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Input);
        }
        video::load(path, &sampling, m.image.image_size).map(Some)
    }
}

/// The runtime and the engine's work units (`run`, `chat`, `serve`).
#[derive(Args)]
struct EngineArgs {
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Tiles per vision-graph run.
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH))]
    vision_batch: usize,
    /// Prompt positions per prefill run (bounds attention memory on long prompts).
    #[arg(long, allow_negative_numbers = true, default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = positive(MAX_PREFILL_CHUNK))]
    prefill_chunk: usize,
}

impl EngineArgs {
    fn config(&self, rows: usize) -> EngineConfig {
        EngineConfig { rows, vision_batch: self.vision_batch, prefill_chunk: self.prefill_chunk, exact: false }
    }
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
    /// Replace an existing --logits-out file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct RuntimeArgs {
    /// Where the graphs run: `auto` = TensorRT, else CUDA, else the CPU, as available (said on stderr).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// CUDA / TensorRT: the GPU's index.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=1023))]
    gpu_id: i32,
    /// CUDA: most MiB the provider's memory arena may hold (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    gpu_mem_limit: Option<u64>,
    /// CUDA: TF32 matmuls (faster on Ampere and later; `off` for results that match the CPU's).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    tf32: Switch,
    /// TensorRT: folder for its engines and timing cache, built once per GPU (default: the model
    /// folder's `trt-cache`).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// Intra-op threads (0 = one per core).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0, value_parser = threads())]
    threads: usize,
    /// Attention kernels: `auto` = this crate's AMX ones where the model folder and the CPU allow it.
    #[arg(long, value_enum, default_value_t = AttentionKernels::Auto)]
    attention: AttentionKernels,
}

impl RuntimeArgs {
    fn options(&self) -> RuntimeOptions {
        let gpu = GpuOptions {
            device_id: self.gpu_id,
            memory_limit: self.gpu_mem_limit.map(|mib| (mib as usize) << 20),
            tf32: self.tf32 == Switch::On,
            trt_cache: self.trt_cache.clone(),
        };
        RuntimeOptions { device: self.device, threads: self.threads, attention: self.attention, gpu }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Args)]
struct PreprocessArgs {
    #[arg(long, required_unless_present = "video", conflicts_with = "video")]
    image: Option<PathBuf>,
    /// Instead of --image: a video's sampled frames as tiles, one per frame (the frame indices and what
    /// was read are printed on stdout as JSON).
    #[command(flatten)]
    video: VideoArgs,
    #[arg(long, allow_negative_numbers = true, default_value_t = 12, value_parser = tiles())]
    max_tiles: u32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1, value_parser = tiles())]
    min_tiles: u32,
    #[arg(long)]
    exif: bool,
    /// .npy file to write ([tiles, 3, 448, 448] float32).
    #[arg(long)]
    out: PathBuf,
    /// Also write each tile as a PNG (`tile_00.png`, ...) into this folder, which must exist.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct EmbedArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    image: PathBuf,
    /// Most tiles (1..=40; default from the model).
    #[arg(long, allow_negative_numbers = true, value_parser = tiles())]
    max_tiles: Option<u32>,
    #[arg(long)]
    exif: bool,
    /// .npy file to write ([tiles, tokens_per_tile, hidden] float32).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH))]
    vision_batch: usize,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Timing and the vision graph used, and ONNX Runtime's own warnings, on stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    // A closed stdout (`internvl tokenize ... | head -c1`) ends the process quietly, as it ends `cat`,
    // instead of a panic in the middle of a write. The Rust runtime ignores SIGPIPE by default.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as Clap;
            if matches!(e.kind(), Clap::DisplayHelp | Clap::DisplayVersion) {
                let _ = write!(std::io::stdout(), "{e}");
                return ExitCode::SUCCESS;
            }
            if e.kind() == Clap::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!("error: no command given (see internvl --help)");
                return ExitCode::from(ErrorKind::Usage.exit_code());
            }
            eprintln!("error: {} (see internvl --help)", clap_one_line(&e.to_string()));
            return ExitCode::from(ErrorKind::Usage.exit_code());
        }
    };
    let res = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Preprocess(a) => preprocess_cmd(a),
        Command::Embed(a) => embed_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Tokenize(a) => tokenize_cmd(a),
        Command::Info(a) => info_cmd(a),
        Command::Serve(a) => serve_cmd(a),
        Command::Devices(a) => devices_cmd(a),
        Command::Package(a) => package_cmd(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(ErrorKind::of(&e).exit_code())
        }
    }
}

/// clap's message on one line: its first line plus the indented lines that name what is missing or
/// wrong, without the usage block and the "for more information" tip.
fn clap_one_line(msg: &str) -> String {
    let mut parts = Vec::new();
    for line in msg.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.trim_start_matches("error: ").to_string());
        }
    }
    let joined = parts.join(" ");
    if joined.is_empty() {
        "invalid arguments".into()
    } else {
        joined
    }
}

/// `--logits-out` is held in memory until written: 2 GiB is 3500 positions of a 152k vocabulary.
const MAX_LOGITS_BYTES: u64 = 2 << 30;

/// Most images one request may name: each takes at least one tile of the context, and every file is
/// read twice (sizes first, then pixels).
const MAX_IMAGES: usize = 64;
/// Decoded pixels one request may hold at once: two images at Pillow's decompression-bomb limit.
const MAX_REQUEST_PIXELS: u64 = 2 * internvl::image::MAX_IMAGE_PIXELS;

/// What `run` and `chat` start from: the model, the request's images (or video frames) and parameters.
struct Loaded {
    model: Arc<Model>,
    images: Vec<Media>,
    params: Params,
    engine: EngineConfig,
    /// What `--video` read, when given.
    video: Option<VideoInfo>,
}

impl GenArgs {
    /// Checks the flags and the images against the model's context from their headers (a request that
    /// cannot fit costs no decoding), decodes the images (a bad one fails before the model spends seconds
    /// loading), then loads the model.
    fn load(&self, progress: bool) -> Result<Loaded> {
        let t0 = Instant::now();
        internvl::runtime::show_runtime_logs(self.verbose);
        let sampling = SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate().kind(ErrorKind::Usage)?;
        let manifest = Manifest::load(&self.model)?;
        let (images, video) = match self.video.load(&manifest)? {
            Some(v) => (v.frames.into_iter().map(Media::frame).collect(), Some(v.info)),
            None => (self.load_images(&manifest)?, None),
        };
        let bar = spinner(progress, "loading model");
        let model = Model::open(manifest, &self.engine.rt.options(), t0)?;
        bar.finish_and_clear();
        let max_new_tokens = self.max_new_tokens.unwrap_or(model.manifest.generation.max_new_tokens);
        // Video frames are one tile each (`load_video(max_num=1)`).
        let max_tiles = if video.is_some() { Some(1) } else { self.max_tiles };
        let params = Params { sampling, max_tiles, ..Params::new(max_new_tokens) };
        let engine = self.engine.config(1);
        Ok(Loaded { model: Arc::new(model), images, params, engine, video })
    }

    fn load_images(&self, m: &Manifest) -> Result<Vec<Media>> {
        check_images(&self.image, m, self.max_tiles)?;
        self.image.iter().map(|p| Media::load(p, self.exif)).collect()
    }
}

/// The images of one request, from their headers: few enough, small enough, and their tiles within the
/// model's context.
fn check_images(paths: &[PathBuf], m: &Manifest, max_tiles: Option<u32>) -> Result<()> {
    if paths.len() > MAX_IMAGES {
        return Err(anyhow::anyhow!("{} images given; at most {MAX_IMAGES} per request", paths.len()))
            .kind(ErrorKind::Input);
    }
    let cfg = ImageConfig { max_tiles: max_tiles.unwrap_or(m.image.max_tiles), ..m.image.clone() };
    let (mut tiles, mut pixels) = (0usize, 0u64);
    for p in paths {
        let (w, h) = image_dimensions(p)?;
        tiles += tile_count(w, h, &cfg);
        pixels += u64::from(w) * u64::from(h);
    }
    let (ctx, positions) = (m.decoder.max_context, tiles.saturating_mul(m.vision.tokens_per_tile));
    let fits = positions < ctx && pixels <= MAX_REQUEST_PIXELS;
    if !fits {
        let why = if positions >= ctx {
            format!("their {tiles} tiles need {positions} positions but the model's context is {ctx} tokens; use fewer images or --max-tiles")
        } else {
            format!("{pixels} pixels in all, more than the limit of {MAX_REQUEST_PIXELS} per request")
        };
        return Err(anyhow::anyhow!("{} images: {why}", paths.len())).kind(ErrorKind::Input);
    }
    Ok(())
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

fn run(a: RunArgs) -> Result<()> {
    let mut inputs: Vec<&Path> = a.gen.image.iter().map(PathBuf::as_path).collect();
    inputs.extend(a.gen.video.video.as_deref());
    inputs.extend(a.history.as_deref());
    inputs.extend(a.force_tokens.as_deref());
    if let Some(path) = &a.logits_out {
        let rules = OutputRules { inputs, model_dir: Some(&a.gen.model), force: a.force };
        rules.check(path, "--logits-out")?;
    }
    let history = match &a.history {
        Some(p) => internvl::prompt::load_history(p)?,
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
        Some(v) => internvl::prompt::video_question(&a.prompt, v.frame_indices.len()),
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

/// What one read of a chat line gave.
enum Line {
    Text(String),
    /// Longer than the bound: the rest of it was read and dropped.
    TooLong(usize),
    NotUtf8,
    End,
}

/// The next line of `input`, at most `limit` bytes kept: an endless line cannot exhaust memory, and a line
/// that is not UTF-8 is reported, not fatal.
fn read_line(input: &mut impl BufRead, limit: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut seen = 0usize;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            if seen == 0 {
                return Ok(Line::End);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        seen += chunk.len() + usize::from(done.is_some());
        if line.len() + chunk.len() <= limit {
            line.extend_from_slice(chunk);
        }
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if seen > limit {
        return Ok(Line::TooLong(seen));
    }
    Ok(match String::from_utf8(line) {
        Ok(text) => Line::Text(text),
        Err(_) => Line::NotUtf8,
    })
}

/// Interactive conversation on stdin: one question per line, answers streamed; the KV cache is kept
/// between turns. `/image PATH` attaches an image to the next question, `/reset` starts over. A bad line
/// (an image that does not load, a question too long, invalid UTF-8) is reported and the session goes on.
fn chat(a: ChatArgs) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let Loaded { model, mut images, params, engine, video } = a.gen.load(std::io::stderr().is_terminal())?;
    // The video's frames go with the first question, labelled as the model card labels them.
    let mut video_frames = video.map(|v| v.frame_indices.len());
    let mut image_paths = a.gen.image.clone();
    let mut conv = Conversation::new(Engine::new(Arc::clone(&model), engine)?, a.gen.system.clone());
    let mut stdout = std::io::stdout().lock();
    let mut stdin = std::io::stdin().lock();
    let limit = model.max_prompt_bytes();
    loop {
        if interactive {
            eprint!("> ");
        }
        let line = match read_line(&mut stdin, limit).context("reading stdin")? {
            Line::End => return Ok(()),
            Line::TooLong(n) => {
                eprintln!(
                    "error: line of {n} bytes is longer than the model's context can hold ({limit} bytes); ignored"
                );
                continue;
            }
            Line::NotUtf8 => {
                eprintln!("error: line is not valid UTF-8; ignored");
                continue;
            }
            Line::Text(t) => t,
        };
        let q = line.trim_end_matches('\r');
        if q.trim().is_empty() {
            continue;
        }
        if q.trim() == "/image" || q.starts_with("/image ") {
            let path = PathBuf::from(q["/image".len()..].trim());
            if path.as_os_str().is_empty() {
                eprintln!("error: /image needs a path: /image PATH");
                continue;
            }
            image_paths.push(path.clone());
            let loaded = check_images(&image_paths, &model.manifest, a.gen.max_tiles)
                .and_then(|()| Media::load(&path, a.gen.exif));
            match loaded {
                Ok(img) => images.push(img),
                Err(e) => {
                    image_paths.pop();
                    eprintln!("error: {}", one_line(&e));
                }
            }
            continue;
        }
        if q.trim() == "/reset" {
            conv.reset();
            continue;
        }
        let q = match video_frames.take() {
            Some(n) => internvl::prompt::video_question(q, n),
            None => q.to_string(),
        };
        let out = conv.turn(&q, std::mem::take(&mut images), &params, &mut |piece| {
            stdout.write_all(piece.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")
        });
        image_paths.clear();
        writeln!(stdout).context("writing to stdout")?;
        match out {
            Ok(out) if a.gen.verbose => print_timings(&out),
            Ok(_) => {}
            // Bad input for this turn: say so and keep the conversation (a failed turn leaves it as it was).
            Err(e) => eprintln!("error: {}", one_line(&e)),
        }
    }
}

fn spinner(enabled: bool, msg: &'static str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    internvl::runtime::show_runtime_logs(a.verbose);
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(path)) => {
            let text = files::read_text(path, 64 << 10, "--api-key-file").kind(ErrorKind::Usage)?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        return Err(anyhow::anyhow!("the API key is empty")).kind(ErrorKind::Usage);
    }
    // Fails now, not after the listener is up, for a folder that is not a model.
    Manifest::load(&a.model)?;
    if let Some(dir) = a.media_root.as_deref().filter(|d| !d.is_dir()) {
        return Err(anyhow::anyhow!("--media-root {}: not a folder", dir.display())).kind(ErrorKind::Usage);
    }
    let cfg = internvl::server::ServeConfig {
        model: a.model,
        runtime: a.engine.rt.options(),
        addr: std::net::SocketAddr::new(a.host, a.port),
        parallel: a.parallel,
        queue: a.queue,
        api_key,
        body_limit: a.body_limit,
        media_root: a.media_root,
        vision_batch: a.engine.vision_batch,
        prefill_chunk: a.engine.prefill_chunk,
        media_cache_bytes: a.vision_cache_bytes,
        grace_period: a.grace_period,
        keep_alive: a.keep_alive,
        exact: a.exact,
        max_pixels_in_flight: a.max_pixels_in_flight,
        remote_media: a.allow_remote_media.then(|| internvl::server::fetch::RemoteMedia {
            hosts: a.allow_media_host,
            private: a.allow_private_media,
            timeout: std::time::Duration::from_secs(a.media_timeout),
            max_bytes: a.media_max_bytes,
        }),
    };
    internvl::server::serve(cfg, |addr| eprintln!("internvl serve: listening on http://{addr} (loading the model)"))
}

/// anyhow's chain on one line: "context: cause: cause".
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '\r'], " ")
}

fn preprocess_cmd(a: PreprocessArgs) -> Result<()> {
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
    let tiles = preprocess(&img, &cfg)?;
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
    let v = video::load(path, &a.video.sampling()?, cfg.image_size)?;
    let mut data = Vec::new();
    for frame in &v.frames {
        data.extend(preprocess(frame, &cfg)?.data);
    }
    let s = cfg.image_size as usize;
    npy::write_f32(&a.out, &[v.frames.len(), 3, s, s], &data)?;
    writeln!(std::io::stdout(), "{}", serde_json::to_string(&v.info)?).context("writing to stdout")
}

fn embed_cmd(a: EmbedArgs) -> Result<()> {
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

fn bench_cmd(a: BenchArgs) -> Result<()> {
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

fn devices_cmd(a: DevicesArgs) -> Result<()> {
    let lib = internvl::runtime::library()?;
    println!("onnxruntime: {}", lib.display());
    let mut bad = Vec::new();
    for device in [Device::Cpu, Device::Cuda, Device::Tensorrt] {
        match internvl::runtime::device_status(device) {
            Ok(()) => println!("{}: available", device.name()),
            Err(why) => {
                println!("{}: not available: {why}", device.name());
                bad.push(device.name());
            }
        }
    }
    if a.bundle_check && !bad.is_empty() {
        return Err(anyhow::anyhow!("--bundle-check: {} cannot start from {}", bad.join(", "), lib.display()))
            .kind(ErrorKind::Usage);
    }
    Ok(())
}

fn tokenize_cmd(a: TokenizeArgs) -> Result<()> {
    use internvl::tokenizer::{answer_text, Tokenizer};
    // The input first: a bad file is refused before the tokenizer is loaded.
    let read = |f: &Path| files::read_text(f, files::MAX_TEXT_FILE, "input file").kind(ErrorKind::Input);
    let input = a.decode.as_deref().or(a.file.as_deref()).map(read).transpose()?.unwrap_or_default();
    let (tok, split_at) = match (&a.model, &a.tokenizer) {
        (Some(dir), None) => {
            let m = Manifest::load(dir)?;
            let answer = &m.tokenizer.answer;
            let tok = Tokenizer::load(&m.path(&m.tokenizer.file)).kind(ErrorKind::Model)?;
            (tok.decoding_as(answer), answer.split_at.clone())
        }
        (None, Some(file)) => (Tokenizer::load(file).kind(ErrorKind::Input)?, None),
        _ => return Err(anyhow::anyhow!("give exactly one of --model and --tokenizer")).kind(ErrorKind::Usage),
    };
    // Tokenising takes about 100x a text's size for a moment: one text is bounded, not only the file.
    const MAX_TEXT: usize = 4 << 20;
    let encode = |t: &str| {
        if t.len() > MAX_TEXT {
            let msg = format!("a text of {} bytes, more than the limit of {MAX_TEXT} per text", t.len());
            return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Input);
        }
        tok.encode(t, true).kind(ErrorKind::Input)
    };
    let out = match (&a.text, &a.file, &a.decode) {
        (_, _, Some(f)) => {
            let items: Vec<Vec<u32>> = serde_json::from_str(&input)
                .with_context(|| format!("{}: expected a JSON list of lists of token ids", f.display()))
                .kind(ErrorKind::Input)?;
            // Written as decoded: a file of millions of short lists never holds all their texts at once.
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            write!(stdout, "[").context("writing to stdout")?;
            for (i, ids) in items.iter().enumerate() {
                let text =
                    tok.decode(ids).with_context(|| format!("{}: list {i}", f.display())).kind(ErrorKind::Input)?;
                let answer = answer_text(&text, split_at.as_deref());
                let item = serde_json::json!({ "text": text, "answer": answer });
                write!(stdout, "{}{item}", if i == 0 { "" } else { "," }).context("writing to stdout")?;
            }
            writeln!(stdout, "]").context("writing to stdout")?;
            return stdout.flush().context("writing to stdout");
        }
        (Some(t), _, None) => serde_json::to_string(&encode(t)?)?,
        (None, Some(f), None) => {
            let items: Vec<String> = serde_json::from_str(&input)
                .with_context(|| format!("{}: expected a JSON list of strings", f.display()))
                .kind(ErrorKind::Input)?;
            serde_json::to_string(&items.iter().map(|t| encode(t)).collect::<Result<Vec<_>>>()?)?
        }
        (None, None, None) => return Err(anyhow::anyhow!("give --text, --file or --decode")).kind(ErrorKind::Usage),
    };
    writeln!(std::io::stdout(), "{out}").context("writing to stdout")
}

fn package_cmd(a: PackageArgs) -> Result<()> {
    let o = cli::package::PackageOptions { model: a.model, out: a.out, gpu: a.gpu };
    cli::package::check_out(&o, a.force)?;
    let bar = spinner(std::io::stderr().is_terminal(), "packaging (checking every file's checksum)");
    let packed = cli::package::package(&o)?;
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

fn info_cmd(a: InfoArgs) -> Result<()> {
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
    let devices = internvl::runtime::providers::devices_for(&m.dtype).join(", ");
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
