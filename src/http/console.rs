//! The operator console: a static single-page app served by the admin
//! listener at `/console/`. Its files (`src/console/`) are embedded in the
//! binary, so the console works offline and always matches the API it was
//! built with. The page talks only to the admin API of the same origin, with
//! the token the operator signs in with; the server enforces every right.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::admin::ApiError;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Every file of the console, by the name it is served under, with its
/// content type. The index is served for `/console/` itself.
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", HTML, include_bytes!("../console/index.html")),
    ("style.css", CSS, include_bytes!("../console/style.css")),
    ("icon.svg", SVG, include_bytes!("../console/icon.svg")),
    ("app.js", JS, include_bytes!("../console/app.js")),
    ("api.js", JS, include_bytes!("../console/api.js")),
    ("dom.js", JS, include_bytes!("../console/dom.js")),
    ("tree.js", JS, include_bytes!("../console/tree.js")),
    ("tokens.js", JS, include_bytes!("../console/tokens.js")),
    ("devices.js", JS, include_bytes!("../console/devices.js")),
    ("sources.js", JS, include_bytes!("../console/sources.js")),
    (
        "directory.js",
        JS,
        include_bytes!("../console/directory.js"),
    ),
    ("cluster.js", JS, include_bytes!("../console/cluster.js")),
    ("chart.js", JS, include_bytes!("../console/chart.js")),
    ("broker.js", JS, include_bytes!("../console/broker.js")),
    ("metrics.js", JS, include_bytes!("../console/metrics.js")),
];

/// Scripts and styles only from this origin (no inline script, no eval),
/// requests only to this origin, no framing, and no form may submit
/// anywhere: the sign-in form is handled by script, so even without it the
/// token cannot end up in a URL.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'none'; \
     object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /console`: to the index, so relative asset paths resolve.
pub(super) async fn redirect() -> Redirect {
    Redirect::permanent("/console/")
}

/// `GET /console/`.
pub(super) async fn index() -> Response {
    asset("index.html")
}

/// `GET /console/{file}`: one embedded file, or 404.
pub(super) async fn file(Path(file): Path<String>) -> Response {
    asset(&file)
}

fn asset(name: &str) -> Response {
    let Some((_, content_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::NotFound.into_response();
    };
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // The files change only with the binary; revalidating each load is
        // cheap on the admin listener and never serves a stale console.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (StatusCode::OK, headers, *body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `src/console/` but not to `ASSETS` would be missing
    /// from the binary; a listed file that no longer exists fails to build.
    #[test]
    fn every_console_file_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/console");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|(n, _, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    /// No asset may make the browser contact another host: the only
    /// absolute URL allowed is the SVG namespace, which is a name, not a
    /// request.
    #[test]
    fn assets_reference_no_other_host() {
        for (name, _, body) in ASSETS {
            let text = std::str::from_utf8(body).unwrap();
            let stripped = text.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(
                    !stripped.contains(needle),
                    "{name} contains {needle:?}: the console must not load anything from elsewhere"
                );
            }
        }
    }
}
