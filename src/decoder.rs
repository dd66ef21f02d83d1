//! The LLM through `decoder.onnx`: prefill, then one step per token, the KV cache carried between calls.
//!
//! With fused attention (GroupQueryAttention) the cache lives in preallocated buffers bound through an
//! `IoBinding` as both `past_key_values.*` and `present.*`: the kernel sees the same buffer on both sides
//! and only writes the new positions, so a decode step costs the same at 8k tokens of context as at 256
//! (no per-step copy of the whole cache). Graphs with plain-operator attention concatenate past and new
//! keys into fresh tensors, which are handed back unchanged as the next call's past. Long prompts are
//! prefilled in chunks so the attention scores of one call stay bounded (`chunk` x context).

use anyhow::{ensure, Context, Result};
use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor};

use crate::manifest::{layer_name, Attention, DecoderSpec, Manifest};
use crate::runtime::{check_shape, open_graph, ort_err, RuntimeOptions};

/// Default prompt positions per prefill run. Measured on the InternVL2.5-1B shape, int8, 2 threads, a
/// 1844-token prompt: chunks of 128 / 256 / 512 / 1024 / 2048 prefill at 997 / 1052 / 957 / 675 / 487
/// tokens/s; the attention scores of a smaller chunk stay in cache.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

pub struct Decoder {
    session: Session,
    pub spec: DecoderSpec,
    /// The graph opened: the portable one or its AMX variant.
    pub file: String,
    past_names: Vec<String>,
    present_names: Vec<String>,
}

/// Positions a shared cache starts with; it grows by doubling (one copy of the filled part each time)
/// unless [`Decoder::reserve`] sized it for the whole request up front.
const MIN_CAPACITY: usize = 256;

/// The KV cache of one sequence: `2 * layers` tensors `[1, kv_heads, capacity, head_dim]`, of which the
/// first `len` positions are filled (plain attention: capacity == len, a new set per step).
pub struct KvCache {
    tensors: Vec<DynValue>,
    pub len: usize,
    capacity: usize,
    /// Fused attention: every past/present pair bound to its buffer, the logits to CPU memory.
    binding: Option<IoBinding>,
}

impl Decoder {
    pub fn load(m: &Manifest, opts: &RuntimeOptions) -> Result<Self> {
        let spec = m.decoder.clone();
        let (session, file) = open_graph(m, &spec.file, spec.amx.as_ref(), opts)?;
        let path = m.path(&file);
        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for l in 0..spec.layers {
            past_names.push(layer_name(&spec.inputs.past_key, l));
            past_names.push(layer_name(&spec.inputs.past_value, l));
            present_names.push(layer_name(&spec.outputs.present_key, l));
            present_names.push(layer_name(&spec.outputs.present_value, l));
        }
        // The manifest must describe this graph: its names, layer count and dimensions.
        let (ins, outs) = (session.inputs(), session.outputs());
        let kv = [None, Some(spec.kv_heads), None, Some(spec.head_dim)];
        for (past, present) in past_names.iter().zip(&present_names) {
            check_shape(&path, ins, past, &kv)?;
            check_shape(&path, outs, present, &kv)?;
        }
        check_shape(&path, ins, &spec.inputs.inputs_embeds, &[None, None, Some(spec.hidden)])?;
        check_shape(&path, ins, &spec.inputs.attention_mask, &[None, None])?;
        if let Some(name) = &spec.inputs.position_ids {
            check_shape(&path, ins, name, &[None, None])?;
        }
        if let Some(name) = &spec.inputs.long_rope {
            check_shape(&path, ins, name, &[None])?;
        }
        check_shape(&path, outs, &spec.outputs.logits, &[None, Some(spec.vocab)])?;
        let prefix = spec.inputs.past_key.split("{}").next().unwrap_or("");
        let n_past = ins.iter().filter(|i| i.name().starts_with(prefix)).count();
        ensure!(
            n_past == 2 * spec.layers,
            "{} has {n_past} cache inputs but the manifest says {} layers: manifest and graph are from different models",
            path.display(),
            spec.layers
        );
        Ok(Self { session, spec, file, past_names, present_names })
    }

    pub fn empty_cache(&self) -> Result<KvCache> {
        let mut tensors = Vec::with_capacity(2 * self.spec.layers);
        for _ in 0..2 * self.spec.layers {
            let t = Tensor::from_array(([1usize, self.spec.kv_heads, 0, self.spec.head_dim], Vec::<f32>::new()))
                .map_err(ort_err)?;
            tensors.push(t.into_dyn());
        }
        Ok(KvCache { tensors, len: 0, capacity: 0, binding: None })
    }

    /// A cache that claims `len` filled positions (zeros) with room for `room` more: what a decode step
    /// costs at a given context does not depend on the cached values, so benchmarks skip the prefill.
    pub fn synthetic_cache(&mut self, len: usize, room: usize) -> Result<KvCache> {
        let ctx = self.spec.max_context;
        ensure!(len + room <= ctx, "a cache of {len} + {room} positions exceeds the model's context of {ctx}");
        let mut cache = self.empty_cache()?;
        if self.shared() {
            self.reserve(&mut cache, len + room)?;
            for t in &mut cache.tensors {
                t.try_extract_tensor_mut::<f32>().map_err(ort_err)?.1.fill(0.0);
            }
        } else {
            let shape = [1usize, self.spec.kv_heads, len, self.spec.head_dim];
            for t in &mut cache.tensors {
                *t = Tensor::from_array((shape, vec![0f32; shape.iter().product()])).map_err(ort_err)?.into_dyn();
            }
            cache.capacity = len;
        }
        cache.len = len;
        Ok(cache)
    }

    /// Forgets the positions from `len` on (a conversation re-run from there). Shared buffers only move
    /// their length (the next call overwrites those positions); handed-off tensors are cut.
    pub fn truncate(&mut self, cache: &mut KvCache, len: usize) -> Result<()> {
        if len >= cache.len {
            return Ok(());
        }
        if self.shared() {
            cache.len = len;
            return Ok(());
        }
        let (kv, d) = (self.spec.kv_heads, self.spec.head_dim);
        for t in &mut cache.tensors {
            let (_, src) = t.try_extract_tensor::<f32>().map_err(ort_err)?;
            let data: Vec<f32> = (0..kv).flat_map(|h| &src[h * cache.capacity * d..][..len * d]).copied().collect();
            *t = Tensor::from_array(([1usize, kv, len, d], data)).map_err(ort_err)?.into_dyn();
        }
        cache.len = len;
        cache.capacity = len;
        Ok(())
    }

    fn shared(&self) -> bool {
        self.spec.attention == Attention::GroupQueryAttention
    }

    /// Makes room for `positions` in total (prompt + answer), so that a request does not grow the cache
    /// step by step; a cache that already holds positions (a chat) at least doubles, so that a long
    /// conversation copies its cache O(log n) times. Capped at the model's context; a no-op for
    /// plain-attention graphs.
    pub fn reserve(&mut self, cache: &mut KvCache, positions: usize) -> Result<()> {
        let ctx = self.spec.max_context;
        ensure!(positions <= ctx, "{positions} positions exceed the model's context of {ctx}");
        if !self.shared() || positions <= cache.capacity {
            return Ok(());
        }
        let grown = if cache.len > 0 { positions.max(2 * cache.capacity) } else { positions };
        let capacity = grown.min(ctx);
        let (kv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let mut tensors = Vec::with_capacity(cache.tensors.len());
        for old in &cache.tensors {
            let mut t = Tensor::<f32>::new(&Allocator::default(), [1usize, kv, capacity, d])
                .map_err(ort_err)
                .with_context(|| format!("allocating a KV cache of {capacity} positions"))?;
            if cache.len > 0 {
                let (_, src) = old.try_extract_tensor::<f32>().map_err(ort_err)?;
                let (_, dst) = t.extract_tensor_mut();
                for h in 0..kv {
                    let n = cache.len * d;
                    dst[h * capacity * d..][..n].copy_from_slice(&src[h * cache.capacity * d..][..n]);
                }
            }
            tensors.push(t.into_dyn());
        }
        cache.binding = None; // holds the old buffers
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        for (i, t) in tensors.iter_mut().enumerate() {
            binding.bind_input(self.past_names[i].as_str(), t).map_err(ort_err)?;
            binding.bind_output(self.present_names[i].as_str(), &mut *t).map_err(ort_err)?;
        }
        let cpu = MemoryInfo::default();
        binding.bind_output_to_device(self.spec.outputs.logits.as_str(), &cpu).map_err(ort_err)?;
        cache.tensors = tensors;
        cache.capacity = capacity;
        cache.binding = Some(binding);
        Ok(())
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
        let end = cache.len + embeds.len() / hidden;
        if self.shared() && end > cache.capacity {
            self.reserve(cache, end.max(MIN_CAPACITY.min(self.spec.max_context)))?;
        }
        // transformers picks LongRoPE's factor set once per forward call, from its last position: every
        // chunk of this call uses the choice the whole call would get.
        let long_rope = self.spec.long_rope_after.is_some_and(|after| end > after);
        let mut logits = Vec::new();
        for piece in embeds.chunks(chunk.max(1).saturating_mul(hidden)) {
            logits = self.step(piece, cache, long_rope)?;
            on_chunk(piece.len() / hidden);
        }
        Ok(logits)
    }

    fn step(&mut self, embeds: &[f32], cache: &mut KvCache, long_rope: bool) -> Result<Vec<f32>> {
        let seq = embeds.len() / self.spec.hidden;
        let total = cache.len + seq;
        let embeds = Tensor::from_array(([1usize, seq, self.spec.hidden], embeds.to_vec())).map_err(ort_err)?;
        // The mask's width tells the kernel the sequence length; the buffer may be longer.
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total])).map_err(ort_err)?;
        let mut inputs: Vec<(&str, DynValue)> = vec![
            (self.spec.inputs.inputs_embeds.as_str(), embeds.into_dyn()),
            (self.spec.inputs.attention_mask.as_str(), mask.into_dyn()),
        ];
        if let Some(name) = &self.spec.inputs.position_ids {
            let positions: Vec<i64> = (cache.len as i64..total as i64).collect();
            inputs.push((name, Tensor::from_array(([1usize, seq], positions)).map_err(ort_err)?.into_dyn()));
        }
        if let Some(name) = &self.spec.inputs.long_rope {
            inputs
                .push((name, Tensor::from_array(([1usize], vec![i64::from(long_rope)])).map_err(ort_err)?.into_dyn()));
        }
        let at = || format!("decoder step at position {} ({seq} tokens)", cache.len);
        let logits = if let Some(binding) = cache.binding.as_mut() {
            ensure!(total <= cache.capacity, "KV cache of {} positions cannot take {total}", cache.capacity);
            for (name, value) in &inputs {
                binding.bind_input(*name, value).map_err(ort_err)?;
            }
            let outputs = self.session.run_binding(binding).map_err(ort_err).with_context(at)?;
            let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
            logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec()
        } else {
            let mut feed: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> =
                inputs.into_iter().map(|(n, v)| (n.into(), v.into())).collect();
            for (name, t) in self.past_names.iter().zip(cache.tensors.drain(..)) {
                feed.push((name.as_str().into(), t.into()));
            }
            let mut outputs = self.session.run(feed).map_err(ort_err).with_context(at)?;
            let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
            let logits = logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec();
            for name in &self.present_names {
                let t = outputs.remove(name.as_str()).with_context(|| format!("decoder returned no {name}"))?;
                cache.tensors.push(t);
            }
            cache.capacity = total;
            logits
        };
        cache.len = total;
        Ok(logits)
    }
}
