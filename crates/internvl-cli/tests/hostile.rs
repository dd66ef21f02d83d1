//! Bad input, as a hostile or careless user sends it: every case must end in one clear line on stderr
//! naming the file, flag or value, with the exit code of its class (README, "Exit codes"), within a time
//! bound, and with nothing the user had changed. The corpus covers each class the hardening issue
//! lists: files destroyed, hangs, unbounded memory, panics, wrong answers, vague messages, a dying chat.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[test]
fn missing_image_file() {
    let img = root().join("build/test-tmp/does-not-exist.png");
    assert_clean_error(&run_model(&fixtures().join("model"), Some(&img), &[]), "does-not-exist.png");
}

#[test]
fn corrupt_truncated_and_non_image_files() {
    let d = tmp("bad-images");
    let png = std::fs::read(fixtures().join("images/448x448_1.png")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("corrupt.png", {
            let mut b = png.clone();
            for x in b.iter_mut().skip(100).step_by(7) {
                *x ^= 0x5a;
            }
            b
        }),
        ("notes.png", b"this is a text file, not an image\n".to_vec()),
        ("empty.jpg", Vec::new()),
    ];
    for (name, bytes) in cases {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_clean_error(&run_model(&fixtures().join("model"), Some(&p), &[]), name);
    }
}

#[test]
fn model_folder_missing_a_graph() {
    let m = model_copy("missing-graph");
    std::fs::remove_file(m.join("decoder.onnx")).unwrap();
    assert_clean_error(&run_model(&m, None, &[]), "decoder.onnx");
    assert_clean_error(&run_model(&tmp("empty-model"), None, &[]), "manifest.json");
    assert_clean_error(&run_model(&root().join("build/test-tmp/no-such-model"), None, &[]), "no-such-model");
}

#[test]
fn manifest_from_another_model() {
    let m = model_copy("other-manifest-layers");
    edit_manifest(&m, |v| v["decoder"]["layers"] = 24.into());
    assert_clean_error(&run_model(&m, None, &[]), "different models");
    let m = model_copy("other-manifest-hidden");
    edit_manifest(&m, |v| {
        v["decoder"]["hidden"] = 896.into();
        v["embed"]["hidden"] = 896.into();
        v["vision"]["embed_dim"] = 896.into();
    });
    assert_clean_error(&run_model(&m, None, &[]), "embed_tokens.bin");
    let m = model_copy("other-manifest-version");
    edit_manifest(&m, |v| v["format_version"] = 99.into());
    assert_clean_error(&run_model(&m, None, &[]), "format_version");
}

#[test]
fn prompt_longer_than_context() {
    let m = model_copy("short-context");
    edit_manifest(&m, |v| v["decoder"]["max_context"] = 600.into());
    let img = fixtures().join("images/800x600_3.png");
    assert_clean_error(&run_model(&m, Some(&img), &[]), "context");
}

#[test]
fn unknown_flag_and_bad_values() {
    assert_clean_error(&run(&["run", "--model", "x", "--prompt", "p", "--bogus"]), "--bogus");
    let model = fixtures().join("model");
    let m = model.to_str().unwrap();
    assert_clean_error(&run(&["run", "--model", m, "--prompt", "p", "--max-tiles", "41"]), "--max-tiles");
    assert_clean_error(&run(&["run", "--model", m, "--prompt", "p", "--top-p", "0"]), "--top-p");
    assert_clean_error(&run(&["run", "--model", m, "--prompt", "p", "--device", "gpu"]), "gpu");
}

#[test]
fn reserved_image_token_in_the_prompt_is_an_error() {
    let out = run(&["run", "--model", fixtures().join("model").to_str().unwrap(), "--prompt", "say <IMG_CONTEXT> now"]);
    assert_clean_error(&out, "<IMG_CONTEXT>");
    let img = fixtures().join("images/448x448_1.png");
    let model = fixtures().join("model");
    let args =
        ["run", "--model", model.to_str().unwrap(), "--image", img.to_str().unwrap(), "--prompt", "<image>, <image>"];
    assert_clean_error(&run(&args), "placeholder");
}

#[test]
fn unavailable_gpu_provider_is_an_error() {
    // The CPU build of ONNX Runtime has no CUDA provider: asking for it must not fall back silently.
    let out = run_model(&fixtures().join("model"), None, &["--device", "cuda"]);
    assert_clean_error(&out, "cuda");
}

// ---- the corpus -------------------------------------------------------------------------------

/// One bad invocation and what it must end in.
struct Bad {
    name: &'static str,
    args: Vec<String>,
    /// Exit code of the class: 2 usage, 3 input, 4 model.
    code: i32,
    needle: String,
}

fn bad(name: &'static str, code: i32, needle: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Bad {
    let args = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    Bad { name, args, code, needle: needle.to_string() }
}

/// Runs the binary, feeding `stdin`, and kills it after `limit`: a hang fails the test instead of stalling it.
fn run_bounded(args: &[String], stdin: Option<Vec<u8>>, limit: Duration) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning internvl");
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data); // the child may stop reading early
        })
    });
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("internvl {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Every file under `dirs` with its content: what a case must leave as it was.
fn snapshot(dirs: &[&Path]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for d in dirs {
        let mut entries: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let content = if meta.file_type().is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
            files.push((p, content));
        }
    }
    files
}

fn mkfifo(p: &Path) {
    let status = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(status.success());
}

fn sparse(p: &Path, len: u64) {
    std::fs::File::create(p).unwrap().set_len(len).unwrap();
}

/// A PNG whose ICC profile chunk inflates to 64 MiB (Pillow refuses past 1 MiB).
fn icc_bomb(p: &Path) {
    let mut png = Vec::new();
    image::RgbImage::new(32, 32).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        z.write_all(&zeros).unwrap();
    }
    let mut body = b"icc\0\0".to_vec();
    body.extend(z.finish().unwrap());
    let mut chunk = (body.len() as u32).to_be_bytes().to_vec();
    let typed: Vec<u8> = b"iCCP".iter().chain(&body).copied().collect();
    chunk.extend(&typed);
    chunk.extend(crc32(&typed).to_be_bytes());
    png.splice(33..33, chunk);
    std::fs::write(p, png).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn hostile_corpus() {
    let d = tmp("hostile");
    let model = fixtures().join("model");
    let photo = d.join("photo.png");
    std::fs::copy(fixtures().join("images/800x600_3.png"), &photo).unwrap();
    std::fs::write(d.join("old.npy"), b"precious").unwrap();
    std::fs::write(d.join("ids.json"), b"[1, 2, 3]").unwrap();
    std::os::unix::fs::symlink(&photo, d.join("link.npy")).unwrap();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    sparse(&d.join("huge.png"), 800 << 20);
    sparse(&d.join("huge.json"), 65 << 20);
    icc_bomb(&d.join("icc-bomb.png"));
    let long_turn = serde_json::json!([{"user": "a".repeat(20 << 20), "assistant": "b"}]);
    std::fs::write(d.join("long-history.json"), long_turn.to_string()).unwrap();
    std::fs::write(d.join("vocab.json"), b"[1, 99999999]").unwrap();
    let cjk = serde_json::json!([{"user": "\u{9f98} ".repeat(4_150_000), "assistant": "b"}]);
    std::fs::write(d.join("cjk-history.json"), cjk.to_string()).unwrap();
    std::fs::write(d.join("4000-ids.json"), serde_json::to_string(&vec![1u32; 4000]).unwrap()).unwrap();
    std::os::unix::fs::symlink("/proc/self/fd/1", d.join("stdout-link")).unwrap();
    std::fs::write(d.join("many-ids.json"), serde_json::to_string(&vec![1u32; 40_000]).unwrap()).unwrap();
    let mut webp = Vec::new();
    image::RgbImage::new(40, 30).write_to(&mut std::io::Cursor::new(&mut webp), image::ImageFormat::WebP).unwrap();
    std::fs::write(d.join("cut.webp"), &webp[..webp.len() - 2]).unwrap();

    // Model folders broken one way each (large files linked).
    let big_manifest = model_copy("hostile-big-manifest");
    let text = std::fs::read_to_string(model.join("manifest.json")).unwrap();
    std::fs::remove_file(big_manifest.join("manifest.json")).unwrap();
    std::fs::write(big_manifest.join("manifest.json"), text + &" ".repeat(2 << 20)).unwrap();
    let edited = |name: &str, f: &dyn Fn(&mut Value)| {
        let m = model_copy(name);
        edit_manifest(&m, f);
        m
    };
    let tpt = edited("hostile-tokens-per-tile", &|v| v["vision"]["tokens_per_tile"] = (1u64 << 32).into());
    let size = edited("hostile-image-size", &|v| {
        v["image"]["image_size"] = 8192.into();
        v["vision"]["image_size"] = 8192.into();
    });
    let kv = edited("hostile-kv-heads", &|v| v["decoder"]["kv_heads"] = 3.into());
    let tpt_small = edited("hostile-tokens-per-tile-graph", &|v| v["vision"]["tokens_per_tile"] = 64.into());
    let cut_data = model_copy("hostile-cut-data");
    let data = std::fs::read(model.join("decoder.onnx.data")).unwrap();
    std::fs::remove_file(cut_data.join("decoder.onnx.data")).unwrap();
    std::fs::write(cut_data.join("decoder.onnx.data"), &data[..data.len() - 4096]).unwrap();
    let garbage = model_copy("hostile-garbage-graph");
    let graph_len = std::fs::metadata(model.join("decoder.onnx")).unwrap().len() as usize;
    std::fs::remove_file(garbage.join("decoder.onnx")).unwrap();
    std::fs::write(garbage.join("decoder.onnx"), vec![0xA5u8; graph_len]).unwrap();
    let swapped = model_copy("hostile-swapped-data");
    let mut vdata = std::fs::read(model.join("vision.onnx.data")).unwrap();
    vdata[100] ^= 1;
    std::fs::remove_file(swapped.join("vision.onnx.data")).unwrap();
    std::fs::write(swapped.join("vision.onnx.data"), vdata).unwrap();

    let m = &model;
    let p = &photo;
    let f = |name: &str| d.join(name);
    let (run, pre, embed, tok, info) = (&"run", &"preprocess", &"embed", &"tokenize", &"info");
    let (mo, im, pr, hi, out) = (&"--model", &"--image", &"--prompt", &"--history", &"--out");
    let mut corpus = vec![
        // Files destroyed.
        bad("output is the input", 2, "also an input", &[pre, im, p, out, p]),
        bad("output is a link to the input", 2, "symbolic link", &[pre, im, p, out, &f("link.npy"), &"--force"]),
        bad(
            "output inside the model folder",
            2,
            "inside the model folder",
            &[embed, mo, m, im, p, out, &m.join("manifest.json")],
        ),
        bad(
            "logits onto the forced ids",
            2,
            "also an input",
            &[run, mo, m, pr, &"Hi", &"--force-tokens", &f("ids.json"), &"--logits-out", &f("ids.json"), &"--force"],
        ),
        bad("output exists", 2, "--force", &[pre, im, p, out, &f("old.npy")]),
        bad("tile folder missing", 2, "--png", &[pre, im, p, out, &f("new.npy"), &"--png", &f("nodir")]),
        bad("output folder missing", 2, "does not exist", &[pre, im, p, out, &f("nodir/x.npy")]),
        // Hangs.
        bad("image is a FIFO", 3, "FIFO", &[run, mo, m, im, &fifo, pr, &"Hi"]),
        bad("history is a FIFO", 3, "FIFO", &[run, mo, m, hi, &fifo, pr, &"Hi"]),
        bad("forced ids are a FIFO", 3, "FIFO", &[run, mo, m, &"--force-tokens", &fifo, pr, &"Hi"]),
        bad("tokenize file is a FIFO", 3, "FIFO", &[tok, mo, m, &"--file", &fifo]),
        bad("decode file is a FIFO", 3, "FIFO", &[tok, mo, m, &"--decode", &fifo]),
        // Unbounded memory.
        bad("image is /dev/zero", 3, "/dev/zero", &[run, mo, m, im, &"/dev/zero", pr, &"Hi"]),
        bad("image is /dev/urandom", 3, "device", &[pre, im, &"/dev/urandom", out, &f("new.npy")]),
        bad("history is /dev/zero", 3, "device", &[run, mo, m, hi, &"/dev/zero", pr, &"Hi"]),
        bad("tokenize file is /dev/zero", 3, "device", &[tok, mo, m, &"--file", &"/dev/zero"]),
        bad("image of 800 MiB", 3, "limit", &[run, mo, m, im, &f("huge.png"), pr, &"Hi"]),
        bad("history of 65 MiB", 3, "limit", &[run, mo, m, hi, &f("huge.json"), pr, &"Hi"]),
        bad("manifest of 2 MiB", 4, "limit", &[run, mo, &big_manifest, pr, &"Hi"]),
        bad("ICC profile bomb", 3, "inflates", &[pre, im, &f("icc-bomb.png"), out, &f("new.npy")]),
        bad(
            "history longer than the context",
            3,
            "bytes, more than",
            &[run, mo, m, hi, &f("long-history.json"), pr, &"Hi"],
        ),
        bad(
            "forced id outside the vocabulary",
            3,
            "outside the vocabulary",
            &[run, mo, m, pr, &"Hi", &"--force-tokens", &f("vocab.json")],
        ),
        bad(
            "more forced ids than the context",
            3,
            "context",
            &[run, mo, m, pr, &"Hi", &"--force-tokens", &f("many-ids.json")],
        ),
        bad("16 MB of CJK history", 3, "counted on its first", &[run, mo, m, hi, &f("cjk-history.json"), pr, &"Hi"]),
        bad(
            "2.4 GB of logits",
            3,
            "--logits-out",
            &[run, mo, m, pr, &"Hi", &"--force-tokens", &f("4000-ids.json"), &"--logits-out", &f("l.npy")],
        ),
        bad("output is a link to stdout", 2, "symbolic link", &[pre, im, p, out, &f("stdout-link"), &"--force"]),
        bad("output path ends with /", 2, "ends with '/'", &[pre, im, p, out, &f("x.npy/")]),
        bad("output collides with a tile", 2, "also an input", &[pre, im, p, out, &f("tile_00.png"), &"--png", &d]),
        bad("no command", 2, "no command", &[]),
        bad("temperature -inf", 2, "--temperature", &[run, mo, m, pr, &"Hi", &"--temperature", &"-inf"]),
        // Panics and crashes.
        bad("100000 threads", 2, "--threads", &[run, mo, m, pr, &"Hi", &"--threads", &"100000"]),
        bad("vision batch 2^52", 2, "--vision-batch", &[run, mo, m, pr, &"Hi", &"--vision-batch", &"4503599627370496"]),
        bad(
            "prefill chunk 2^58",
            2,
            "--prefill-chunk",
            &[run, mo, m, pr, &"Hi", &"--prefill-chunk", &"288230376151711744"],
        ),
        bad("tokens per tile 2^32", 4, "tokens_per_tile", &[run, mo, &tpt, pr, &"Hi"]),
        bad("image size 8192", 4, "image_size", &[run, mo, &size, im, p, pr, &"Hi"]),
        // Wrong answers.
        bad("cut lossy WebP", 3, "truncated", &[run, mo, m, im, &f("cut.webp"), pr, &"Hi"]),
        bad("NaN temperature", 2, "--temperature", &[run, mo, m, pr, &"Hi", &"--temperature", &"nan"]),
        // Vague messages.
        bad("missing required flag", 2, "--prompt", &[run, mo, m]),
        bad("negative count", 2, "'-1'", &[run, mo, m, pr, &"Hi", &"--max-new-tokens", &"-1"]),
        bad("negative temperature", 2, "--temperature", &[run, mo, m, pr, &"Hi", &"--temperature", &"-1"]),
        bad("zero tiles", 2, "--max-tiles", &[run, mo, m, pr, &"Hi", &"--max-tiles", &"0"]),
        bad("wrong kv_heads in the manifest", 4, "past_key_values.0.key", &[run, mo, &kv, pr, &"Hi"]),
        bad("wrong tokens_per_tile in the manifest", 4, "image_embeds", &[run, mo, &tpt_small, pr, &"Hi"]),
        bad("truncated .data file", 4, "decoder.onnx.data", &[run, mo, &cut_data, pr, &"Hi"]),
        bad("graph file of garbage", 4, "decoder.onnx", &[run, mo, &garbage, pr, &"Hi"]),
        bad("swapped .data file", 4, "vision.onnx.data", &[info, mo, &swapped, &"--verify"]),
    ];
    // 65 images, and 40 photos whose 520 tiles cannot fit the context: refused from their headers, at once.
    let mut many = vec![run.to_string(), "--model".into(), m.display().to_string(), "--prompt".into(), "Hi".into()];
    for _ in 0..65 {
        many.extend(["--image".to_string(), p.display().to_string()]);
    }
    corpus.push(Bad { name: "65 images", args: many.clone(), code: 3, needle: "at most 64".into() });
    many.truncate(5 + 2 * 40);
    corpus.push(Bad { name: "40 images past the context", args: many, code: 3, needle: "context".into() });

    let before = snapshot(&[&d, m]);
    let mut failures = Vec::new();
    for case in &corpus {
        let t0 = Instant::now();
        let out = run_bounded(&case.args, None, Duration::from_secs(60));
        let err = stderr(&out);
        let lines: Vec<&str> = err.trim_end().lines().collect();
        let ok = out.status.code() == Some(case.code)
            && lines.len() == 1
            && lines[0].starts_with("error: ")
            && lines[0].contains(&case.needle)
            && !err.contains("panicked")
            && !err.contains('\x1b');
        if !ok {
            failures.push(format!("{}: exit {:?}, stderr {err:?}", case.name, out.status.code()));
        }
        eprintln!("{:<40} {:>6.0} ms  {}", case.name, t0.elapsed().as_secs_f64() * 1e3, lines.first().unwrap_or(&""));
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), corpus.len(), failures.join("\n"));
    assert!(before == snapshot(&[&d, m]), "a refused command changed, added or removed a file");
}

#[test]
fn closed_stdout_is_not_a_panic() {
    for args in [&["--help"][..], &["tokenize", "--tokenizer", "x", "--text", "hi"][..]] {
        let tokenizer = fixtures().join("model/tokenizer.json");
        let args: Vec<String> =
            args.iter().map(|a| if *a == "x" { tokenizer.display().to_string() } else { a.to_string() }).collect();
        let mut child = bin().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take()); // the reader went away before the first byte
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked") && err.is_empty(), "{args:?}: {err}");
        use std::os::unix::process::ExitStatusExt;
        assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{args:?}: {:?}", out.status);
    }
}

#[test]
fn chat_survives_bad_lines() {
    let d = tmp("hostile-chat");
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let mut input = b"\xff\xfe not UTF-8\n/image \n".to_vec();
    input.extend(format!("/image {}\n", fifo.display()).as_bytes());
    input.extend(std::iter::repeat_n(b'a', 20 << 20));
    input.extend(b"\nHi\n");
    let args: Vec<String> = ["chat", "--model", fixtures().join("model").to_str().unwrap(), "--max-new-tokens", "3"]
        .map(String::from)
        .to_vec();
    let out = run_bounded(&args, Some(input), Duration::from_secs(60));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for needle in ["not valid UTF-8", "/image needs a path", "FIFO", "longer than the model's context"] {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    assert_eq!(err.lines().count(), 4, "one line per bad input: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "the question after them was answered");
}

#[test]
fn tiny_temperature_samples_like_greedy() {
    // 1/T overflows f32 at T = 1e-40; sampling must still be a distribution, which at that temperature
    // puts all its mass on the greedy choice.
    let model = fixtures().join("model");
    let img = fixtures().join("images/448x448_1.png");
    let go = |extra: &[&str]| -> Value {
        let out = run_model(&model, Some(&img), &[&["--json", "--max-new-tokens", "12"], extra].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let greedy = go(&[]);
    let tiny = go(&["--temperature", "1e-40", "--seed", "5"]);
    assert_eq!(tiny["token_ids"], greedy["token_ids"]);
    assert_eq!(greedy["token_ids"].as_array().map(Vec::len), Some(12), "too short to tell: {greedy}");
}
