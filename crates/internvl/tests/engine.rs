//! The engine below the server: more requests than rows wait and then run, each answer equal to the same
//! request alone; a request whose listener goes away is cancelled and frees its row; a request that
//! cannot fit is refused by `Model::prepare` as bad input, before any work.

mod common;

use std::sync::mpsc;
use std::sync::Arc;

use common::*;
use internvl::error::ErrorKind;
use internvl::{Content, Engine, EngineConfig, Event, Media, Model, Output, Params, Sequence, Sink};

fn model() -> Arc<Model> {
    Arc::new(Model::load(&fixtures().join("model"), &Default::default()).unwrap())
}

fn content(question: &str, image: Option<&str>) -> Content {
    let images = image.map(|p| Media::load(&fixtures().join("images").join(p), false).unwrap()).into_iter().collect();
    Content { question: question.to_string(), images, ..Content::default() }
}

fn solo(model: &Arc<Model>, question: &str, image: Option<&str>, tokens: usize) -> Output {
    let mut engine = Engine::new(Arc::clone(model), EngineConfig::default()).unwrap();
    engine.generate(content(question, image), Params::new(tokens), &mut |_| Ok(())).unwrap()
}

/// Events of one sequence, and a switch that makes it look gone.
struct Probe {
    tx: mpsc::Sender<Event>,
    gone: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink for Probe {
    fn send(&mut self, event: Event) -> bool {
        !self.is_closed() && self.tx.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn done(rx: &mpsc::Receiver<Event>) -> Option<Output> {
    rx.try_iter().find_map(|e| match e {
        Event::Done(out) => Some(*out),
        Event::Error(e) => panic!("{e:#}"),
        Event::Text(_) => None,
    })
}

#[test]
fn requests_beyond_the_rows_wait_and_each_answer_equals_its_solo_run() {
    let model = model();
    let jobs = [
        ("Describe the image.", Some("448x448_1.png")),
        ("Tell me a story.", None),
        ("What is this?", Some("800x600_3.png")),
    ];
    let want: Vec<Output> = jobs.iter().map(|&(q, i)| solo(&model, q, i, 12)).collect();
    let mut engine = Engine::new(Arc::clone(&model), EngineConfig { rows: 2, ..EngineConfig::default() }).unwrap();
    let mut rxs = Vec::new();
    for &(q, i) in &jobs {
        let (tx, rx) = mpsc::channel();
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let request = model.prepare(content(q, i), Params::new(12)).unwrap();
        engine.submit(Sequence::new(&model, request, Box::new(Probe { tx, gone })));
        rxs.push(rx);
    }
    engine.step();
    assert_eq!((engine.running(), engine.waiting()), (2, 1), "two rows: the third request waits");
    let mut got: Vec<Option<Output>> = vec![None, None, None];
    let mut steps = 0;
    while engine.has_work() {
        engine.step();
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
        for (k, rx) in rxs.iter().enumerate() {
            if let Some(out) = done(rx) {
                got[k] = Some(out);
            }
        }
    }
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let g = g.as_ref().unwrap_or_else(|| panic!("request {k} gave no output"));
        assert_eq!((&g.token_ids, &g.text), (&w.token_ids, &w.text), "request {k} differs from its solo run");
        assert_eq!(g.prompt_tokens, w.prompt_tokens);
    }
}

#[test]
fn a_request_whose_listener_leaves_is_cancelled_and_frees_its_row() {
    let model = model();
    let mut engine = Engine::new(Arc::clone(&model), EngineConfig { rows: 1, ..EngineConfig::default() }).unwrap();
    let (tx, rx) = mpsc::channel();
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = Probe { tx, gone: Arc::clone(&gone) };
    let request = model.prepare(content("Go on forever.", None), Params::new(5000)).unwrap();
    engine.submit(Sequence::new(&model, request, Box::new(probe)));
    for _ in 0..5 {
        engine.step();
    }
    assert!(rx.try_iter().any(|e| matches!(e, Event::Text(_))), "no text before leaving");
    gone.store(true, std::sync::atomic::Ordering::Relaxed);
    engine.step();
    assert_eq!(engine.running(), 0, "the cancelled request still holds its row");
    let want = solo(&model, "Tell me a story.", None, 8);
    let got = engine.generate(content("Tell me a story.", None), Params::new(8), &mut |_| Ok(())).unwrap();
    assert_eq!(got.token_ids, want.token_ids, "the freed row answers the next request as a fresh one would");
}

#[test]
fn a_request_too_long_for_the_context_is_bad_input_before_any_work() {
    let model = model();
    let long = "word ".repeat(model.manifest.decoder.max_context + 10);
    let err = model.prepare(content(&long, None), Params::new(4)).expect_err("refused");
    assert_eq!(ErrorKind::of(&err), ErrorKind::Input, "{err:#}");
    assert!(format!("{err:#}").contains("context"), "{err:#}");
    assert!(internvl::error::is_context_overflow(&err), "not typed as a context overflow: {err:#}");
    let params = Params { max_tiles: Some(0), ..Params::new(4) };
    let err = model.prepare(content("x", Some("448x448_1.png")), params).expect_err("refused");
    assert_eq!(ErrorKind::of(&err), ErrorKind::Usage, "{err:#}");
}
