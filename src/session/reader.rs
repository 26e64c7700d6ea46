//! The reader side of a session: inbound frames, budgets, and the requests they carry (join,
//! leave, publish, refresh, ping, history), and the resume of a reconnecting client's rooms.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::errors::RequestError;
use super::io::{FrameSource, Inbound};
use super::pipeline::{Pipeline, Unacked};
use crate::auth::{AuthError, Permissions};
use crate::clock::wall_ms;
use crate::cluster::BusError;
use crate::cluster::REPLAY_PAGE;
use crate::context::NodeContext;
use crate::limits::{Admit, SessionBudget};
use crate::member::{CloseReason, Member, Waiter};
use crate::proto::{self, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame};
use crate::room::{HistoryPage, HistoryQuery, Publication, RoomName, Sequenced};
use crate::telemetry::{KeyValue, SpanKind, Trace, attr, position};

/// An inbound event after decoding.
enum Decoded {
    Activity,
    Text,
    Frame(ClientFrame),
    Undecodable(prost::DecodeError),
    /// A WebTransport datagram, decoded by [`Session::datagram`].
    Datagram(Bytes),
}

/// The reader side's state.
pub(super) struct Session {
    pub(super) ctx: Arc<NodeContext>,
    pub(super) handle: Arc<Member>,
    /// Rooms joined explicitly (the implicit user and broadcast rooms are not counted).
    pub(super) rooms: HashSet<RoomName>,
    pub(super) violations: u32,
    pub(super) budget: SessionBudget,
    pub(super) permissions: Permissions,
    /// The token's presence info (empty: none; then a Join's `presence_info` is used).
    pub(super) info: Bytes,
    /// Unix seconds when the token expires (None: never).
    pub(super) expires_at: Option<u64>,
    /// Whether TokenExpiring was sent for the current token.
    pub(super) warned: bool,
    /// Set by a Refresh: the expiry timer must be re-armed.
    pub(super) rearm: bool,
    /// Reliable publishes read and not yet answered.
    pub(super) publishes: Pipeline,
    /// The rooms the Connect asked to resume, with its request id, until they are rejoined.
    pub(super) resume: Option<(u64, proto::Resume)>,
    /// The Connect's request id (resumed rooms are answered with it).
    pub(super) connect_request_id: u64,
    /// `Connect.device_id`: where this device has read its user room to is kept.
    pub(super) device: Option<String>,
    /// Where the user room is rejoined from (a resumed position, or the device's), once the
    /// writer runs; `None`: it was joined live with the other implicit room.
    pub(super) user_room_since: Option<(u64, u64)>,
}

/// The answer to a History request: the page's frames are the Message frames members got.
fn history_frame(request_id: u64, room: &RoomName, page: HistoryPage) -> ServerFrame {
    let (oldest_epoch, oldest_seq) = page.oldest.unwrap_or_default();
    let (more, (epoch, seq)) = (page.more, page.position);
    ServerFrame::reply(
        request_id,
        server_frame::Kind::HistoryPage(proto::HistoryPage {
            room: room.to_string(),
            messages: page.into_messages(),
            more,
            epoch,
            seq,
            oldest_epoch,
            oldest_seq,
        }),
    )
}

/// A request that awaits the bus, boxed (see [`Session::handle_frame`]).
type BoxedRequest<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl Session {
    pub(super) async fn read_loop<S: FrameSource>(&mut self, source: &mut S) {
        let idle = self.ctx.config.idle_timeout();
        let handle = self.handle.clone();
        let cancelled = handle.closing(Waiter::Reader);
        tokio::pin!(cancelled);
        // One timer for both deadlines (silence for `idle`, the token's warning or expiry),
        // re-armed only when it fires: an inbound frame just notes the time, so a busy session
        // does not touch the timer wheel per frame, and an idle one holds a single timer.
        let mut last_inbound = tokio::time::Instant::now();
        let timer = tokio::time::sleep_until(self.next_deadline(last_inbound + idle));
        tokio::pin!(timer);
        loop {
            let reading = self.publishes.has_room();
            let inbound = tokio::select! {
                biased;
                _ = &mut cancelled => return,
                answers = self.publishes.done(), if self.publishes.is_busy() => {
                    self.acknowledge(answers);
                    if let Some(answers) = self.publishes.start(&self.ctx) {
                        self.acknowledge(answers);
                    }
                    continue;
                }
                _ = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if !reading {
                        // The node, not the peer, is why nothing was read.
                        last_inbound = now;
                    }
                    if now >= last_inbound + idle {
                        self.handle.close(CloseReason::IdleTimeout);
                        return;
                    }
                    if self.token_due_in_ms() == 0 {
                        self.on_token_timer();
                    }
                    timer.as_mut().reset(self.next_deadline(last_inbound + idle));
                    continue;
                }
                r = source.recv(), if reading => r,
            };
            last_inbound = tokio::time::Instant::now();
            let inbound = match inbound {
                Err(error) => {
                    self.handle.close(error.into());
                    return;
                }
                Ok(inbound) => inbound,
            };
            // Decoding slices the buffer (no copy), so it comes before the budget: a refused
            // request is answered with its own request id.
            let (decoded, len) = match inbound {
                Inbound::Closed => {
                    self.handle.close(CloseReason::ClientClosed);
                    return;
                }
                Inbound::Activity => (Decoded::Activity, 1),
                Inbound::Text => (Decoded::Text, 1),
                Inbound::Datagram(bytes) => {
                    let len = bytes.len();
                    (Decoded::Datagram(bytes), len)
                }
                Inbound::Frame(bytes) => {
                    let len = bytes.len();
                    (
                        ClientFrame::decode_bytes(bytes)
                            .map_or_else(Decoded::Undecodable, Decoded::Frame),
                        len,
                    )
                }
            };
            let request_id = match &decoded {
                Decoded::Frame(frame) => frame.request_id,
                _ => 0,
            };
            // Every inbound frame is charged, pings included: this is also the ping-flood limit.
            match self.budget.admit(len) {
                Admit::Accept => {}
                Admit::Refuse => {
                    self.count_in("rate_limited");
                    self.send_error(
                        request_id,
                        ErrorCode::RateLimited,
                        "rate limit exceeded; frame dropped",
                    );
                    continue;
                }
                Admit::Close => {
                    self.handle.close(CloseReason::RateLimited);
                    return;
                }
            }
            match decoded {
                Decoded::Activity => {}
                Decoded::Datagram(bytes) => Box::pin(self.datagram(bytes)).await,
                Decoded::Text => {
                    self.count_in("text");
                    self.violation(
                        0,
                        ErrorCode::TextFrame,
                        "text messages are not part of the protocol; send binary ClientFrames",
                    );
                }
                Decoded::Frame(frame) => {
                    self.count_in(frame.kind_name());
                    if let Some(request) = self.handle_frame(frame) {
                        request.await;
                    }
                }
                Decoded::Undecodable(error) => {
                    self.count_in("undecodable");
                    tracing::debug!(%error, "undecodable frame");
                    self.violation(0, ErrorCode::BadFrame, "not a decodable ClientFrame");
                }
            }
            // Time spent handling the frame (a join in a mesh may wait for the owner) is not
            // the peer's silence.
            last_inbound = tokio::time::Instant::now();
            if std::mem::take(&mut self.rearm) {
                timer
                    .as_mut()
                    .reset(self.next_deadline(last_inbound + idle));
            }
        }
    }

    /// A datagram from the client: only an unreliable Publish is accepted this way; anything else
    /// is dropped and counted (datagrams may be lost, so there is no reply to a bad one).
    async fn datagram(&mut self, bytes: Bytes) {
        let received = &self.ctx.metrics.datagrams_received;
        match ClientFrame::decode_bytes(bytes) {
            Ok(ClientFrame {
                request_id,
                kind: Some(client_frame::Kind::Publish(publish)),
            }) if publish.unreliable => {
                received.get_or_create(&[("outcome", "publish")]).inc();
                let result = match self.publication(publish) {
                    Ok((publication, _)) => self.publish_unreliable(publication).await,
                    Err(error) => Err(error),
                };
                self.answer(request_id, result);
            }
            _ => {
                received.get_or_create(&[("outcome", "rejected")]).inc();
            }
        }
    }

    /// Milliseconds until the token's next event (the warning, then the expiry); 0 when due.
    fn token_due_in_ms(&self) -> u64 {
        // Capped so no configuration can overflow the Instant arithmetic.
        const FAR: u64 = 365 * 86_400 * 1000;
        let Some(expires_at) = self.expires_at else {
            return FAR;
        };
        let warning = self.ctx.config.auth.jwt.refresh_warning_s;
        let at_s = if self.warned {
            expires_at
        } else {
            expires_at.saturating_sub(warning)
        };
        at_s.saturating_mul(1000).saturating_sub(wall_ms()).min(FAR)
    }

    /// When the read loop's timer fires next: the token's next event or the idle deadline.
    fn next_deadline(&self, idle_at: tokio::time::Instant) -> tokio::time::Instant {
        let token_at = tokio::time::Instant::now() + Duration::from_millis(self.token_due_in_ms());
        token_at.min(idle_at)
    }

    fn on_token_timer(&mut self) {
        let Some(expires_at) = self.expires_at else {
            return;
        };
        if self.warned || wall_ms() / 1000 >= expires_at {
            self.handle.close(CloseReason::TokenExpired);
        } else {
            self.warned = true;
            self.handle.push_frame(&ServerFrame::reply(
                0,
                server_frame::Kind::TokenExpiring(proto::TokenExpiring {
                    expires_at_ms: expires_at.saturating_mul(1000),
                }),
            ));
        }
    }

    async fn refresh(&mut self, request_id: u64, token: &str) -> Result<(), RequestError> {
        // Only token sessions expire; a certificate (or development) session has nothing to
        // refresh, and a token must not graft an expiry or new permissions onto it.
        if self.expires_at.is_none() {
            return Err(RequestError::Auth(AuthError::Invalid(
                "this session was not opened with a token".into(),
            )));
        }
        let principal = self.ctx.refresh(token, &self.handle.user).await?;
        self.permissions = principal.permissions;
        self.expires_at = principal.expires_at;
        self.info = principal.info;
        // Rooms the new token no longer allows are left, each with a Left frame.
        let revoked: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|r| !self.permissions.may_join(r))
            .cloned()
            .collect();
        for room in revoked {
            self.rooms.remove(&room);
            self.ctx.bus.leave(&room, &self.handle).await;
            self.handle.push_frame(&ServerFrame::reply(
                0,
                server_frame::Kind::Left(proto::Left {
                    room: room.to_string(),
                }),
            ));
        }
        self.warned = false;
        self.rearm = true;
        self.handle.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Refreshed(proto::Refreshed {
                expires_at_ms: self.expires_at.map_or(0, |s| s.saturating_mul(1000)),
            }),
        ));
        Ok(())
    }

    fn count_in(&self, kind: &'static str) {
        self.ctx.metrics.frame_in(kind);
    }

    fn count_error(&self, code: ErrorCode) {
        self.ctx
            .metrics
            .errors
            .get_or_create(&[("code", code.label())])
            .inc();
    }

    fn send_error(&self, request_id: u64, code: ErrorCode, message: &str) {
        self.count_error(code);
        self.handle
            .push_frame(&ServerFrame::error(request_id, code, message));
    }

    /// A protocol violation: answered with an Error frame; too many close the session (4000).
    fn violation(&mut self, request_id: u64, code: ErrorCode, message: &str) {
        self.send_error(request_id, code, message);
        self.violations += 1;
        if self.violations >= self.ctx.config.session.max_violations {
            self.handle.close(CloseReason::ProtocolViolation);
        }
    }

    /// Handles one request. What completes at once (a reliable publish is only queued for the
    /// bus, a ping, a refusal) is done here; a request that awaits the bus (join, leave,
    /// refresh, an unreliable publish) is returned boxed for the read loop to await, so its
    /// future (kilobytes in a mesh) is not part of every idle session's state and the common
    /// frames cost no allocation.
    fn handle_frame(&mut self, frame: ClientFrame) -> Option<BoxedRequest<'_>> {
        use client_frame::Kind;
        let request_id = frame.request_id;
        let result = match frame.kind {
            Some(Kind::Join(join)) => {
                return Some(Box::pin(async move {
                    let result = self.join(request_id, join).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Presence(ask)) => {
                return Some(Box::pin(async move {
                    let result = self
                        .presence(request_id, &ask.room, ask.after, ask.limit, false)
                        .await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::PresenceStats(ask)) => {
                return Some(Box::pin(async move {
                    let result = self
                        .presence(request_id, &ask.room, String::new(), 0, true)
                        .await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::History(ask)) => {
                return Some(Box::pin(async move {
                    let result = self.history(request_id, ask).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Seen(position)) => {
                return Some(Box::pin(async move {
                    let result = self.seen(position).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Leave(leave)) => {
                return Some(Box::pin(async move {
                    let result = self.leave(request_id, &leave.room).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Refresh(refresh)) => {
                return Some(Box::pin(async move {
                    let result = self.refresh(request_id, &refresh.token).await;
                    self.answer(request_id, result);
                }));
            }
            Some(Kind::Publish(publish)) => match self.publication(publish) {
                Ok((publication, true)) => {
                    return Some(Box::pin(async move {
                        let result = self.publish_unreliable(publication).await;
                        self.answer(request_id, result);
                    }));
                }
                Ok((publication, false)) => {
                    self.publish(request_id, publication);
                    Ok(())
                }
                Err(error) => Err(error),
            },
            Some(Kind::Ping(ping)) => {
                self.handle.push_frame(&ServerFrame::reply(
                    request_id,
                    server_frame::Kind::Pong(proto::Pong { nonce: ping.nonce }),
                ));
                Ok(())
            }
            Some(Kind::Connect(_)) => {
                self.violation(request_id, ErrorCode::UnexpectedFrame, "already connected");
                Ok(())
            }
            None => {
                self.violation(request_id, ErrorCode::BadFrame, "frame has no kind");
                Ok(())
            }
        };
        self.answer(request_id, result);
        None
    }

    /// A refused request gets its error frame.
    fn answer(&self, request_id: u64, result: Result<(), RequestError>) {
        if let Err(error) = result {
            tracing::debug!(%error, "request refused");
            self.send_error(request_id, error.code(), &error.to_string());
        }
    }

    fn room_name(&self, name: &str) -> Result<RoomName, RequestError> {
        Ok(RoomName::parse_client(
            name,
            self.ctx.config.rooms.max_name_bytes,
        )?)
    }

    /// This device has read its user room to `position` (offline delivery).
    async fn seen(&mut self, position: proto::RoomPosition) -> Result<(), RequestError> {
        let Some(device) = &self.device else {
            return Err(RequestError::SeenWithoutDevice);
        };
        if position.room != RoomName::for_user(&self.handle.user).as_str() {
            return Err(RequestError::SeenWithoutDevice);
        }
        let at = (position.epoch, position.seq);
        Ok(self
            .ctx
            .bus
            .device_seen(&self.handle.user, device, at)
            .await?)
    }

    /// Where the user room is to be rejoined from: its entry in `Connect.resume`, else where
    /// this device had read to; `None` to join it live.
    pub(super) async fn user_room_position(&mut self) -> Option<(u64, u64)> {
        let user_room = RoomName::for_user(&self.handle.user);
        if let Some((_, resume)) = &mut self.resume
            && let Some(i) = resume
                .rooms
                .iter()
                .position(|p| p.room == user_room.as_str())
        {
            let position = resume.rooms.remove(i);
            return Some((position.epoch, position.seq));
        }
        let device = self.device.clone()?;
        let bus = &self.ctx.bus;
        let user = &self.handle.user;
        let known = match bus.device_position(user, &device).await {
            Ok(known) => known,
            Err(error) => {
                tracing::warn!(%error, "the device's position is unknown; its user room is joined live");
                return None;
            }
        };
        if known.is_some() {
            return known;
        }
        // A device not known (new, or away for longer than its entry is kept) gets what the
        // user room keeps: it starts right before the oldest kept message (or at the room's
        // position when it keeps none), remembered at once, so what it is sent is delivered to
        // it even if this session ends before it reports anything.
        let oldest = bus.history(&user_room, HistoryQuery::After(0, 0), 1).await;
        let page = oldest.ok()?;
        let position = match page.messages.first() {
            Some(m) => (m.epoch, m.seq - 1),
            None => page.position,
        };
        if let Err(error) = bus.device_seen(user, &device, position).await {
            tracing::warn!(%error, "a new device's position could not be kept");
        }
        Some(position)
    }

    /// Rejoins the rooms the Connect named in `resume`, each as a Join with its position, and
    /// the user room from where this device left it; what fails for one room is answered with
    /// an Error naming it (the Connect's request id).
    pub(super) async fn resume(&mut self) {
        if let Some(since) = self.user_room_since {
            let user_room = RoomName::for_user(&self.handle.user);
            let request_id = self.connect_request_id;
            let joined = self
                .ctx
                .bus
                .join(&user_room, &self.handle, Some(request_id), Some(since))
                .await;
            if let Err(error) = joined {
                tracing::warn!(%error, "user room not rejoined; sending the session away");
                self.handle
                    .go_away("this node cannot serve the session now; reconnect");
            }
        }
        let Some((request_id, resume)) = self.resume.take() else {
            return;
        };
        for position in resume.rooms {
            let join = proto::Join {
                presence_events: resume.presence_events.contains(&position.room),
                room: position.room.clone(),
                since: Some(position.clone()),
                presence_info: Bytes::new(),
            };
            if let Err(error) = self.join(request_id, join).await {
                tracing::debug!(%error, room = %position.room, "resume refused");
                self.count_error(error.code());
                self.handle.push_frame(&ServerFrame::room_error(
                    request_id,
                    error.code(),
                    error.to_string(),
                    position.room,
                ));
            }
        }
    }

    /// A Join, in a `room.join` span when telemetry is on (a trace of its own).
    async fn join(&mut self, request_id: u64, join: proto::Join) -> Result<(), RequestError> {
        let mut span =
            self.ctx
                .telemetry
                .span("room.join", SpanKind::Server, &Trace::default(), || {
                    [
                        KeyValue::new(attr::ROOM, join.room.clone()),
                        KeyValue::new(attr::USER, self.handle.user.to_string()),
                        KeyValue::new(attr::SESSION, self.handle.id.to_string()),
                        KeyValue::new("roomwire.resume", join.since.is_some()),
                    ]
                });
        let result = self.join_room(request_id, join).await;
        if let Err(error) = &result {
            span.fail(error);
        }
        result
    }

    async fn join_room(&mut self, request_id: u64, join: proto::Join) -> Result<(), RequestError> {
        let room = self.room_name(&join.room)?;
        let since = join.since.map(|p| (p.epoch, p.seq));
        if !self.permissions.may_join(&room) {
            return Err(RequestError::Forbidden("join", room));
        }
        let presence = self.ctx.bus.presence();
        let info_max = presence.info_max_bytes;
        if join.presence_info.len() > info_max {
            return Err(RequestError::InfoTooLarge(info_max));
        }
        // The token's info is the issuer's word on who this is: a Join cannot replace it.
        let info = if self.info.is_empty() {
            join.presence_info
        } else if self.info.len() > info_max && presence.list_max(&room).is_some() {
            return Err(RequestError::TokenInfoTooLarge(info_max));
        } else {
            self.info.clone()
        };
        let max = self.ctx.config.session.max_rooms;
        if !self.rooms.contains(&room) && self.rooms.len() >= max {
            return Err(RequestError::TooManyRooms(max));
        }
        self.ctx
            .bus
            .join(&room, &self.handle, Some(request_id), since)
            .await?;
        self.ctx
            .bus
            .presence()
            .joined(&room, &self.handle, info, join.presence_events);
        self.rooms.insert(room);
        Ok(())
    }

    /// Answers GetPresence (a page) or GetPresenceStats (`stats_only`), from the room's owner.
    async fn presence(
        &mut self,
        request_id: u64,
        room: &str,
        after: String,
        limit: u32,
        stats_only: bool,
    ) -> Result<(), RequestError> {
        let room = self.room_name(room)?;
        if !self.permissions.may_join(&room) {
            return Err(RequestError::Forbidden("read", room));
        }
        if self.ctx.bus.presence().list_max(&room).is_none() {
            return Err(RequestError::PresenceOff(room));
        }
        let query = proto::mesh::PresenceQuery {
            room: room.to_string(),
            after,
            limit,
            stats_only,
            uncapped: false,
        };
        let reply = self.ctx.bus.presence_query(&room, query).await?;
        if reply.too_large {
            return Err(RequestError::PresenceTooLarge(room, reply.users));
        }
        let kind = if stats_only {
            server_frame::Kind::PresenceStats(proto::PresenceStats {
                room: room.to_string(),
                users: reply.users,
                sessions: reply.sessions,
                epoch: reply.epoch,
                version: reply.version,
            })
        } else {
            server_frame::Kind::PresencePage(proto::PresencePage {
                room: room.to_string(),
                members: reply
                    .members
                    .into_iter()
                    .map(|m| proto::PresenceMember {
                        user_id: m.user,
                        sessions: m.sessions,
                        info: m.info,
                    })
                    .collect(),
                next: reply.next,
                epoch: reply.epoch,
                version: reply.version,
                users: reply.users,
                sessions: reply.sessions,
            })
        };
        self.handle
            .push_frame(&ServerFrame::reply(request_id, kind));
        Ok(())
    }

    /// Answers a History request with one page of the room's kept messages.
    async fn history(&mut self, request_id: u64, ask: proto::History) -> Result<(), RequestError> {
        let room = self.room_name(&ask.room)?;
        if !self.permissions.may_join(&room) {
            return Err(RequestError::Forbidden("read", room));
        }
        let query = match (ask.after, ask.before) {
            (None, None) => HistoryQuery::Newest,
            (Some(after), None) => HistoryQuery::After(after.epoch, after.seq),
            (None, Some(before)) => HistoryQuery::Before(before.epoch, before.seq),
            (Some(_), Some(_)) => return Err(RequestError::BothDirections),
        };
        let limit = match ask.limit as usize {
            0 => REPLAY_PAGE,
            n => n.min(REPLAY_PAGE),
        };
        let page = self.ctx.bus.history(&room, query, limit).await?;
        self.handle
            .push_frame(&history_frame(request_id, &room, page));
        Ok(())
    }

    async fn leave(&mut self, request_id: u64, name: &str) -> Result<(), RequestError> {
        let room = self.room_name(name)?;
        if !self.rooms.remove(&room) {
            return Err(RequestError::NotMember(room));
        }
        self.ctx.bus.leave(&room, &self.handle).await;
        self.handle.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Left(proto::Left {
                room: room.to_string(),
            }),
        ));
        Ok(())
    }

    /// A checked Publish, and whether it is unreliable.
    fn publication(&self, publish: proto::Publish) -> Result<(Publication, bool), RequestError> {
        let room = self.room_name(&publish.room)?;
        if !self.permissions.may_publish(&room) {
            return Err(RequestError::Forbidden("publish", room));
        }
        let publication = Publication::checked(
            room,
            publish.payload,
            self.handle.user.clone(),
            publish.client_msg_id,
            self.ctx.config.session.max_frame_bytes,
        )?;
        Ok((publication, publish.unreliable))
    }

    async fn publish_unreliable(&self, publication: Publication) -> Result<(), RequestError> {
        let report = self.ctx.bus.publish_unreliable(publication).await;
        match report.too_large {
            Some(max) => Err(RequestError::DatagramTooLarge(max)),
            None => Ok(()),
        }
    }

    /// Queues a reliable publish for the bus; its ack (or error) follows once it is sequenced.
    /// Traced, it starts a trace: a `room.publish` span, which the publication carries to its
    /// owner and which ends with the answer.
    fn publish(&mut self, request_id: u64, mut publication: Publication) {
        let span =
            self.ctx
                .telemetry
                .span("room.publish", SpanKind::Server, &Trace::default(), || {
                    [
                        KeyValue::new(attr::ROOM, publication.room.to_string()),
                        KeyValue::new(attr::USER, self.handle.user.to_string()),
                        KeyValue::new(attr::SESSION, self.handle.id.to_string()),
                        KeyValue::new(attr::CLIENT_MSG_ID, publication.client_msg_id.clone()),
                        KeyValue::new(attr::PAYLOAD_BYTES, publication.payload.len() as i64),
                    ]
                });
        publication.trace = span.trace();
        self.publishes.enqueue(request_id, publication, span);
        if let Some(answers) = self.publishes.start(&self.ctx) {
            self.acknowledge(answers);
        }
    }

    /// Answers sequenced publishes: an ack, or an error, each, in order.
    fn acknowledge(&self, answers: Vec<(Unacked, Result<Sequenced, BusError>)>) {
        for (mut unacked, result) in answers {
            match &result {
                Ok(s) => unacked
                    .span
                    .record(|| position(s.epoch, s.seq, s.duplicate)),
                Err(error) => unacked.span.fail(error),
            }
            match result {
                Ok(sequenced) => {
                    self.handle.push_frame(&ServerFrame::reply(
                        unacked.request_id,
                        server_frame::Kind::PublishAck(proto::PublishAck {
                            room: unacked.room.to_string(),
                            client_msg_id: unacked.client_msg_id,
                            epoch: sequenced.epoch,
                            seq: sequenced.seq,
                            duplicate: sequenced.duplicate,
                        }),
                    ));
                }
                Err(error) => {
                    let error = RequestError::from(error);
                    tracing::debug!(%error, "publish refused");
                    self.send_error(unacked.request_id, error.code(), &error.to_string());
                }
            }
        }
    }
}
