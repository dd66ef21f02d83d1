//! What a request shows the model: images ([`image`]: decoding as Pillow does, tiling, normalising),
//! video frames ([`video`]), the [`Media`] an engine takes, and the vision-feature cache that lets a
//! repeated image skip decoding, tiling and the vision graph.
//!
//! An image is known by the SHA-256 of its file's bytes plus the tile limit it was tiled with (the rest
//! of the tiling and the vision graph are fixed by the loaded model folder), so two requests that send
//! the same file share one encoding, and a changed byte is a new image.

pub mod image;
pub mod video;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ::image::RgbImage;
use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};

use crate::error::{ErrorKind, WithKind};
use crate::media::image::decode_image;

/// What identifies an image's vision features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MediaKey {
    pub sha256: [u8; 32],
    pub max_tiles: u32,
}

/// Vision features of one image: `tiles * tokens_per_tile` rows of `hidden` floats.
#[derive(Debug)]
pub struct EncodedImage {
    pub tiles: usize,
    pub rows: Vec<f32>,
}

/// One image of a request: decoded pixels still to be encoded, or features already encoded (a cache hit,
/// or an earlier turn of a conversation).
#[derive(Debug, Clone)]
pub enum Media {
    Pixels { sha256: [u8; 32], image: Arc<RgbImage> },
    Encoded { key: MediaKey, features: Arc<EncodedImage> },
}

impl Media {
    /// Decodes an image file's bytes as Pillow does (`apply_exif`: then `ImageOps.exif_transpose`).
    pub fn decode(bytes: &[u8], apply_exif: bool) -> Result<Self> {
        let image = decode_image(bytes, apply_exif).kind(ErrorKind::Input)?;
        Ok(Media::Pixels { sha256: sha256(bytes), image: Arc::new(image) })
    }

    /// [`Media::decode`] of a file read with the image size bound; errors name the file.
    pub fn load(path: &Path, apply_exif: bool) -> Result<Self> {
        let bytes =
            crate::files::read_limited(path, crate::files::MAX_IMAGE_FILE, "image file").kind(ErrorKind::Input)?;
        if bytes.is_empty() {
            return Err(anyhow!("image file is empty (0 bytes): {}", path.display())).kind(ErrorKind::Input);
        }
        Self::decode(&bytes, apply_exif)
            .map_err(|e| anyhow!("cannot load image {}: {}", path.display(), format!("{e:#}").replace('\n', " ")))
            .kind(ErrorKind::Input)
    }

    /// A decoded video frame: known by the SHA-256 of its pixels (and size), so a frame seen again, in
    /// this video or another, reuses its features.
    pub fn frame(image: RgbImage) -> Self {
        let mut h = Sha256::new();
        h.update(b"frame");
        h.update(image.width().to_le_bytes());
        h.update(image.height().to_le_bytes());
        h.update(image.as_raw());
        Media::Pixels { sha256: h.finalize().into(), image: Arc::new(image) }
    }

    pub fn sha256(&self) -> [u8; 32] {
        match self {
            Media::Pixels { sha256, .. } => *sha256,
            Media::Encoded { key, .. } => key.sha256,
        }
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Least-recently-used vision features, bounded in bytes.
pub struct MediaCache {
    entries: HashMap<MediaKey, (Arc<EncodedImage>, u64)>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

impl MediaCache {
    pub fn new(limit: usize) -> Self {
        Self { entries: HashMap::new(), bytes: 0, limit, clock: 0 }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        self.evict();
    }

    pub fn get(&mut self, key: &MediaKey) -> Option<Arc<EncodedImage>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(features, used)| {
            *used = clock;
            Arc::clone(features)
        })
    }

    /// Keeps `features` unless they alone are over the limit; evicts the least recently used to fit.
    pub fn insert(&mut self, key: MediaKey, features: Arc<EncodedImage>) {
        let size = features.rows.len() * 4;
        if size > self.limit || self.entries.contains_key(&key) {
            return;
        }
        self.clock += 1;
        self.bytes += size;
        self.entries.insert(key, (features, self.clock));
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.limit {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) else {
                break;
            };
            if let Some((features, _)) = self.entries.remove(&oldest) {
                self.bytes -= features.rows.len() * 4;
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(rows: usize) -> Arc<EncodedImage> {
        Arc::new(EncodedImage { tiles: 1, rows: vec![0.0; rows] })
    }

    fn key(b: u8) -> MediaKey {
        MediaKey { sha256: [b; 32], max_tiles: 12 }
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_byte_limit() {
        let mut cache = MediaCache::new(3 * 400);
        for b in 0..3 {
            cache.insert(key(b), features(100));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key(0)).is_some()); // 1 is now the oldest
        cache.insert(key(3), features(100));
        assert!(cache.get(&key(1)).is_none(), "least recently used evicted");
        assert!(cache.get(&key(0)).is_some() && cache.get(&key(3)).is_some());
        assert!(cache.bytes() <= 1200);
        cache.insert(key(9), features(1000)); // alone over the limit: not kept, nothing evicted
        assert!(cache.get(&key(9)).is_none());
        assert_eq!(cache.len(), 3);
        cache.set_limit(0);
        assert!(cache.is_empty() && cache.bytes() == 0);
        let other_tiling = MediaKey { max_tiles: 6, ..key(0) };
        assert_ne!(other_tiling, key(0));
    }
}
