//! The browser side, embedded in the binary so `cargo run --release` serves it with no npm on the
//! user's machine: the demo chat page at `/`, the ES module client at `/client/roomwire.js`, the
//! wire contract at `/client/roomwire.proto`, and the vendored protobuf.js build (BSD-3-Clause,
//! its license at `/client/vendor/LICENSE.protobufjs`).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../web/index.html");
const CLIENT_JS: &str = include_str!("../web/roomwire.js");
const PROTOBUF_JS: &str = include_str!("../web/vendor/protobuf.min.js");
const PROTOBUF_LICENSE: &str = include_str!("../web/vendor/LICENSE.protobufjs");
const PROTO: &str = include_str!("../proto/roomwire/v1/roomwire.proto");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The routes of the browser client and demo page (stateless; merged into the HTTP router).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/client/roomwire.js",
            get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
        .route(
            "/client/roomwire.proto",
            get(|| async { asset("text/plain; charset=utf-8", PROTO) }),
        )
        .route(
            "/client/vendor/protobuf.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", PROTOBUF_JS) }),
        )
        .route(
            "/client/vendor/LICENSE.protobufjs",
            get(|| async { asset("text/plain; charset=utf-8", PROTOBUF_LICENSE) }),
        )
}
