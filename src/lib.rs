//! InternVL on ONNX Runtime: a shared model, sequences, and an engine that steps them; one module per
//! stage.
//!
//! ```text
//! engine::media (image bytes -> pixels, cached features) -> image::preprocess (tiles) -> vision
//! prompt (template, <image> expansion) -> embed (token rows) -> decoder (prefill chunks, batched steps)
//! -> sampling -> tokenizer::AnswerStream (text pieces)
//! ```
//! [`Model`] is loaded once and shared (`&self`); [`Model::start`] turns a request into a [`Sequence`];
//! an [`Engine`] steps sequences together (continuous batching). `src/main.rs` is only the command line
//! and `internvl serve`.

pub mod decoder;
pub mod embed;
pub mod engine;
pub mod error;
pub mod files;
pub mod image;
pub mod kernels;
pub mod manifest;
pub mod model;
pub mod npy;
pub mod prompt;
pub mod runtime;
pub mod sampling;
pub mod server;
pub mod tokenizer;
pub mod video;
pub mod vision;

pub use engine::media::Media;
pub use engine::{Content, Conversation, Engine, EngineConfig, Event, FinishReason, Output, Params, Sequence, Sink};
pub use model::Model;
