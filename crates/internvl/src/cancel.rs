//! A request's "stop now", shared by whoever works for it: set when its client leaves (or the server
//! shuts down), checked between units of work (a video frame, an image), so that no work outlives the
//! request it was for. Cloning shares the flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};

use crate::error::{ErrorKind, WithKind};

#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token nobody has cancelled (work that cannot be abandoned passes a fresh one).
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// An error once cancelled: `?` after each unit of work stops the rest.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(anyhow!("cancelled: the request ended")).kind(ErrorKind::Input);
        }
        Ok(())
    }
}

/// Cancels its token when dropped: a request handler holds one, so that however the handler ends (its
/// client gone, an error, done) the work it started stops.
#[derive(Debug)]
pub struct CancelOnDrop(pub Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_sees_the_cancel_and_the_guard_cancels_on_drop() {
        let c = Cancel::new();
        assert!(c.check().is_ok());
        let guard = CancelOnDrop(c.clone());
        drop(guard);
        assert!(c.is_cancelled() && c.check().is_err());
    }
}
