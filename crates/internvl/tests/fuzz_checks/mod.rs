//! The fuzz checks: one function per fuzz target, holding the whole check of that target.
//!
//! Each function takes arbitrary bytes, feeds them to the part of the runtime that parses untrusted input,
//! and asserts what must hold for *every* input. Errors are fine (most random inputs are rejected); a panic,
//! an abort, a hang or a failed assertion is a finding. Each returns whether the input got past the parser
//! (decoded, parsed, tokenised), so the corpus test can tell that its inputs reach the deeper checks.
//!
//! The same functions run in two places:
//! * `fuzz/fuzz_targets/*.rs` (cargo-fuzz, libFuzzer + AddressSanitizer, nightly): `scripts/fuzz.sh`;
//! * `tests/fuzz_corpus.rs` (plain `cargo test`): every saved corpus file and every regression, so a crash
//!   that fuzzing found once stays fixed.
//!
//! The tokenizer and template come from the test fixtures (`tests/fixtures.py build/fixtures`), or from the
//! model folders named in `INTERNVL_FUZZ_MODEL` (several separated by `:`). Nothing here loads an ONNX
//! Runtime session.

// Each fuzz target uses one of these functions; the others are unused there.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use internvl::manifest::{layer_name, Manifest};
use internvl::media::image::{decode_image, preprocess, tile_count, ImageConfig, MAX_IMAGE_PIXELS, MAX_TILES};
use internvl::text::prompt::{load_history, parse_history, render, token_ids, Turn, IMAGE_PLACEHOLDER};
use internvl::text::tokenizer::{answer_text, AnswerStream, Tokenizer};

/// Images above this many pixels are decoded but not preprocessed: tiling a legal 100-megapixel image takes
/// seconds, which only slows fuzzing down without reaching new code.
pub const MAX_PREPROCESS_PIXELS: u64 = 4_000_000;
/// The EXIF orientation is cross-checked (a second decode) only for images up to this many pixels.
pub const MAX_EXIF_CHECK_PIXELS: u64 = 1 << 16;
/// Most token ids one stream input generates: the length of the default answer budget
/// (`generation.max_new_tokens`). `AnswerStream` decodes at every step (a window of recent ids, or all of
/// them when the window's text changes), so longer inputs only make fuzzing slow.
pub const MAX_STREAM_IDS: usize = 1024;

/// A model folder's manifest and tokenizer, as `InternVL::load` makes them (the tokenizer decoding as the
/// manifest's `answer` section says).
pub struct Model {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
}

/// The repository root: the fuzz crate lives in `fuzz/`, the tests in the root package.
pub fn repo_root() -> PathBuf {
    // Built from the workspace's `crates/internvl` (cargo test) or from `fuzz/` (cargo fuzz).
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let levels = if here.file_name().is_some_and(|n| n == "fuzz") { 1 } else { 2 };
    here.ancestors().nth(levels).unwrap_or(here).to_path_buf()
}

/// The model folders the checks use: `INTERNVL_FUZZ_MODEL` (`:`-separated), else the five fixture models
/// of the original exports. Several families because their decoders differ: byte-level BPE (Qwen2, Qwen3,
/// Llama 3) vs sentencepiece with byte fallback (InternLM2, Phi-3), separate ids (Phi-3), clean-up (InternLM2).
pub fn model_dirs() -> Vec<PathBuf> {
    match std::env::var("INTERNVL_FUZZ_MODEL") {
        Ok(v) if !v.is_empty() => v.split(':').map(PathBuf::from).collect(),
        _ => {
            let base = repo_root().join("build/fixtures/models");
            ["qwen2", "internlm2", "llama", "phi3", "qwen3"]
                .iter()
                .map(|m| base.join(format!("{m}-original")))
                .collect()
        }
    }
}

/// Every model of [`model_dirs`], loaded once per process.
pub fn models() -> &'static [Model] {
    static MODELS: OnceLock<Vec<Model>> = OnceLock::new();
    MODELS.get_or_init(|| model_dirs().iter().map(|d| load_model(d)).collect())
}

fn load_model(dir: &Path) -> Model {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); build the fixtures first: .venv/bin/python tests/fixtures.py build/fixtures \
             (or set INTERNVL_FUZZ_MODEL to model folders)",
            path.display()
        )
    });
    let mut manifest = parse_fixture_manifest(dir, &text);
    manifest.dir = dir.to_path_buf();
    let tokenizer = Tokenizer::load(&dir.join(&manifest.tokenizer.file))
        .unwrap_or_else(|e| panic!("tokenizer of {}: {e:#}", dir.display()))
        .decoding_as(&manifest.tokenizer.answer);
    Model { dir: dir.to_path_buf(), manifest, tokenizer }
}

/// [`Manifest::parse`] of a fixture manifest. Fixtures built before the manifest gained its `files` section
/// (size and SHA-256 of every file in the folder) fail to parse; for those the section is made from the
/// folder as `export/manifest.py` makes it, with the real sizes (which `parse` compares with the embedding's
/// shape) and placeholder digests (only `internvl info --verify` reads digests).
pub fn parse_fixture_manifest(dir: &Path, text: &str) -> Manifest {
    let first = match Manifest::parse(text) {
        Ok(m) => return m,
        Err(e) => e,
    };
    let mut value: serde_json::Value = serde_json::from_str(text).expect("fixture manifest is not JSON");
    if value.get("files").is_none() {
        let mut files = serde_json::Map::new();
        for entry in std::fs::read_dir(dir).expect("listing the model folder").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().expect("model file metadata");
            if name != "manifest.json" && meta.is_file() {
                files.insert(name, serde_json::json!({"bytes": meta.len(), "sha256": "0".repeat(64)}));
            }
        }
        value["files"] = serde_json::Value::Object(files);
    }
    Manifest::parse(&value.to_string()).unwrap_or_else(|e| {
        panic!("fixture manifest {} does not parse: {first:#}; with files added: {e:#}", dir.display())
    })
}

/// The model that selector byte `b` picks.
fn pick_model(b: u8) -> &'static Model {
    let all = models();
    &all[usize::from(b) % all.len()]
}

/// A cursor over the input: leading bytes steer the options, what is left is the payload.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// The next byte (0 once the input is used up, so every input is valid).
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// The next three bytes as a little-endian 24-bit number, if there are three.
    fn u24(&mut self) -> Option<u32> {
        let (&[a, b, c], rest) = self.0.split_first_chunk::<3>()?;
        self.0 = rest;
        Some(u32::from_le_bytes([a, b, c, 0]))
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

// ---------------------------------------------------------------------------------------------------------
// image: decode + tiling
// ---------------------------------------------------------------------------------------------------------

/// The preprocessing options of an image input, made from its length so that every input is the image file
/// itself (a reproducer opens in any viewer and in `internvl run --image`): the decoders ignore what follows
/// the image data, so the fuzzer varies the options by appending or removing bytes.
pub fn image_options(len: usize) -> (bool, ImageConfig) {
    // A multiplicative hash: neighbouring lengths get unrelated options.
    let s = (len as u32).wrapping_mul(0x9E37_79B9).rotate_left(13);
    let apply_exif = s & 1 == 1;
    // The models' 448-pixel tiles in one input of eight: resizing a small image up to 12 such tiles takes
    // most of a second under AddressSanitizer, and smaller tiles run the same grid and resize arithmetic.
    let image_size = [448, 32, 28, 16, 14, 7, 3, 1][((s >> 11) & 7) as usize];
    let max_tiles = 1 + (s >> 1) % if image_size == 448 { 6 } else { 12 };
    // Mostly the reference's min_num = 1; sometimes a larger minimum (a forced multi-tile grid).
    let min_tiles = if (s >> 5) & 3 == 3 { 1 + (s >> 7) % max_tiles } else { 1 };
    let cfg = ImageConfig { image_size, min_tiles, max_tiles, use_thumbnail: (s >> 14) & 3 != 0, ..Default::default() };
    (apply_exif, cfg)
}

/// `decode_image` then `preprocess`, as a request's image goes through them.
///
/// * A decoded image is never empty and never above Pillow's decompression-bomb limit: `decode_image`
///   checks the header's size before it allocates pixels.
/// * With `--exif`, the image is the plain decode turned by one of the 8 EXIF orientations: a damaged EXIF
///   block is ignored, never a reason to fail, so both decodes succeed or neither does.
/// * Preprocessing a decoded image with a valid configuration cannot fail, and makes exactly the tiles that
///   `tile_count` promised from the size alone (the prompt's length is computed from that before any pixel
///   work): `cols * rows` tiles within `min_tiles..=max_tiles`, plus a thumbnail when there is more than
///   one, each `size x size`, with every value `(x / 255 - mean) / std` for some byte `x`.
pub fn image(data: &[u8]) -> bool {
    let (apply_exif, cfg) = image_options(data.len());
    let Ok(img) = decode_image(data, apply_exif) else { return false };
    let (w, h) = img.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    assert!(w > 0 && h > 0, "decoded an empty {w}x{h} image");
    assert!(pixels <= MAX_IMAGE_PIXELS, "decoded {w}x{h}, above the decompression-bomb limit");
    assert_eq!(img.as_raw().len() as u64, pixels * 3);

    if apply_exif && pixels <= MAX_EXIF_CHECK_PIXELS {
        let plain = decode_image(data, false).unwrap_or_else(|e| panic!("decodes with --exif but not without: {e:#}"));
        assert!(
            is_dihedral_transform(plain.as_raw(), plain.dimensions(), img.as_raw(), (w, h)),
            "the --exif decode ({w}x{h}) is no rotation / flip of the plain decode ({}x{})",
            plain.width(),
            plain.height()
        );
    }

    if pixels > MAX_PREPROCESS_PIXELS {
        return true;
    }
    let tiles = preprocess(&img, &cfg).unwrap_or_else(|e| panic!("preprocess of a decoded {w}x{h} image: {e:#}"));
    let (cols, rows) = tiles.grid;
    let blocks = cols * rows;
    assert!((cfg.min_tiles..=cfg.max_tiles).contains(&blocks), "grid {cols}x{rows} outside the tile range of {cfg:?}");
    let expected = blocks as usize + usize::from(cfg.use_thumbnail && blocks != 1);
    assert_eq!(tiles.count, expected, "{w}x{h} grid {cols}x{rows}: tile count");
    assert_eq!(tile_count(w, h, &cfg), tiles.count, "tile_count({w}, {h}) differs from what preprocess made");
    assert_eq!(tiles.size, cfg.image_size);
    let plane = cfg.image_size as usize * cfg.image_size as usize;
    assert_eq!(tiles.data.len(), tiles.count * 3 * plane);
    for (k, tile) in tiles.data.chunks_exact(3 * plane).enumerate() {
        for (c, channel) in tile.chunks_exact(plane).enumerate() {
            let lo = (0.0 - cfg.mean[c]) / cfg.std[c];
            let hi = (1.0 - cfg.mean[c]) / cfg.std[c];
            let bad = channel.iter().find(|v| !(v.is_finite() && (lo - 1e-4..=hi + 1e-4).contains(*v)));
            assert!(bad.is_none(), "tile {k} channel {c}: value {bad:?} outside [{lo}, {hi}]");
        }
    }
    true
}

/// True when `b` (size `bd`) is `a` (size `ad`) under one of the 8 rotations / flips of EXIF orientations.
fn is_dihedral_transform(a: &[u8], ad: (u32, u32), b: &[u8], bd: (u32, u32)) -> bool {
    let (aw, ah) = (ad.0 as usize, ad.1 as usize);
    let (bw, bh) = (bd.0 as usize, bd.1 as usize);
    let pixel = |buf: &[u8], w: usize, x: usize, y: usize| -> [u8; 3] {
        let i = 3 * (y * w + x);
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    for swap in [false, true] {
        if (if swap { (ah, aw) } else { (aw, ah) }) != (bw, bh) {
            continue;
        }
        for flip_x in [false, true] {
            for flip_y in [false, true] {
                let same = (0..bh).all(|y| {
                    (0..bw).all(|x| {
                        let (u, v) = if swap { (y, x) } else { (x, y) };
                        let sx = if flip_x { aw - 1 - u } else { u };
                        let sy = if flip_y { ah - 1 - v } else { v };
                        pixel(b, bw, x, y) == pixel(a, aw, sx, sy)
                    })
                });
                if same {
                    return true;
                }
            }
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------------------
// manifest
// ---------------------------------------------------------------------------------------------------------

/// `Manifest::parse` of arbitrary text (`manifest.json` is the one file of a downloaded model folder that
/// every stage trusts after load).
///
/// Everything downstream relies on what a parsed manifest promises, so for an accepted manifest this checks
/// the promises again and then uses it the way loading does, which must not panic: the tile grid for a
/// few image shapes stays inside the configured range, a prompt renders, layer names expand.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(m) = Manifest::parse(text) else { return false };
    let (img, d, t) = (&m.image, &m.decoder, &m.tokenizer);
    assert!(1 <= img.min_tiles && img.min_tiles <= img.max_tiles && img.max_tiles <= MAX_TILES, "{img:?}");
    assert!((1..=4096).contains(&img.image_size) && m.vision.image_size == img.image_size);
    assert!(img.std.iter().all(|s| s.is_finite() && *s > 0.0) && img.mean.iter().all(|x| x.is_finite()));
    assert!(t.vocab_size <= d.vocab && m.embed.vocab == d.vocab && m.embed.hidden == d.hidden);
    assert!(!t.stop_ids.is_empty());
    let ids = [t.img_start_id, t.img_end_id, t.img_context_id];
    for &id in ids.iter().chain(&t.stop_ids).chain(&t.answer.skip_ids).chain(&t.answer.separate_ids) {
        assert!((id as usize) < d.vocab, "special id {id} outside the vocabulary {}", d.vocab);
    }
    assert!(d.layers >= 1 && d.kv_heads >= 1 && d.head_dim >= 1 && d.max_context >= 1);
    for name in m.files.keys() {
        assert!(!name.contains('/') && name != "manifest.json" && !name.starts_with('.'), "file entry {name:?}");
    }

    for (w, h) in [(1, 1), (800, 600), (1, 100_000)] {
        let n = tile_count(w, h, img);
        let lo = img.min_tiles as usize;
        let hi = img.max_tiles as usize + usize::from(img.use_thumbnail);
        assert!((lo..=hi).contains(&n), "{w}x{h}: {n} tiles with {img:?}");
    }
    let history = [Turn { user: "<image>\nu".into(), assistant: "a".into() }];
    let prompt = render(&m.template, &history, "q", None, 1);
    assert!(prompt.ends_with(&m.template.roles[1]));
    let _ = layer_name(&d.inputs.past_key, d.layers - 1);
    let _ = m.path(&t.file);
    true
}

// ---------------------------------------------------------------------------------------------------------
// stream_decode: the answer text as it is streamed
// ---------------------------------------------------------------------------------------------------------

/// In a stream input, the 24-bit value that stands for an id outside the vocabulary (the next byte says
/// how far outside: `vocab + byte`, or `u32::MAX` for `0xFF`).
pub const OUT_OF_VOCAB: u32 = 0xFF_FFFF;

/// The token id that the 24-bit value `v` (not [`OUT_OF_VOCAB`]) stands for in a stream input: values below
/// `0xF0_0000` are ids (modulo the vocabulary); the rest count down from the top of the vocabulary, where
/// the added and special tokens are, so that mutations of small values reach them too.
pub fn stream_id(v: u32, vocab: u32) -> u32 {
    if v < 0xF0_0000 {
        v % vocab
    } else {
        vocab - 1 - (v - 0xF0_0000) % vocab
    }
}

/// Token ids, as a model generates them, through `AnswerStream` exactly as `pipeline.rs` (`turn`) drives it.
///
/// Input: a byte that picks the model, then three bytes (little-endian) per id ([`stream_id`]).
///
/// * What the user saw streamed adds up to exactly the returned answer, `answer_text(decode(ids))`: the
///   pieces are printed as they come and the final text is what the next turn's history holds.
/// * Ids inside the tokenizer's vocabulary decode without error (a model can sample any of them); an id
///   outside it is an error, never a panic.
pub fn stream_decode(data: &[u8]) -> bool {
    let mut input = Input(data);
    let model = pick_model(input.byte());
    let tok = &model.tokenizer;
    let vocab = model.manifest.tokenizer.vocab_size as u32;
    let split_at = model.manifest.tokenizer.answer.split_at.as_deref();
    let mut answer = AnswerStream::new(split_at);
    let mut generated = Vec::new();
    let mut shown = String::new();
    while generated.len() < MAX_STREAM_IDS {
        let Some(v) = input.u24() else { break };
        if v == OUT_OF_VOCAB {
            let far = input.byte();
            let id = if far == 0xFF { u32::MAX } else { vocab + u32::from(far) };
            assert!(tok.decode(&[id]).is_err(), "id {id} outside the vocabulary {vocab} decoded");
            assert!(answer.push(tok, id).is_err(), "id {id} outside the vocabulary {vocab} streamed");
            return true; // `turn` ends with that error
        }
        let id = stream_id(v, vocab);
        generated.push(id);
        let piece = answer.push(tok, id).unwrap_or_else(|e| panic!("streaming id {id} (vocabulary {vocab}): {e:#}"));
        shown.extend(piece);
    }
    let (rest, returned) = answer.finish(tok).unwrap_or_else(|e| panic!("end of stream: {e:#}"));
    shown.extend(rest);
    let whole = tok.decode(&generated).unwrap_or_else(|e| panic!("decoding {generated:?}: {e:#}"));
    let expected = answer_text(&whole, split_at);
    assert_eq!(returned, expected, "finish() returned another answer than answer_text(decode(ids))");
    assert!(
        shown == expected,
        "{}: the streamed answer differs from the returned one\n  ids:      {generated:?}\n  streamed: {shown:?}\n  \
         returned: {expected:?}\n  decode(ids): {whole:?}",
        model.dir.display()
    );
    true
}

// ---------------------------------------------------------------------------------------------------------
// prompt: template rendering and prompt tokens
// ---------------------------------------------------------------------------------------------------------

/// A prompt input's parts: `[flags, model, text...]`, the text (UTF-8, invalid bytes replaced) split at NUL
/// bytes into the question, the system message, then user / assistant pairs of earlier turns.
struct PromptInput {
    model: &'static Model,
    images: usize,
    system: Option<String>,
    first: bool,
    question: String,
    history: Vec<Turn>,
}

fn prompt_input(data: &[u8]) -> PromptInput {
    let mut input = Input(data);
    let flags = input.byte();
    let model = pick_model(input.byte());
    let text = String::from_utf8_lossy(input.rest());
    let mut fields = text.split('\0').map(str::to_string);
    let question = fields.next().unwrap_or_default();
    let system_field = fields.next().unwrap_or_default();
    let system = match (flags >> 3) & 3 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(system_field),
    };
    let mut history = Vec::new();
    while let Some(user) = fields.next() {
        history.push(Turn { user, assistant: fields.next().unwrap_or_default() });
    }
    PromptInput { model, images: usize::from(flags & 7), system, first: flags & 0x20 != 0, question, history }
}

/// `render` then `token_ids` on arbitrary user text: the question, the system message (`--system`) and the
/// earlier turns (`--history`) are all the user's. See [`check_prompt`] for what must hold.
pub fn prompt(data: &[u8]) -> bool {
    let p = prompt_input(data);
    check_prompt(p.model, &p.history, &p.question, p.system.as_deref(), p.images, p.first)
}

/// The prompt of a request, checked:
///
/// * The rendered text ends with the assistant role (generation continues from there); images without a
///   placeholder anywhere in the conversation get `<image>` lines before the question.
/// * Tokenising it with `tiles` tiles per `<image>` fails only when the user's own text holds the reserved
///   `<IMG_CONTEXT>` token: otherwise the expansion is the only source of that (added, matched whole)
///   token, and the ids hold exactly `tokens_per_tile` context ids per tile, all inside the vocabulary.
fn check_prompt(
    model: &Model,
    history: &[Turn],
    question: &str,
    system: Option<&str>,
    images: usize,
    first: bool,
) -> bool {
    let (m, t) = (&model.manifest, &model.manifest.template);
    let text = render(t, history, question, system, images);
    assert!(text.ends_with(&t.roles[1]), "the prompt does not end with the assistant role: {text:?}");
    let placed = question.contains(IMAGE_PLACEHOLDER) || history.iter().any(|h| h.user.contains(IMAGE_PLACEHOLDER));
    if images > 0 && !placed {
        let lines = match images {
            1 => format!("{IMAGE_PLACEHOLDER}\n"),
            n => (1..=n).map(|i| format!("Image-{i}: {IMAGE_PLACEHOLDER}\n")).collect(),
        };
        let asked = format!("{}{lines}{question}", t.roles[0]);
        assert!(text.contains(&asked), "no image lines before the question in {text:?}");
    }

    let placeholders = text.matches(IMAGE_PLACEHOLDER).count();
    let tiles: Vec<usize> = (0..placeholders).map(|k| 1 + k % 3).collect();
    let spec = &m.tokenizer;
    let result = token_ids(m, &model.tokenizer, &text, &tiles, first);
    if text.contains(&spec.img_context) {
        assert!(result.is_err(), "a prompt with {} typed in was accepted", spec.img_context);
        return false;
    }
    let ids = result.unwrap_or_else(|e| panic!("{}: tokenising {text:?}: {e:#}", model.dir.display()));
    let context = ids.iter().filter(|&&id| id == spec.img_context_id).count();
    assert_eq!(context, tiles.iter().sum::<usize>() * m.vision.tokens_per_tile, "image context ids in {text:?}");
    let bad = ids.iter().find(|&&id| id as usize >= spec.vocab_size);
    assert!(bad.is_none(), "id {bad:?} outside the vocabulary {} in the prompt", spec.vocab_size);
    true
}

// ---------------------------------------------------------------------------------------------------------
// history: the --history file
// ---------------------------------------------------------------------------------------------------------

/// A `--history` file with arbitrary content, read as the command line reads it (`load_history`), then used
/// as the earlier turns of a one-image request ([`check_prompt`]).
///
/// * `load_history` of the file agrees with `parse_history` of its text, and refuses a file that is not
///   UTF-8; its errors are input errors (exit code 3), whatever the content.
/// * Accepted turns survive a JSON round trip unchanged (what was read is exactly the file's strings).
pub fn history(data: &[u8]) -> bool {
    let path = scratch_file();
    std::fs::write(&path, data).expect("writing the scratch history file");
    let loaded = load_history(&path);
    let _ = std::fs::remove_file(&path);
    let text = std::str::from_utf8(data);
    let turns = match (loaded, text) {
        (Ok(turns), Ok(text)) => {
            let again = parse_history(text).expect("load_history accepted what parse_history refuses");
            assert!(same_turns(&turns, &again), "load_history and parse_history disagree");
            turns
        }
        (Ok(_), Err(e)) => panic!("load_history accepted a file that is not UTF-8 ({e})"),
        (Err(e), text) => {
            let kind = internvl::error::ErrorKind::of(&e);
            assert_eq!(kind, internvl::error::ErrorKind::Input, "history error {e:#} is not an input error");
            if let Ok(text) = text {
                assert!(parse_history(text).is_err(), "parse_history accepts what load_history refused: {e:#}");
            }
            return false;
        }
    };
    let json: Vec<serde_json::Value> =
        turns.iter().map(|t| serde_json::json!({"user": t.user, "assistant": t.assistant})).collect();
    let again = parse_history(&serde_json::Value::Array(json).to_string()).expect("re-parsing written turns");
    assert!(same_turns(&turns, &again), "history turns changed in a JSON round trip");

    let model = pick_model(data.len() as u8);
    check_prompt(model, &turns, "Describe the image.", None, 1, true);
    true
}

fn same_turns(a: &[Turn], b: &[Turn]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.user == y.user && x.assistant == y.assistant)
}

/// A file of this process and thread (the corpus test runs targets on parallel threads).
fn scratch_file() -> PathBuf {
    thread_local! {
        static PATH: PathBuf = std::env::temp_dir()
            .join(format!("internvl-fuzz-history-{}-{:?}.json", std::process::id(), std::thread::current().id()));
    }
    PATH.with(|p| p.clone())
}
