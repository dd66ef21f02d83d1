//! A conversation kept between turns (`internvl chat`): the earlier turns as the reference's `history`
//! holds them, and the images' features, so a new turn re-encodes nothing and, through the engine's
//! prefix reuse, runs only its own tokens through the decoder.

use anyhow::Result;

use super::{Content, Engine, Output, Params};
use crate::media::Media;
use crate::text::prompt::{self, Turn};

pub struct Conversation {
    engine: Engine,
    system: Option<String>,
    history: Vec<Turn>,
    /// Every image so far, in order, with its features once encoded.
    media: Vec<Media>,
}

impl Conversation {
    pub fn new(engine: Engine, system: Option<String>) -> Self {
        Self { engine, system, history: Vec::new(), media: Vec::new() }
    }

    /// Starts over (the cache is reused only where a new prompt shares its start).
    pub fn reset(&mut self) {
        self.history.clear();
        self.media.clear();
    }

    /// The next turn: `question` with `images` (placed before it as `chat()` does when it has no
    /// `<image>` of its own). A failed turn leaves the conversation as it was.
    pub fn turn(
        &mut self,
        question: &str,
        images: Vec<Media>,
        params: &Params,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        let question = prompt::place_images(question, images.len());
        let mut all = self.media.clone();
        all.extend(images);
        let content = Content {
            system: self.system.clone(),
            history: self.history.clone(),
            question: question.clone(),
            images: all,
        };
        let out = self.engine.generate(content, params.clone(), on_text)?;
        self.media = out.media.clone();
        self.history.push(Turn { user: question, assistant: out.text.clone() });
        Ok(out)
    }
}
