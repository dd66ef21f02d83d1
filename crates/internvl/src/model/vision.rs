//! Tiles -> image embeddings through `vision.onnx`, in batches of at most `batch` tiles.
//!
//! Batching bounds peak memory (activations grow with the batch) while keeping the GEMMs large; the
//! graph treats every tile independently, so results do not depend on the batch size.

use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use ort::session::Session;
use ort::value::TensorRef;

use crate::manifest::{Manifest, VisionSpec};
use crate::runtime::providers::trt_max_tiles;
use crate::runtime::{check_shape, open_graph, ort_err, Device, RuntimeOptions, Stage};

/// Default tiles per vision run (see README, "Tile batching"). Measured on the InternVL2.5-1B shape,
/// int8, 2 threads: 417-437 / 433-443 / 485-493 ms per tile at batch 1 / 2 / 4 with AMX attention (ONNX
/// attention: 707 / 800 / 880; fp32: 2331 at 1, 2433 at 4); one
/// tile's GEMMs (1025 tokens) already fill the cores, and larger batches only add activation memory.
pub const DEFAULT_BATCH: usize = 1;

pub struct VisionEncoder {
    /// ONNX Runtime's `Run` needs `&mut`; the lock lives here so the model is shared by reference.
    session: Mutex<Session>,
    spec: VisionSpec,
    /// The graph opened: the portable one or a variant.
    pub file: String,
    /// Most tiles per run: TensorRT's optimisation profile (a larger batch would rebuild its engine).
    max_batch: usize,
}

impl VisionEncoder {
    pub fn load(m: &Manifest, opts: &RuntimeOptions) -> Result<Self> {
        let spec = m.vision.clone();
        let (session, file) = open_graph(m, &spec.file, spec.amx.as_ref(), opts, Stage::Vision)?;
        let path = m.path(&file);
        let size = Some(spec.image_size as usize);
        check_shape(&path, session.inputs(), &spec.input, &[None, Some(3), size, size])?;
        check_shape(&path, session.outputs(), &spec.output, &[None, Some(spec.tokens_per_tile), Some(spec.embed_dim)])?;
        let max_batch = if opts.device == Device::Tensorrt { trt_max_tiles(m) } else { usize::MAX };
        Ok(Self { session: Mutex::new(session), spec, file, max_batch })
    }

    /// `pixels` is `[tiles, 3, size, size]`; returns `[tiles, tokens_per_tile, embed_dim]` row-major.
    pub fn encode(&self, pixels: &[f32], tiles: usize, batch: usize) -> Result<Vec<f32>> {
        let size = self.spec.image_size as usize;
        let per_tile = 3 * size * size;
        ensure!(pixels.len() == tiles * per_tile, "pixel buffer holds {} floats, expected {tiles} tiles", pixels.len());
        let out_per_tile = self.spec.tokens_per_tile * self.spec.embed_dim;
        let mut out = Vec::with_capacity(tiles * out_per_tile);
        let batch = batch.clamp(1, tiles.max(1)).min(self.max_batch);
        for (i, chunk) in pixels.chunks(batch * per_tile).enumerate() {
            let n = chunk.len() / per_tile;
            let input = TensorRef::from_array_view(([n, 3, size, size], chunk)).map_err(ort_err)?;
            let mut session = self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let outputs = session
                .run(ort::inputs![self.spec.input.as_str() => input])
                .map_err(ort_err)
                .with_context(|| format!("vision graph on tiles {}..{}", i * batch, i * batch + n))?;
            let value = outputs.get(self.spec.output.as_str()).context("vision graph returned no embeddings")?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err)?;
            ensure!(
                data.len() == n * out_per_tile,
                "vision graph returned shape {shape:?}, expected [{n}, {}, {}]",
                self.spec.tokens_per_tile,
                self.spec.embed_dim
            );
            out.extend_from_slice(data);
        }
        Ok(out)
    }
}
