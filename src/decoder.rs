//! The LLM through `decoder.onnx`: prefill, then one step per token, the KV cache carried between calls.
//!
//! A [`KvCache`] holds the cache of several sequences ("rows"), so that one decode step of every active
//! sequence is one call of the graph: the weights are read once per step whatever the batch, which is
//! what makes serving many streams cost little more than one (decode is memory-bound).
//!
//! With fused attention (GroupQueryAttention) each layer's keys and values live in one buffer
//! `[rows, kv_heads, capacity, head_dim]` that a call binds, for the rows it runs, as both
//! `past_key_values.*` and `present.*`: the kernel sees the same memory on both sides and only writes the
//! new positions, each row at its own length (`seqlens_k` comes from the row's mask), so a decode step
//! costs the same at 8k tokens of context as at 256 and rows of different lengths step together. Graphs
//! with plain-operator attention concatenate past and new keys into fresh tensors, which are handed back
//! unchanged as the next call's past; their rows step one at a time. Long prompts are prefilled in
//! chunks (the caller's) so the attention scores of one call stay bounded (`chunk` x context).

use std::ffi::CString;
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, ensure, Context, Result};
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor, TensorRefMut};
use ort::AsPointer;

use crate::manifest::{layer_name, Attention, DecoderSpec, Manifest};
use crate::runtime::{check_shape, open_graph, ort_err, RuntimeOptions};

/// Default prompt positions per prefill run. Measured on the InternVL2.5-1B shape, int8, 2 threads, a
/// 1844-token prompt: chunks of 128 / 256 / 512 / 1024 / 2048 prefill at 997 / 1052 / 957 / 675 / 487
/// tokens/s; the attention scores of a smaller chunk stay in cache.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Positions a shared cache starts with; it grows by doubling (one copy of the filled part each time)
/// unless [`Decoder::reserve`] sized it for the request up front.
const MIN_CAPACITY: usize = 256;

pub struct Decoder {
    /// ONNX Runtime's `Run` needs `&mut`; the lock lives here so the model is shared by reference.
    session: Mutex<Session>,
    pub spec: DecoderSpec,
    /// The graph opened: the portable one or its AMX variant.
    pub file: String,
    past_names: Vec<String>,
    present_names: Vec<String>,
}

/// The KV cache of `rows` sequences; row `r` holds `len(r)` filled positions.
pub struct KvCache {
    lens: Vec<usize>,
    store: Store,
}

enum Store {
    /// Fused attention: per layer K and V, `[rows, kv_heads, capacity, head_dim]` each.
    Shared { buffers: Vec<Vec<f32>>, capacity: usize },
    /// Plain attention: per row the `2 * layers` tensors `[1, kv_heads, len, head_dim]` the graph returned.
    Plain { rows: Vec<Vec<DynValue>> },
}

impl KvCache {
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    pub fn len(&self, row: usize) -> usize {
        self.lens[row]
    }

    pub fn is_empty(&self, row: usize) -> bool {
        self.lens[row] == 0
    }

    /// Positions every row can hold without growing (plain attention: grows every step).
    pub fn capacity(&self) -> usize {
        match &self.store {
            Store::Shared { capacity, .. } => *capacity,
            Store::Plain { .. } => usize::MAX,
        }
    }

    /// Bytes held by the cache's buffers.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Shared { buffers, .. } => buffers.iter().map(|b| b.len() * 4).sum(),
            Store::Plain { rows } => {
                rows.iter().flatten().map(|t| t.shape().iter().product::<i64>().max(0) as usize * 4).sum()
            }
        }
    }
}

/// One row's part of a call: the embeddings of its new positions.
pub struct RowInput<'a> {
    pub row: usize,
    pub embeds: &'a [f32],
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
        Ok(Self { session: Mutex::new(session), spec, file, past_names, present_names })
    }

    /// Whether several rows can run in one call (fused attention keeps per-row lengths).
    pub fn batches(&self) -> bool {
        self.spec.attention == Attention::GroupQueryAttention
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        // A panic while running cannot leave the session half-changed: ONNX Runtime's state is its own.
        self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An empty cache for `rows` sequences.
    pub fn new_cache(&self, rows: usize) -> Result<KvCache> {
        ensure!(rows >= 1, "a KV cache needs at least one row");
        let store = if self.batches() {
            Store::Shared { buffers: vec![Vec::new(); 2 * self.spec.layers], capacity: 0 }
        } else {
            let mut all = Vec::with_capacity(rows);
            for _ in 0..rows {
                all.push(self.empty_row()?);
            }
            Store::Plain { rows: all }
        };
        Ok(KvCache { lens: vec![0; rows], store })
    }

    fn empty_row(&self) -> Result<Vec<DynValue>> {
        let shape = [1usize, self.spec.kv_heads, 0, self.spec.head_dim];
        (0..2 * self.spec.layers)
            .map(|_| Ok(Tensor::from_array((shape, Vec::<f32>::new())).map_err(ort_err)?.into_dyn()))
            .collect()
    }

    /// A one-row cache that claims `len` filled positions (zeros) with room for `room` more: what a decode
    /// step costs at a given context does not depend on the cached values, so benchmarks skip the prefill.
    pub fn synthetic_cache(&self, len: usize, room: usize) -> Result<KvCache> {
        let ctx = self.spec.max_context;
        ensure!(len + room <= ctx, "a cache of {len} + {room} positions exceeds the model's context of {ctx}");
        let mut cache = self.new_cache(1)?;
        match &mut cache.store {
            Store::Shared { .. } => self.reserve(&mut cache, len + room)?,
            Store::Plain { rows } => {
                let shape = [1usize, self.spec.kv_heads, len, self.spec.head_dim];
                for t in &mut rows[0] {
                    *t = Tensor::from_array((shape, vec![0f32; shape.iter().product()])).map_err(ort_err)?.into_dyn();
                }
            }
        }
        cache.lens[0] = len;
        Ok(cache)
    }

    /// Forgets row `row`'s positions from `len` on (a conversation re-run from there, or a row handed to
    /// another sequence). Shared buffers only move the length (the next call overwrites those positions);
    /// handed-off tensors are cut.
    pub fn truncate(&self, cache: &mut KvCache, row: usize, len: usize) -> Result<()> {
        if len >= cache.lens[row] {
            return Ok(());
        }
        if let Store::Plain { rows } = &mut cache.store {
            let (kv, d, old) = (self.spec.kv_heads, self.spec.head_dim, cache.lens[row]);
            for t in &mut rows[row] {
                let (_, src) = t.try_extract_tensor::<f32>().map_err(ort_err)?;
                let data: Vec<f32> = (0..kv).flat_map(|h| &src[h * old * d..][..len * d]).copied().collect();
                *t = Tensor::from_array(([1usize, kv, len, d], data)).map_err(ort_err)?.into_dyn();
            }
        }
        cache.lens[row] = len;
        Ok(())
    }

    /// Makes room for `positions` in every row (prompt + answer), so that a request does not grow the cache
    /// step by step; a cache that already holds positions at least doubles, so that a long conversation
    /// copies its cache O(log n) times. Capped at the model's context; a no-op for plain-attention graphs.
    pub fn reserve(&self, cache: &mut KvCache, positions: usize) -> Result<()> {
        let ctx = self.spec.max_context;
        ensure!(positions <= ctx, "{positions} positions exceed the model's context of {ctx}");
        let rows = cache.rows();
        let filled = cache.lens.iter().any(|&l| l > 0);
        let Store::Shared { buffers, capacity } = &mut cache.store else { return Ok(()) };
        if positions <= *capacity {
            return Ok(());
        }
        let grown = if filled { positions.max(2 * *capacity) } else { positions };
        let new_cap = grown.min(ctx);
        let (kv, d, old_cap) = (self.spec.kv_heads, self.spec.head_dim, *capacity);
        let elems = rows
            .checked_mul(kv * new_cap * d)
            .filter(|n| n.checked_mul(4 * buffers.len()).is_some())
            .ok_or_else(|| anyhow!("a KV cache of {rows} x {new_cap} positions does not fit in memory"))?;
        for buf in buffers.iter_mut() {
            let mut grown = Vec::new();
            grown.try_reserve_exact(elems).with_context(|| {
                format!(
                    "allocating a KV cache of {rows} x {new_cap} positions ({} MB)",
                    (elems * 4 * 2 * self.spec.layers) >> 20
                )
            })?;
            grown.resize(elems, 0.0);
            for (r, &len) in cache.lens.iter().enumerate() {
                for h in 0..kv {
                    let (from, to) = ((r * kv + h) * old_cap * d, (r * kv + h) * new_cap * d);
                    grown[to..][..len * d].copy_from_slice(&buf[from..][..len * d]);
                }
            }
            *buf = grown;
        }
        *capacity = new_cap;
        Ok(())
    }

    /// Runs the new positions of each row in `inputs` after what the cache holds for it, and returns each
    /// row's logits of its last position, in the order given. Several rows: one position each, rows of
    /// the cache only (fused attention). `long_rope`: LongRoPE's long factors for every row of this call.
    pub fn step(&self, cache: &mut KvCache, inputs: &[RowInput], long_rope: bool) -> Result<Vec<Vec<f32>>> {
        let hidden = self.spec.hidden;
        ensure!(!inputs.is_empty(), "a decoder call needs at least one row");
        for input in inputs {
            ensure!(input.row < cache.rows(), "row {} of a {}-row KV cache", input.row, cache.rows());
            ensure!(
                !input.embeds.is_empty() && input.embeds.len().is_multiple_of(hidden),
                "embedding buffer of {} floats is not a multiple of {hidden}",
                input.embeds.len()
            );
        }
        if inputs.len() == 1 || !self.batches() {
            let mut out = Vec::with_capacity(inputs.len());
            for input in inputs {
                out.push(self.step_rows(cache, std::slice::from_ref(input), long_rope)?.remove(0));
            }
            return Ok(out);
        }
        ensure!(inputs.iter().all(|i| i.embeds.len() == hidden), "rows stepped together take one position each");
        self.step_rows(cache, inputs, long_rope)
    }

    /// One call of the graph over a contiguous range of rows: those in `inputs` with their positions, the
    /// others in between with a placeholder position (written past their length, so overwritten by their
    /// next call, and its logits dropped).
    fn step_rows(&self, cache: &mut KvCache, inputs: &[RowInput], long_rope: bool) -> Result<Vec<Vec<f32>>> {
        let hidden = self.spec.hidden;
        let seq = inputs[0].embeds.len() / hidden;
        let lo = inputs.iter().map(|i| i.row).min().unwrap_or(0);
        let hi = inputs.iter().map(|i| i.row).max().unwrap_or(0);
        let batch = hi - lo + 1;
        let mut feeds: Vec<Option<&[f32]>> = vec![None; batch];
        for input in inputs {
            ensure!(feeds[input.row - lo].is_none(), "row {} given twice in one decoder call", input.row);
            feeds[input.row - lo] = Some(input.embeds);
        }
        let lens: Vec<usize> = cache.lens[lo..=hi].to_vec();
        let ends: Vec<usize> = lens.iter().map(|&l| l + seq).collect();
        let total = ends.iter().copied().max().unwrap_or(seq);
        if matches!(cache.store, Store::Shared { .. }) && total > cache.capacity() {
            self.reserve(cache, total.max(MIN_CAPACITY.min(self.spec.max_context)))?;
        }
        ensure!(
            total <= self.spec.max_context,
            "{total} positions exceed the model's context of {}",
            self.spec.max_context
        );

        let mut embeds = Vec::with_capacity(batch * seq * hidden);
        let mut mask = Vec::with_capacity(batch * total);
        let mut positions = Vec::with_capacity(batch * seq);
        for (r, feed) in feeds.iter().enumerate() {
            match feed {
                Some(e) => embeds.extend_from_slice(e),
                None => embeds.resize(embeds.len() + seq * hidden, 0.0),
            }
            // The mask's row sum tells the kernel the row's length; its width, the longest row's.
            mask.extend((0..total).map(|p| i64::from(p < ends[r])));
            positions.extend((lens[r]..ends[r]).map(|p| p as i64));
        }
        let embeds = Tensor::from_array(([batch, seq, hidden], embeds)).map_err(ort_err)?;
        let mask = Tensor::from_array(([batch, total], mask)).map_err(ort_err)?;
        let mut named: Vec<(&str, DynValue)> = vec![
            (self.spec.inputs.inputs_embeds.as_str(), embeds.into_dyn()),
            (self.spec.inputs.attention_mask.as_str(), mask.into_dyn()),
        ];
        if let Some(name) = &self.spec.inputs.position_ids {
            named.push((name, Tensor::from_array(([batch, seq], positions)).map_err(ort_err)?.into_dyn()));
        }
        if let Some(name) = &self.spec.inputs.long_rope {
            named.push((name, Tensor::from_array(([1usize], vec![i64::from(long_rope)])).map_err(ort_err)?.into_dyn()));
        }
        let at = || {
            let rows: Vec<String> = inputs.iter().map(|i| format!("{}@{}", i.row, lens[i.row - lo])).collect();
            format!("decoder call, rows {} ({seq} positions each)", rows.join(", "))
        };

        let logits = match &mut cache.store {
            Store::Shared { buffers, capacity } => {
                self.run_shared(buffers, *capacity, lo, batch, &named).with_context(at)?
            }
            Store::Plain { rows } => {
                ensure!(batch == 1, "plain-attention graphs run one row per call");
                let mut session = self.session();
                let mut feed: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> =
                    named.into_iter().map(|(n, v)| (n.into(), v.into())).collect();
                for (name, t) in self.past_names.iter().zip(rows[lo].drain(..)) {
                    feed.push((name.as_str().into(), t.into()));
                }
                let run = session.run(feed).map_err(ort_err).with_context(at);
                let mut outputs = match run {
                    Ok(o) => o,
                    Err(e) => {
                        rows[lo] = self.empty_row()?; // the past went into the failed call
                        cache.lens[lo] = 0;
                        return Err(e);
                    }
                };
                let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
                let logits = logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec();
                for name in &self.present_names {
                    let t = outputs.remove(name.as_str()).with_context(|| format!("decoder returned no {name}"))?;
                    rows[lo].push(t);
                }
                logits
            }
        };
        let vocab = self.spec.vocab;
        ensure!(logits.len() == batch * vocab, "decoder returned {} logits for {batch} rows of {vocab}", logits.len());
        for input in inputs {
            cache.lens[input.row] += seq;
        }
        Ok(inputs.iter().map(|i| logits[(i.row - lo) * vocab..][..vocab].to_vec()).collect())
    }

    /// A call with the shared buffers' rows `lo..lo + batch` bound as both past and present.
    fn run_shared(
        &self,
        buffers: &mut [Vec<f32>],
        capacity: usize,
        lo: usize,
        batch: usize,
        named: &[(&str, DynValue)],
    ) -> Result<Vec<f32>> {
        let (kv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let row_elems = kv * capacity * d;
        let mut session = self.session();
        let mut binding = session.create_binding().map_err(ort_err)?;
        for (name, value) in named {
            binding.bind_input(*name, value).map_err(ort_err)?;
        }
        for (i, buf) in buffers.iter_mut().enumerate() {
            let rows = &mut buf[lo * row_elems..(lo + batch) * row_elems];
            // SAFETY: `rows` is `batch * kv * capacity * d` floats of CPU memory that outlives the binding
            // (dropped at the end of this function, before the buffers can move).
            let view = unsafe {
                TensorRefMut::<f32>::from_raw(
                    MemoryInfo::default(),
                    rows.as_mut_ptr().cast(),
                    vec![batch as i64, kv as i64, capacity as i64, d as i64].into(),
                )
            }
            .map_err(ort_err)?;
            bind_aliased(&mut binding, &self.past_names[i], &view)?;
            binding.bind_output(self.present_names[i].as_str(), view).map_err(ort_err)?;
        }
        binding.bind_output_to_device(self.spec.outputs.logits.as_str(), &MemoryInfo::default()).map_err(ort_err)?;
        let outputs = session.run_binding(&binding).map_err(ort_err)?;
        let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
        Ok(logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec())
    }
}

/// Binds `value` as input `name` as it is. `IoBinding::bind_input` copies a tensor that views borrowed
/// memory (it cannot know the memory outlives the call); the KV views must not be copied: the past and
/// the present are the same buffer on purpose, which is what lets the kernel append in place.
fn bind_aliased(binding: &mut IoBinding, name: &str, value: &TensorRefMut<'_, f32>) -> Result<()> {
    let c_name = CString::new(name).with_context(|| format!("input name {name:?}"))?;
    // SAFETY: both pointers are live ONNX Runtime objects; the binding keeps no reference to the name, and
    // the value is kept alive by the binding's output map (bound as the present output right after).
    unsafe { ort::Error::result_from_status((ort::api().BindInput)(binding.ptr_mut(), c_name.as_ptr(), value.ptr())) }
        .map_err(ort_err)
        .with_context(|| format!("binding the KV cache as {name}"))
}
