//! The decoder's input rows for a prompt: rows of the token-embedding table for text, an image's vision
//! features at its `<IMG_CONTEXT>` positions (what the reference's `model.chat()` does with
//! `input_embeds[selected] = vit_embeds`).

use anyhow::{anyhow, ensure, Result};

use super::Model;
use crate::media::EncodedImage;

/// One image's place in the prompt and its features (None where they are not needed: wholly inside a
/// prefix already in the cache).
pub struct ImageRows<'a> {
    pub first: usize,
    pub tiles: usize,
    pub features: Option<&'a EncodedImage>,
}

impl Model {
    /// Input rows of prompt positions `from..ids.len()`, `hidden` floats each.
    pub fn prompt_embeddings(&self, ids: &[u32], from: usize, images: &[ImageRows]) -> Result<Vec<f32>> {
        let hidden = self.manifest.decoder.hidden;
        let per_tile = self.manifest.vision.tokens_per_tile;
        let ids_from = ids.get(from..).ok_or_else(|| anyhow!("internal error: prompt position {from} past its end"))?;
        let mut embeds = Vec::with_capacity(ids_from.len() * hidden);
        let mut run_start = 0;
        let mut image = 0;
        for (i, &id) in ids_from.iter().enumerate() {
            let pos = from + i;
            while image < images.len() && pos >= images[image].first + images[image].tiles * per_tile {
                image += 1;
            }
            let Some(rows) = images.get(image).filter(|r| pos >= r.first) else { continue };
            self.embeddings.lookup_into(&ids_from[run_start..i], &mut embeds)?;
            run_start = i + 1;
            let features = rows
                .features
                .ok_or_else(|| anyhow!("internal error: image {image} has no features at position {pos}"))?;
            let k = pos - rows.first;
            ensure!(
                features.rows.len() == rows.tiles * per_tile * hidden && id == self.manifest.tokenizer.img_context_id,
                "internal error: image {image} features do not match its tokens"
            );
            embeds.extend_from_slice(&features.rows[k * hidden..][..hidden]);
        }
        self.embeddings.lookup_into(&ids_from[run_start..], &mut embeds)?;
        Ok(embeds)
    }
}
