//! End to end on the tiny random-weight model: the `internvl` binary must produce exactly the token
//! ids that PyTorch `generate` produces (goldens computed in the same run by tests/fixtures.py). Bad
//! input is tests/hostile.rs.

mod common;

use internvl::decoder::{Decoder, KvCache, RowInput};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::Value;

struct Case {
    name: String,
    images: Vec<String>,
    prompt: String,
    max_tiles: Option<u64>,
    max_new_tokens: u64,
    model: String,
    system: Option<String>,
    history: Option<Value>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            images: c["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()).collect(),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            max_tiles: c["max_tiles"].as_u64(),
            max_new_tokens: c["max_new_tokens"].as_u64().unwrap(),
            model: c["model"].as_str().unwrap().to_string(),
            system: c["system"].as_str().map(str::to_string),
            history: c.get("history").cloned(),
        })
        .collect()
}

fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn case_args(case: &Case) -> Vec<String> {
    let model = fixtures().join(&case.model);
    let mut args: Vec<String> = vec!["run".into(), "--model".into(), model.display().to_string()];
    for img in &case.images {
        args.extend(["--image".into(), fixtures().join(img).display().to_string()]);
    }
    if let Some(n) = case.max_tiles {
        args.extend(["--max-tiles".into(), n.to_string()]);
    }
    if let Some(s) = &case.system {
        args.extend(["--system".into(), s.clone()]);
    }
    if let Some(h) = &case.history {
        // The fixture stores [[user, assistant], ...]; the CLI reads [{"user", "assistant"}, ...].
        let turns: Vec<Value> =
            h.as_array().unwrap().iter().map(|t| serde_json::json!({"user": t[0], "assistant": t[1]})).collect();
        let file = tmp(&format!("history-{}", case.name)).join("history.json");
        std::fs::write(&file, serde_json::to_string(&turns).unwrap()).unwrap();
        args.extend(["--history".into(), file.display().to_string()]);
    }
    args.extend(["--prompt".into(), case.prompt.clone(), "--max-new-tokens".into(), case.max_new_tokens.to_string()]);
    args
}

fn run_case(case: &Case, extra: &[&str]) -> Value {
    let mut args = case_args(case);
    args.push("--json".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = bin().args(&args).output().unwrap();
    assert!(out.status.success(), "{}: {}", case.name, stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_parity(name: &str, extra: &[&str]) {
    let case = case(name);
    let want = golden(name);
    let got = run_case(&case, extra);
    assert_eq!(got["tiles"], want["tiles"], "{name}: tile count");
    assert_eq!(
        got["prompt_tokens"].as_u64().unwrap() as usize,
        ids(&want["prompt_ids"]).len(),
        "{name}: prompt length"
    );
    assert_eq!(ids(&got["token_ids"]), ids(&want["tokens"]), "{name}: generated tokens differ from PyTorch");
    assert_eq!(got["finish_reason"], want["finish_reason"], "{name}: finish reason");
}

#[test]
fn teacher_forcing_scores_the_forced_answer() {
    // Forcing PyTorch's greedy answer: each row of logits must pick the id that was forced next, and
    // the answer must be exactly the forced ids.
    let case = case("one_tile");
    let want = ids(&golden("one_tile")["tokens"]);
    let dir = tmp("forced");
    std::fs::write(dir.join("ids.json"), serde_json::to_string(&want).unwrap()).unwrap();
    let npy = dir.join("logits.npy");
    let got = run_case(
        &case,
        &["--force-tokens", dir.join("ids.json").to_str().unwrap(), "--logits-out", npy.to_str().unwrap()],
    );
    assert_eq!(ids(&got["token_ids"]), want);
    let (shape, logits) = internvl::npy::read_f32(&npy).unwrap();
    assert_eq!(shape, [want.len(), logits.len() / want.len()]);
    for (row, id) in logits.chunks(shape[1]).zip(&want) {
        let argmax = row.iter().enumerate().fold(0, |b, (i, x)| if *x > row[b] { i } else { b });
        assert_eq!(argmax as u64, *id);
    }
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "[1, 99999999]").unwrap();
    assert_clean_error(
        &bin().args(case_args(&case)).args(["--force-tokens", bad.to_str().unwrap()]).output().unwrap(),
        "99999999",
    );
}

#[test]
fn goldens_depend_on_image_and_prompt() {
    // A parity test on a model that ignores its input would prove little.
    let a = ids(&golden("one_tile")["tokens"]);
    let b = ids(&golden("one_tile_other_prompt")["tokens"]);
    let c = ids(&golden("one_tile_other_image")["tokens"]);
    assert!(a.len() >= 32, "golden one_tile has only {} tokens", a.len());
    assert_ne!(a, b, "output does not depend on the prompt");
    assert_ne!(a, c, "output does not depend on the image");
    for case in cases() {
        let t = ids(&golden(&case.name)["tokens"]);
        let distinct: std::collections::HashSet<_> = t.iter().collect();
        assert!(distinct.len() >= 8, "{}: greedy output collapsed to {} distinct tokens", case.name, distinct.len());
    }
}

#[test]
fn parity_one_tile() {
    check_parity("one_tile", &[]);
    check_parity("one_tile_other_prompt", &[]);
    check_parity("one_tile_other_image", &[]);
}

#[test]
fn parity_grid_with_thumbnail() {
    check_parity("grid_thumbnail", &[]);
    check_parity("grid_max6_own_placeholder", &[]);
}

#[test]
fn parity_max_tiles_40() {
    check_parity("max_tiles_40", &[]);
}

#[test]
fn parity_text_only() {
    check_parity("text_only", &[]);
}

#[test]
fn parity_two_images_batched_together() {
    check_parity("two_images", &[]);
    check_parity("two_images", &["--vision-batch", "3"]);
}

#[test]
fn parity_history_and_system_prompt() {
    check_parity("history", &[]);
    check_parity("system_replaced", &[]);
}

#[test]
fn parity_original_layout_qwen2() {
    check_parity("qwen2-original", &[]);
}

#[test]
fn parity_original_layout_llama() {
    check_parity("llama-original", &[]);
}

#[test]
fn parity_original_layout_qwen3_internvit_6b() {
    check_parity("qwen3-original", &[]);
}

#[test]
fn parity_original_layout_internlm2_internvit_6b() {
    check_parity("internlm2-original", &[]);
}

#[test]
fn parity_original_layout_phi3_long_rope() {
    // The prompt (13 tiles) is past LongRoPE's switch point: every prefill chunk uses the long factors.
    check_parity("phi3-original", &[]);
    check_parity("phi3-original", &["--prefill-chunk", "100000"]);
}

#[test]
fn parity_phi3_crossing_long_rope_while_decoding() {
    let name = "phi3-original-text-crossing-long-rope";
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(case(name).model).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let after = manifest["decoder"]["long_rope_after"].as_u64().unwrap() as usize;
    let prompt = ids(&golden(name)["prompt_ids"]).len();
    let answer = ids(&golden(name)["tokens"]).len();
    assert!(prompt < after && prompt + answer > after + 1, "case does not cross {after}: {prompt} + {answer}");
    check_parity(name, &[]);
}

/// The exact prompt ids of every case, Rust tokenizer (the converted tokenizer.json) against the reference
/// (Qwen2: its tokenizer.json; sentencepiece families: transformers 4.37's slow classes written out).
#[test]
fn prompt_ids_equal_the_reference_for_every_case() {
    let mut by_model: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for case in cases() {
        by_model.entry(case.model.clone()).or_default().push(golden(&case.name));
    }
    for (model, goldens) in by_model {
        let texts: Vec<&Value> = goldens.iter().map(|g| &g["prompt_text"]).collect();
        let file = tmp(&format!("prompts-{}", model.replace('/', "-"))).join("prompts.json");
        std::fs::write(&file, serde_json::to_string(&texts).unwrap()).unwrap();
        let dir = fixtures().join(&model);
        let out = run(&["tokenize", "--model", dir.to_str().unwrap(), "--file", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let got: Vec<Vec<u64>> = serde_json::from_slice(&out.stdout).unwrap();
        for (g, ids_got) in goldens.iter().zip(got) {
            assert_eq!(ids_got, ids(&g["prompt_ids"]), "{}: prompt ids differ from the reference", g["name"]);
        }
    }
}

#[test]
fn vision_batch_and_prefill_chunk_do_not_change_tokens() {
    check_parity("grid_thumbnail", &["--vision-batch", "1", "--prefill-chunk", "500"]);
    check_parity("grid_thumbnail", &["--vision-batch", "13", "--prefill-chunk", "100000"]);
}

#[test]
fn streamed_text_matches_json_text() {
    let case = case("one_tile");
    let json = run_case(&case, &[]);
    let out = bin().args(case_args(&case)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let streamed = String::from_utf8(out.stdout.clone()).expect("stdout is valid UTF-8");
    assert_eq!(streamed.trim(), json["text"].as_str().unwrap());
    assert!(out.stderr.is_empty(), "stderr not a terminal: no progress output expected, got {}", stderr(&out));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let case = case("text_only");
    let args = ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--repetition-penalty", "1.1"];
    let a = run_case(&case, &[&args[..], &["--seed", "1"]].concat());
    let b = run_case(&case, &[&args[..], &["--seed", "1"]].concat());
    let c = run_case(&case, &[&args[..], &["--seed", "2"]].concat());
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_ne!(a["token_ids"], c["token_ids"]);
}

#[test]
fn stops_at_a_stop_token() {
    // Make the 6th golden token a stop token: the answer must end right before it.
    let want = ids(&golden("one_tile")["tokens"]);
    let stop = want[5];
    let first = want.iter().position(|&t| t == stop).unwrap();
    let m = model_copy("stop-token");
    edit_manifest(&m, |v| v["tokenizer"]["stop_ids"] = serde_json::json!([stop]));
    let case = case("one_tile");
    let img = fixtures().join(&case.images[0]);
    let out = bin()
        .args([
            "run",
            "--model",
            m.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            &case.prompt,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&got["token_ids"]), want[..first].to_vec());
    assert_eq!(got["finish_reason"], "stop");
}

/// Two turns of `internvl chat` on `case` (its images attached to the first): the first answer must be
/// `run`'s, the second exactly what the reference `chat(history=...)` gives, i.e. `run --history` with the
/// first answer as text. Returns the number of tokens the second turn ran through the decoder.
fn chat_matches_run_with_history(name: &str, second_question: &str) -> usize {
    let case = case(name);
    let want = run_case(&case, &[]);
    let model = fixtures().join(&case.model);
    let images: Vec<String> = case.images.iter().map(|i| fixtures().join(i).display().to_string()).collect();
    let image_args: Vec<&str> = images.iter().flat_map(|i| ["--image", i.as_str()]).collect();
    let tokens = case.max_new_tokens.to_string();
    let mut child = bin()
        .args(["chat", "--model", model.to_str().unwrap()])
        .args(&image_args)
        .args(["--max-new-tokens", &tokens, "--verbose"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let questions = format!("{}\n{second_question}\n", case.prompt);
    child.stdin.take().unwrap().write_all(questions.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    // Streamed text compared with streamed text (the JSON text is a whole-answer decode, which differs
    // where random weights produce invalid UTF-8); the history holds the decoded answer, as chat() does.
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let streamed = bin().args(case_args(&case)).output().unwrap();
    assert!(streamed.status.success(), "{name}: {}", stderr(&streamed));
    let first_streamed = String::from_utf8(streamed.stdout).unwrap();
    let second_answer = stdout.strip_prefix(first_streamed.as_str()).expect("first chat turn differs from run").trim();
    assert!(!second_answer.is_empty(), "{name}: no second answer: {stdout:?}");
    let first = want["text"].as_str().unwrap();

    let user = if images.is_empty() { case.prompt.clone() } else { format!("<image>\n{}", case.prompt) };
    let history = tmp(&format!("chat-history-{name}")).join("history.json");
    std::fs::write(&history, serde_json::json!([{"user": user, "assistant": first}]).to_string()).unwrap();
    let mut args = vec!["run", "--model", model.to_str().unwrap()];
    args.extend(&image_args);
    args.extend(["--history", history.to_str().unwrap(), "--prompt", second_question, "--max-new-tokens", &tokens]);
    let reference = run(&args);
    assert!(reference.status.success(), "{name}: {}", stderr(&reference));
    let reference = String::from_utf8(reference.stdout).unwrap();
    assert_eq!(second_answer, reference.trim(), "{name}: second chat turn differs from run --history");

    let err = stderr(&out);
    let second = err.lines().nth(1).expect("timings of the second turn");
    second.split("prefill ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn chat_turns_equal_the_reference_and_keep_the_cache() {
    // The second turn runs only what changed through the decoder: from the first position where the first
    // answer, re-tokenised from its text, differs from the generated ids (on random weights the answer is
    // gibberish that re-tokenises differently early on), then the new question; not the ~300-token first
    // turn again.
    let prefill = chat_matches_run_with_history("one_tile", "And what colour is it?");
    assert!(prefill < 100, "second turn prefilled {prefill} tokens");
}

#[test]
fn chat_past_the_long_rope_switch_reruns_the_conversation() {
    // The first turn's prompt is short of Phi-3's LongRoPE switch point and its answer crosses it; the
    // reference runs the two-turn conversation with the long factors throughout, so the cache is rebuilt.
    let name = "phi3-original-text-crossing-long-rope";
    let prompt = ids(&golden(name)["prompt_ids"]).len();
    let prefill = chat_matches_run_with_history(name, "Another one, please.");
    assert!(prefill > prompt, "second turn prefilled only {prefill} tokens: the short-factor cache was kept");
}

/// The KV cache grows (a copy of the filled positions into a larger buffer) when a conversation outgrows
/// it; the logits must be exactly those of a cache sized for everything up front.
/// Deterministic embedding rows (not a real prompt: the decoder only sees vectors).
fn embedding_rows(n: usize, seed: usize, hidden: usize) -> Vec<f32> {
    (0..n * hidden).map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// Logits of 200 + 150 positions and two steps with a cache sized up front, and with one that starts
/// empty and grows (256 positions, then 512, copying the filled part).
fn logits_sized_and_grown(model: &internvl::Model) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let hidden = model.manifest.decoder.hidden;
    let (a, b, c) = (embedding_rows(200, 1, hidden), embedding_rows(150, 2, hidden), embedding_rows(1, 3, hidden));
    let dec = model.decoder();
    let mut sized = dec.new_cache(1).unwrap();
    dec.reserve(&mut sized, 400).unwrap();
    let mut grown = dec.new_cache(1).unwrap();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for (piece, chunk) in [(&a, 64), (&b, 256), (&c, 1), (&c, 1)] {
        want.push(forward(dec, &mut sized, 0, piece, chunk));
        got.push(forward(dec, &mut grown, 0, piece, chunk));
    }
    assert_eq!(grown.len(0), 352);
    (want, got)
}

/// `embeds` after what row `row` holds, in chunks of `chunk` positions: the logits of the last.
fn forward(dec: &Decoder, cache: &mut KvCache, row: usize, embeds: &[f32], chunk: usize) -> Vec<f32> {
    let mut last = Vec::new();
    for piece in embeds.chunks(chunk * dec.spec.hidden) {
        last = dec.step(cache, &[RowInput { row, embeds: piece }], false).unwrap().remove(0);
    }
    last
}

#[test]
fn rows_decoded_together_give_each_row_its_solo_logits() {
    // Continuous batching: rows of different lengths (and an idle row between them) step in one call;
    // each row's logits must be exactly those of the same row stepped alone, for ONNX Runtime's
    // GroupQueryAttention (fp32 model) and the AMX kernel. int8 graphs quantise activations per tensor,
    // so there a row's logits move with its batch (bounded here; token changes: scripts/serve_bench.py).
    let rt = internvl::runtime::RuntimeOptions::default();
    let [amx64, _] = amx_models();
    for dir in [fixtures().join("model"), amx64] {
        // fp32 (ONNX Runtime's GroupQueryAttention), then int8 with the AMX kernel where it runs.
        let model = internvl::Model::load(&dir, &rt).unwrap();
        let dec = model.decoder();
        let hidden = model.manifest.decoder.hidden;
        let prompts = [(0, 37), (1, 5), (3, 120)]; // (row, prompt length); row 2 stays idle
        let solo: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|&(_, n)| {
                let mut cache = dec.new_cache(1).unwrap();
                let mut out = vec![forward(dec, &mut cache, 0, &embedding_rows(n, n, hidden), 64)];
                for step in 0..4 {
                    out.push(forward(dec, &mut cache, 0, &embedding_rows(1, 1000 * n + step, hidden), 1));
                }
                out
            })
            .collect();
        let mut cache = dec.new_cache(4).unwrap();
        let mut together: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|&(row, n)| vec![forward(dec, &mut cache, row, &embedding_rows(n, n, hidden), 64)])
            .collect();
        for step in 0..4 {
            let rows: Vec<Vec<f32>> =
                prompts.iter().map(|&(_, n)| embedding_rows(1, 1000 * n + step, hidden)).collect();
            let inputs: Vec<RowInput> =
                prompts.iter().zip(&rows).map(|(&(row, _), e)| RowInput { row, embeds: e }).collect();
            for (k, logits) in dec.step(&mut cache, &inputs, false).unwrap().into_iter().enumerate() {
                together[k].push(logits);
            }
        }
        assert_eq!(cache.len(2), 0, "the idle row between the others gained no positions");
        let int8 = model.manifest.dtype != "float32";
        for (k, (want, got)) in solo.iter().zip(&together).enumerate() {
            if !int8 {
                assert_eq!(got, want, "{}: row {} stepped with others differs from alone", dec.file, prompts[k].0);
                continue;
            }
            // Per-tensor activation scales: measured up to 3.7e-2 of the largest logit on this model; the
            // prompt (one row alone) stays exact, and a wrong row or cache slot is off by far more.
            assert_eq!(got[0], want[0], "row {}: prefill alone must be exact", prompts[k].0);
            for (w, g) in want.iter().zip(got) {
                let d = max_rel_diff(w, g);
                assert!(d < 0.1, "{}: row {} batched differs by {d} of the logits' range", dec.file, prompts[k].0);
            }
        }
        assert!(solo[0][1] != solo[0][2], "steps gave identical logits: the test would not see a stale cache");
    }
}

#[test]
fn kv_cache_growth_keeps_logits_exact() {
    let rt = internvl::runtime::RuntimeOptions::default();
    // The fp32 model (ONNX Runtime's GroupQueryAttention) and the AMX kernel where it runs.
    let [amx64, amx128] = amx_models();
    for dir in [fixtures().join("model"), amx64, amx128] {
        let model = internvl::Model::load(&dir, &rt).unwrap();
        let (want, got) = logits_sized_and_grown(&model);
        assert_eq!(got, want, "{}: logits after cache growth differ", model.decoder().file);
        assert!(want[2] != want[3], "decode steps gave identical logits: the test would not see a stale cache");
    }
}

/// int8 export with 64-wide attention heads: it has `vision-amx.onnx` and `decoder-amx.onnx`.
fn amx_model() -> PathBuf {
    fixtures().join("models/qwen2-amx-int8")
}

/// Both head sizes the AMX kernels lay out: 64 and 128.
fn amx_models() -> [PathBuf; 2] {
    [amx_model(), fixtures().join("models/qwen2-amx128-int8")]
}

fn embed(model: &Path, attention: &str, out: &Path) -> Output {
    let img = fixtures().join("images/1600x1000_5.png");
    let args = ["embed", "--model", model.to_str().unwrap(), "--image", img.to_str().unwrap(), "--max-tiles", "6"];
    let out_args = ["--out", out.to_str().unwrap(), "--attention", attention, "--verbose"];
    bin().args(args).args(out_args).output().unwrap()
}

#[test]
fn amx_vision_attention_agrees_with_onnx_runtime() {
    for model in amx_models() {
        amx_vision_agrees(&model);
    }
}

fn amx_vision_agrees(model: &Path) {
    let dir = tmp("amx-embed");
    let onnx = embed(model, "onnx", &dir.join("onnx.npy"));
    assert!(onnx.status.success(), "{}", stderr(&onnx));
    assert!(stderr(&onnx).contains("through vision.onnx"), "{}", stderr(&onnx));
    let auto = embed(model, "auto", &dir.join("auto.npy"));
    assert!(auto.status.success(), "{}", stderr(&auto));
    if !internvl::kernels::amx_available() {
        // Off AMX hardware the portable graph runs, and asking for the kernel is a clean error.
        assert!(stderr(&auto).contains("through vision.onnx"), "{}", stderr(&auto));
        assert_clean_error(&embed(model, "amx", &dir.join("amx.npy")), "no AMX-BF16");
        return;
    }
    assert!(stderr(&auto).contains("through vision-amx.onnx"), "auto must pick the AMX graph: {}", stderr(&auto));
    let (shape_a, a) = internvl::npy::read_f32(&dir.join("onnx.npy")).unwrap();
    let (shape_b, b) = internvl::npy::read_f32(&dir.join("auto.npy")).unwrap();
    assert_eq!(shape_a, shape_b);
    assert_eq!(shape_a[0], 7, "6 tiles + thumbnail");
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
    let cosine = dot(&a, &b) / (dot(&a, &a) * dot(&b, &b)).sqrt();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p - q).collect();
    let rel_l2 = (dot(&diff, &diff) / dot(&a, &a)).sqrt();
    // bf16 attention vs fp32 (same int8 weights), measured: cosine 0.99999 / rel. L2 0.5% here, 0.99995 /
    // 1.0% on the InternVL2.5-1B shape; a head or layout mix-up gives cosine far below 0.99.
    assert!(cosine > 0.9995 && rel_l2 < 0.02, "{}: cosine {cosine}, relative L2 {rel_l2}", model.display());
    assert!(rel_l2 > 0.0, "identical output: the AMX kernel did not run");
    // And the whole pipeline answers with it.
    let img = fixtures().join("images/448x448_1.png");
    let out = run_model(model, Some(&img), &["--max-new-tokens", "4", "--attention", "amx"]);
    assert!(out.status.success() && !out.stdout.is_empty(), "{}", stderr(&out));
}

#[test]
fn kv_cache_handed_back_instead_of_shared_gives_the_same_logits() {
    // With the manifest saying plain attention, the decoder hands each call's present tensors back as the
    // next past instead of binding one buffer to both: the attention kernel then writes a fresh present
    // (the AMX operator copies the past into it). Same numbers either way, for both kernels.
    use internvl::runtime::{AttentionKernels, RuntimeOptions};
    let copy = folder_copy(&amx_model(), "amx-unshared");
    edit_manifest(&copy, |v| v["decoder"]["attention"] = "onnx".into());
    for attention in [AttentionKernels::Onnx, AttentionKernels::Auto] {
        let rt = RuntimeOptions { attention, ..Default::default() };
        let shared = internvl::Model::load(&amx_model(), &rt).unwrap();
        let handed = internvl::Model::load(&copy, &rt).unwrap();
        assert_eq!(shared.graph_files(), handed.graph_files());
        let (want, _) = logits_sized_and_grown(&shared);
        let (got, _) = logits_sized_and_grown(&handed);
        assert_eq!(got, want, "{:?}: logits differ when the cache is handed back", shared.graph_files());
    }
}

#[test]
fn amx_graph_refused_where_it_cannot_run() {
    let img = fixtures().join("images/448x448_1.png");
    // fp32 exports keep fp32 attention: no AMX graph.
    let out = run_model(&fixtures().join("model"), Some(&img), &["--attention", "amx"]);
    assert_clean_error(&out, "no AMX variant");
    let out = run_model(&amx_model(), Some(&img), &["--attention", "amx", "--device", "cuda"]);
    assert_clean_error(&out, "AMX kernels run on the CPU and --device is cuda");
    let m = folder_copy(&amx_model(), "amx-missing");
    std::fs::remove_file(m.join("vision-amx.onnx")).unwrap();
    assert_clean_error(&run_model(&m, Some(&img), &[]), "vision-amx.onnx");
    let m = folder_copy(&amx_model(), "amx-other-op");
    edit_manifest(&m, |v| v["vision"]["amx"]["op"] = "ai.other::Attention".into());
    assert_clean_error(&run_model(&m, Some(&img), &[]), "ai.other::Attention");
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn amx_decoder_attention_agrees_with_onnx_runtime() {
    for model in amx_models() {
        amx_decoder_agrees(&model);
    }
}

fn amx_decoder_agrees(model: &Path) {
    use internvl::runtime::{AttentionKernels, RuntimeOptions};
    let load = |attention| internvl::Model::load(model, &RuntimeOptions { attention, ..Default::default() });
    let onnx = load(AttentionKernels::Onnx).unwrap();
    assert_eq!(onnx.decoder().file, "decoder.onnx");
    if !internvl::kernels::amx_available() {
        assert_eq!(load(AttentionKernels::Auto).unwrap().decoder().file, "decoder.onnx");
        let err = format!("{:#}", load(AttentionKernels::Amx).err().expect("--attention amx without AMX"));
        assert!(err.contains("no AMX-BF16"), "{err}");
        return;
    }
    let amx = load(AttentionKernels::Auto).unwrap();
    assert_eq!(amx.decoder().file, "decoder-amx.onnx");
    // One position per call: the kernel's fp32 path throughout (cache writes, rotary, head groups), so
    // ONNX Runtime's numbers to rounding: measured <= 2.2e-7 of the largest logit, except where the
    // int8 graph's on-the-fly activation quantisation rounds a near-tie the other way (one position in
    // 40 on the 128-wide model: 1.2e-2). A wrong cache row, rotation or head group is off everywhere.
    let hidden = amx.manifest.decoder.hidden;
    let rows = embedding_rows(40, 5, hidden);
    let (mut cache_a, mut cache_b) = (onnx.decoder().new_cache(1).unwrap(), amx.decoder().new_cache(1).unwrap());
    let mut exact = 0;
    for (i, row) in rows.chunks(hidden).enumerate() {
        let w = forward(onnx.decoder(), &mut cache_a, 0, row, 1);
        let g = forward(amx.decoder(), &mut cache_b, 0, row, 1);
        let d = max_rel_diff(&w, &g);
        assert!(d < 5e-2, "{}: position {i}: logits differ by {d} of their range", model.display());
        exact += usize::from(d < 1e-5);
    }
    assert!(exact >= 36, "{}: only {exact} of 40 positions within 1e-5", model.display());
    let (want, _) = logits_sized_and_grown(&onnx);
    let (got, _) = logits_sized_and_grown(&amx);
    // Prompt chunks run on bf16 tiles (the kernel itself is checked against a reference in its unit
    // tests); these models' widened weights make attention peaked, so bf16 moves their logits: measured
    // up to 0.19 (64-wide) / 0.13 (128-wide) of the largest logit, 7.6e-2 on the InternVL2.5-1B shape
    // with the same rows. Quality on real prompts: scripts/quality.py.
    for (step, (w, g)) in want.iter().zip(&got).enumerate() {
        let d = max_rel_diff(w, g);
        assert!(d < 0.35 && d > 0.0, "{}: call {step}: logits differ by {d} of their range", model.display());
    }
}
