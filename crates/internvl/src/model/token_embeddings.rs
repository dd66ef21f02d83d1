//! Token embedding rows read straight from `embed_tokens.bin` (float32 `[vocab, hidden]`).
//!
//! Positioned reads of only the rows a prompt uses: the table (545 MB for a 0.5B LLM) is never
//! copied into RAM and needs no ONNX session.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::manifest::Manifest;

pub struct Embeddings {
    file: File,
    path: PathBuf,
    vocab: usize,
    pub hidden: usize,
}

impl Embeddings {
    pub fn open(m: &Manifest) -> Result<Self> {
        let path = m.path(&m.embed.file);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, path, vocab: m.embed.vocab, hidden: m.embed.hidden })
    }

    /// Appends the embeddings of `ids` to `out` (row-major, `hidden` floats per id).
    pub fn lookup_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let row_bytes = self.hidden * 4;
        let mut buf = vec![0u8; row_bytes];
        out.reserve(ids.len() * self.hidden);
        for &id in ids {
            ensure!((id as usize) < self.vocab, "token id {id} outside the embedding table ({})", self.vocab);
            self.file
                .read_exact_at(&mut buf, id as u64 * row_bytes as u64)
                .with_context(|| format!("reading row {id} of {}", self.path.display()))?;
            out.extend(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Ok(())
    }
}
