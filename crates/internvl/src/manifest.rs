//! The model folder's `manifest.json`, as typed structs checked once at load.
//!
//! `export/manifest.py` writes it; everything downstream trusts a [`Manifest`] returned by
//! [`Manifest::load`]: the files it names exist, the dimensions agree with each other, and the
//! template style is one the prompt builder knows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::error::{ErrorKind, WithKind};
use crate::files;
use crate::media::image::{ImageConfig, MAX_TILES};

/// The schema this runtime reads; `export/manifest.py` writes the same number.
pub const FORMAT: &str = "internvl-onnx";
pub const FORMAT_VERSION: u32 = 1;

/// What `--dtype` an export was written with (the exporter's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Dtype {
    Float32,
    Float16,
    Bfloat16,
    Int8,
    Int4,
    Int4Float16,
    Int4Bfloat16,
}

impl Dtype {
    pub const ALL: [Dtype; 7] = [
        Dtype::Float32,
        Dtype::Float16,
        Dtype::Bfloat16,
        Dtype::Int8,
        Dtype::Int4,
        Dtype::Int4Float16,
        Dtype::Int4Bfloat16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
            Dtype::Int4Float16 => "int4-float16",
            Dtype::Int4Bfloat16 => "int4-bfloat16",
        }
    }

    /// Weights quantised to integers (int8, or int4 blocks with whatever activations).
    pub fn quantised(self) -> bool {
        matches!(self, Dtype::Int8 | Dtype::Int4 | Dtype::Int4Float16 | Dtype::Int4Bfloat16)
    }

    /// Whether a batch row's numbers are the same whatever it is computed with: tested for fp32; not so
    /// for int8 graphs, whose activations are quantised with one scale per tensor (ONNX Runtime's dynamic
    /// quantisation); int4 (MatMulNBits with int8 compute) and the GPU types are not measured, so treated
    /// as int8.
    pub fn rows_independent(self) -> bool {
        self == Dtype::Float32
    }
}

impl TryFrom<String> for Dtype {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        Dtype::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| format!("dtype {s:?} is not supported"))
    }
}

impl From<Dtype> for &'static str {
    fn from(d: Dtype) -> Self {
        d.name()
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    pub dtype: Dtype,
    /// Tiling and normalisation (`dynamic_preprocess` + `build_transform` parameters).
    pub image: ImageConfig,
    pub vision: VisionSpec,
    pub embed: EmbedSpec,
    pub decoder: DecoderSpec,
    pub tokenizer: TokenizerSpec,
    pub template: TemplateSpec,
    #[serde(default)]
    pub generation: GenerationSpec,
    /// Every file of the folder but the manifest, with its size and SHA-256: sizes are checked at every
    /// load (a truncated or swapped `.data` file is named before ONNX Runtime reads it), digests by
    /// `internvl info --verify`.
    pub files: BTreeMap<String, FileEntry>,
    /// Folder the manifest was read from; file names below resolve against it.
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionSpec {
    pub file: String,
    /// The graph's type (`int8` in the int8 / int4 exports); absent in older exports: the folder's.
    #[serde(default)]
    pub dtype: Option<Dtype>,
    pub input: String,
    pub output: String,
    pub image_size: u32,
    pub tokens_per_tile: usize,
    pub embed_dim: usize,
    /// The same graph with its attention on this crate's AMX kernel (`src/kernels`).
    #[serde(default)]
    pub amx: Option<AmxVariant>,
    /// The same graph with its attention in plain ONNX operators, which TensorRT can build engines of
    /// (`export/tensorrt.py`); opened under `--device tensorrt`.
    #[serde(default)]
    pub tensorrt: Option<GraphVariant>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphVariant {
    pub file: String,
}

/// The element type of a graph's KV cache (`decoder.kv_dtype`): fp32 for float32 and the CPU-quantised
/// exports, the graph's own type for float16 / bfloat16 exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    #[default]
    Float32,
    Float16,
    Bfloat16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::Float32 => 4,
            KvType::Float16 | KvType::Bfloat16 => 2,
        }
    }
}

/// A graph's variant that calls this crate's AMX attention kernel (`export/amx.py`); written for int8 /
/// int4 exports whose head size the kernel supports.
#[derive(Debug, Clone, Deserialize)]
pub struct AmxVariant {
    pub file: String,
    /// `domain::op` of the kernel the graph calls; checked against what this runtime registers.
    pub op: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbedSpec {
    pub file: String,
    pub dtype: String,
    pub vocab: usize,
    pub hidden: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSpec {
    pub file: String,
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_context: usize,
    /// How the graph attends; decides how the runtime keeps the KV cache.
    #[serde(default)]
    pub attention: Attention,
    #[serde(default)]
    pub kv_dtype: KvType,
    /// LongRoPE (Phi-3 128k): a forward call whose last position reaches past this many tokens uses the
    /// long rotary factors throughout, as transformers does; absent for plain RoPE.
    #[serde(default)]
    pub long_rope_after: Option<usize>,
    pub inputs: DecoderInputs,
    pub outputs: DecoderOutputs,
    /// The same graph with its attention on this crate's AMX kernel (`src/kernels`).
    #[serde(default)]
    pub amx: Option<AmxVariant>,
}

/// `GroupQueryAttention`: ONNX Runtime's fused kernel, which can append to a preallocated cache in place.
/// `onnx`: plain operators that concatenate past and new keys into a fresh present tensor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Attention {
    GroupQueryAttention,
    #[default]
    #[serde(rename = "onnx")]
    Onnx,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderInputs {
    pub inputs_embeds: String,
    /// Plain-attention graphs (and fused graphs of older exports, which computed the lengths from it).
    #[serde(default)]
    pub attention_mask: Option<String>,
    /// Fused graphs: each row's last key index (`[batch]` i32) and the longest row's length (`[]` i32),
    /// fed as inputs so that nothing the kernel reads on the host is computed on a device.
    #[serde(default)]
    pub seqlens_k: Option<String>,
    #[serde(default)]
    pub total_sequence_length: Option<String>,
    /// Absent in graphs whose fused attention takes positions from the cache length.
    pub position_ids: Option<String>,
    /// The LongRoPE switch (`[1]` i64, 1 = long factors); only in LongRoPE graphs.
    #[serde(default)]
    pub long_rope: Option<String>,
    /// Per-layer names with `{}` standing for the layer index.
    pub past_key: String,
    pub past_value: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderOutputs {
    pub logits: String,
    pub present_key: String,
    pub present_value: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerSpec {
    pub file: String,
    pub img_start: String,
    pub img_end: String,
    pub img_context: String,
    pub img_start_id: u32,
    pub img_end_id: u32,
    pub img_context_id: u32,
    pub vocab_size: usize,
    /// The ids generation stops on: what the reference stops on for this layout (`stop_ids_source`).
    pub stop_ids: Vec<u32>,
    pub answer: AnswerSpec,
}

/// How the answer text is made from the generated ids, as the reference returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct AnswerSpec {
    /// Ids left out of the text (the reference tokenizer's special ids; empty where it keeps them).
    pub skip_ids: Vec<u32>,
    /// The text is cut at the first occurrence of this (the template separator), then stripped.
    pub split_at: Option<String>,
    /// Non-special added tokens that the reference's slow sentencepiece tokenizer decodes apart: the text
    /// between them is decoded run by run, and the pieces are joined with spaces.
    pub separate_ids: Vec<u32>,
    pub spaces_between_separate: bool,
    /// transformers' `clean_up_tokenization` (" ." -> "." and the like) on each run between separate
    /// tokens (InternLM2's slow tokenizer) and on the whole text (`clean_up_tokenization_spaces`).
    pub clean_up_runs: bool,
    pub clean_up_text: bool,
}

/// A conversation template as the reference `conversation.py` defines it.
#[derive(Debug, Clone, Deserialize)]
pub struct TemplateSpec {
    pub name: String,
    pub style: String,
    pub system_template: String,
    pub system_message: String,
    pub roles: [String; 2],
    pub sep: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GenerationSpec {
    pub max_new_tokens: usize,
}

impl Default for GenerationSpec {
    fn default() -> Self {
        Self { max_new_tokens: 1024 }
    }
}

impl Manifest {
    /// Reads and validates `DIR/manifest.json` and the files it names; errors name the folder and the
    /// offending value, and are model errors.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_unmarked(dir).kind(ErrorKind::Model)
    }

    fn load_unmarked(dir: &Path) -> Result<Self> {
        ensure!(dir.exists(), "model folder not found: {}", dir.display());
        ensure!(dir.is_dir(), "model folder {} is not a folder", dir.display());
        let path = dir.join("manifest.json");
        let text = files::read_text(&path, files::MAX_MANIFEST_FILE, "manifest")?;
        let mut m = Self::parse(&text).with_context(|| format!("invalid manifest {}", path.display()))?;
        m.dir = dir.to_path_buf();
        m.check_files().with_context(|| format!("model folder {}", dir.display()))?;
        Ok(m)
    }

    /// The manifest in `text`, its values checked against each other and against sane bounds (no file is
    /// touched: [`Manifest::load`] checks those).
    pub fn parse(text: &str) -> Result<Self> {
        let m: Manifest = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{e} (from an older exporter? export the checkpoint again)"))?;
        m.validate()?;
        Ok(m)
    }

    /// The vision graph's type.
    pub fn vision_dtype(&self) -> Dtype {
        self.vision.dtype.unwrap_or(self.dtype)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.format == FORMAT, "format is {:?}, expected {FORMAT:?}", self.format);
        ensure!(
            self.format_version == FORMAT_VERSION,
            "format_version {} is not the {FORMAT_VERSION} this runtime reads; re-export the model",
            self.format_version
        );
        ensure!(self.template.style == "mpt", "template style {:?} is not supported", self.template.style);
        ensure!(self.embed.dtype == "float32", "embedding dtype {:?} is not supported", self.embed.dtype);
        let (v, e, d, t) = (&self.vision, &self.embed, &self.decoder, &self.tokenizer);
        // Bounds far above any InternVL release, low enough that no buffer sized from them overflows or
        // asks for more memory than a machine has before the graphs' own shapes are compared.
        for (name, value, max) in [
            ("image.image_size", self.image.image_size as usize, 4096),
            ("vision.tokens_per_tile", v.tokens_per_tile, 16_384),
            ("decoder.hidden", d.hidden, 65_536),
            ("decoder.vocab", d.vocab, 1 << 22),
            ("decoder.layers", d.layers, 1024),
            ("decoder.kv_heads", d.kv_heads, 1024),
            ("decoder.head_dim", d.head_dim, 1024),
            ("decoder.max_context", d.max_context, 1 << 21),
        ] {
            ensure!((1..=max).contains(&value), "{name} {value} outside 1..={max}");
        }
        ensure!(
            v.image_size == self.image.image_size,
            "vision image_size {} != image {}",
            v.image_size,
            self.image.image_size
        );
        ensure!(v.embed_dim == d.hidden, "vision embed_dim {} != decoder hidden {}", v.embed_dim, d.hidden);
        ensure!(e.hidden == d.hidden, "embedding hidden {} != decoder hidden {}", e.hidden, d.hidden);
        ensure!(e.vocab == d.vocab, "embedding vocab {} != decoder vocab {}", e.vocab, d.vocab);
        ensure!(
            d.inputs.long_rope.is_some() == d.long_rope_after.is_some(),
            "decoder names a LongRoPE input without its threshold, or the reverse"
        );
        let i = &d.inputs;
        let lengths = i.seqlens_k.is_some() && i.total_sequence_length.is_some();
        ensure!(
            i.seqlens_k.is_some() == i.total_sequence_length.is_some(),
            "decoder names one of seqlens_k / total_sequence_length without the other"
        );
        ensure!(lengths || i.attention_mask.is_some(), "decoder takes neither the lengths nor an attention mask");
        ensure!(t.vocab_size <= d.vocab, "tokenizer has {} ids but the model only {}", t.vocab_size, d.vocab);
        ensure!(
            (1..=MAX_TILES).contains(&self.image.max_tiles),
            "max_tiles {} outside 1..={MAX_TILES}",
            self.image.max_tiles
        );
        ensure!(
            (1..=self.image.max_tiles).contains(&self.image.min_tiles),
            "min_tiles {} outside 1..=max_tiles",
            self.image.min_tiles
        );
        ensure!(
            self.image.std.iter().chain(&self.image.mean).all(|x| x.is_finite())
                && self.image.std.iter().all(|&s| s > 0.0),
            "image mean / std {:?} / {:?} are not finite positive numbers",
            self.image.mean,
            self.image.std
        );
        ensure!(!t.stop_ids.is_empty(), "no stop ids: generation would only end at the length limit");
        let ids = [t.img_start_id, t.img_end_id, t.img_context_id];
        for id in ids.iter().chain(&t.stop_ids).chain(&t.answer.skip_ids).chain(&t.answer.separate_ids) {
            ensure!((*id as usize) < d.vocab, "special token id {id} outside the vocabulary ({})", d.vocab);
        }
        for (variant, op) in [(&v.amx, crate::kernels::OP_ATTENTION), (&d.amx, crate::kernels::OP_GQA)] {
            if let Some(amx) = variant {
                let ours = format!("{}::{op}", crate::kernels::DOMAIN);
                ensure!(amx.op == ours, "graph {} calls {:?}; this runtime provides {ours:?}", amx.file, amx.op);
            }
        }
        for name in self.files.keys() {
            let plain = Path::new(name).components().count() == 1 && !name.starts_with('.') && name != "manifest.json";
            ensure!(plain, "file entry {name:?} is not a plain file name in the model folder");
        }
        for file in self.named_files() {
            ensure!(self.files.contains_key(file), "{file} is not listed in the manifest's files");
        }
        let want = e.vocab as u64 * e.hidden as u64 * 4;
        let listed = self.files.get(&e.file).map_or(0, |f| f.bytes);
        ensure!(
            listed == want,
            "{} is listed with {listed} bytes, expected {want} ({} x {} float32)",
            e.file,
            e.vocab,
            e.hidden
        );
        Ok(())
    }

    /// The files the stages open (graphs, their AMX variants, the tokenizer, the embedding table).
    fn named_files(&self) -> impl Iterator<Item = &String> {
        let (v, e, d, t) = (&self.vision, &self.embed, &self.decoder, &self.tokenizer);
        let variants = [&v.amx, &d.amx].into_iter().flatten().map(|a| &a.file);
        let variants = variants.chain(v.tensorrt.iter().map(|t| &t.file));
        [&v.file, &e.file, &d.file, &t.file].into_iter().chain(variants)
    }

    /// The fast check of every load: each listed file is present, a regular file, and of its listed size;
    /// and every graph, weight or tokenizer file the folder holds is listed (one the export did not write,
    /// or whose entry was removed, would be loaded unchecked).
    fn check_files(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        for entry in entries {
            let name = entry.with_context(|| format!("reading {}", self.dir.display()))?.file_name();
            let name = name.to_string_lossy();
            let weights = [".onnx", ".data", ".bin", ".json"].iter().any(|ext| name.ends_with(ext));
            ensure!(
                !weights || name == "manifest.json" || self.files.contains_key(name.as_ref()),
                "{name} is not listed in the manifest's files (not from this export?)"
            );
        }
        for (name, entry) in &self.files {
            let p = self.path(name);
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{name} is missing"),
                Err(e) => bail!("cannot read {}: {e}", p.display()),
            };
            ensure!(meta.is_file(), "{} is not a regular file", p.display());
            ensure!(
                meta.len() == entry.bytes,
                "{} has {} bytes but the export wrote {} (truncated, damaged or from another export)",
                p.display(),
                meta.len(),
                entry.bytes
            );
        }
        Ok(())
    }

    /// The full check (`internvl info --verify`): every listed file's SHA-256. Returns the bytes read.
    pub fn verify_checksums(&self, on_file: impl FnMut(&str, u64)) -> Result<u64> {
        self.verify_unmarked(on_file).kind(ErrorKind::Model)
    }

    fn verify_unmarked(&self, mut on_file: impl FnMut(&str, u64)) -> Result<u64> {
        use sha2::{Digest, Sha256};
        let mut total = 0;
        for (name, entry) in &self.files {
            let p = self.path(name);
            let (mut file, _) = files::open_regular(&p, u64::MAX, "model file")?;
            let mut hasher = Sha256::new();
            let n = std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", p.display()))?;
            let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            ensure!(
                digest == entry.sha256.to_ascii_lowercase(),
                "{} does not match its checksum (damaged, or swapped with another export's file)",
                p.display()
            );
            total += n;
            on_file(name, n);
        }
        Ok(total)
    }
}

/// `past_key_values.{}.key` -> `past_key_values.3.key`.
pub fn layer_name(pattern: &str, layer: usize) -> String {
    pattern.replace("{}", &layer.to_string())
}
