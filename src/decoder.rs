//! The LLM through `decoder.onnx`: prefill, then one step per token, the KV cache carried between calls.
//!
//! The cache tensors ONNX Runtime returns (`present.*`) are handed back unchanged as the next call's
//! `past_key_values.*`: no copy on our side. Long prompts are prefilled in chunks so the attention
//! scores of one call stay bounded (`chunk` x context instead of context x context).

use anyhow::{ensure, Context, Result};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::manifest::{layer_name, DecoderSpec, Manifest};
use crate::runtime::{open_session, ort_err, RuntimeOptions};

/// Default prompt positions per prefill run. Measured on the InternVL2.5-1B shape, int8, 2 threads, a
/// 1844-token prompt: chunks of 128 / 256 / 512 / 1024 / 2048 prefill at 997 / 1052 / 957 / 675 / 487
/// tokens/s; the attention scores of a smaller chunk stay in cache.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

pub struct Decoder {
    session: Session,
    pub spec: DecoderSpec,
    past_names: Vec<String>,
    present_names: Vec<String>,
}

/// The KV cache of one sequence: `2 * layers` tensors `[1, kv_heads, len, head_dim]`.
pub struct KvCache {
    tensors: Vec<DynValue>,
    pub len: usize,
}

impl Decoder {
    pub fn load(m: &Manifest, opts: &RuntimeOptions) -> Result<Self> {
        let path = m.path(&m.decoder.file);
        let session = open_session(&path, opts)?;
        let spec = m.decoder.clone();
        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for l in 0..spec.layers {
            past_names.push(layer_name(&spec.inputs.past_key, l));
            past_names.push(layer_name(&spec.inputs.past_value, l));
            present_names.push(layer_name(&spec.outputs.present_key, l));
            present_names.push(layer_name(&spec.outputs.present_value, l));
        }
        // The manifest must describe this graph: its names, layer count and input width.
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let wanted_in =
            [Some(&spec.inputs.inputs_embeds), Some(&spec.inputs.attention_mask), spec.inputs.position_ids.as_ref()];
        for name in past_names.iter().chain(wanted_in.into_iter().flatten()) {
            ensure!(
                inputs.contains(&name.as_str()),
                "{} has no input {name:?}: manifest and graph are from different models",
                path.display()
            );
        }
        for name in present_names.iter().chain([&spec.outputs.logits]) {
            ensure!(
                outputs.contains(&name.as_str()),
                "{} has no output {name:?}: manifest and graph are from different models",
                path.display()
            );
        }
        let n_past =
            inputs.iter().filter(|n| n.starts_with(spec.inputs.past_key.split("{}").next().unwrap_or(""))).count();
        ensure!(
            n_past == 2 * spec.layers,
            "{} has {n_past} cache inputs but the manifest says {} layers: manifest and graph are from different models",
            path.display(),
            spec.layers
        );
        if let Some(ort::value::ValueType::Tensor { shape, .. }) =
            session.inputs().iter().find(|i| i.name() == spec.inputs.inputs_embeds).map(|i| i.dtype())
        {
            let width = shape.last().copied().unwrap_or(-1);
            ensure!(
                width == spec.hidden as i64,
                "{} takes embeddings of width {width}, the manifest says {}: manifest and graph are from different models",
                path.display(),
                spec.hidden
            );
        }
        Ok(Self { session, spec, past_names, present_names })
    }

    pub fn empty_cache(&self) -> Result<KvCache> {
        let mut tensors = Vec::with_capacity(2 * self.spec.layers);
        for _ in 0..2 * self.spec.layers {
            let t = Tensor::from_array(([1usize, self.spec.kv_heads, 0, self.spec.head_dim], Vec::<f32>::new()))
                .map_err(ort_err)?;
            tensors.push(t.into_dyn());
        }
        Ok(KvCache { tensors, len: 0 })
    }

    /// Runs `embeds` (`seq` x hidden) after what `cache` holds, in chunks of at most `chunk` positions,
    /// and returns the logits of the last position.
    pub fn forward(
        &mut self,
        embeds: &[f32],
        cache: &mut KvCache,
        chunk: usize,
        mut on_chunk: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let hidden = self.spec.hidden;
        ensure!(
            !embeds.is_empty() && embeds.len().is_multiple_of(hidden),
            "embedding buffer of {} floats is not a multiple of {hidden}",
            embeds.len()
        );
        let mut logits = Vec::new();
        for piece in embeds.chunks(chunk.max(1) * hidden) {
            logits = self.step(piece, cache)?;
            on_chunk(piece.len() / hidden);
        }
        Ok(logits)
    }

    fn step(&mut self, embeds: &[f32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let seq = embeds.len() / self.spec.hidden;
        let total = cache.len + seq;
        let embeds = Tensor::from_array(([1usize, seq, self.spec.hidden], embeds.to_vec())).map_err(ort_err)?;
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total])).map_err(ort_err)?;
        let mut inputs: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> = vec![
            (self.spec.inputs.inputs_embeds.as_str().into(), embeds.into()),
            (self.spec.inputs.attention_mask.as_str().into(), mask.into()),
        ];
        if let Some(name) = &self.spec.inputs.position_ids {
            let positions: Vec<i64> = (cache.len as i64..total as i64).collect();
            let positions = Tensor::from_array(([1usize, seq], positions)).map_err(ort_err)?;
            inputs.push((name.as_str().into(), positions.into()));
        }
        for (name, t) in self.past_names.iter().zip(cache.tensors.drain(..)) {
            inputs.push((name.as_str().into(), t.into()));
        }
        let mut outputs = self
            .session
            .run(inputs)
            .map_err(ort_err)
            .with_context(|| format!("decoder step at position {} ({seq} tokens)", cache.len))?;
        let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
        let (_, logits) = logits.try_extract_tensor::<f32>().map_err(ort_err)?;
        let logits = logits.to_vec();
        for name in &self.present_names {
            let t = outputs.remove(name.as_str()).with_context(|| format!("decoder returned no {name}"))?;
            cache.tensors.push(t);
        }
        cache.len = total;
        Ok(logits)
    }
}
