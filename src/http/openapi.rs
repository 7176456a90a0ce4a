//! `GET /openapi.json` on the admin listener: the OpenAPI 3.1 document of
//! both listeners (`docs/openapi.json`, embedded in the binary so it always
//! describes the server that serves it). `tests/integration/openapi.rs`
//! checks it against the route tables and the running server. No token is
//! needed: it describes the API, it grants nothing.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, byte for byte as kept in the repository.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_json() {
        let v: serde_json::Value = serde_json::from_str(super::DOCUMENT).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        assert!(v["paths"].as_object().is_some_and(|p| !p.is_empty()));
    }
}
