//! Videos as the reference reads them (the model card's `load_video`): `num_segments` frames taken at
//! the middle of equal segments of the video (or of a `[start, end]` window in seconds), each frame
//! resized whole to one square tile (`max_num=1`: no grid, no thumbnail), asked about with one
//! `Frame-N: <image>` line per frame (`prompt::video_question`).
//!
//! Containers and codecs are FFmpeg's (`ffmpeg.rs`): the reference decodes with decord, which is
//! FFmpeg's decoders too, so frame counts, rates and pixels come from the same code. FFmpeg is run as
//! the `ffprobe` / `ffmpeg` programs rather than linked: the binary starts and answers about images on
//! a machine without it, and says what is missing when a video is given. Animated GIF and WebP are
//! decoded here by the image crate (`animated.rs`), so they need no FFmpeg.
//!
//! Only the sampled frames are kept, each already resized to the tile size: a long or high-resolution
//! video costs decoding time, not memory.

mod animated;
mod ffmpeg;
pub mod frame_index;

use std::path::Path;

use anyhow::{anyhow, Result};
use image::RgbImage;
use serde::Serialize;

use crate::cancel::Cancel;
use crate::error::{ErrorKind, WithKind};
use crate::limits::MAX_FRAMES;
use crate::media::image::resize_bicubic;

/// Frames per video when not given: the model card's example (its `load_video` defaults to 32).
pub const DEFAULT_FRAMES: usize = 8;
/// Frame size bound (width x height) checked before any frame is decoded.
pub const MAX_FRAME_PIXELS: u64 = crate::media::image::MAX_IMAGE_PIXELS;

/// Which frames to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameSampling {
    pub frames: usize,
    /// `[start, end]` in seconds (the reference's `bound`); None: the whole video.
    pub bound: Option<(f64, f64)>,
}

impl Default for FrameSampling {
    fn default() -> Self {
        Self { frames: DEFAULT_FRAMES, bound: None }
    }
}

impl FrameSampling {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_FRAMES).contains(&self.frames) {
            return Err(anyhow!("frames {} must be between 1 and {MAX_FRAMES}", self.frames));
        }
        if let Some((s, e)) = self.bound {
            if !(s.is_finite() && e.is_finite() && s >= 0.0 && s < e && e <= 1e7) {
                return Err(anyhow!("video window {s}..{e} s: need 0 <= start < end <= 1e7 seconds"));
            }
        }
        Ok(())
    }
}

/// The sampled frames of a video, each `size` x `size`.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Vec<RgbImage>,
    pub info: VideoInfo,
}

/// What was read and which frames were taken (`run --json` reports it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VideoInfo {
    /// Frames the video has (decord's `len(vr)`: the stream's packets).
    pub frames_total: usize,
    /// decord's `get_avg_fps()`.
    pub fps: f64,
    pub width: u32,
    pub height: u32,
    /// The frame numbers taken, in order (repeats where the video is shorter than the frames asked).
    pub frame_indices: Vec<usize>,
    /// `ffmpeg` (and its codec name), `gif` or `webp`.
    pub decoder: String,
}

/// A video opened for decoding: its frame size known (from the header of an animated GIF / WebP, or from
/// `ffprobe`) before any frame is decoded, so a caller can admit what the decode will hold first.
pub struct VideoFile {
    path: std::path::PathBuf,
    source: Source,
    /// How errors name the file: its path, or `(request)` for a temporary copy of a request's bytes.
    name: String,
    _temp: Option<TempFile>,
}

enum Source {
    Animated { kind: animated::Kind, width: u32, height: u32 },
    Ffmpeg(ffmpeg::Probe),
}

/// Opens `path`. Errors name the file and are [`ErrorKind::Input`] (FFmpeg missing included).
pub fn open(path: &Path) -> Result<VideoFile> {
    let name = path.display().to_string();
    open_as(path.to_path_buf(), name, None)
}

/// [`open`] of a video given as bytes (a server request's `data:` URI or download): FFmpeg needs a
/// seekable file (an MP4's index may sit at its end), so the bytes go to a private temporary file that is
/// removed with the [`VideoFile`], or by [`remove_temporary_files`] if the process ends first.
pub fn open_bytes(bytes: &[u8]) -> Result<VideoFile> {
    use std::io::Write;
    let path = temp_dir().join(format!("{TEMP_PREFIX}{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    let mut file =
        file.map_err(|e| anyhow!("cannot write a temporary file for the video: {e}")).kind(ErrorKind::Internal)?;
    let temp = TempFile::new(path.clone());
    file.write_all(bytes)
        .map_err(|e| anyhow!("cannot write a temporary file for the video: {e}"))
        .kind(ErrorKind::Internal)?;
    drop(file);
    open_as(path, "(request)".into(), Some(temp))
}

fn open_as(path: std::path::PathBuf, name: String, temp: Option<TempFile>) -> Result<VideoFile> {
    let named = |e: anyhow::Error| anyhow!("video {name}: {}", format!("{e:#}").replace('\n', " "));
    let head =
        read_head(&path).map_err(|e| anyhow!("{}", format!("{e:#}").replace(&path.display().to_string(), &name)));
    let head = head.kind(ErrorKind::Input)?;
    let source = match animated::kind(&head) {
        Some(kind) => animated::canvas(&path, kind).map(|(width, height)| Source::Animated { kind, width, height }),
        None => ffmpeg::probe(&path).map(Source::Ffmpeg),
    };
    let source = source.map_err(named).kind(ErrorKind::Input)?;
    Ok(VideoFile { path, source, name, _temp: temp })
}

impl VideoFile {
    /// Width and height of its frames (an animation's canvas).
    pub fn frame_size(&self) -> (u32, u32) {
        match &self.source {
            Source::Animated { width, height, .. } => (*width, *height),
            Source::Ffmpeg(p) => (p.width, p.height),
        }
    }

    /// Bytes the decode holds at its peak besides the tiles it returns: an animation's RGBA canvas and the
    /// RGBA frame handed out (8 bytes a pixel); for FFmpeg, the RGB frame read from its pipe and the one
    /// FFmpeg converts it from (6 bytes a pixel).
    pub fn decode_bytes(&self) -> u64 {
        let (w, h) = self.frame_size();
        let per_pixel = match self.source {
            Source::Animated { .. } => 8,
            Source::Ffmpeg(_) => 6,
        };
        u64::from(w) * u64::from(h) * per_pixel
    }

    /// Reads the frames `sampling` picks, each resized to `size` x `size` as Pillow's `Image.resize` does.
    /// `cancel` is checked between frames (FFmpeg is killed when it is set).
    pub fn decode(&self, sampling: &FrameSampling, size: u32, cancel: &Cancel) -> Result<Video> {
        sampling.validate().kind(ErrorKind::Usage)?;
        let video = match &self.source {
            Source::Animated { kind, .. } => animated::load(&self.path, *kind, sampling, size, cancel),
            Source::Ffmpeg(p) => ffmpeg::load(&self.path, p, sampling, size, cancel),
        };
        video
            .map_err(|e| {
                let text = format!("{e:#}").replace('\n', " ").replace(&self.path.display().to_string(), &self.name);
                anyhow!("video {}: {text}", self.name)
            })
            .kind(ErrorKind::Input)
    }
}

/// [`open`] and [`VideoFile::decode`]: what the command line does.
pub fn load(path: &Path, sampling: &FrameSampling, size: u32, cancel: &Cancel) -> Result<Video> {
    sampling.validate().kind(ErrorKind::Usage)?;
    open(path)?.decode(sampling, size, cancel)
}

/// Temporary video files are `internvl-video-<pid>-<random>` in the temporary folder.
const TEMP_PREFIX: &str = "internvl-video-";

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir()
}

/// The temporary files this process has open, so that a shutdown that cannot wait for their decodes
/// still removes them.
static TEMP_FILES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A temporary file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(path: std::path::PathBuf) -> Self {
        TEMP_FILES.lock().unwrap_or_else(|p| p.into_inner()).push(path.clone());
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        TEMP_FILES.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p != &self.0);
    }
}

/// Removes this process's temporary video files (a server calls it as it exits, whatever is running).
pub fn remove_temporary_files() {
    for path in TEMP_FILES.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes temporary video files left by processes that are gone (killed before they could clean up);
/// returns how many. Files of running processes (another server on this machine) are kept.
pub fn sweep_temporary_files() -> usize {
    let Ok(entries) = std::fs::read_dir(temp_dir()) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)?.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && entry.file_type().is_ok_and(|t| t.is_file()) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| anyhow!("cannot read video {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(anyhow!("video {} is not a file", path.display()));
    }
    if meta.len() == 0 {
        return Err(anyhow!("video file is empty (0 bytes): {}", path.display()));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| anyhow!("cannot read video {}: {e}", path.display()))?;
    Ok(head)
}

/// Frames in sampled order from the distinct ones decoded (`decoded[k]` is frame `wanted[k]`).
fn in_order(indices: &[usize], wanted: &[usize], decoded: Vec<RgbImage>) -> Vec<RgbImage> {
    indices
        .iter()
        .map(|i| {
            let k = wanted.binary_search(i).unwrap_or(0);
            decoded[k].clone()
        })
        .collect()
}

/// The distinct frame numbers of `indices`, ascending.
fn distinct(indices: &[usize]) -> Vec<usize> {
    let mut wanted = indices.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

fn check_size(width: u32, height: u32) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 || pixels > MAX_FRAME_PIXELS {
        return Err(anyhow!("frames of {width}x{height} pixels are outside 1..={MAX_FRAME_PIXELS} pixels"));
    }
    Ok(())
}

fn to_tile(frame: &RgbImage, size: u32) -> RgbImage {
    resize_bicubic(frame, size, size)
}
