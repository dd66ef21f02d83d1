//! The LLM through `decoder.onnx`: prefill, then one step per token, the KV cache carried between calls.
//!
//! A [`KvCache`] holds the cache of several sequences ("rows"), so that one decode step of every active
//! sequence is one call of the graph: the weights are read once per step whatever the batch, which is
//! what makes serving many streams cost little more than one (decode is memory-bound).
//!
//! With fused attention (GroupQueryAttention) each layer's keys and values live in one buffer
//! `[rows, kv_heads, capacity, head_dim]` that a call binds, for the rows it runs, as both
//! `past_key_values.*` and `present.*`: the kernel sees the same memory on both sides and only writes the
//! new positions, each row at its own length (`seqlens_k`, fed per row), so a decode step
//! costs the same at 8k tokens of context as at 256 and rows of different lengths step together.
//!
//! The buffers are allocated by the decoder session's allocator for the memory it runs on: host memory
//! on the CPU, device memory under CUDA / TensorRT, where the kernel then reads and writes the cache in
//! place (ONNX Runtime copies a bound input that lives elsewhere to the device at bind time, so a host
//! cache would cost two whole-cache copies per step). Only the embeddings go in and the logits come
//! back. The CPU runs the same buffers and the same binding calls. Graphs
//! with plain-operator attention concatenate past and new keys into fresh tensors, which are handed back
//! unchanged as the next call's past; their rows step one at a time. Long prompts are prefilled in
//! chunks (the caller's) so the attention scores of one call stay bounded (`chunk` x context).

use std::ffi::CString;
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::session::{IoBinding, Session};

use ort::value::{DynTensor, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, TensorRefMut, ValueType};
use ort::AsPointer;

use crate::manifest::{layer_name, Attention, DecoderSpec, KvType, Manifest};
use crate::runtime::{check_shape, kv_memory, open_graph, ort_err, RuntimeOptions, Stage};

/// Runs `$body` with `$t` the Rust element type of the KV cache.
macro_rules! with_kv_type {
    ($kv:expr, $t:ident => $body:expr) => {
        match $kv {
            KvType::Float32 => {
                type $t = f32;
                $body
            }
            KvType::Float16 => {
                type $t = half::f16;
                $body
            }
            KvType::Bfloat16 => {
                type $t = half::bf16;
                $body
            }
        }
    };
}

fn element_type(kv: KvType) -> TensorElementType {
    match kv {
        KvType::Float32 => TensorElementType::Float32,
        KvType::Float16 => TensorElementType::Float16,
        KvType::Bfloat16 => TensorElementType::Bfloat16,
    }
}

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
    /// The session's allocator for the memory it runs on, which holds the shared KV buffers.
    kv_alloc: Mutex<Allocator>,
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
    /// Fused attention: per layer K and V, `[rows, kv_heads, capacity, head_dim]` each, where the decoder
    /// runs (empty until the first [`Decoder::reserve`]).
    Shared { buffers: Vec<DynTensor>, capacity: usize, elem: usize },
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
            Store::Shared { buffers, elem, .. } => {
                buffers.iter().map(|b| b.shape().iter().product::<i64>().max(0) as usize * elem).sum()
            }
            Store::Plain { rows } => rows
                .iter()
                .flatten()
                .map(|t| {
                    let elem =
                        if let ValueType::Tensor { ty, .. } = t.dtype() { ty.byte_size(1).unwrap_or(4) } else { 4 };
                    t.shape().iter().product::<i64>().max(0) as usize * elem
                })
                .sum(),
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
        let (session, file) = open_graph(m, &spec.file, spec.amx.as_ref(), opts, Stage::Decoder)?;
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
        if let Some(name) = &spec.inputs.attention_mask {
            check_shape(&path, ins, name, &[None, None])?;
        }
        if let Some(name) = &spec.inputs.seqlens_k {
            check_shape(&path, ins, name, &[None])?;
        }
        if let Some(name) = &spec.inputs.total_sequence_length {
            check_shape(&path, ins, name, &[])?;
        }
        let want = element_type(spec.kv_dtype);
        for name in &past_names {
            let ty = ins.iter().find(|i| i.name() == name).map(|i| i.dtype());
            if let Some(ValueType::Tensor { ty, .. }) = ty {
                ensure!(
                    *ty == want,
                    "{}: {name} holds {ty:?} but the manifest says a {:?} KV cache: manifest and graph are from different exports",
                    path.display(),
                    spec.kv_dtype
                );
            }
        }
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
        let kv_alloc = Allocator::new(&session, kv_memory(opts)?).map_err(ort_err).with_context(|| {
            format!("the KV cache allocator of {} on --device {}", path.display(), opts.device.name())
        })?;
        Ok(Self { session: Mutex::new(session), kv_alloc: Mutex::new(kv_alloc), spec, file, past_names, present_names })
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
            Store::Shared { buffers: Vec::new(), capacity: 0, elem: self.spec.kv_dtype.bytes() }
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
        (0..2 * self.spec.layers).map(|_| self.host_zeros(0)).collect()
    }

    /// `[1, kv_heads, len, head_dim]` zeros in host memory (plain attention's per-row tensors).
    fn host_zeros(&self, len: usize) -> Result<DynValue> {
        let shape = [1usize, self.spec.kv_heads, len, self.spec.head_dim];
        Ok(with_kv_type!(self.spec.kv_dtype, T => {
            Tensor::from_array((shape, vec![T::default(); shape.iter().product()])).map_err(ort_err)?.into_dyn()
        }))
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
                for t in &mut rows[0] {
                    *t = self.host_zeros(len)?;
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
                *t = with_kv_type!(self.spec.kv_dtype, T => cut::<T>(t, kv, d, old, len)?);
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
        let Store::Shared { buffers, capacity, elem } = &mut cache.store else { return Ok(()) };
        if positions <= *capacity {
            return Ok(());
        }
        let grown = if filled { positions.max(2 * *capacity) } else { positions };
        let new_cap = grown.min(ctx);
        let (kv, d, layers) = (self.spec.kv_heads, self.spec.head_dim, self.spec.layers);
        rows.checked_mul(kv * new_cap * d)
            .and_then(|n| n.checked_mul(*elem * 2 * layers))
            .filter(|&n| isize::try_from(n).is_ok())
            .ok_or_else(|| anyhow!("a KV cache of {rows} x {new_cap} positions does not fit in memory"))?;
        let mb = (rows * kv * new_cap * d * *elem * 2 * layers) >> 20;
        let layout = Layout { rows, kv, d, elem: *elem, old_cap: *capacity, new_cap };
        let alloc = self.kv_alloc.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            let old = if filled { buffers.get(i) } else { None };
            let buf = self
                .regrow(&alloc, old, &layout, &cache.lens)
                .with_context(|| format!("allocating a KV cache of {rows} x {new_cap} positions ({mb} MB)"))?;
            next.push(buf);
        }
        *buffers = next;
        *capacity = new_cap;
        Ok(())
    }

    /// A buffer of `layout.new_cap` positions per row holding the first `lens[r]` positions of each row of
    /// `old`. Device memory is not host-addressable: the filled part is rearranged through host copies
    /// (growth is rare: the engine reserves each request's positions up front and a cache doubles).
    fn regrow(&self, alloc: &Allocator, old: Option<&DynTensor>, l: &Layout, lens: &[usize]) -> Result<DynTensor> {
        let ty = element_type(self.spec.kv_dtype);
        let shape = [l.rows, l.kv, l.new_cap, l.d];
        let mut new = DynTensor::new(alloc, ty, shape).map_err(ort_err)?;
        let Some(old) = old else { return Ok(new) };
        if new.memory_info().is_cpu_accessible() && old.memory_info().is_cpu_accessible() {
            l.copy_rows(old.data_ptr().cast(), new.data_ptr_mut().cast(), lens);
        } else {
            let host_old =
                old.to(AllocationDevice::CPU, 0).map_err(ort_err).context("copying the KV cache to the host")?;
            let mut host_new = DynTensor::new(&Allocator::default(), ty, shape).map_err(ort_err)?;
            l.copy_rows(host_old.data_ptr().cast(), host_new.data_ptr_mut().cast(), lens);
            host_new.copy_into(&mut new).map_err(ort_err).context("copying the KV cache back to the device")?;
        }
        Ok(new)
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
        let mut positions = Vec::with_capacity(batch * seq);
        for (r, feed) in feeds.iter().enumerate() {
            match feed {
                Some(e) => embeds.extend_from_slice(e),
                None => embeds.resize(embeds.len() + seq * hidden, 0.0),
            }
            positions.extend((lens[r]..ends[r]).map(|p| p as i64));
        }
        let embeds = Tensor::from_array(([batch, seq, hidden], embeds)).map_err(ort_err)?;
        let mut named: Vec<(&str, DynValue)> = vec![(self.spec.inputs.inputs_embeds.as_str(), embeds.into_dyn())];
        let ins = &self.spec.inputs;
        if let (Some(seqlens), Some(width)) = (&ins.seqlens_k, &ins.total_sequence_length) {
            // Each row's last key index and the longest row's length: what the kernel would derive from a mask.
            let last: Vec<i32> = ends.iter().map(|&e| e as i32 - 1).collect();
            named.push((seqlens, Tensor::from_array(([batch], last)).map_err(ort_err)?.into_dyn()));
            named.push((width, Tensor::from_array(([0usize; 0], vec![total as i32])).map_err(ort_err)?.into_dyn()));
        }
        if let Some(name) = &ins.attention_mask {
            // The mask's row sum tells the kernel the row's length; its width, the longest row's.
            let mask: Vec<i64> = ends.iter().flat_map(|&e| (0..total).map(move |p| i64::from(p < e))).collect();
            named.push((name, Tensor::from_array(([batch, total], mask)).map_err(ort_err)?.into_dyn()));
        }
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
            Store::Shared { buffers, capacity, .. } => {
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
        buffers: &mut [DynTensor],
        capacity: usize,
        lo: usize,
        batch: usize,
        named: &[(&str, DynValue)],
    ) -> Result<Vec<f32>> {
        let (kv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let row_bytes = kv * capacity * d * self.spec.kv_dtype.bytes();
        let shape = vec![batch as i64, kv as i64, capacity as i64, d as i64];
        let mut session = self.session();
        let mut binding = session.create_binding().map_err(ort_err)?;
        for (name, value) in named {
            binding.bind_input(*name, value).map_err(ort_err)?;
        }
        for (i, buf) in buffers.iter_mut().enumerate() {
            let info = buf.memory_info().to_owned();
            // Pointer arithmetic only: the rows may be device memory, never dereferenced here.
            let rows = buf.data_ptr_mut().cast::<u8>().wrapping_add(lo * row_bytes).cast();
            let (past, present) = (&self.past_names[i], &self.present_names[i]);
            with_kv_type!(self.spec.kv_dtype, T => {
                // SAFETY: `rows` starts `batch` whole rows of `buf`, which outlives the binding (dropped at
                // the end of this function, while `buffers` is borrowed).
                unsafe { bind_rows::<T>(&mut binding, past, present, info, rows, shape.clone())? }
            });
        }
        binding.bind_output_to_device(self.spec.outputs.logits.as_str(), &MemoryInfo::default()).map_err(ort_err)?;
        let outputs = session.run_binding(&binding).map_err(ort_err)?;
        let logits = outputs.get(self.spec.outputs.logits.as_str()).context("decoder returned no logits")?;
        Ok(logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec())
    }
}

/// Where row `r`, head `h` starts in a `[rows, kv, cap, d]` buffer, before and after it grows.
struct Layout {
    rows: usize,
    kv: usize,
    d: usize,
    elem: usize,
    old_cap: usize,
    new_cap: usize,
}

impl Layout {
    /// Copies the first `lens[r]` positions of every row and head from the old layout to the new one.
    fn copy_rows(&self, from: *const u8, to: *mut u8, lens: &[usize]) {
        let (kv, d, e) = (self.kv, self.d, self.elem);
        // SAFETY: both point at host buffers of `rows * kv * cap * d` elements of `elem` bytes in their
        // layouts (allocated by ONNX Runtime just before, or the cache's own), which do not overlap.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(from, self.rows * kv * self.old_cap * d * e),
                std::slice::from_raw_parts_mut(to, self.rows * kv * self.new_cap * d * e),
            )
        };
        for (r, &len) in lens.iter().enumerate().take(self.rows) {
            let len = len.min(self.old_cap);
            for h in 0..kv {
                let (a, b) = ((r * kv + h) * self.old_cap * d * e, (r * kv + h) * self.new_cap * d * e);
                dst[b..][..len * d * e].copy_from_slice(&src[a..][..len * d * e]);
            }
        }
    }
}

/// Binds `batch` rows of a shared buffer starting at `rows` as input `past` and output `present`.
///
/// # Safety
/// `rows` must point at `shape`'s elements of `T` in memory described by `info`, alive until the binding
/// is dropped.
unsafe fn bind_rows<T: PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut IoBinding,
    past: &str,
    present: &str,
    info: MemoryInfo<'static>,
    rows: *mut std::ffi::c_void,
    shape: Vec<i64>,
) -> Result<()> {
    let view = unsafe { TensorRefMut::<T>::from_raw(info, rows.cast(), shape.into()) }.map_err(ort_err)?;
    bind_aliased(binding, past, &view)?;
    binding.bind_output(present, view).map_err(ort_err)
}

/// A plain-attention row's `[1, kv, old, d]` tensor cut to its first `len` positions.
fn cut<T: PrimitiveTensorElementType + std::fmt::Debug + Copy + 'static>(
    t: &DynValue,
    kv: usize,
    d: usize,
    old: usize,
    len: usize,
) -> Result<DynValue> {
    let (_, src) = t.try_extract_tensor::<T>().map_err(ort_err)?;
    if src.len() < kv * old * d {
        bail!("a KV tensor of {} values is shorter than {kv} x {old} x {d}", src.len());
    }
    let data: Vec<T> = (0..kv).flat_map(|h| &src[h * old * d..][..len * d]).copied().collect();
    Ok(Tensor::from_array(([1usize, kv, len, d], data)).map_err(ort_err)?.into_dyn())
}

/// Binds `value` as input `name` as it is. `IoBinding::bind_input` copies a tensor that views borrowed
/// memory (it cannot know the memory outlives the call); the KV views must not be copied: the past and
/// the present are the same buffer on purpose, which is what lets the kernel append in place.
fn bind_aliased<T: PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut IoBinding,
    name: &str,
    value: &TensorRefMut<'_, T>,
) -> Result<()> {
    let c_name = CString::new(name).with_context(|| format!("input name {name:?}"))?;
    // SAFETY: both pointers are live ONNX Runtime objects; the binding keeps no reference to the name, and
    // the value is kept alive by the binding's output map (bound as the present output right after).
    unsafe { ort::Error::result_from_status((ort::api().BindInput)(binding.ptr_mut(), c_name.as_ptr(), value.ptr())) }
        .map_err(ort_err)
        .with_context(|| format!("binding the KV cache as {name}"))
}
