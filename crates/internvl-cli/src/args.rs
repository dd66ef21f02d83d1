//! Flag groups several commands share: the runtime (device, threads, kernels), the engine's work units,
//! what `run` and `chat` generate from (model, images, video, sampling), and the parsers that bound each
//! number by the library's limits so a bad value is a usage error naming the flag.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use internvl::cancel::Cancel;
use internvl::error::{ErrorKind, WithKind};
use internvl::limits::{self, MAX_FRAMES, MAX_NEW_TOKENS, MAX_PREFILL_CHUNK, MAX_THREADS, MAX_TILES, MAX_VISION_BATCH};
use internvl::manifest::Manifest;
use internvl::media::image::image_dimensions;
use internvl::media::video::{self, FrameSampling, VideoInfo, DEFAULT_FRAMES};
use internvl::model::decoder::DEFAULT_PREFILL_CHUNK;
use internvl::model::vision;
use internvl::runtime::{AttentionKernels, Device, GpuOptions, RuntimeOptions};
use internvl::sampling::{self, SamplingOptions};
use internvl::{EngineConfig, Media, Model, Params};

use crate::notices::spinner;

/// Flag bounds, checked by the parser so a bad value is a usage error naming the flag.
pub(crate) fn positive(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

pub(crate) fn tiles() -> clap::builder::RangedU64ValueParser<u32> {
    clap::builder::RangedU64ValueParser::<u32>::new().range(1..=u64::from(MAX_TILES))
}

pub(crate) fn threads() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_THREADS as u64)
}

/// A float flag checked by the library's rule for its parameter, so the parser's message names the flag.
pub(crate) fn checked(rule: fn(f32) -> Result<()>) -> impl Fn(&str) -> std::result::Result<f32, String> + Clone {
    move |s| {
        let v: f32 = s.trim().parse().map_err(|e| format!("{e}"))?;
        rule(v).map_err(|e| e.to_string())?;
        Ok(v)
    }
}

/// What `run` and `chat` share: the model, the images, and how to generate.
#[derive(Args)]
pub(crate) struct GenArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Image file (PNG, JPEG, WebP, BMP, GIF, TIFF); repeat for several images; omit for text only.
    #[arg(long, conflicts_with = "video")]
    pub(crate) image: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) video: VideoArgs,
    /// Replace the template's system prompt; "" drops the system block.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Most tiles per image (1..=40; default from the model, 12). Video frames are one tile each.
    #[arg(long, allow_negative_numbers = true, value_parser = tiles(), conflicts_with = "video")]
    pub(crate) max_tiles: Option<u32>,
    /// Apply the EXIF orientation tag (the reference ignores it).
    #[arg(long)]
    pub(crate) exif: bool,
    /// Most tokens to generate (default from the model, 1024); also bounded by the context.
    #[arg(long, allow_negative_numbers = true, value_parser = positive(MAX_NEW_TOKENS as u64))]
    pub(crate) max_new_tokens: Option<usize>,
    /// 0 = greedy (default).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.0, value_parser = checked(sampling::check_temperature))]
    pub(crate) temperature: f32,
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, value_parser = checked(sampling::check_top_p))]
    pub(crate) top_p: f32,
    /// 0 = off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub(crate) top_k: usize,
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, value_parser = checked(sampling::check_repetition_penalty))]
    pub(crate) repetition_penalty: f32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub(crate) seed: u64,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Timing figures, and ONNX Runtime's own warnings, on stderr.
    #[arg(long)]
    pub(crate) verbose: bool,
}

/// A video's frames as the model card's `load_video` takes them.
#[derive(Args, Clone)]
pub(crate) struct VideoArgs {
    /// Video file: MP4, MOV, MKV, WebM, AVI, ... (H.264, H.265, VP9, AV1 and every codec of the FFmpeg
    /// installed: its `ffprobe` / `ffmpeg` programs are run), or an animated GIF / WebP (no FFmpeg
    /// needed). --frames frames, one tile each, asked about as `Frame-N: <image>` lines.
    #[arg(long)]
    pub(crate) video: Option<PathBuf>,
    /// Frames taken from --video, at the middle of equal segments (the model card's `num_segments`).
    #[arg(long, requires = "video", allow_negative_numbers = true, default_value_t = DEFAULT_FRAMES,
          value_parser = positive(MAX_FRAMES as u64))]
    pub(crate) frames: usize,
    /// Start of the part of --video to sample, in seconds (with --video-end; the card's `bound`).
    #[arg(long, requires_all = ["video", "video_end"], allow_negative_numbers = true)]
    pub(crate) video_start: Option<f64>,
    /// End of the part of --video to sample, in seconds.
    #[arg(long, requires_all = ["video", "video_start"], allow_negative_numbers = true)]
    pub(crate) video_end: Option<f64>,
}

impl VideoArgs {
    /// The frames asked for, checked (a usage error naming the flags).
    pub(crate) fn sampling(&self) -> Result<FrameSampling> {
        let sampling = FrameSampling { frames: self.frames, bound: self.video_start.zip(self.video_end) };
        sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("--frames / --video-start / --video-end: {e}"))
            .kind(ErrorKind::Usage)?;
        Ok(sampling)
    }

    /// The sampled frames, after checking that their tiles fit the model's context (before decoding).
    pub(crate) fn load(&self, m: &Manifest) -> Result<Option<video::Video>> {
        let Some(path) = &self.video else { return Ok(None) };
        let sampling = self.sampling()?;
        limits::check_video_fits(self.frames, m).map_err(|e| e.context(format!("--frames {}", self.frames)))?;
        video::load(path, &sampling, m.image.image_size, &Cancel::new()).map(Some)
    }
}

/// The runtime and the engine's work units (`run`, `chat`, `serve`).
#[derive(Args)]
pub(crate) struct EngineArgs {
    #[command(flatten)]
    pub(crate) rt: RuntimeArgs,
    /// Tiles per vision-graph run.
    #[arg(long, allow_negative_numbers = true, default_value_t = vision::DEFAULT_BATCH, value_parser = positive(MAX_VISION_BATCH as u64))]
    pub(crate) vision_batch: usize,
    /// Prompt positions per prefill run (bounds attention memory on long prompts).
    #[arg(long, allow_negative_numbers = true, default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = positive(MAX_PREFILL_CHUNK as u64))]
    pub(crate) prefill_chunk: usize,
}

impl EngineArgs {
    pub(crate) fn config(&self, rows: usize) -> EngineConfig {
        EngineConfig { rows, vision_batch: self.vision_batch, prefill_chunk: self.prefill_chunk, exact: false }
    }
}

#[derive(Args)]
pub(crate) struct RuntimeArgs {
    /// Where the graphs run: `auto` = TensorRT, else CUDA, else the CPU, as available (said on stderr).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub(crate) device: DeviceArg,
    /// CUDA / TensorRT: the GPU's index.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=1023))]
    pub(crate) gpu_id: i32,
    /// CUDA: most MiB the provider's memory arena may hold (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub(crate) gpu_mem_limit: Option<u64>,
    /// CUDA: TF32 matmuls (faster on Ampere and later; `off` for results that match the CPU's).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    tf32: Switch,
    /// TensorRT: folder for its engines and timing cache, built once per GPU (default: the model
    /// folder's `trt-cache`).
    #[arg(long)]
    pub(crate) trt_cache: Option<PathBuf>,
    /// Intra-op threads (0 = one per core).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0, value_parser = threads())]
    pub(crate) threads: usize,
    /// Attention kernels: `auto` = this crate's AMX ones where the model folder and the CPU allow it.
    #[arg(long, value_enum, default_value_t = AttentionArg::Auto)]
    pub(crate) attention: AttentionArg,
}

impl RuntimeArgs {
    pub(crate) fn options(&self) -> RuntimeOptions {
        let gpu = GpuOptions {
            device_id: self.gpu_id,
            memory_limit: self.gpu_mem_limit.map(|mib| (mib as usize) << 20),
            tf32: self.tf32 == Switch::On,
            trt_cache: self.trt_cache.clone(),
        };
        RuntimeOptions { device: self.device.into(), threads: self.threads, attention: self.attention.into(), gpu }
    }
}

/// `--device`: [`Device`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DeviceArg {
    /// The best available: TensorRT, else CUDA, else the CPU (said on stderr).
    Auto,
    Cpu,
    Cuda,
    Tensorrt,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => Device::Auto,
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
            DeviceArg::Tensorrt => Device::Tensorrt,
        }
    }
}

/// `--attention`: [`AttentionKernels`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AttentionArg {
    /// This crate's AMX kernels where the model folder has their graphs and the CPU runs them, else
    /// ONNX Runtime's.
    Auto,
    /// ONNX Runtime's (`MultiHeadAttention`, `GroupQueryAttention`): the portable graphs.
    Onnx,
    /// This crate's AMX kernels; an error where they cannot run.
    Amx,
}

impl From<AttentionArg> for AttentionKernels {
    fn from(a: AttentionArg) -> Self {
        match a {
            AttentionArg::Auto => AttentionKernels::Auto,
            AttentionArg::Onnx => AttentionKernels::Onnx,
            AttentionArg::Amx => AttentionKernels::Amx,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Switch {
    On,
    Off,
}

/// What `run` and `chat` start from: the model, the request's images (or video frames) and parameters.
pub(crate) struct Loaded {
    pub(crate) model: Arc<Model>,
    pub(crate) images: Vec<Media>,
    pub(crate) params: Params,
    pub(crate) engine: EngineConfig,
    /// What `--video` read, when given.
    pub(crate) video: Option<VideoInfo>,
}

impl GenArgs {
    /// Checks the flags and the images against the model's context from their headers (a request that
    /// cannot fit costs no decoding), decodes the images (a bad one fails before the model spends seconds
    /// loading), then loads the model.
    pub(crate) fn load(&self, progress: bool) -> Result<Loaded> {
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
        let max_tiles = if video.is_some() { Some(limits::VIDEO_TILES_PER_FRAME) } else { self.max_tiles };
        let params = Params { sampling, max_tiles, ..Params::new(max_new_tokens) };
        let engine = self.engine.config(1);
        Ok(Loaded { model: Arc::new(model), images, params, engine, video })
    }

    pub(crate) fn load_images(&self, m: &Manifest) -> Result<Vec<Media>> {
        check_images(&self.image, m, self.max_tiles)?;
        self.image.iter().map(|p| Media::load(p, self.exif)).collect()
    }
}

/// The images of one request, from their headers: few enough, small enough, and their tiles within the
/// model's context ([`limits::check_images`]), before any is decoded.
pub(crate) fn check_images(paths: &[PathBuf], m: &Manifest, max_tiles: Option<u32>) -> Result<()> {
    limits::check_image_count(paths.len())?;
    let cfg = limits::image_config(m, max_tiles)?;
    let dims = paths.iter().map(|p| image_dimensions(p)).collect::<Result<Vec<_>>>()?;
    limits::check_images(&dims, m, &cfg).map(|_pixels| ())
}
