//! The engine's vision thread: tiles an image and runs batches of its tiles through the vision graph
//! while the engine thread goes on decoding and prefilling, so a new request's 13-tile image shares the
//! cores with the other streams but never stops them.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::image::RgbImage;
use anyhow::{anyhow, ensure, Context, Result};

use crate::media::image::{preprocess, ImageConfig};
use crate::model::Model;

/// A batch of one image's tiles.
pub(crate) struct VisionJob {
    pub seq: u64,
    pub image: usize,
    pub source: TileSource,
    /// First tile and tile count of the batch.
    pub start: usize,
    pub tiles: usize,
}

/// The first batch of an image brings the decoded image (the worker tiles it, off the engine thread);
/// the next ones the tiles it made.
pub(crate) enum TileSource {
    Image { image: Arc<RgbImage>, cfg: ImageConfig, count: usize },
    Tiles(Arc<Vec<f32>>),
}

/// A batch's features, and the image's tiles when this batch made them.
pub(crate) type Encoded = (Vec<f32>, Option<Arc<Vec<f32>>>);

pub(crate) struct VisionDone {
    pub seq: u64,
    pub image: usize,
    pub tiles: usize,
    pub rows: Result<Encoded>,
    pub ms: f64,
}

pub(crate) struct VisionWorker {
    jobs: Sender<VisionJob>,
    done: Receiver<VisionDone>,
}

impl VisionWorker {
    /// Starts the thread; it ends when the worker (the jobs' sender) is dropped.
    pub fn spawn(model: Arc<Model>) -> Result<Self> {
        let (jobs, job_rx) = channel::<VisionJob>();
        let (done_tx, done) = channel();
        std::thread::Builder::new()
            .name("internvl-vision".into())
            .spawn(move || {
                for job in job_rx {
                    let t = Instant::now();
                    let rows = run(&model, &job);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let finished = VisionDone { seq: job.seq, image: job.image, tiles: job.tiles, rows, ms };
                    if done_tx.send(finished).is_err() {
                        return;
                    }
                }
            })
            .context("starting the vision thread")?;
        Ok(Self { jobs, done })
    }

    /// Hands a job over; false if the thread is gone.
    pub fn send(&self, job: VisionJob) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// A finished job, waiting up to `wait` for one (None: not at all).
    pub fn finished(&self, wait: Option<Duration>) -> Option<VisionDone> {
        match wait {
            Some(w) => self.done.recv_timeout(w).ok(),
            None => self.done.try_recv().ok(),
        }
    }
}

/// Tiles (if the job brings an image) and encodes one batch.
fn run(model: &Model, job: &VisionJob) -> Result<Encoded> {
    let per_tile = 3 * (model.manifest.vision.image_size as usize).pow(2);
    let (tiles, made) = match &job.source {
        TileSource::Tiles(t) => (Arc::clone(t), None),
        TileSource::Image { image, cfg, count } => {
            let t = preprocess(image, cfg)?;
            ensure!(t.count == *count, "internal error: {} tiles made, {count} counted", t.count);
            let t = Arc::new(t.data);
            (Arc::clone(&t), Some(t))
        }
    };
    let pixels = tiles
        .get(job.start * per_tile..(job.start + job.tiles) * per_tile)
        .ok_or_else(|| anyhow!("internal error: tiles {}..{} of an image", job.start, job.start + job.tiles))?;
    Ok((model.vision.encode(pixels, job.tiles, job.tiles)?, made))
}
