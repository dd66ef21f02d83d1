//! The reference's frame choice (`get_index` in the model card), with Python's rounding: `round()` and
//! `np.round` round half to even, `int()` truncates.

use anyhow::{anyhow, Result};

/// Frame numbers for `segments` segments of a video of `frames_total` frames at `fps`, within
/// `bound` seconds (None: the reference's default window of -100000..100000 s, i.e. everything).
///
/// ```python
/// start_idx = max(first_idx, round(start * fps)); end_idx = min(round(end * fps), max_frame)
/// seg_size = float(end_idx - start_idx) / num_segments
/// [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
/// ```
/// A window that starts past the last frame is an error (the reference would index before it).
pub fn frame_indices(bound: Option<(f64, f64)>, fps: f64, frames_total: usize, segments: usize) -> Result<Vec<usize>> {
    if frames_total == 0 {
        return Err(anyhow!("the video has no frames"));
    }
    let max_frame = (frames_total - 1) as f64;
    let (start, end) = bound.unwrap_or((-100_000.0, 100_000.0));
    let start_idx = (start * fps).round_ties_even().max(0.0);
    let end_idx = (end * fps).round_ties_even().min(max_frame);
    if end_idx < start_idx {
        return Err(anyhow!(
            "the window {start}..{end} s starts after the video's last frame ({frames_total} frames at {fps} fps)"
        ));
    }
    let seg = (end_idx - start_idx) / segments as f64;
    Ok((0..segments).map(|i| (start_idx + seg / 2.0 + (seg * i as f64).round_ties_even()) as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn middle_of_equal_segments() {
        // 100 frames (max_frame 99), 8 segments: seg 12.375 -> int(6.1875 + round(12.375 * i))
        assert_eq!(frame_indices(None, 25.0, 100, 8).unwrap(), vec![6, 18, 31, 43, 56, 68, 80, 93]);
    }

    #[test]
    fn short_videos_repeat_frames() {
        assert_eq!(frame_indices(None, 30.0, 3, 8).unwrap(), vec![0, 0, 0, 1, 1, 1, 2, 2]);
        assert_eq!(frame_indices(None, 30.0, 1, 4).unwrap(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn a_window_in_seconds() {
        // 10 s at 10 fps, 2..4 s: frames 20..40, seg 5
        assert_eq!(frame_indices(Some((2.0, 4.0)), 10.0, 100, 4).unwrap(), vec![22, 27, 32, 37]);
        assert!(frame_indices(Some((20.0, 30.0)), 10.0, 100, 4).is_err());
        assert!(frame_indices(None, 10.0, 0, 4).is_err());
    }

    #[test]
    fn halves_round_to_even() {
        // seg 0.5: round(0.5 * 1) = 0, round(0.5 * 3) = 2 (half to even), as np.round
        assert_eq!(frame_indices(None, 1.0, 3, 4).unwrap(), vec![0, 0, 1, 2]);
    }
}
