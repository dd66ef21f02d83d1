//! Answers end to end on the tiny random-weight models: the `internvl` binary must produce exactly the
//! token ids that PyTorch `generate` produces (goldens computed in the same run by tests/fixtures.py),
//! in one-shot runs and chat turns. The decoder's cache and kernels are tests/kernels.rs, bad input
//! tests/hostile.rs, the server tests/python/test_serve.py.

mod common;

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
