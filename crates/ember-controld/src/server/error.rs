//! The one place a failure becomes an HTTP answer: every handler returns
//! [`ApiError`], whose [`IntoResponse`] impl makes the status and the
//! documented `{error, message}` body; [`From<StoreError>`] maps the
//! store's errors; [`json_errors`] gives the framework's own refusals
//! (body too large, wrong method) the same shape.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_api::wire::ErrorBody;
use ember_control::StoreError;
use serde::Serialize;

/// An API error: every handler's failure becomes one of these, and its one
/// [`IntoResponse`] impl is the only place error bodies are made.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token (401).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A valid credential used for something it does not cover (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request, or what it would store, is over a limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The server failed (500); the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// What a client is told: the code and, except for internal faults
    /// (logged here), the message.
    pub(super) fn body(&self) -> ErrorBody {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "request failed");
        }
        ErrorBody {
            error: self.status_and_code().1.to_owned(),
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_and_code().0;
        let mut resp = json_response(status, &self.body());
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// `e` and its sources on one line, for an error body: an error's own
/// `Display` is only its outermost layer (see `ember_error`).
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    ember_error::chain(e).to_string()
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Invalid(_) => ApiError::BadRequest(chain(&e)),
            StoreError::DeploymentNotFound(_)
            | StoreError::RunNotFound(_)
            | StoreError::NodeNotFound(_) => ApiError::NotFound(chain(&e)),
            StoreError::DeploymentExists(_)
            | StoreError::IdempotencyMismatch { .. }
            | StoreError::Conflict { .. }
            | StoreError::Transition { .. }
            | StoreError::NotAssigned { .. }
            | StoreError::NotClaimed { .. } => ApiError::Conflict(chain(&e)),
            StoreError::Backend(_) => ApiError::Internal(chain(&e)),
        }
    }
}

/// `value` as a JSON response with `status`.
pub(super) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(body),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the response: {e}"),
        )
            .into_response(),
    }
}

/// Answers every error that did not come from a handler (a body over the
/// limit, a wrong method, a panic caught by the framework) with the
/// documented `{error, message}` object instead of the framework's plain
/// text, so clients parse one error shape.
pub(super) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("request body too large ({text})"),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    let mut out = json_response(
        status,
        &ErrorBody {
            error: code.to_owned(),
            message,
        },
    );
    // Keep what the framework said beyond the body (`Allow` on a 405).
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_control::model::{RunId, RunState, TransitionError};

    /// A refused transition keeps its reason in the body although the
    /// store error's own `Display` no longer repeats it.
    #[test]
    fn error_bodies_carry_the_whole_chain_once() {
        let e = StoreError::Transition {
            run: RunId(3),
            source: TransitionError::Illegal {
                from: RunState::Failed,
                to: RunState::Running,
            },
        };
        assert_eq!(ember_error::repeated_source(&e), None);
        let body = ApiError::from(e).body();
        assert_eq!(body.error, "conflict");
        assert_eq!(
            body.message,
            "run-3: illegal run transition failed -> running"
        );
        // A database failure is logged in full and answered generically.
        let body = ApiError::from(StoreError::Backend("disk full".into())).body();
        assert_eq!(
            (body.error.as_str(), body.message.as_str()),
            ("internal", "internal error")
        );
    }

    #[test]
    fn server_io_errors_say_their_source_once() {
        let e = super::super::ServerError::Io {
            what: "binding 0.0.0.0:80".into(),
            source: std::io::Error::other("EACCES"),
        };
        assert_eq!(ember_error::repeated_source(&e), None);
        assert_eq!(chain(&e), "binding 0.0.0.0:80: EACCES");
    }
}
