//! What kind of failure an error is, so that the command line can exit with a code per class (and a server
//! can answer with a status per class) without parsing messages.
//!
//! Errors stay `anyhow::Error`; a step that knows what went wrong marks it with [`WithKind::kind`]. The
//! innermost mark wins: a bad image found while loading a request stays an input error.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A flag or parameter is wrong (a value out of range, a refused output path).
    Usage,
    /// What the user sent is bad: an image, a prompt, a history file.
    Input,
    /// The model folder is damaged, incomplete or from another exporter.
    Model,
    /// Anything else: ONNX Runtime failed, the disk is full, a bug.
    Internal,
}

impl ErrorKind {
    /// The process exit code of this class (README, "Exit codes").
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Input => 3,
            ErrorKind::Model => 4,
        }
    }

    /// The class of `e`: its innermost mark, or `Internal` when nothing marked it.
    pub fn of(e: &anyhow::Error) -> ErrorKind {
        e.chain().filter_map(|c| c.downcast_ref::<Marked>()).last().map_or(ErrorKind::Internal, |m| m.kind)
    }
}

/// An error with its kind; displays as the error it wraps (its whole chain, on one line).
#[derive(Debug)]
struct Marked {
    kind: ErrorKind,
    inner: anyhow::Error,
}

impl fmt::Display for Marked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.inner)
    }
}

impl std::error::Error for Marked {}

/// A request that does not fit the model's context (prompt, images or video frames plus the answer's
/// first position): bad input a client can fix by sending less. A server answers it with OpenAI's
/// `context_length_exceeded` code; [`is_context_overflow`] finds it in an error's chain.
#[derive(Debug)]
pub struct ContextOverflow(pub String);

impl fmt::Display for ContextOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ContextOverflow {}

/// An input error saying `message`, typed as [`ContextOverflow`].
pub fn context_overflow(message: String) -> anyhow::Error {
    anyhow::Error::new(Marked { kind: ErrorKind::Input, inner: anyhow::Error::new(ContextOverflow(message)) })
}

/// Whether `e` (or any error it wraps, marked or not) is a [`ContextOverflow`].
pub fn is_context_overflow(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.is::<ContextOverflow>() || c.downcast_ref::<Marked>().is_some_and(|m| is_context_overflow(&m.inner)))
}

pub trait WithKind<T> {
    /// Marks the error with `kind` unless a step below already marked it.
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> WithKind<T> for Result<T, E> {
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T> {
        self.map_err(|e| {
            let inner: anyhow::Error = e.into();
            if inner.chain().any(|c| c.is::<Marked>()) {
                inner
            } else {
                anyhow::Error::new(Marked { kind, inner })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{anyhow, Context};

    #[test]
    fn innermost_mark_wins_and_text_is_unchanged() {
        let e: anyhow::Result<()> = Err(anyhow!("bad pixel")).kind(ErrorKind::Input);
        let e = e.context("loading request").kind(ErrorKind::Model).unwrap_err();
        assert_eq!(ErrorKind::of(&e), ErrorKind::Input);
        assert_eq!(format!("{e:#}"), "loading request: bad pixel");
        assert_eq!(ErrorKind::of(&anyhow!("x")), ErrorKind::Internal);
    }

    #[test]
    fn context_overflow_is_found_under_context_and_is_input() {
        let e = Err::<(), _>(context_overflow("too long".into())).context("request 3").unwrap_err();
        assert!(is_context_overflow(&e));
        assert_eq!(ErrorKind::of(&e), ErrorKind::Input);
        assert_eq!(format!("{e:#}"), "request 3: too long");
        assert!(!is_context_overflow(&anyhow!("the context is fine")));
    }
}
