//! The browser side, embedded in the binary so `cargo run --release` serves it with no npm on the
//! user's machine: the demo chat page at `/` and, under `/client/`, the ES module client (the
//! same files as the npm package `@roomwire/client` in `web/`), its compiled-in wire contract,
//! the vendored protobuf.js build (BSD-3-Clause, its license beside it) and the `.proto` itself
//! for other implementers.
//!
//! Pages on other origins (an application that bundles the npm package) need the node to answer
//! CORS for what the client fetches: `/client/*` here, and `/webtransport/certhash` through
//! [`with_cors`]. Origins are those of `server.allowed_origins`, the list that already admits
//! their WebSocket upgrades.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};

use crate::context::NodeContext;

const INDEX_HTML: &str = include_str!("../web/index.html");

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The files under `/client/`: (path, content type, body).
const CLIENT_FILES: &[(&str, &str, &str)] = &[
    (
        "roomwire.js",
        JAVASCRIPT,
        include_str!("../web/roomwire.js"),
    ),
    // Generated from the .proto by web/tools/generate-wire.mjs; tests/browser.rs fails when stale.
    ("wire.js", JAVASCRIPT, include_str!("../web/wire.js")),
    (
        "roomwire.proto",
        TEXT,
        include_str!("../proto/roomwire/v1/roomwire.proto"),
    ),
    (
        "vendor/protobuf.min.js",
        JAVASCRIPT,
        include_str!("../web/vendor/protobuf.min.js"),
    ),
    (
        "vendor/LICENSE.protobufjs",
        TEXT,
        include_str!("../web/vendor/LICENSE.protobufjs"),
    ),
];

/// How long a browser may cache a preflight answer, in seconds: the allowed origins change only
/// with the node's configuration.
const PREFLIGHT_MAX_AGE_S: &str = "600";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The routes of the browser client and demo page (merged into the HTTP router).
pub fn routes() -> Router<Arc<NodeContext>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/client/{*file}",
            get(client_file).options(client_preflight),
        )
}

async fn client_file(
    State(ctx): State<Arc<NodeContext>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut response = match CLIENT_FILES.iter().find(|(path, _, _)| *path == file) {
        Some((_, content_type, body)) => asset(content_type, body),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    let origin = allowed_origin(&ctx.config.server.allowed_origins, &headers);
    add_cors_headers(response.headers_mut(), origin);
    response
}

async fn client_preflight(State(ctx): State<Arc<NodeContext>>, headers: HeaderMap) -> Response {
    preflight(&ctx.config.server.allowed_origins, &headers)
}

/// Adds the CORS behaviour of `/client/*` to a route of the HTTP router: `Access-Control-Allow-
/// Origin` for the origins of `allowed_origins` (`*` when the list holds `*`), `Vary: Origin`, and
/// an answer to OPTIONS preflights. Used for `/webtransport/certhash`, which a page on another
/// origin fetches before it opens WebTransport.
pub fn with_cors<S>(route: MethodRouter<S>, allowed_origins: &[String]) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let allowed: Arc<[String]> = allowed_origins.into();
    route.layer(middleware::from_fn_with_state(allowed, cors))
}

async fn cors(State(allowed): State<Arc<[String]>>, request: Request, next: Next) -> Response {
    if request.method() == Method::OPTIONS {
        return preflight(&allowed, request.headers());
    }
    let origin = allowed_origin(&allowed, request.headers());
    let mut response = next.run(request).await;
    add_cors_headers(response.headers_mut(), origin);
    response
}

/// The `Access-Control-Allow-Origin` value for this request: `*` when every origin is allowed,
/// the request's own `Origin` when the list names it (ignoring case and a trailing slash, as the
/// WebSocket upgrade's check does), else none. An empty list allows no other origin: same-origin
/// pages need no CORS.
fn allowed_origin(allowed: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    if allowed.iter().any(|a| a == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

/// `Vary: Origin` always (caches must not hand one origin's answer to another), and the allowed
/// origin when there is one.
fn add_cors_headers(headers: &mut HeaderMap, origin: Option<HeaderValue>) {
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
}

/// The answer to an OPTIONS preflight: 204, with the allowed methods and the requested headers
/// when the origin is allowed (the browser refuses the real request when they are missing).
fn preflight(allowed: &[String], request: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let origin = allowed_origin(allowed, request);
    let headers = response.headers_mut();
    headers.insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    if origin.is_some() {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, OPTIONS"),
        );
        if let Some(requested) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE_S),
        );
    }
    add_cors_headers(headers, origin);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(origin: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        headers
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        let allowed = vec!["https://App.example.com/".to_string()];
        assert_eq!(
            allowed_origin(&allowed, &with_origin("https://app.example.com")).unwrap(),
            "https://app.example.com"
        );
        assert!(allowed_origin(&allowed, &with_origin("https://evil.example.com")).is_none());
        assert!(allowed_origin(&allowed, &HeaderMap::new()).is_none());
        assert!(allowed_origin(&[], &with_origin("https://app.example.com")).is_none());
    }

    #[test]
    fn a_star_allows_every_origin() {
        let allowed = vec!["*".to_string()];
        assert_eq!(
            allowed_origin(&allowed, &with_origin("https://any.example")).unwrap(),
            "*"
        );
    }
}
