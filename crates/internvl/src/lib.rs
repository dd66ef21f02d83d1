//! InternVL on ONNX Runtime, as a library: what is computed apart from who runs it when.
//!
//! ```text
//! media   (image bytes -> pixels -> tiles; video frames; the vision-feature cache)
//! text    (chat template, <image> expansion, tokenizer, answer stream)
//!   ^ both below everything else, importing neither model nor engine
//! model   (Model: manifest, tokenizer and the stages: vision, token embeddings, decoder + KV cache)
//! engine  (Engine: sequences stepped together; scheduler = pure decisions, vision worker, Sequence)
//! ```
//! [`Model`] is loaded once and shared (`&self`); [`Model::prepare`] checks and tokenises a request, and
//! [`Sequence::new`] makes it a [`Sequence`];
//! an [`Engine`] steps sequences together (continuous batching). [`limits`] holds every request bound
//! the command line, the server and the engine check; [`notice`] carries what a front end may want to
//! show (the library never prints). The command line is the `internvl-cli` crate, the HTTP server
//! `internvl-server`.

pub mod cancel;
pub mod engine;
pub mod error;
pub mod files;
pub mod kernels;
pub mod limits;
pub mod manifest;
pub mod media;
pub mod model;
pub mod notice;
pub mod npy;
pub mod runtime;
pub mod sampling;
pub mod text;

pub use engine::{Content, Conversation, Engine, EngineConfig, Event, FinishReason, Output, Params, Sequence, Sink};
pub use media::Media;
pub use model::Model;
