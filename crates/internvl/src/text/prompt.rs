//! Prompts built as the reference `chat()` builds them: `<image>\n` before a question without its own
//! `<image>`, the conversation template around it, and each `<image>` expanded to
//! `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`.

use anyhow::{bail, ensure, Context, Result};

use std::path::Path;

use crate::error::{ErrorKind, WithKind};
use crate::files;
use crate::manifest::{Manifest, TemplateSpec};
use crate::text::tokenizer::Tokenizer;

pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One earlier exchange of a conversation.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// Earlier turns from a history file's text: a JSON list of `{"user": ..., "assistant": ...}`, oldest first.
pub fn parse_history(text: &str) -> Result<Vec<Turn>> {
    serde_json::from_str(text).context("expected a JSON list of {\"user\": ..., \"assistant\": ...}")
}

/// [`parse_history`] of a file, read with a size bound; errors name the file and are input errors.
pub fn load_history(path: &Path) -> Result<Vec<Turn>> {
    let text = files::read_text(path, files::MAX_TEXT_FILE, "history file").kind(ErrorKind::Input)?;
    parse_history(&text).with_context(|| format!("history file {}", path.display())).kind(ErrorKind::Input)
}

/// The prompt text with `<image>` placeholders still in it (what the reference calls `query` before the
/// image-token replacement), for `question` after the `history` turns.
///
/// Images with no placeholder anywhere in the conversation go before the question: `<image>\n` for one
/// (the reference `chat()`), `Image-1: <image>\nImage-2: <image>\n...` for several (the model card's
/// multi-image format). `system`: None = the template's own message; Some("") = no system block.
pub fn render(t: &TemplateSpec, history: &[Turn], question: &str, system: Option<&str>, images: usize) -> String {
    let placed = history.iter().any(|h| h.user.contains(IMAGE_PLACEHOLDER));
    let question = with_image_placeholders(question, images, placed);
    let system = system.unwrap_or(&t.system_message);
    let mut out = String::new();
    if !system.is_empty() {
        out.push_str(&t.system_template.replace("{system_message}", system));
        out.push_str(&t.sep);
    }
    // SeparatorStyle.MPT: role + message + sep per message, an empty message is the open role alone.
    for (user, assistant) in
        history.iter().map(|h| (h.user.as_str(), h.assistant.as_str())).chain([(question.as_str(), "")])
    {
        for (role, message) in [(&t.roles[0], user), (&t.roles[1], assistant)] {
            out.push_str(role);
            if !message.is_empty() {
                out.push_str(message);
                out.push_str(&t.sep);
            }
        }
    }
    out
}

/// `question` with `<image>` lines for `images` images when it has no placeholder of its own: what the
/// reference `chat()` does to the question of the turn that brings the images.
pub fn place_images(question: &str, images: usize) -> String {
    with_image_placeholders(question, images, false)
}

fn with_image_placeholders(question: &str, images: usize, placed: bool) -> String {
    match images {
        0 => question.to_string(),
        _ if placed || question.contains(IMAGE_PLACEHOLDER) => question.to_string(),
        1 => format!("{IMAGE_PLACEHOLDER}\n{question}"),
        n => (1..=n).map(|i| format!("Image-{i}: {IMAGE_PLACEHOLDER}\n")).collect::<String>() + question,
    }
}

/// A question about a video of `frames` frames as the model card asks it: one `Frame-N: <image>` line per
/// frame before the question (older InternVL2 cards write `FrameN:`).
pub fn video_question(question: &str, frames: usize) -> String {
    (1..=frames).map(|i| format!("Frame-{i}: {IMAGE_PLACEHOLDER}\n")).collect::<String>() + question
}

/// Token ids of the prompt, as the reference tokenises it: every `<image>` becomes `<img><IMG_CONTEXT></img>`,
/// the whole text is encoded at once (`first`: with the tokenizer's own special tokens, e.g. a BOS, as
/// `tokenizer(query)` adds them; follow-up chat turns continue a sequence and add none), then each
/// `<IMG_CONTEXT>` is widened to 256 x tiles ids. Encoding in one piece matters for tokenizers that mark
/// the start of a text (sentencepiece's `▁`); a stray `<IMG_CONTEXT>` typed by the user is an error.
pub fn token_ids(
    m: &Manifest,
    tok: &Tokenizer,
    text: &str,
    tiles_per_image: &[usize],
    first: bool,
) -> Result<Vec<u32>> {
    let t = &m.tokenizer;
    let placeholders = text.matches(IMAGE_PLACEHOLDER).count();
    if placeholders != tiles_per_image.len() {
        bail!(
            "the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {} image(s) were given",
            tiles_per_image.len()
        );
    }
    if text.contains(&t.img_context) {
        bail!("the prompt contains {} itself; that token is reserved for image embeddings", t.img_context);
    }
    let expanded = text.replace(IMAGE_PLACEHOLDER, &format!("{}{}{}", t.img_start, t.img_context, t.img_end));
    let encoded = tok.encode(&expanded, first)?;
    let mut ids = Vec::with_capacity(encoded.len() + tiles_per_image.iter().sum::<usize>() * m.vision.tokens_per_tile);
    let mut images = tiles_per_image.iter();
    for id in encoded {
        if id == t.img_context_id {
            let tiles = images.next().context("tokenizer produced more image tokens than placeholders")?;
            ids.extend(std::iter::repeat_n(id, tiles * m.vision.tokens_per_tile));
        } else {
            ids.push(id);
        }
    }
    ensure!(images.next().is_none(), "tokenizer did not keep every {} token", t.img_context);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpl() -> TemplateSpec {
        TemplateSpec {
            name: "internvl2_5".into(),
            style: "mpt".into(),
            system_template: "<|im_start|>system\n{system_message}".into(),
            system_message: "SYS".into(),
            roles: ["<|im_start|>user\n".into(), "<|im_start|>assistant\n".into()],
            sep: "<|im_end|>\n".into(),
        }
    }

    #[test]
    fn image_goes_before_question() {
        let p = render(&tpl(), &[], "What?", None, 1);
        assert_eq!(
            p,
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn own_placeholder_kept_and_system_dropped() {
        let p = render(&tpl(), &[], "Look: <image> now", Some(""), 1);
        assert_eq!(p, "<|im_start|>user\nLook: <image> now<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn several_images_are_numbered() {
        let p = render(&tpl(), &[], "Compare.", Some(""), 2);
        assert!(p.contains("user\nImage-1: <image>\nImage-2: <image>\nCompare.<|im_end|>"), "{p}");
    }

    #[test]
    fn history_turns_come_first() {
        let h = [Turn { user: "<image>\nA?".into(), assistant: "B.".into() }];
        let p = render(&tpl(), &h, "C?", Some(""), 1);
        assert_eq!(
            p,
            "<|im_start|>user\n<image>\nA?<|im_end|>\n<|im_start|>assistant\nB.<|im_end|>\n<|im_start|>user\nC?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_chat_turn_places_its_own_images() {
        assert_eq!(place_images("C?", 1), "<image>\nC?");
        assert_eq!(place_images("Look: <image>", 1), "Look: <image>");
        assert_eq!(place_images("C?", 0), "C?");
    }

    #[test]
    fn video_frames_are_labelled_lines() {
        let q = video_question("What happens?", 2);
        assert_eq!(q, "Frame-1: <image>\nFrame-2: <image>\nWhat happens?");
        assert_eq!(
            render(&tpl(), &[], &q, Some(""), 2),
            format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        );
    }

    #[test]
    fn text_only_has_no_placeholder() {
        assert!(!render(&tpl(), &[], "Hi", Some("other"), 0).contains(IMAGE_PLACEHOLDER));
    }
}
