//! Admission: a request holds a slot (running or waiting, bounded by `--parallel` + `--queue`) and its
//! images' decoded pixels (bounded by `--max-pixels-in-flight`) from before its cost is paid until its
//! response or stream ends, however it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::state::AppState;

/// Releases the request's admission slot and pixel budget when the response (or its stream) ends,
/// however it ends.
pub(crate) struct Admission {
    state: Arc<AppState>,
    /// Taken so far; more may be taken by the work it admits (a video's frames once probed).
    pixels: AtomicU64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.pixels_in_flight.fetch_sub(self.pixels.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Admission {
    /// One of the slots, or 429 when `--parallel` + `--queue` requests are in already.
    pub(crate) fn enter(state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.cfg.parallel + state.cfg.queue;
        if state.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            state.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("internvl_requests_rejected_total").increment(1);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                format!("the server is busy ({limit} requests running or waiting); retry later"),
            )
            .code("server_overloaded");
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(Self { state: Arc::clone(state), pixels: AtomicU64::new(0) })
    }

    /// Gives back `pixels` taken by [`Admission::reserve_pixels`] that the work turned out not to need.
    pub(crate) fn release_pixels(&self, pixels: u64) {
        self.pixels.fetch_sub(pixels, Ordering::Relaxed);
        self.state.pixels_in_flight.fetch_sub(pixels, Ordering::Relaxed);
    }

    /// Takes `pixels` of the server's budget, or says to come back later.
    pub(crate) fn reserve_pixels(&self, pixels: u64) -> Result<(), ApiError> {
        let budget = self.state.cfg.max_pixels_in_flight;
        let before = self.state.pixels_in_flight.fetch_add(pixels, Ordering::Relaxed);
        self.pixels.fetch_add(pixels, Ordering::Relaxed);
        if before + pixels > budget && before > 0 {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                format!(
                    "the images of the requests in progress are at the server's limit of {budget} pixels; retry later"
                ),
            )
            .code("server_overloaded");
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(())
    }
}
