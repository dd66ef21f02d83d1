//! `internvl chat`: a conversation on stdin, one question per line, the KV cache kept between turns.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use internvl::{Conversation, Engine, Media};

use super::run::print_timings;
use crate::args::{check_images, GenArgs, Loaded};
use crate::one_line;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub gen: GenArgs,
}

/// What one read of a chat line gave.
pub enum Line {
    Text(String),
    /// Longer than the bound: the rest of it was read and dropped.
    TooLong(usize),
    NotUtf8,
    End,
}

/// The next line of `input`, at most `limit` bytes kept: an endless line cannot exhaust memory, and a line
/// that is not UTF-8 is reported, not fatal.
fn read_line(input: &mut impl BufRead, limit: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut seen = 0usize;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            if seen == 0 {
                return Ok(Line::End);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        seen += chunk.len() + usize::from(done.is_some());
        if line.len() + chunk.len() <= limit {
            line.extend_from_slice(chunk);
        }
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if seen > limit {
        return Ok(Line::TooLong(seen));
    }
    Ok(match String::from_utf8(line) {
        Ok(text) => Line::Text(text),
        Err(_) => Line::NotUtf8,
    })
}

/// Interactive conversation on stdin: one question per line, answers streamed; the KV cache is kept
/// between turns. `/image PATH` attaches an image to the next question, `/reset` starts over. A bad line
/// (an image that does not load, a question too long, invalid UTF-8) is reported and the session goes on.
pub fn chat(a: ChatArgs) -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let Loaded { model, mut images, params, engine, video } = a.gen.load(std::io::stderr().is_terminal())?;
    // The video's frames go with the first question, labelled as the model card labels them.
    let mut video_frames = video.map(|v| v.frame_indices.len());
    let mut image_paths = a.gen.image.clone();
    let mut conv = Conversation::new(Engine::new(Arc::clone(&model), engine)?, a.gen.system.clone());
    let mut stdout = std::io::stdout().lock();
    let mut stdin = std::io::stdin().lock();
    let limit = model.max_prompt_bytes();
    loop {
        if interactive {
            eprint!("> ");
        }
        let line = match read_line(&mut stdin, limit).context("reading stdin")? {
            Line::End => return Ok(()),
            Line::TooLong(n) => {
                eprintln!(
                    "error: line of {n} bytes is longer than the model's context can hold ({limit} bytes); ignored"
                );
                continue;
            }
            Line::NotUtf8 => {
                eprintln!("error: line is not valid UTF-8; ignored");
                continue;
            }
            Line::Text(t) => t,
        };
        let q = line.trim_end_matches('\r');
        if q.trim().is_empty() {
            continue;
        }
        if q.trim() == "/image" || q.starts_with("/image ") {
            let path = PathBuf::from(q["/image".len()..].trim());
            if path.as_os_str().is_empty() {
                eprintln!("error: /image needs a path: /image PATH");
                continue;
            }
            image_paths.push(path.clone());
            let loaded = check_images(&image_paths, &model.manifest, a.gen.max_tiles)
                .and_then(|()| Media::load(&path, a.gen.exif));
            match loaded {
                Ok(img) => images.push(img),
                Err(e) => {
                    image_paths.pop();
                    eprintln!("error: {}", one_line(&e));
                }
            }
            continue;
        }
        if q.trim() == "/reset" {
            conv.reset();
            continue;
        }
        let q = match video_frames.take() {
            Some(n) => internvl::text::prompt::video_question(q, n),
            None => q.to_string(),
        };
        let out = conv.turn(&q, std::mem::take(&mut images), &params, &mut |piece| {
            stdout.write_all(piece.as_bytes()).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")
        });
        image_paths.clear();
        writeln!(stdout).context("writing to stdout")?;
        match out {
            Ok(out) if a.gen.verbose => print_timings(&out),
            Ok(_) => {}
            // Bad input for this turn: say so and keep the conversation (a failed turn leaves it as it was).
            Err(e) => eprintln!("error: {}", one_line(&e)),
        }
    }
}
