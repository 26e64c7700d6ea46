//! HTTP routes, on the same port as the WebSocket upgrade: health, readiness, metrics, and the
//! server API (`/api/v1/*`, bearer API key, compared in constant time).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::{BusError, ClusterStatus, REPLAY_PAGE};
use crate::context::NodeContext;
use crate::member::CloseReason;
use crate::room::{HistoryQuery, Publication, PublishError, RoomName};
use crate::telemetry::{KeyValue, SpanKind, Trace, attr, position};
use crate::transport::ws;

/// Publisher id of messages sent through the HTTP API.
pub const SERVER_PUBLISHER: &str = "$server";

pub fn router(ctx: Arc<NodeContext>) -> Router {
    Router::new()
        .merge(crate::web::routes())
        .route("/about", get(index))
        .route("/ws", get(ws::upgrade))
        .route(
            "/webtransport/certhash",
            crate::web::with_cors(get(certhash), &ctx.config.server.allowed_origins),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/rooms/{room}", get(room_info))
        .route("/api/v1/rooms/{room}/history", get(room_history))
        .route("/api/v1/rooms/{room}/presence", get(room_presence))
        .route(
            "/api/v1/rooms/{room}/presence/stats",
            get(room_presence_stats),
        )
        .route("/api/v1/users/{user}/disconnect", post(disconnect_user))
        .route("/api/v1/node", get(node_info))
        .route("/api/v1/cluster", get(cluster))
        .layer(DefaultBodyLimit::max(ctx.config.server.max_body_bytes))
        .with_state(ctx)
}

/// A refused API request: a status and a JSON body `{"error": code, "message": text}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

/// Proof that the request carried a configured API key (`Authorization: Bearer <key>`).
pub struct ApiKey;

impl FromRequestParts<Arc<NodeContext>> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<NodeContext>,
    ) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .unwrap_or("");
        let matched = ctx.api_keys.accepts(presented);
        let outcome = if matched {
            "authorized"
        } else {
            "unauthorized"
        };
        ctx.metrics
            .http_api_requests
            .get_or_create(&[("outcome", outcome)])
            .inc();
        if matched {
            Ok(ApiKey)
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (Authorization: Bearer <key>)",
            ))
        }
    }
}

async fn index(State(ctx): State<Arc<NodeContext>>) -> String {
    format!(
        "roomwire node {} (region {})\nWebSocket: /ws (subprotocol roomwire.v1)\nHealth: /healthz /readyz  Metrics: /metrics  API: /api/v1/*\nDemo page: /  Browser client: /client/roomwire.js  WebTransport certificate: /webtransport/certhash\n",
        ctx.node_id, ctx.config.node.region
    )
}

/// `GET /webtransport/certhash`: the SHA-256 of the WebTransport certificate (hex and base64),
/// for browsers' `serverCertificateHashes`. 404 when WebTransport is disabled.
async fn certhash(State(ctx): State<Arc<NodeContext>>) -> Response {
    match ctx.webtransport_cert.as_ref().and_then(|c| c.get()) {
        Some(info) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({
                "algorithm": info.algorithm,
                "hex": info.hex,
                "base64": info.base64,
                "not_after_ms": info.not_after_ms,
                "generated": info.generated,
                "port": ctx.webtransport_port,
                "path": ctx.config.webtransport.path,
            })),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "webtransport disabled\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Arc<NodeContext>>) -> Response {
    if ctx.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !ctx.bus.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the mesh (NATS) or still learning its nodes\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
        .into_response()
}

/// Body of `POST /api/v1/publish`: exactly one target (room, user or broadcast) and one payload
/// field (`data`, UTF-8 text, or `data_base64`, any bytes).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub room: Option<String>,
    pub user: Option<String>,
    #[serde(default)]
    pub broadcast: bool,
    pub data: Option<String>,
    pub data_base64: Option<String>,
    #[serde(default)]
    pub client_msg_id: String,
}

#[derive(Debug, Serialize)]
pub struct PublishResponse {
    pub room: String,
    pub epoch: u64,
    pub seq: u64,
    pub local_deliveries: usize,
    /// A repeat of an earlier client_msg_id: not delivered again.
    pub duplicate: bool,
}

async fn publish(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    headers: axum::http::HeaderMap,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    // The rejection knows its status: 413 over max_body_bytes, 415 without a JSON content
    // type, 400/422 for bad JSON.
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
    let max = ctx.config.rooms.max_name_bytes;
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg);
    let room = match (&req.room, &req.user, req.broadcast) {
        (Some(room), None, false) => {
            RoomName::parse_client(room, max).map_err(|e| bad(e.to_string()))?
        }
        (None, Some(user), false) => {
            if !crate::ids::is_valid_user_id(user) {
                return Err(bad(crate::ids::USER_ID_RULE.into()));
            }
            RoomName::for_user(user)
        }
        (None, None, true) => RoomName::broadcast(),
        _ => return Err(bad("give exactly one of room, user, broadcast".into())),
    };
    let payload = match (req.data, req.data_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(Bytes::from)
            .map_err(|e| bad(format!("data_base64: {e}")))?,
        _ => return Err(bad("give exactly one of data, data_base64".into())),
    };
    let mut publication = Publication::checked(
        room.clone(),
        payload,
        SERVER_PUBLISHER.into(),
        req.client_msg_id,
        ctx.config.session.max_frame_bytes,
    )
    .map_err(|e| match e {
        PublishError::PayloadTooLarge(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{e} (session.max_frame_bytes)"),
        ),
        PublishError::ClientMsgIdTooLong => bad(e.to_string()),
    })?;
    // Traced, the publish continues the caller's trace when it sent a `traceparent`.
    let parent = match ctx.telemetry.is_on() {
        true => Trace::from_http(&headers),
        false => Trace::default(),
    };
    let mut span = ctx
        .telemetry
        .span("room.publish", SpanKind::Server, &parent, || {
            [
                KeyValue::new(attr::ROOM, room.to_string()),
                KeyValue::new(attr::USER, SERVER_PUBLISHER),
                KeyValue::new(attr::PAYLOAD_BYTES, publication.payload.len() as i64),
            ]
        });
    publication.trace = span.trace();
    // In its own task: a client that hangs up must not cut a publish off between its sequencing
    // and its fan-out.
    let publishing = tokio::spawn({
        let ctx = ctx.clone();
        async move { ctx.bus.publish(publication).await }
    });
    let published = publishing
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match &published {
        Ok(s) => span.record(|| position(s.epoch, s.seq, s.duplicate)),
        Err(error) => span.fail(error),
    }
    let sequenced = published.map_err(|e| match e {
        BusError::TooLarge(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            e.to_string(),
        ),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    })?;
    Ok(Json(PublishResponse {
        room: room.to_string(),
        epoch: sequenced.epoch,
        seq: sequenced.seq,
        local_deliveries: sequenced.local_deliveries,
        duplicate: sequenced.duplicate,
    }))
}

#[derive(Debug, Deserialize)]
struct RoomQuery {
    #[serde(default)]
    members: bool,
}

async fn room_info(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Path(room): Path<String>,
    Query(query): Query<RoomQuery>,
) -> Result<Response, ApiError> {
    let room = RoomName::parse_any(&room, ctx.config.rooms.max_name_bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let info = ctx.bus.room_info(&room).await;
    let mut body = serde_json::to_value(&info).expect("RoomInfo serializes");
    if query.members {
        let members: Vec<_> = ctx
            .hub
            .members(&room)
            .iter()
            .map(|s| json!({ "session": &*s.id, "user": &*s.user, "transport": s.transport.label(), "client": s.client_name }))
            .collect();
        body["members"] = json!(members);
    }
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
struct HistoryParams {
    /// `<epoch>:<seq>`: the messages after it, oldest first.
    after: Option<String>,
    /// `<epoch>:<seq>`: the messages before it, newest first.
    before: Option<String>,
    #[serde(default)]
    limit: usize,
}

/// A page of a room's kept messages (`after` or `before` a position, else the newest).
async fn room_history(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Path(room): Path<String>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg);
    let room = RoomName::parse_any(&room, ctx.config.rooms.max_name_bytes)
        .map_err(|e| bad(e.to_string()))?;
    let position = |text: &str| {
        let (epoch, seq) = text.split_once(':')?;
        Some((epoch.parse().ok()?, seq.parse().ok()?))
    };
    let position =
        |text: &str| position(text).ok_or_else(|| bad(format!("{text:?} is not <epoch>:<seq>")));
    let query = match (&params.after, &params.before) {
        (None, None) => HistoryQuery::Newest,
        (Some(after), None) => {
            let (epoch, seq) = position(after)?;
            HistoryQuery::After(epoch, seq)
        }
        (None, Some(before)) => {
            let (epoch, seq) = position(before)?;
            HistoryQuery::Before(epoch, seq)
        }
        (Some(_), Some(_)) => return Err(bad("give after or before, not both".into())),
    };
    let limit = match params.limit {
        0 => REPLAY_PAGE,
        n => n.min(REPLAY_PAGE),
    };
    let page = ctx.bus.history(&room, query, limit).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    let (more, (epoch, seq), oldest) = (page.more, page.position, page.oldest);
    let messages: Vec<_> = page
        .into_messages()
        .into_iter()
        .map(|m| {
            let mut message = json!({
                "epoch": m.epoch,
                "seq": m.seq,
                "publisher": m.publisher,
                "client_msg_id": m.client_msg_id,
                "server_time_ms": m.server_time_ms,
            });
            match String::from_utf8(m.payload.to_vec()) {
                Ok(text) => message["data"] = json!(text),
                Err(_) => {
                    message["data_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&m.payload))
                }
            }
            message
        })
        .collect();
    Ok(Json(json!({
        "room": room.to_string(),
        "epoch": epoch,
        "seq": seq,
        "oldest": oldest.map(|(epoch, seq)| json!({ "epoch": epoch, "seq": seq })),
        "more": more,
        "messages": messages,
    })))
}

#[derive(Debug, Deserialize)]
struct PresenceParams {
    /// The users after this user id (the previous page's `next`).
    #[serde(default)]
    after: String,
    #[serde(default)]
    limit: u32,
}

/// A room's presence as the HTTP API shows it.
#[derive(Debug, Serialize)]
struct PresenceBody {
    room: String,
    epoch: u64,
    version: u64,
    users: u32,
    sessions: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<Vec<PresenceMemberBody>>,
    /// The last user id of the page when more follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Debug, Serialize)]
struct PresenceMemberBody {
    user: String,
    sessions: u32,
    /// The presence info when it is UTF-8, else `info_base64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info_base64: Option<String>,
}

/// Asks the room's owner for a page of its presence, or its counts. The HTTP API lists any
/// room, whatever its size (paged): the class's list cap is for clients.
async fn presence_reply(
    ctx: &NodeContext,
    room: &str,
    after: String,
    limit: u32,
    stats_only: bool,
) -> Result<PresenceBody, ApiError> {
    let room = RoomName::parse_any(room, ctx.config.rooms.max_name_bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    if ctx.bus.presence().list_max(&room).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "presence_off",
            format!("room {room} keeps no presence (its class has presence = false)"),
        ));
    }
    let query = crate::proto::mesh::PresenceQuery {
        room: room.to_string(),
        after,
        limit,
        stats_only,
        uncapped: true,
    };
    let reply = ctx.bus.presence_query(&room, query).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    let members = (!stats_only).then(|| {
        reply
            .members
            .into_iter()
            .map(|m| {
                let (info, info_base64) = match std::str::from_utf8(&m.info) {
                    _ if m.info.is_empty() => (None, None),
                    Ok(text) => (Some(text.to_string()), None),
                    Err(_) => (
                        None,
                        Some(base64::engine::general_purpose::STANDARD.encode(&m.info)),
                    ),
                };
                PresenceMemberBody {
                    user: m.user,
                    sessions: m.sessions,
                    info,
                    info_base64,
                }
            })
            .collect()
    });
    Ok(PresenceBody {
        room: room.to_string(),
        epoch: reply.epoch,
        version: reply.version,
        users: reply.users,
        sessions: reply.sessions,
        members,
        next: (!reply.next.is_empty()).then_some(reply.next),
    })
}

/// A page of a room's presence (`after` a user id; `limit` at most 1000, default 100).
async fn room_presence(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Path(room): Path<String>,
    Query(params): Query<PresenceParams>,
) -> Result<Json<PresenceBody>, ApiError> {
    Ok(Json(
        presence_reply(&ctx, &room, params.after, params.limit, false).await?,
    ))
}

/// A room's presence counts.
async fn room_presence_stats(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Path(room): Path<String>,
) -> Result<Json<PresenceBody>, ApiError> {
    Ok(Json(
        presence_reply(&ctx, &room, String::new(), 0, true).await?,
    ))
}

async fn disconnect_user(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !crate::ids::is_valid_user_id(&user) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            crate::ids::USER_ID_RULE,
        ));
    }
    let disconnected = ctx.hub.close_user(&user, CloseReason::Disconnected);
    let other_nodes_told = ctx
        .bus
        .disconnect_user_elsewhere(&user)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
    Ok(Json(json!({
        "user": user,
        "disconnected": disconnected,
        "other_nodes_told": other_nodes_told,
    })))
}

async fn node_info(State(ctx): State<Arc<NodeContext>>, _key: ApiKey) -> Json<serde_json::Value> {
    Json(json!({
        "node_id": &*ctx.node_id,
        "region": ctx.config.node.region,
        "mode": ctx.bus.mode(),
        "draining": ctx.is_draining(),
        "sessions": ctx.hub.member_count(&RoomName::broadcast()),
        "local_rooms": ctx.metrics.local_rooms.get(),
        "owned_rooms": ctx.metrics.owned_rooms.get(),
    }))
}

#[derive(Deserialize)]
struct ClusterQuery {
    room: Option<String>,
}

/// `GET /api/v1/cluster[?room=NAME]`: the live nodes, the ring version, and the owner of a room.
async fn cluster(
    State(ctx): State<Arc<NodeContext>>,
    _key: ApiKey,
    Query(query): Query<ClusterQuery>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let room = query
        .room
        .map(|room| RoomName::parse_any(&room, ctx.config.rooms.max_name_bytes))
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    Ok(Json(ctx.bus.status(
        &ctx.node_id,
        &ctx.config.node.region,
        room.as_ref(),
    )))
}
