//! Video containers and codecs through FFmpeg's programs: `ffprobe` for the stream's frame count
//! (packets counted by demuxing, as decord indexes a file) and average rate, `ffmpeg` to decode only
//! the chosen frames to RGB (`select` by decoded frame number, no rotation applied, no frame rate
//! conversion), read from a pipe one frame at a time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context, Result};
use image::RgbImage;

use crate::cancel::Cancel;

use super::{check_size, distinct, frame_index, in_order, to_tile, FrameSampling, Video, VideoInfo};

/// `name` from `$INTERNVL_FFMPEG_DIR`, else beside this binary (an edge bundle may carry it), else PATH.
fn tool(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("INTERNVL_FFMPEG_DIR").map(PathBuf::from).into_iter().collect();
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        dirs.push(dir.to_path_buf());
    }
    dirs.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "reading this video needs FFmpeg's `{name}`, which is not installed (looked in $INTERNVL_FFMPEG_DIR, \
             beside internvl and on PATH): install FFmpeg (e.g. `apt install ffmpeg`); animated GIF / WebP need none"
        )
    })
}

#[derive(Debug)]
pub(super) struct Probe {
    codec: String,
    pub width: u32,
    pub height: u32,
    frames: usize,
    fps: f64,
}

/// The video stream's codec, size, frame count and rate (checked: a frame of a size that may be decoded).
pub(super) fn probe(path: &Path) -> Result<Probe> {
    let p = run_probe(path)?;
    check_size(p.width, p.height)?;
    Ok(p)
}

fn run_probe(path: &Path) -> Result<Probe> {
    let out = Command::new(tool("ffprobe")?)
        .args(["-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries"])
        .arg("stream=codec_name,width,height,avg_frame_rate,nb_read_packets")
        .args(["-of", "json"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ffprobe")?;
    if !out.status.success() {
        return Err(anyhow!("ffprobe cannot read it: {}", last_line(&out.stderr)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ffprobe's output is not JSON")?;
    let s = v["streams"].get(0).ok_or_else(|| anyhow!("it has no video stream"))?;
    let num = |k: &str| -> Option<u64> { s[k].as_u64().or_else(|| s[k].as_str().and_then(|t| t.parse().ok())) };
    let (width, height) = (num("width").unwrap_or(0), num("height").unwrap_or(0));
    let fps = s["avg_frame_rate"].as_str().map(rate).unwrap_or(0.0);
    Ok(Probe {
        codec: s["codec_name"].as_str().unwrap_or("unknown").to_string(),
        width: u32::try_from(width).unwrap_or(u32::MAX),
        height: u32::try_from(height).unwrap_or(u32::MAX),
        frames: num("nb_read_packets").unwrap_or(0) as usize,
        fps,
    })
}

/// "30000/1001" -> 29.97; "0/0" (unknown) -> 0, as decord's `get_avg_fps` gives it.
fn rate(text: &str) -> f64 {
    let (n, d) = text.split_once('/').unwrap_or((text, "1"));
    match (n.parse::<f64>(), d.parse::<f64>()) {
        (Ok(n), Ok(d)) if d != 0.0 && n.is_finite() => n / d,
        _ => 0.0,
    }
}

pub(super) fn load(path: &Path, p: &Probe, sampling: &FrameSampling, size: u32, cancel: &Cancel) -> Result<Video> {
    let indices = frame_index::frame_indices(sampling.bound, p.fps, p.frames, sampling.frames)?;
    let wanted = distinct(&indices);
    let select = wanted.iter().map(|i| format!("eq(n\\,{i})")).collect::<Vec<_>>().join("+");
    let mut child = Command::new(tool("ffmpeg")?)
        .args(["-nostdin", "-v", "error", "-noautorotate", "-i"])
        .arg(path)
        .args(["-map", "0:v:0", "-vf", &format!("select='{select}'"), "-fps_mode", "passthrough"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ffmpeg")?;
    // stderr drained aside so a chatty decoder cannot block the pipe we read frames from.
    let mut stderr = child.stderr.take().context("ffmpeg's stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.by_ref().take(64 << 10).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        text
    });
    let mut stdout = child.stdout.take().context("ffmpeg's stdout")?;
    let bytes = p.width as usize * p.height as usize * 3;
    let mut buf = vec![0u8; bytes];
    let mut decoded = Vec::with_capacity(wanted.len());
    while decoded.len() < wanted.len() {
        if cancel.is_cancelled() || stdout.read_exact(&mut buf).is_err() {
            break;
        }
        let frame = RgbImage::from_raw(p.width, p.height, std::mem::take(&mut buf)).context("frame size")?;
        decoded.push(to_tile(&frame, size));
        buf = frame.into_raw();
    }
    drop(stdout);
    if decoded.len() == wanted.len() || cancel.is_cancelled() {
        let _ = child.kill(); // the rest of the video is not needed
    }
    let status = child.wait().context("waiting for ffmpeg")?;
    let errors = errors.join().unwrap_or_default();
    cancel.check()?;
    if decoded.len() < wanted.len() {
        let why = if status.success() { "the file ends early".to_string() } else { last_line(&errors) };
        return Err(anyhow!(
            "decoded {} of the {} frames needed (its {} frames, {} codec): {why}",
            decoded.len(),
            wanted.len(),
            p.frames,
            p.codec
        ));
    }
    let info = VideoInfo {
        frames_total: p.frames,
        fps: p.fps,
        width: p.width,
        height: p.height,
        frame_indices: indices.clone(),
        decoder: format!("ffmpeg {}", p.codec),
    };
    Ok(Video { frames: in_order(&indices, &wanted, decoded), info })
}

fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_rates() {
        assert!((super::rate("30000/1001") - 29.97).abs() < 1e-3);
        assert_eq!(super::rate("25/1"), 25.0);
        assert_eq!(super::rate("0/0"), 0.0);
        assert_eq!(super::rate("junk"), 0.0);
    }
}
