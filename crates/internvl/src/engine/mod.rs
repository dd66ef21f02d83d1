//! The engine: steps many sequences through one loaded [`Model`], continuously batched.
//!
//! Every [`Engine::step`] runs the decode step of every decoding sequence as one call of the decoder
//! (one row of the shared KV cache each, at its own length), then one prefill chunk of one sequence,
//! round robin. Images are encoded on the [`vision_worker`] thread, a batch of tiles per job and one job
//! per image at a time (so several images take turns), while the engine thread goes on decoding and
//! prefilling: a text-only request arriving meanwhile gets its first token after its own prefill.
//!
//! The decisions (which row, which prefix, which prefill, which rows per decoder call) are the
//! [`scheduler`]'s, as plain data; a [`Sequence`]'s transitions are its own methods; this module carries
//! them out against the model's graphs.
//!
//! A sequence's greedy answer does not depend on what runs beside it in fp32 (each row's attention and
//! GEMM rows are computed as alone); int8 graphs quantise activations per tensor, so a row's result can
//! depend on its batch (see README, "Serving").

pub mod conversation;
mod output;
pub mod scheduler;
mod sequence;
mod vision_worker;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};

use crate::model::decoder::{KvCache, RowInput};
use crate::model::Model;
pub use crate::model::{Content, Params};
pub use conversation::Conversation;
pub use output::{Event, FinishReason, Output, Sink, Timings};
use scheduler::{Placement, Prompt, Scheduler};
use sequence::Phase;
pub use sequence::Sequence;
use vision_worker::{TileSource, VisionDone, VisionJob, VisionWorker};

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
            vision_batch: crate::model::vision::DEFAULT_BATCH,
            prefill_chunk: crate::model::decoder::DEFAULT_PREFILL_CHUNK,
            exact: false,
        }
    }
}

pub struct Engine {
    model: Arc<Model>,
    cfg: EngineConfig,
    vision: VisionWorker,
    cache: KvCache,
    scheduler: Scheduler,
    active: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    steps: u64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Engine {
    pub fn new(model: Arc<Model>, cfg: EngineConfig) -> Result<Self> {
        ensure!(cfg.rows >= 1, "the engine needs at least one row");
        let cache = model.decoder.new_cache(cfg.rows)?;
        let solo = cfg.exact && !model.manifest.dtype.rows_independent();
        let scheduler = Scheduler::new(cfg.rows, solo, model.manifest.decoder.long_rope_after);
        let vision = VisionWorker::spawn(Arc::clone(&model))?;
        Ok(Self { model, cfg, vision, cache, scheduler, active: Vec::new(), waiting: VecDeque::new(), steps: 0 })
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

    /// Whether a row's numbers are the same whatever it is computed with (see
    /// [`crate::manifest::Dtype::rows_independent`]).
    pub fn rows_independent(&self) -> bool {
        self.model.manifest.dtype.rows_independent()
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
        let runnable = self.active.iter().any(|s| matches!(s.phase, Phase::Decode { .. } | Phase::Prefill { .. }));
        let encoding = self.active.iter().any(|s| s.media.iter().any(|m| m.in_flight));
        self.decode();
        self.prompt_work();
        if !runnable && encoding {
            // Only images being encoded: wait for the vision thread (briefly, so new requests and
            // cancellations are still seen) instead of spinning.
            self.vision_results(Some(Duration::from_millis(10)));
        }
        self.retire();
        self.gauges();
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
        let request = self.model.prepare(content, params)?;
        self.submit(Sequence::new(&self.model, request, Box::new(tx)));
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
            seq.cancel_if_closed();
        }
    }

    /// Gives waiting sequences free rows, each the row whose cache shares the longest prefix with it.
    fn admit(&mut self) {
        while let Some(seq) = self.waiting.front() {
            let images: Vec<_> = seq.media.iter().map(|m| (m.first, m.key)).collect();
            let prompt = Prompt { ids: &seq.ids[..seq.prompt_len], images: &images };
            let Some(placement) = self.scheduler.admit(&prompt) else { return };
            let Some(mut seq) = self.waiting.pop_front() else { return };
            if let Err(e) = self.place(&mut seq, placement) {
                seq.fail(e);
                self.forget_row(placement.row);
                self.scheduler.release(placement.row); // the sequence never became active
                continue;
            }
            self.active.push(seq);
        }
    }

    /// Starts `seq` on its row: the cache cut to the kept prefix and sized for the answer.
    fn place(&mut self, seq: &mut Sequence, Placement { row, keep }: Placement) -> Result<()> {
        let dec = &self.model.decoder;
        dec.truncate(&mut self.cache, row, keep)?;
        seq.row = row;
        seq.keep = keep;
        // Images wholly inside the kept prefix need no features.
        let per_tile = self.model.manifest.vision.tokens_per_tile;
        for m in &mut seq.media {
            if m.features.is_none() && m.first + m.tiles * per_tile <= keep {
                m.skip();
            }
        }
        dec.reserve(&mut self.cache, scheduler::reserve(seq.prompt_len, seq.budget))?;
        seq.phase = Phase::Vision;
        self.advance(seq)
    }

    /// Moves a sequence past the vision phase once every image it needs is encoded.
    fn advance(&self, seq: &mut Sequence) -> Result<()> {
        if !matches!(seq.phase, Phase::Vision) || seq.media.iter().any(|m| m.pending()) {
            return Ok(());
        }
        let embeds = self.model.prompt_embeddings(&seq.ids[..seq.prompt_len], seq.keep, &seq.image_rows())?;
        seq.phase = Phase::Prefill { embeds, done: 0 };
        Ok(())
    }

    /// Takes what the vision thread finished (waiting up to `wait` for the first result).
    fn vision_results(&mut self, wait: Option<Duration>) {
        let mut first = self.vision.finished(wait);
        loop {
            let Some(done) = first.take().or_else(|| self.vision.finished(None)) else { return };
            let Some(i) = self.active.iter().position(|s| s.id == done.seq && matches!(s.phase, Phase::Vision)) else {
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
        let m = &mut seq.media[done.image];
        m.in_flight = false;
        let (rows, tiled) = done.rows?;
        if let Some(tiles) = tiled {
            m.pixels = tiles;
            m.image = None;
        }
        seq.clock.vision_ms += done.ms;
        metrics::counter!("internvl_vision_tiles_total").increment(done.tiles as u64);
        metrics::counter!("internvl_vision_milliseconds_total").increment(done.ms.round() as u64);
        if let Some(features) = m.add_rows(rows, done.tiles) {
            self.model.media_cache().insert(m.key, features);
        }
        self.advance(seq)
    }

    /// Gives the vision thread the next batch of tiles of every sequence that has none there.
    fn dispatch_vision(&mut self) {
        let batch = self.cfg.vision_batch.max(1);
        let mut lost = None;
        for seq in &mut self.active {
            if !matches!(seq.phase, Phase::Vision) || seq.media.iter().any(|m| m.in_flight) {
                continue;
            }
            let Some((image, m)) = seq.media.iter_mut().enumerate().find(|(_, m)| m.pending()) else { continue };
            let tiles = batch.min(m.tiles - m.done);
            let source = match &m.image {
                Some(picture) => {
                    TileSource::Image { image: Arc::clone(picture), cfg: seq.image_cfg.clone(), count: m.tiles }
                }
                None => TileSource::Tiles(Arc::clone(&m.pixels)),
            };
            if !self.vision.send(VisionJob { seq: seq.id, image, source, start: m.done, tiles }) {
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

    /// One decode step of every sequence with a sampled id to run, in the scheduler's decoder calls.
    fn decode(&mut self) {
        let decoding: Vec<(usize, usize)> = (0..self.active.len())
            .filter(|&i| matches!(self.active[i].phase, Phase::Decode { .. }))
            .map(|i| (i, self.cache.len(self.active[i].row)))
            .collect();
        for (group, long) in self.scheduler.decode_groups(&decoding) {
            self.decode_group(&group, long);
        }
    }

    fn decode_group(&mut self, group: &[usize], long: bool) {
        let hidden = self.model.manifest.decoder.hidden;
        let mut embeds = Vec::with_capacity(group.len() * hidden);
        let nexts: Vec<u32> = group
            .iter()
            .filter_map(|&i| match self.active[i].phase {
                Phase::Decode { next } => Some(next),
                _ => None,
            })
            .collect();
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
                    self.scheduler.ran(s.row, &[next]);
                    s.stepped();
                    s.sample(&self.model, &mut logits);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for &i in group {
                    let row = self.active[i].row;
                    self.forget_row(row);
                    self.active[i].fail(anyhow!("{msg}"));
                }
            }
        }
    }

    /// One prefill chunk, for the sequence that waited longest for one.
    fn prompt_work(&mut self) {
        let candidates = self.active.iter().enumerate().filter(|(_, s)| matches!(s.phase, Phase::Prefill { .. }));
        let Some(i) = scheduler::next_prefill(candidates.map(|(i, s)| (i, s.served, s.id))) else { return };
        let mut seq = self.active.swap_remove(i);
        seq.served = self.steps;
        if let Err(e) = self.prefill_chunk(&mut seq) {
            self.fail(&mut seq, e);
        }
        self.active.push(seq);
    }

    fn prefill_chunk(&mut self, seq: &mut Sequence) -> Result<()> {
        let hidden = self.model.manifest.decoder.hidden;
        let Phase::Prefill { embeds, done } = &mut seq.phase else { return Ok(()) };
        let total = embeds.len() / hidden;
        let n = self.cfg.prefill_chunk.max(1).min(total - *done);
        // transformers picks LongRoPE's factor set once per forward call, from its last position: every
        // chunk of the prompt uses the choice the whole prompt gets.
        let long = self.scheduler.long_rope(seq.prompt_len);
        let t = Instant::now();
        let input = RowInput { row: seq.row, embeds: &embeds[*done * hidden..][..n * hidden] };
        let result = self.model.decoder.step(&mut self.cache, &[input], long);
        seq.clock.prefill_ms += ms(t);
        let mut logits = match result {
            Ok(mut l) => l.remove(0),
            Err(e) => {
                self.forget_row(seq.row);
                return Err(e);
            }
        };
        let start = seq.keep + *done;
        self.scheduler.ran(seq.row, &seq.ids[start..start + n]);
        *done += n;
        if *done == total {
            metrics::counter!("internvl_prompt_tokens_total").increment(seq.prompt_len as u64);
            seq.sample(&self.model, &mut logits);
        }
        Ok(())
    }

    /// Forgets what a row's cache holds (its state after a failed call is unknown).
    fn forget_row(&mut self, r: usize) {
        self.scheduler.forget(r);
        let _ = self.model.decoder.truncate(&mut self.cache, r, 0);
    }

    fn fail(&mut self, seq: &mut Sequence, e: anyhow::Error) {
        if !matches!(seq.phase, Phase::Queued) {
            self.forget_row(seq.row);
        }
        seq.fail(e);
    }

    /// Ends finished sequences: the rest of the text, the output, the row freed.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let Phase::Done(end) = self.active[i].phase else {
                i += 1;
                continue;
            };
            let mut seq = self.active.swap_remove(i);
            // The row's cache holds exactly the ids the scheduler recorded: the next request may reuse them.
            self.scheduler.release(seq.row);
            if end.silent() {
                continue; // failed (the error was sent) or cancelled
            }
            let event = match seq.output(&self.model, end) {
                Ok(out) => Event::Done(Box::new(out)),
                Err(e) => Event::Error(e),
            };
            let _ = seq.sink.send(event);
        }
    }
}
