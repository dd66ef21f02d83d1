//! InternVL on ONNX Runtime: the pipeline a request flows through, one module per stage.
//!
//! ```text
//! image::load_image -> image::preprocess (tiles) -> vision (image embeddings)
//! prompt (template, <image> expansion) -> embed (token rows) -> decoder (prefill, KV-cache steps)
//! -> sampling -> tokenizer::AnswerStream (text pieces)
//! ```
//! [`pipeline::InternVL`] ties them together; `src/main.rs` is only the command line.

pub mod bench;
pub mod decoder;
pub mod embed;
pub mod error;
pub mod files;
pub mod image;
pub mod kernels;
pub mod manifest;
pub mod npy;
pub mod pipeline;
pub mod prompt;
pub mod runtime;
pub mod sampling;
pub mod tokenizer;
pub mod vision;

pub use pipeline::{InternVL, Output, Request};
