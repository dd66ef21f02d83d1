//! The engine thread: it owns the [`Engine`], takes the sequences request handlers prepared, and steps
//! them together; a sequence's events go back through its [`ChannelSink`].

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{Context, Result};
use internvl::engine::{Engine, EngineConfig, Event, Sequence, Sink};
use internvl::model::Model;
use tokio::sync::mpsc as tmpsc;

use crate::state::AppState;

/// A sequence's events into a tokio channel; closed when the request's handler or stream is dropped.
pub(crate) struct ChannelSink(pub(crate) tmpsc::UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub(crate) fn start_engine(state: &Arc<AppState>) -> Result<()> {
    let cfg = &state.cfg;
    let model = Arc::new(Model::load(&cfg.model, &cfg.runtime)?);
    model.set_media_cache_bytes(cfg.media_cache_bytes);
    let engine = Engine::new(
        Arc::clone(&model),
        EngineConfig {
            rows: cfg.parallel,
            vision_batch: cfg.vision_batch,
            prefill_chunk: cfg.prefill_chunk,
            exact: cfg.exact,
        },
    )?;
    let (tx, rx) = mpsc::channel::<Sequence>();
    *state.submit.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    let beat = Arc::clone(state);
    std::thread::Builder::new()
        .name("internvl-engine".into())
        .spawn(move || engine_loop(engine, rx, &beat))
        .context("starting the engine thread")?;
    let _ = state.model.set(model);
    Ok(())
}

/// The engine thread: takes new sequences, steps while there is work, waits (with a heartbeat) when idle.
fn engine_loop(mut engine: Engine, rx: mpsc::Receiver<Sequence>, state: &AppState) {
    loop {
        state.heartbeat.store(state.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        while let Ok(seq) = rx.try_recv() {
            engine.submit(seq);
        }
        if engine.has_work() {
            engine.step();
            continue;
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(seq) => engine.submit(seq),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
