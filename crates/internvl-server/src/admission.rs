//! Admission: a request holds a slot (running or waiting, bounded by `--parallel` + `--queue`) and its
//! images' decoded pixels (bounded by `--max-pixels-in-flight`) from before its cost is paid until its
//! response or stream ends, however it ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::state::AppState;

/// Releases the request's admission slot and pixel budget when the response (or its stream) ends,
/// however it ends.
pub(crate) struct Admission {
    pub(crate) state: Arc<AppState>,
    pub(crate) pixels: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.pixels_in_flight.fetch_sub(self.pixels, Ordering::Relaxed);
    }
}

impl Admission {
    /// Takes `pixels` of the server's budget, or says to come back later.
    pub(crate) fn reserve_pixels(&mut self, pixels: u64) -> Result<(), ApiError> {
        let budget = self.state.cfg.max_pixels_in_flight;
        let before = self.state.pixels_in_flight.fetch_add(pixels, Ordering::Relaxed);
        self.pixels += pixels;
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
