//! Errors as the OpenAI API sends them: `{"error": {"message", "type", "param", "code"}}` with the
//! status the official SDK maps to the right exception. Bad input is never a 5xx (the SDK retries those).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use internvl::error::{is_context_overflow, ErrorKind};

use crate::types::{ErrorBody, ErrorDetail};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unsupported(param: &'static str, why: &str) -> Self {
        Self::invalid(format!("{param}: {why}")).param(param).code("unsupported_parameter")
    }

    pub fn unavailable(message: &str) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", message);
        e.retry_after = Some(1);
        e
    }

    /// A library error: bad input and usage are the client's (400), the rest the server's (500),
    /// with only the message (no paths of this machine are in library messages about requests).
    pub fn from_library(e: &anyhow::Error) -> Self {
        let message = format!("{e:#}").replace(['\n', '\r'], " ");
        match ErrorKind::of(e) {
            ErrorKind::Input | ErrorKind::Usage => {
                let code = if is_context_overflow(e) { "context_length_exceeded" } else { "invalid_request" };
                Self::invalid(message).code(code)
            }
            ErrorKind::Model | ErrorKind::Internal => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
        }
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorDetail { message: &self.message, kind: self.kind, param: self.param, code: self.code } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("internvl_http_errors_total", "status" => self.status.as_u16().to_string()).increment(1);
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say which scheme the key goes in.
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
