//! `internvl tokenize`: token ids of texts, or texts and answers of id lists.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use internvl::error::{ErrorKind, WithKind};
use internvl::files;
use internvl::manifest::Manifest;

#[derive(Args)]
pub struct TokenizeArgs {
    /// An exported model folder (its manifest names the tokenizer).
    #[arg(long, conflicts_with = "tokenizer")]
    pub model: Option<PathBuf>,
    /// A tokenizer.json directly, e.g. one the exporter converted (instead of --model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, conflicts_with = "file")]
    pub text: Option<String>,
    /// A JSON list of strings; prints a JSON list of id lists.
    #[arg(long, conflicts_with = "decode")]
    pub file: Option<PathBuf>,
    /// The reverse: a JSON list of id lists; prints, for each, `{"text": ..., "answer": ...}`: the decoded
    /// text and the answer the reference would return for those generated ids (with --model, its
    /// manifest's skipped ids and separator).
    #[arg(long, conflicts_with = "text")]
    pub decode: Option<PathBuf>,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    use internvl::text::tokenizer::{answer_text, Tokenizer};
    // The input first: a bad file is refused before the tokenizer is loaded.
    let read = |f: &Path| files::read_text(f, files::MAX_TEXT_FILE, "input file").kind(ErrorKind::Input);
    let input = a.decode.as_deref().or(a.file.as_deref()).map(read).transpose()?.unwrap_or_default();
    let (tok, split_at) = match (&a.model, &a.tokenizer) {
        (Some(dir), None) => {
            let m = Manifest::load(dir)?;
            let answer = &m.tokenizer.answer;
            let tok = Tokenizer::load(&m.path(&m.tokenizer.file)).kind(ErrorKind::Model)?;
            (tok.decoding_as(answer), answer.split_at.clone())
        }
        (None, Some(file)) => (Tokenizer::load(file).kind(ErrorKind::Input)?, None),
        _ => return Err(anyhow::anyhow!("give exactly one of --model and --tokenizer")).kind(ErrorKind::Usage),
    };
    // Tokenising takes about 100x a text's size for a moment: one text is bounded, not only the file.
    const MAX_TEXT: usize = 4 << 20;
    let encode = |t: &str| {
        if t.len() > MAX_TEXT {
            let msg = format!("a text of {} bytes, more than the limit of {MAX_TEXT} per text", t.len());
            return Err(anyhow::anyhow!(msg)).kind(ErrorKind::Input);
        }
        tok.encode(t, true).kind(ErrorKind::Input)
    };
    let out = match (&a.text, &a.file, &a.decode) {
        (_, _, Some(f)) => {
            let items: Vec<Vec<u32>> = serde_json::from_str(&input)
                .with_context(|| format!("{}: expected a JSON list of lists of token ids", f.display()))
                .kind(ErrorKind::Input)?;
            // Written as decoded: a file of millions of short lists never holds all their texts at once.
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            write!(stdout, "[").context("writing to stdout")?;
            for (i, ids) in items.iter().enumerate() {
                let text =
                    tok.decode(ids).with_context(|| format!("{}: list {i}", f.display())).kind(ErrorKind::Input)?;
                let answer = answer_text(&text, split_at.as_deref());
                let item = serde_json::json!({ "text": text, "answer": answer });
                write!(stdout, "{}{item}", if i == 0 { "" } else { "," }).context("writing to stdout")?;
            }
            writeln!(stdout, "]").context("writing to stdout")?;
            return stdout.flush().context("writing to stdout");
        }
        (Some(t), _, None) => serde_json::to_string(&encode(t)?)?,
        (None, Some(f), None) => {
            let items: Vec<String> = serde_json::from_str(&input)
                .with_context(|| format!("{}: expected a JSON list of strings", f.display()))
                .kind(ErrorKind::Input)?;
            serde_json::to_string(&items.iter().map(|t| encode(t)).collect::<Result<Vec<_>>>()?)?
        }
        (None, None, None) => return Err(anyhow::anyhow!("give --text, --file or --decode")).kind(ErrorKind::Usage),
    };
    writeln!(std::io::stdout(), "{out}").context("writing to stdout")
}
