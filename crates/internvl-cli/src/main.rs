//! The `internvl` command line: one module per command under `commands/`, the flag groups they share
//! in `args.rs`, and what the library reports rendered on stderr in `notices.rs`. Errors end as one line
//! on stderr and an exit code per kind (`internvl::error::ErrorKind`).

mod args;
mod commands;
mod notices;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use internvl::error::ErrorKind;

use commands::{bench, chat, devices, embed, info, package, preprocess, run, serve, tokenize};

#[derive(Parser)]
#[command(
    name = "internvl",
    version,
    about = "Run InternVL vision-language models exported to ONNX",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 usage (flags, output paths), 3 bad input (image, prompt, history), 4 model folder."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about an image (or text only), streaming the answer to stdout.
    Run(run::RunArgs),
    /// Converse on stdin, one question per line, keeping the KV cache between turns.
    Chat(chat::ChatArgs),
    /// Write the exact float32 tensor the vision graph receives for an image.
    Preprocess(preprocess::PreprocessArgs),
    /// Write an image's embeddings: the vision graph's output, the rows the LLM receives per tile.
    Embed(embed::EmbedArgs),
    /// Measure load, vision, time to first token, prefill and decode speed, peak memory.
    Bench(bench::BenchArgs),
    /// Print the token ids of a text (one JSON list per input line of --file, or of --text).
    Tokenize(tokenize::TokenizeArgs),
    /// Describe a model folder and check its files (sizes always; checksums with --verify).
    Info(info::InfoArgs),
    /// Serve the OpenAI Chat Completions API (streaming, images, many clients) from one loaded model.
    Serve(serve::ServeArgs),
    /// Say which execution providers this binary's ONNX Runtime has and whether their libraries are beside it.
    Devices(devices::DevicesArgs),
    /// Write one .tar.gz an edge server unpacks and runs: this binary, ONNX Runtime, the model folder,
    /// a README and SHA256SUMS.
    Package(package::PackageArgs),
}

fn main() -> ExitCode {
    // A closed stdout (`internvl tokenize ... | head -c1`) ends the process quietly, as it ends `cat`,
    // instead of a panic in the middle of a write. The Rust runtime ignores SIGPIPE by default.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    notices::install();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as Clap;
            if matches!(e.kind(), Clap::DisplayHelp | Clap::DisplayVersion) {
                let _ = write!(std::io::stdout(), "{e}");
                return ExitCode::SUCCESS;
            }
            if e.kind() == Clap::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!("error: no command given (see internvl --help)");
                return ExitCode::from(ErrorKind::Usage.exit_code());
            }
            eprintln!("error: {} (see internvl --help)", clap_one_line(&e.to_string()));
            return ExitCode::from(ErrorKind::Usage.exit_code());
        }
    };
    let res = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Preprocess(a) => preprocess::preprocess(a),
        Command::Embed(a) => embed::embed(a),
        Command::Bench(a) => bench::bench(a),
        Command::Tokenize(a) => tokenize::tokenize(a),
        Command::Info(a) => info::info(a),
        Command::Serve(a) => serve::serve(a),
        Command::Devices(a) => devices::devices(a),
        Command::Package(a) => package::package(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(ErrorKind::of(&e).exit_code())
        }
    }
}

/// clap's message on one line: its first line plus the indented lines that name what is missing or
/// wrong, without the usage block and the "for more information" tip.
fn clap_one_line(msg: &str) -> String {
    let mut parts = Vec::new();
    for line in msg.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.trim_start_matches("error: ").to_string());
        }
    }
    let joined = parts.join(" ");
    if joined.is_empty() {
        "invalid arguments".into()
    } else {
        joined
    }
}

/// anyhow's chain on one line: "context: cause: cause".
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '\r'], " ")
}
