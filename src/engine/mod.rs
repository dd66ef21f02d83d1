//! The engine: steps many sequences through one loaded [`Model`], continuously batched.
//!
//! Every [`Engine::step`] runs the decode step of every decoding sequence as one call of the decoder
//! (one row of the shared KV cache each, at its own length), then one prefill chunk of one sequence,
//! round robin. Images are encoded on a vision thread of the engine's own, a batch of tiles per job and
//! one job per image at a time (so several images take turns), while the engine thread goes on
//! decoding and prefilling: a new request's 13-tile image shares the cores with the other streams but
//! never stops them, and a text-only request arriving meanwhile gets its first token after its own
//! prefill.
//!
//! A sequence's greedy answer does not depend on what runs beside it in fp32 (each row's attention and
//! GEMM rows are computed as alone); int8 graphs quantise activations per tensor, so a row's result can
//! depend on its batch (see README, "Serving").

pub mod conversation;
pub mod media;
pub mod sequence;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};

use crate::decoder::{KvCache, RowInput};
use crate::error::{ErrorKind, WithKind};
use crate::image::{preprocess, tile_count, ImageConfig};
use crate::model::Model;
use crate::prompt;
use crate::sampling::Sampler;
use crate::tokenizer::{answer_text, AnswerStream};
pub use conversation::Conversation;
use image::RgbImage;
use media::{EncodedImage, Media, MediaKey};
pub use sequence::{Content, Event, FinishReason, Output, Params, Sequence, Sink, Timings};
use sequence::{MediaState, Stage, StopFilter};

/// Images one request may bring: each takes at least one tile of the context.
pub const MAX_IMAGES: usize = 64;

/// Answer positions the KV cache is sized for before decoding (the manifest's default answer length).
const RESERVE_AHEAD: usize = 1024;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences that run at once (KV-cache rows).
    pub rows: usize,
    /// Tiles per vision-graph run (see `vision::DEFAULT_BATCH`).
    pub vision_batch: usize,
    /// Prompt positions per prefill run (see `decoder::DEFAULT_PREFILL_CHUNK`).
    pub prefill_chunk: usize,
    /// Every answer equal to its solo run even where rows are not computed independently (int8 graphs
    /// quantise activations per tensor): such models then decode one row per call and reuse no prompt
    /// prefix across requests. fp32 rows are independent and batch regardless.
    pub exact: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            rows: 1,
            vision_batch: crate::vision::DEFAULT_BATCH,
            prefill_chunk: crate::decoder::DEFAULT_PREFILL_CHUNK,
            exact: false,
        }
    }
}

/// What a KV-cache row holds: the ids its positions were computed from, the images among them, and how.
#[derive(Default)]
struct Row {
    ids: Vec<u32>,
    media: Vec<MediaKey>,
    /// LongRoPE: the positions were computed with the short factors.
    short_rope: bool,
    busy: bool,
}

/// A batch of one image's tiles for the vision thread.
struct VisionJob {
    seq: u64,
    image: usize,
    source: TileSource,
    /// First tile and tile count of the batch.
    start: usize,
    tiles: usize,
}

/// The first batch of an image brings the decoded image (the vision thread tiles it, off the engine
/// thread); the next ones the tiles it made.
enum TileSource {
    Image { image: Arc<RgbImage>, cfg: ImageConfig, count: usize },
    Tiles(Arc<Vec<f32>>),
}

/// A batch's features, and the image's tiles when this batch made them.
type Encoded = (Vec<f32>, Option<Arc<Vec<f32>>>);

struct VisionDone {
    seq: u64,
    image: usize,
    tiles: usize,
    rows: Result<Encoded>,
    ms: f64,
}

/// Tiles (if the job brings an image) and encodes one batch.
fn vision_job(model: &Model, job: &VisionJob) -> Result<Encoded> {
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

pub struct Engine {
    model: Arc<Model>,
    cfg: EngineConfig,
    vision_jobs: std::sync::mpsc::Sender<VisionJob>,
    vision_done: std::sync::mpsc::Receiver<VisionDone>,
    cache: KvCache,
    rows: Vec<Row>,
    active: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    steps: u64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Model {
    /// Prepares a request: checks it, counts its tiles from the images' sizes and tokenises the prompt (a
    /// request too long for the context costs no pixel work), and takes cached features for images seen
    /// before. Tiling and the graphs run in the [`Engine`] (tiling on its vision thread, when the image's
    /// turn comes, so a waiting request holds only its decoded pixels).
    pub fn start(&self, content: Content, params: Params, sink: Box<dyn Sink>) -> Result<Sequence> {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let started = Instant::now();
        params.sampling.validate().kind(ErrorKind::Usage)?;
        let cfg = self.image_config(params.max_tiles).kind(ErrorKind::Usage)?;
        if content.images.len() > MAX_IMAGES {
            let n = content.images.len();
            return Err(anyhow!("{n} images given; at most {MAX_IMAGES} per request")).kind(ErrorKind::Input);
        }
        // Cached features stand in for pixels: a hit skips tiling and the vision graph.
        let images: Vec<Media> = content
            .images
            .into_iter()
            .map(|m| match m {
                Media::Pixels { sha256, .. } => {
                    let key = MediaKey { sha256, max_tiles: cfg.max_tiles };
                    match self.cached_image(&key) {
                        Some(features) => {
                            metrics::counter!("internvl_vision_cache_hits_total").increment(1);
                            Media::Encoded { key, features }
                        }
                        None => m,
                    }
                }
                encoded => encoded,
            })
            .collect();
        let counts: Vec<usize> = images
            .iter()
            .map(|m| match m {
                Media::Pixels { image, .. } => tile_count(image.width(), image.height(), &cfg),
                Media::Encoded { features, .. } => features.tiles,
            })
            .collect();
        let text = prompt::render(
            &self.manifest.template,
            &content.history,
            &content.question,
            content.system.as_deref(),
            images.len(),
        );
        let ids = self.prompt_ids(&text, &counts).kind(ErrorKind::Input)?;
        let ctx_id = self.manifest.tokenizer.img_context_id;
        let per_tile = self.manifest.vision.tokens_per_tile;
        let mut firsts = Vec::with_capacity(images.len());
        let mut i = 0;
        for &n in &counts {
            while ids.get(i) != Some(&ctx_id) {
                i += 1;
                ensure!(i < ids.len(), "internal error: fewer image tokens than images");
            }
            firsts.push(i);
            i += n * per_tile;
        }
        let mut media = Vec::with_capacity(images.len());
        for ((m, tiles), first) in images.into_iter().zip(counts).zip(firsts) {
            let state = match &m {
                Media::Pixels { sha256, image } => MediaState {
                    key: MediaKey { sha256: *sha256, max_tiles: cfg.max_tiles },
                    tiles,
                    image: Some(Arc::clone(image)),
                    pixels: Arc::new(Vec::new()),
                    in_flight: false,
                    done: 0,
                    rows: Vec::new(),
                    features: None,
                    first,
                    original: None,
                },
                Media::Encoded { key, features } => MediaState {
                    key: *key,
                    tiles,
                    image: None,
                    pixels: Arc::new(Vec::new()),
                    in_flight: false,
                    done: tiles,
                    rows: Vec::new(),
                    features: Some(Arc::clone(features)),
                    first,
                    original: Some(m.clone()),
                },
            };
            media.push(state);
        }
        let ctx = self.manifest.decoder.max_context;
        let budget = params.forced.as_ref().map_or(params.max_new_tokens, Vec::len).min(ctx - ids.len());
        Ok(Sequence {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            prompt_len: ids.len(),
            ids,
            budget,
            media,
            image_cfg: cfg,
            stage: Stage::Queued,
            row: 0,
            keep: 0,
            sink,
            sampler: Sampler::new(params.sampling.clone()),
            answer: AnswerStream::new(self.manifest.tokenizer.answer.split_at.as_deref()),
            stops: StopFilter::new(&params.stop),
            params,
            generated: Vec::new(),
            forced_logits: Vec::new(),
            served: 0,
            started,
            preprocess_ms: ms(started),
            vision_ms: 0.0,
            prefill_ms: 0.0,
            first_token_ms: 0.0,
            decode_started: None,
            decode_steps: 0,
            last_token: None,
            stop_token: false,
            stop_string: false,
            silent: false,
        })
    }
}

impl Engine {
    pub fn new(model: Arc<Model>, cfg: EngineConfig) -> Result<Self> {
        ensure!(cfg.rows >= 1, "the engine needs at least one row");
        let cache = model.decoder.new_cache(cfg.rows)?;
        let rows = (0..cfg.rows).map(|_| Row::default()).collect();
        let (vision_jobs, jobs) = std::sync::mpsc::channel::<VisionJob>();
        let (done, vision_done) = std::sync::mpsc::channel();
        let worker = Arc::clone(&model);
        // Ends when the engine (the jobs' sender) is dropped.
        std::thread::Builder::new()
            .name("internvl-vision".into())
            .spawn(move || {
                for job in jobs {
                    let t = Instant::now();
                    let rows = vision_job(&worker, &job);
                    let done_job = VisionDone { seq: job.seq, image: job.image, tiles: job.tiles, rows, ms: ms(t) };
                    if done.send(done_job).is_err() {
                        return;
                    }
                }
            })
            .context("starting the vision thread")?;
        Ok(Self {
            model,
            cfg,
            vision_jobs,
            vision_done,
            cache,
            rows,
            active: Vec::new(),
            waiting: VecDeque::new(),
            steps: 0,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues a sequence; it starts when a row is free.
    pub fn submit(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
        self.gauges();
    }

    pub fn has_work(&self) -> bool {
        !self.active.is_empty() || !self.waiting.is_empty()
    }

    pub fn running(&self) -> usize {
        self.active.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a row's numbers are the same whatever it is computed with: tested for fp32; not so for
    /// int8 graphs, whose activations are quantised with one scale per tensor (ONNX Runtime's dynamic
    /// quantisation); int4 (MatMulNBits with int8 compute) is not measured, so treated as int8.
    pub fn rows_independent(&self) -> bool {
        self.model.manifest.dtype == "float32"
    }

    /// Whether this engine runs rows one at a time to keep answers equal to solo runs.
    fn solo_rows(&self) -> bool {
        self.cfg.exact && !self.rows_independent()
    }

    /// Bytes the KV cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// One round: cancellations, admissions, finished and new vision jobs, one decode step of every
    /// decoding sequence together, and one prefill chunk for one sequence.
    pub fn step(&mut self) {
        self.steps += 1;
        self.cancel_closed();
        self.admit();
        self.vision_results(None);
        self.dispatch_vision();
        let runnable = self.active.iter().any(|s| matches!(s.stage, Stage::Decode { .. } | Stage::Prefill { .. }));
        let encoding = self.active.iter().any(|s| s.media.iter().any(|m| m.in_flight));
        self.decode();
        self.prompt_work();
        if !runnable && encoding {
            // Only images being encoded: wait for the vision thread (briefly, so new requests and
            // cancellations are still seen) instead of spinning.
            self.vision_results(Some(std::time::Duration::from_millis(10)));
        }
        self.retire();
        self.gauges();
    }

    /// Takes what the vision thread finished (waiting up to `wait` for the first result).
    fn vision_results(&mut self, wait: Option<std::time::Duration>) {
        let mut first = match wait {
            Some(w) => self.vision_done.recv_timeout(w).ok(),
            None => None,
        };
        loop {
            let Some(done) = first.take().or_else(|| self.vision_done.try_recv().ok()) else { return };
            let Some(i) = self.active.iter().position(|s| s.id == done.seq && matches!(s.stage, Stage::Vision)) else {
                continue; // cancelled or failed meanwhile
            };
            let mut seq = self.active.swap_remove(i);
            if let Err(e) = self.vision_finished(&mut seq, done) {
                self.fail(&mut seq, e);
            }
            self.active.push(seq);
        }
    }

    fn vision_finished(&mut self, seq: &mut Sequence, done: VisionDone) -> Result<()> {
        let model = Arc::clone(&self.model);
        let m = &mut seq.media[done.image];
        m.in_flight = false;
        let (rows, tiled) = done.rows?;
        if let Some(tiles) = tiled {
            m.pixels = tiles;
            m.image = None;
        }
        seq.vision_ms += done.ms;
        metrics::counter!("internvl_vision_tiles_total").increment(done.tiles as u64);
        metrics::counter!("internvl_vision_milliseconds_total").increment(done.ms.round() as u64);
        if m.rows.is_empty() {
            m.rows = rows;
        } else {
            m.rows.extend_from_slice(&rows);
        }
        m.done += done.tiles;
        if m.done == m.tiles {
            let features = Arc::new(EncodedImage { tiles: m.tiles, rows: std::mem::take(&mut m.rows) });
            m.pixels = Arc::new(Vec::new());
            model.media_cache().insert(m.key, Arc::clone(&features));
            m.features = Some(features);
        }
        self.advance(seq)
    }

    /// Gives the vision thread the next batch of tiles of every sequence that has none there.
    fn dispatch_vision(&mut self) {
        let batch = self.cfg.vision_batch.max(1);
        let mut lost = None;
        for seq in &mut self.active {
            if !matches!(seq.stage, Stage::Vision) || seq.media.iter().any(|m| m.in_flight) {
                continue;
            }
            let Some((image, m)) =
                seq.media.iter_mut().enumerate().find(|(_, m)| m.features.is_none() && m.done < m.tiles)
            else {
                continue;
            };
            let tiles = batch.min(m.tiles - m.done);
            let source = match &m.image {
                Some(picture) => {
                    TileSource::Image { image: Arc::clone(picture), cfg: seq.image_cfg.clone(), count: m.tiles }
                }
                None => TileSource::Tiles(Arc::clone(&m.pixels)),
            };
            let job = VisionJob { seq: seq.id, image, source, start: m.done, tiles };
            if self.vision_jobs.send(job).is_err() {
                lost = Some(seq.id);
                break;
            }
            m.in_flight = true;
        }
        if let Some(id) = lost {
            if let Some(i) = self.active.iter().position(|s| s.id == id) {
                let mut seq = self.active.swap_remove(i);
                self.fail(&mut seq, anyhow!("internal error: the vision thread stopped"));
                self.active.push(seq);
            }
        }
    }

    /// Runs one request alone to its end, passing its text to `on_text` as it comes: what `run`, `chat`
    /// and the benchmarks do. An error from `on_text` cancels the request and is returned.
    pub fn generate(
        &mut self,
        content: Content,
        params: Params,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        let (tx, rx) = std::sync::mpsc::channel();
        let seq = self.model.start(content, params, Box::new(tx))?;
        self.submit(seq);
        let mut rx = Some(rx);
        let mut failure = None;
        while self.has_work() {
            self.step();
            let Some(events) = &rx else { continue };
            while let Ok(event) = events.try_recv() {
                match event {
                    Event::Text(piece) => {
                        if let Err(e) = on_text(&piece) {
                            failure = Some(e);
                            break;
                        }
                    }
                    Event::Done(out) => return Ok(*out),
                    Event::Error(e) => return Err(e),
                }
            }
            if failure.is_some() {
                rx = None; // the sequence sees its sink closed and is cancelled at the next step
            }
        }
        Err(failure.unwrap_or_else(|| anyhow!("internal error: the request ended without an answer")))
    }

    fn gauges(&self) {
        metrics::gauge!("internvl_requests_running").set(self.active.len() as f64);
        metrics::gauge!("internvl_requests_waiting").set(self.waiting.len() as f64);
        metrics::gauge!("internvl_kv_cache_bytes").set(self.cache.bytes() as f64);
    }

    fn cancel_closed(&mut self) {
        self.waiting.retain(|s| {
            let closed = s.sink.is_closed();
            if closed {
                metrics::counter!("internvl_requests_cancelled_total").increment(1);
            }
            !closed
        });
        for seq in &mut self.active {
            if !matches!(seq.stage, Stage::Finished) && seq.sink.is_closed() {
                metrics::counter!("internvl_requests_cancelled_total").increment(1);
                seq.stage = Stage::Finished;
                seq.silent = true;
            }
        }
    }

    /// Gives waiting sequences free rows, each the row whose cache shares the longest prefix with it.
    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            let free: Vec<usize> = (0..self.rows.len()).filter(|&r| !self.rows[r].busy).collect();
            if free.is_empty() {
                return;
            }
            let Some(mut seq) = self.waiting.pop_front() else { return };
            let (row, keep) = free
                .iter()
                .map(|&r| (r, self.shared_prefix(&seq, r)))
                .max_by_key(|&(r, keep)| (keep, std::cmp::Reverse(r)))
                .unwrap_or((free[0], 0));
            if let Err(e) = self.place(&mut seq, row, keep) {
                self.fail(&mut seq, e);
                self.reset_row(row);
                self.rows[row].busy = false; // the sequence never became active
                continue;
            }
            self.active.push(seq);
        }
    }

    /// Prompt positions of `seq` that row `r`'s cache already holds: equal ids, and the same images
    /// wherever those ids are image tokens.
    fn shared_prefix(&self, seq: &Sequence, r: usize) -> usize {
        if self.solo_rows() {
            return 0; // a partial prefill quantises differently from the whole prompt's
        }
        let row = &self.rows[r];
        let same = row.ids.iter().zip(&seq.ids[..seq.prompt_len]).take_while(|(a, b)| a == b).count();
        // Image tokens are the same ids for every image: the prefix ends at the first image that differs.
        let mut end = same;
        for (j, m) in seq.media.iter().enumerate() {
            if m.first >= end {
                break;
            }
            if row.media.get(j) != Some(&m.key) {
                end = m.first;
                break;
            }
        }
        // At least the last prompt position runs, for its logits.
        let mut keep = end.min(seq.prompt_len - 1);
        let after = self.model.manifest.decoder.long_rope_after;
        // LongRoPE: the reference runs a prompt past the switch point with the long factors throughout.
        if row.short_rope && after.is_some_and(|a| seq.prompt_len > a) {
            keep = 0;
        }
        keep
    }

    fn place(&mut self, seq: &mut Sequence, r: usize, keep: usize) -> Result<()> {
        let dec = &self.model.decoder;
        dec.truncate(&mut self.cache, r, keep)?;
        let row = &mut self.rows[r];
        row.busy = true;
        row.ids.truncate(keep);
        row.media = seq.media.iter().map(|m| m.key).collect();
        if keep == 0 {
            row.short_rope = self.model.manifest.decoder.long_rope_after.is_some_and(|a| seq.prompt_len <= a);
        }
        seq.row = r;
        seq.keep = keep;
        // Images wholly inside the kept prefix need no features.
        let per_tile = self.model.manifest.vision.tokens_per_tile;
        for m in &mut seq.media {
            if m.features.is_none() && m.first + m.tiles * per_tile <= keep {
                m.pixels = Arc::new(Vec::new());
                m.image = None;
                m.done = m.tiles;
            }
        }
        // Room for the answer up to the default answer length: a large max_new_tokens does not allocate
        // the whole context's cache for an answer that stops after a sentence; longer ones grow it.
        dec.reserve(&mut self.cache, seq.prompt_len + seq.budget.min(RESERVE_AHEAD))?;
        seq.stage = Stage::Vision;
        self.advance(seq)
    }

    /// Moves a sequence past the vision stage once every image it needs is encoded.
    fn advance(&mut self, seq: &mut Sequence) -> Result<()> {
        if !matches!(seq.stage, Stage::Vision) || seq.media.iter().any(|m| m.features.is_none() && m.done < m.tiles) {
            return Ok(());
        }
        let embeds = self.prompt_embeddings(seq)?;
        seq.stage = Stage::Prefill { embeds, done: 0 };
        Ok(())
    }

    /// Embeddings of the prompt positions from `keep` on: rows of the table for text, the images'
    /// features at their `<IMG_CONTEXT>` positions.
    fn prompt_embeddings(&self, seq: &Sequence) -> Result<Vec<f32>> {
        let m = &self.model;
        let hidden = m.manifest.decoder.hidden;
        let per_tile = m.manifest.vision.tokens_per_tile;
        let ids = &seq.ids[seq.keep..seq.prompt_len];
        let mut embeds = Vec::with_capacity(ids.len() * hidden);
        let mut run_start = 0;
        let mut image = 0;
        for (i, &id) in ids.iter().enumerate() {
            let pos = seq.keep + i;
            while image < seq.media.len() && pos >= seq.media[image].first + seq.media[image].tiles * per_tile {
                image += 1;
            }
            let Some(media) = seq.media.get(image).filter(|md| pos >= md.first) else { continue };
            m.embeddings.lookup_into(&ids[run_start..i], &mut embeds)?;
            run_start = i + 1;
            let features = media
                .features
                .as_ref()
                .ok_or_else(|| anyhow!("internal error: image {image} has no features at position {pos}"))?;
            let k = pos - media.first;
            ensure!(
                features.rows.len() == media.tiles * per_tile * hidden && id == m.manifest.tokenizer.img_context_id,
                "internal error: image {image} features do not match its tokens"
            );
            embeds.extend_from_slice(&features.rows[k * hidden..][..hidden]);
        }
        m.embeddings.lookup_into(&ids[run_start..], &mut embeds)?;
        Ok(embeds)
    }

    /// One decode step of every sequence with a sampled id to run, in one decoder call per LongRoPE
    /// factor set.
    fn decode(&mut self) {
        let after = self.model.manifest.decoder.long_rope_after;
        let decoding: Vec<usize> =
            (0..self.active.len()).filter(|&i| matches!(self.active[i].stage, Stage::Decode { .. })).collect();
        if decoding.is_empty() {
            return;
        }
        for long in [false, true] {
            let group: Vec<usize> = decoding
                .iter()
                .copied()
                .filter(|&i| after.is_some_and(|a| self.cache.len(self.active[i].row) + 1 > a) == long)
                .collect();
            if group.is_empty() {
                continue;
            }
            if self.solo_rows() {
                for i in group {
                    self.decode_group(&[i], long);
                }
            } else {
                self.decode_group(&group, long);
            }
        }
    }

    fn decode_group(&mut self, group: &[usize], long: bool) {
        let hidden = self.model.manifest.decoder.hidden;
        let mut embeds = Vec::with_capacity(group.len() * hidden);
        let mut nexts = Vec::with_capacity(group.len());
        for &i in group {
            let Stage::Decode { next } = self.active[i].stage else { continue };
            nexts.push(next);
        }
        let result = self.model.embeddings.lookup_into(&nexts, &mut embeds).and_then(|()| {
            let inputs: Vec<RowInput> = group
                .iter()
                .enumerate()
                .map(|(k, &i)| RowInput { row: self.active[i].row, embeds: &embeds[k * hidden..][..hidden] })
                .collect();
            self.model.decoder.step(&mut self.cache, &inputs, long)
        });
        match result {
            Ok(logits) => {
                for ((&i, next), mut logits) in group.iter().zip(nexts).zip(logits) {
                    let s = &mut self.active[i];
                    self.rows[s.row].ids.push(next);
                    s.decode_steps += 1;
                    let now = Instant::now();
                    if let Some(last) = s.last_token {
                        metrics::histogram!("internvl_inter_token_latency_seconds").record((now - last).as_secs_f64());
                    }
                    s.last_token = Some(now);
                    let model = Arc::clone(&self.model);
                    sample(&model, s, &mut logits);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                metrics::counter!("internvl_requests_failed_total").increment(group.len() as u64);
                for &i in group {
                    let row = self.active[i].row;
                    self.reset_row(row);
                    let s = &mut self.active[i];
                    let _ = s.sink.send(Event::Error(anyhow!("{msg}")));
                    s.stage = Stage::Finished;
                    s.silent = true;
                }
            }
        }
    }

    /// One prefill chunk, for the sequence that waited longest for one.
    fn prompt_work(&mut self) {
        let Some(i) = (0..self.active.len())
            .filter(|&i| matches!(self.active[i].stage, Stage::Prefill { .. }))
            .min_by_key(|&i| (self.active[i].served, self.active[i].id))
        else {
            return;
        };
        let mut seq = self.active.swap_remove(i);
        seq.served = self.steps;
        let result = self.prefill_work(&mut seq);
        if let Err(e) = result {
            self.fail(&mut seq, e);
        }
        self.active.push(seq);
    }

    fn prefill_work(&mut self, seq: &mut Sequence) -> Result<()> {
        let hidden = self.model.manifest.decoder.hidden;
        let Stage::Prefill { embeds, done } = &mut seq.stage else { return Ok(()) };
        let total = embeds.len() / hidden;
        let n = self.cfg.prefill_chunk.max(1).min(total - *done);
        // transformers picks LongRoPE's factor set once per forward call, from its last position: every
        // chunk of the prompt uses the choice the whole prompt gets.
        let long = self.model.manifest.decoder.long_rope_after.is_some_and(|a| seq.prompt_len > a);
        let t = Instant::now();
        let input = RowInput { row: seq.row, embeds: &embeds[*done * hidden..][..n * hidden] };
        let result = self.model.decoder.step(&mut self.cache, &[input], long);
        seq.prefill_ms += ms(t);
        let mut logits = match result {
            Ok(mut l) => l.remove(0),
            Err(e) => {
                self.reset_row(seq.row);
                return Err(e);
            }
        };
        let start = seq.keep + *done;
        self.rows[seq.row].ids.extend_from_slice(&seq.ids[start..start + n]);
        *done += n;
        if *done == total {
            seq.stage = Stage::Finished; // replaced by what sampling decides
            metrics::counter!("internvl_prompt_tokens_total").increment(seq.prompt_len as u64);
            let model = Arc::clone(&self.model);
            sample(&model, seq, &mut logits);
        }
        Ok(())
    }

    /// Forgets what a row's cache holds (its state after a failed call is unknown).
    fn reset_row(&mut self, r: usize) {
        self.rows[r].ids.clear();
        self.rows[r].media.clear();
        let _ = self.model.decoder.truncate(&mut self.cache, r, 0);
    }

    fn fail(&mut self, seq: &mut Sequence, e: anyhow::Error) {
        if !matches!(seq.stage, Stage::Queued) {
            self.reset_row(seq.row);
        }
        metrics::counter!("internvl_requests_failed_total").increment(1);
        let _ = seq.sink.send(Event::Error(e));
        seq.stage = Stage::Finished;
        seq.silent = true;
    }

    /// Ends finished sequences: the rest of the text, the output, the row freed.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if !matches!(self.active[i].stage, Stage::Finished) {
                i += 1;
                continue;
            }
            let mut seq = self.active.swap_remove(i);
            let row = seq.row;
            // The row's cache holds exactly `rows[row].ids`: the next request may reuse that prefix.
            self.rows[row].busy = false;
            if seq.silent {
                continue; // failed (the error was sent) or cancelled
            }
            match finish(&self.model, &mut seq) {
                Ok(out) => {
                    let _ = seq.sink.send(Event::Done(Box::new(out)));
                }
                Err(e) => {
                    let _ = seq.sink.send(Event::Error(e));
                }
            }
        }
    }
}

/// Picks the next id from `logits` and decides what the sequence does next: stop, or run that id.
fn sample(model: &Model, seq: &mut Sequence, logits: &mut [f32]) {
    let id = match &seq.params.forced {
        Some(ids) => {
            if seq.params.keep_logits {
                seq.forced_logits.push(logits.to_vec());
            }
            ids[seq.generated.len()]
        }
        // Rows past the tokenizer's ids (a vocabulary padded beyond it, as Qwen2.5's 151936 rows over 151665
        // ids) name no token: never pick one (vLLM slices them off too); decoding one would fail the request.
        None => {
            let ids = model.manifest.tokenizer.vocab_size.min(logits.len());
            seq.sampler.next(&mut logits[..ids], &seq.ids)
        }
    };
    if seq.generated.is_empty() {
        seq.first_token_ms = ms(seq.started);
        seq.decode_started = Some(Instant::now());
        seq.last_token = seq.decode_started;
        metrics::histogram!("internvl_time_to_first_token_seconds").record(seq.first_token_ms / 1e3);
    }
    let stop_ids = &model.manifest.tokenizer.stop_ids;
    if !seq.params.ignore_eos && seq.params.forced.is_none() && stop_ids.contains(&id) {
        seq.stage = Stage::Finished;
        seq.stop_token = true;
        return;
    }
    seq.generated.push(id);
    seq.ids.push(id);
    metrics::counter!("internvl_generated_tokens_total").increment(1);
    let piece = match seq.answer.push(&model.tokenizer, id) {
        Ok(p) => p,
        Err(e) => {
            let _ = seq.sink.send(Event::Error(e));
            seq.stage = Stage::Finished;
            seq.silent = true;
            return;
        }
    };
    if let Some(piece) = piece {
        let (shown, hit) = seq.stops.push(&piece);
        if let Some(shown) = shown {
            if !seq.sink.send(Event::Text(shown)) {
                metrics::counter!("internvl_requests_cancelled_total").increment(1);
                seq.stage = Stage::Finished;
                seq.silent = true;
                return;
            }
        }
        if hit {
            seq.stage = Stage::Finished;
            seq.stop_string = true;
            return;
        }
    }
    // The last id is not run: the next turn re-tokenises the answer anyway.
    seq.stage = if seq.generated.len() >= seq.budget { Stage::Finished } else { Stage::Decode { next: id } };
}

/// The output of a finished sequence, after the last of its text was sent.
fn finish(model: &Model, seq: &mut Sequence) -> Result<Output> {
    let (rest, mut text) = seq.answer.finish(&model.tokenizer)?;
    if !seq.stop_string {
        if let Some(rest) = rest {
            let (shown, hit) = seq.stops.push(&rest);
            if let Some(shown) = shown {
                seq.sink.send(Event::Text(shown));
            }
            seq.stop_string = hit;
        }
        if !seq.stop_string {
            if let Some(shown) = seq.stops.finish() {
                seq.sink.send(Event::Text(shown));
            }
        }
    }
    if seq.stop_string {
        text = answer_text(seq.stops.text(), model.manifest.tokenizer.answer.split_at.as_deref());
    }
    let decode_ms = seq.decode_started.map_or(0.0, ms);
    let prefilled = seq.prompt_len - seq.keep;
    metrics::histogram!("internvl_e2e_request_latency_seconds").record(ms(seq.started) / 1e3);
    let finish_reason = if seq.stop_token || seq.stop_string { FinishReason::Stop } else { FinishReason::Length };
    Ok(Output {
        text,
        prompt_tokens: seq.prompt_len,
        cached_tokens: seq.keep,
        generated_tokens: seq.generated.len(),
        token_ids: std::mem::take(&mut seq.generated),
        tiles: seq.tiles(),
        finish_reason,
        logits: std::mem::take(&mut seq.forced_logits),
        // (An image wholly inside a reused prefix has no features here and is left out: only a request
        // that is not a conversation's next turn has one.)
        media: seq
            .media
            .iter()
            .filter_map(|m| match &m.features {
                Some(features) => Some(Media::Encoded { key: m.key, features: Arc::clone(features) }),
                None => m.original.clone(),
            })
            .collect(),
        timings: Timings {
            load_ms: model.load_ms,
            preprocess_ms: seq.preprocess_ms,
            vision_ms: seq.vision_ms,
            prefill_ms: seq.prefill_ms,
            first_token_ms: seq.first_token_ms,
            decode_ms,
            prefill_tokens_per_s: prefilled as f64 / (seq.prefill_ms / 1e3),
            decode_tokens_per_s: seq.decode_steps as f64 / (decode_ms / 1e3),
        },
    })
}
