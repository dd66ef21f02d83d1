//! `--api-key`: the bearer token every /v1 route asks for.

use axum::http::{header, HeaderMap, StatusCode};

use crate::error::ApiError;
use crate::state::AppState;

pub(crate) fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.cfg.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or invalid API key")
            .code("invalid_api_key"))
    }
}

/// Compares without an early exit, so the time taken says nothing about how much of the key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_compare_equal_only_when_equal() {
        use super::constant_time_eq as eq;
        assert!(eq(b"secret", b"secret"));
        assert!(!eq(b"secreT", b"secret") && !eq(b"secre", b"secret") && !eq(b"secrets", b"secret") && !eq(b"", b"x"));
        assert!(eq(b"", b""));
    }
}
