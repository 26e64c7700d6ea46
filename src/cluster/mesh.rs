//! The mesh over NATS: many nodes act as one, each room sequenced by the one node that owns it
//! on the ring of live nodes. docs/CLUSTER.md tells the whole story; in short:
//!
//! - Subjects (prefix `p` = `mesh.subject_prefix`): `p.hb` heartbeats, `p.req.<node>` requests
//!   to one node (forwarded publishes, join syncs, hand-offs; `proto/roomwire/mesh/v1`),
//!   `p.room.<room>` the room's ordered stream, subscribed only by nodes with local members.
//! - The owner sequences under the room's lock, delivers to its own members, and publishes the
//!   encoded frame once to the room subject; every other interested node fans the received bytes
//!   out as they are (one encoding per message for the whole mesh).
//! - Receivers deliver a room's messages in `(epoch, seq)` order: a message that overtakes
//!   another (two owners' streams during a hand-off travel different NATS paths) waits in a
//!   bounded reorder buffer for at most `request_timeout_ms / 2`.
//! - Ownership moves by pulling: the new owner asks the node that held the room (the ring
//!   without itself says who) to release it; the holder stops sequencing and returns
//!   `(epoch, seq, dedupe)`, so members see no gap. A draining node pushes its rooms. When no
//!   holder answers (crash), the new owner starts a new epoch and members get `EpochChanged`.
//! - Fencing: a node sequences only while connected to NATS, settled, and the owner in its own
//!   view — checked under the room's lock for every message — and owner state from before a
//!   NATS disconnect is never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use xxhash_rust::xxh3::xxh3_64;

use crate::clock::wall_ms as now_ms;
use crate::cluster::membership::{Heartbeat, Membership, NodeState, RingView, Seen};
use crate::cluster::order::{Effect, Output, RoomOrder};
use crate::cluster::{BusError, Publication, RoomInfo, Sequenced};
use crate::config::{MeshConfig, RoomsConfig};
use crate::fanout::{Hub, UnreliableReport};
use crate::member::Member;
use crate::metrics::Metrics;
use crate::proto::mesh::{self as wire, reply, request};
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{Dedupe, EpochClock, RoomName, Sequencer};

/// First byte of a room-subject message.
const KIND_MESSAGE: u8 = 1; // + epoch, seq (u64 BE), then an encoded ServerFrame
const KIND_UNRELIABLE: u8 = 2; // then an encoded ServerFrame
const KIND_SYNC: u8 = 3; // + epoch, seq, join token
const KIND_EPOCH: u8 = 4; // + epoch, 0: a new epoch starts here
const HEADER: usize = 17;

/// Node-to-node requests handled at once; more wait in the subscription's bounded buffer.
const MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Rooms searched for a previous holder: the ring's successors, at most this many.
const PULL_HOPS: usize = 3;
/// Rooms a draining node hands over at once.
const DRAIN_PUSHES_AT_ONCE: usize = 32;
/// Rooms remembered as given away, at most; and for how long.
const MOVED_MAX: usize = 100_000;
const MOVED_TTL_MS: u64 = 60_000;

fn header(kind: u8, epoch: u64, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1..9].copy_from_slice(&epoch.to_be_bytes());
    h[9..17].copy_from_slice(&seq.to_be_bytes());
    h
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// When the NATS connection last came up (set by the client's `Connected` event, and by the
/// heartbeat tick when it sees a new connection; events can be dropped by the client).
#[derive(Default)]
struct Link {
    connected_at_ms: AtomicU64,
}

/// Why a node-to-node request got no reply.
#[derive(Debug)]
enum RequestFailure {
    /// Nobody subscribes to the node's subject: it is gone (its connection closed).
    NoResponders,
    /// Timed out or failed otherwise: the node may be alive but slow, or unreachable.
    Other(String),
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestFailure::NoResponders => f.write_str("no responders"),
            RequestFailure::Other(reason) => f.write_str(reason),
        }
    }
}

/// Publications sent to an owner in one request at most.
const MAX_FORWARD_BATCH: usize = 64;

/// One step of routing a request to a room's owner.
enum Step<T> {
    Done(T),
    /// Try again (after a pause) while the deadline allows: the reason is reported if it does not.
    Retry(String),
    Fail(BusError),
}

/// The pause-and-retry budget of one routed request.
struct Route {
    deadline: Instant,
    attempt: u32,
}

impl Route {
    fn new(config: &MeshConfig) -> Self {
        Self {
            deadline: Instant::now() + Duration::from_millis(config.route_deadline_ms),
            attempt: 0,
        }
    }

    async fn pause(&mut self, reason: String) -> Result<(), BusError> {
        let delay = Duration::from_millis((20u64 << self.attempt.min(5)).min(400));
        if Instant::now() + delay > self.deadline {
            return Err(BusError::Unavailable(reason));
        }
        self.attempt += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// The owner's state of one room.
struct OwnedRoom {
    sequencer: Sequencer,
    dedupe: Dedupe,
    last_active_ms: u64,
    /// Released to another node: nothing more may be sequenced here.
    moved: bool,
    /// [`Link::generation`] when this state was created or taken over.
    generation: u64,
}

type OwnedCell = Arc<tokio::sync::Mutex<OwnedRoom>>;

/// A join waiting for the owner's sync marker to arrive on the room subject.
struct PendingJoin {
    token: u64,
    session: Arc<Member>,
    request_id: u64,
    done: oneshot::Sender<()>,
}

/// This node's subscription to one room, while it has local members.
struct Interest {
    room: RoomName,
    state: Mutex<InterestState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Wakes the room's task when a gap deadline is set from outside it (the owner's own
    /// deliveries do not come through the subscription).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct InterestState {
    closed: bool,
    /// [`Link::generation`] the order was last checked against.
    generation: u64,
    pending: Vec<PendingJoin>,
    order: RoomOrder,
}

/// What a pull found.
enum Pulled {
    State(wire::RoomState),
    /// No node holds the room: start a new epoch.
    Nowhere,
    /// A node may hold it but cannot give it now: try again later.
    Busy(String),
}

/// The NATS mesh bus.
pub struct MeshBus {
    inner: Arc<Inner>,
}

struct Inner {
    nats: Client,
    node_id: Arc<str>,
    region: Arc<str>,
    started_ms: u64,
    prefix: String,
    config: MeshConfig,
    rooms: RoomsConfig,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    stats: Arc<async_nats::Statistics>,
    membership: Mutex<Membership>,
    view: RwLock<Arc<RingView>>,
    ring_changes: AtomicU64,
    owned: Mutex<HashMap<RoomName, OwnedCell>>,
    /// Rooms this node gave away recently, and to whom: a late release request is sent on.
    moved: Mutex<HashMap<RoomName, (Arc<str>, u64)>>,
    /// Rooms being taken over right now (one pull per room at a time).
    claims: Mutex<HashMap<RoomName, Arc<tokio::sync::Mutex<()>>>>,
    interests: Mutex<HashMap<RoomName, Arc<Interest>>>,
    /// Serializes creating subscriptions, so one room never gets two.
    subscribing: tokio::sync::Mutex<()>,
    epochs: EpochClock,
    draining: AtomicBool,
    requests: Arc<Semaphore>,
}

impl MeshBus {
    /// Connects to NATS (in the background: a node starts, not ready, while NATS is away) and
    /// starts the heartbeat, request and round-trip tasks.
    pub async fn start(
        config: &crate::config::Config,
        node_id: Arc<str>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<MeshBus> {
        let mesh = config.mesh.clone();
        let link = Arc::new(Link::default());
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("roomwire {node_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(mesh.subscription_capacity)
            // A dead server (or a half-open connection) is noticed after two unanswered pings,
            // on the scale of node_ttl_ms, not the client's default minutes.
            .ping_interval(Duration::from_millis((mesh.node_ttl_ms / 2).max(200)))
            .request_timeout(Some(Duration::from_millis(mesh.request_timeout_ms)))
            .connection_timeout(Duration::from_millis(mesh.request_timeout_ms.max(2_000)))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1_000))
            })
            .event_callback({
                let link = link.clone();
                let metrics = metrics.clone();
                move |event| {
                    let link = link.clone();
                    let metrics = metrics.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                link.connected_at_ms.store(now_ms(), Ordering::Release);
                                metrics.mesh_connected.set(1);
                                tracing::info!("mesh: connected to NATS");
                            }
                            async_nats::Event::Disconnected => {
                                metrics.mesh_connected.set(0);
                                tracing::warn!("mesh: NATS connection lost; not ready");
                            }
                            async_nats::Event::SlowConsumer(_) => {
                                metrics.mesh_slow_subscriptions.inc();
                            }
                            other => tracing::info!(event = %other, "mesh: NATS event"),
                        }
                    }
                }
            });
        if !mesh.credentials_file.is_empty() {
            options = options.credentials_file(&mesh.credentials_file).await?;
        }
        if !mesh.token.is_empty() {
            options = options.token(mesh.token.clone());
        }
        let nats = options.connect(mesh.nats_urls.clone()).await?;
        let region: Arc<str> = Arc::from(config.node.region.as_str());
        let membership = Membership::new(
            node_id.clone(),
            region.clone(),
            mesh.vnodes,
            mesh.node_ttl_ms,
        );
        let view = Arc::new(membership.view(now_ms()));
        let stats = nats.statistics();
        let inner = Arc::new(Inner {
            nats,
            stats,
            node_id,
            region,
            started_ms: now_ms(),
            prefix: mesh.subject_prefix.clone(),
            config: mesh,
            rooms: config.rooms.clone(),
            hub,
            metrics,
            link,
            membership: Mutex::new(membership),
            view: RwLock::new(view),
            ring_changes: AtomicU64::new(0),
            owned: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            interests: Mutex::new(HashMap::new()),
            subscribing: tokio::sync::Mutex::new(()),
            epochs: EpochClock::default(),
            draining: AtomicBool::new(false),
            requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
        });
        inner.publish_view();
        let heartbeats = inner.nats.subscribe(inner.subject_heartbeat()).await?;
        let requests = inner
            .nats
            .subscribe(inner.subject_requests(&inner.node_id))
            .await?;
        let control = inner.nats.subscribe(inner.subject_disconnect()).await?;
        tokio::spawn(inner.clone().disconnect_loop(control));
        tokio::spawn(inner.clone().heartbeat_loop(heartbeats));
        tokio::spawn(inner.clone().request_loop(requests));
        tokio::spawn(inner.clone().rtt_loop());
        Ok(MeshBus { inner })
    }

    /// Sequences every publication at its room's owner; one result per publication, in order.
    /// Publications to one room are sequenced in the order given; rooms proceed concurrently.
    pub async fn publish_batch(
        &self,
        publications: Vec<Publication>,
    ) -> Vec<Result<Sequenced, BusError>> {
        self.inner.publish_batch(publications).await
    }

    pub async fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        self.inner.publish_unreliable(p).await
    }

    pub async fn join(
        &self,
        room: &RoomName,
        session: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        self.inner.join(room, session, request_id).await
    }

    pub fn leave(&self, room: &RoomName, session: &Arc<Member>) {
        self.inner.leave(room, session)
    }

    pub fn room_info(&self, room: &RoomName) -> RoomInfo {
        self.inner.room_info(room)
    }

    pub fn sweep(&self, now_ms: u64) {
        self.inner.sweep(now_ms)
    }

    /// Connected to NATS, settled, and not draining.
    pub fn is_ready(&self) -> bool {
        self.inner.settled() && !self.inner.draining.load(Ordering::Acquire)
    }

    /// Leaves the active ring and hands every owned room to its next owner; sessions on this
    /// node keep working (their publishes are forwarded) until they have gone.
    pub async fn drain(&self) {
        self.inner.drain().await
    }

    /// Says goodbye (peers drop this node at once) and flushes the NATS connection.
    pub async fn leave_mesh(&self) {
        self.inner.leave_mesh().await
    }

    /// Tells every other node to close the sessions of `user` (this node closes its own).
    pub async fn disconnect_user_elsewhere(&self, user: &str) -> Result<(), BusError> {
        let inner = &self.inner;
        inner.check_link()?;
        inner
            .send(
                inner.subject_disconnect(),
                Bytes::copy_from_slice(user.as_bytes()),
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("mesh publish failed: {e}")))
    }

    /// The cluster as `/api/v1/cluster` shows it.
    pub fn status(&self, room: Option<&RoomName>) -> serde_json::Value {
        let inner = &self.inner;
        let view = inner.view();
        let mut status = serde_json::json!({
            "mode": "mesh",
            "node": {"id": &*inner.node_id, "region": &*inner.region},
            "ready": self.is_ready(),
            "nats": {
                "connected": inner.connected(),
                "urls": inner.config.nats_urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
                "rtt_seconds_by_region": view
                    .nodes_per_region()
                    .keys()
                    .filter_map(|region| {
                        let labels = vec![("region", region.to_string())];
                        let rtt = inner.metrics.mesh_nats_rtt.get(&labels)?;
                        Some((region.to_string(), rtt.get()))
                    })
                    .collect::<std::collections::BTreeMap<_, _>>(),
            },
            "ring": {
                "version": format!("{:016x}", view.version),
                "changes": inner.ring_changes.load(Ordering::Relaxed),
                "vnodes": inner.config.vnodes,
                "nodes": view.nodes,
            },
            "owned_rooms": inner.owned.lock().expect("owned lock poisoned").len(),
        });
        if let Some(room) = room {
            let owner = view.ring.owner(room.as_str());
            status["owner"] = serde_json::json!({
                "room": room.as_str(),
                "node": owner.map(|o| &**o),
                "region": owner.and_then(|o| view.region_of(o)).map(|r| &**r),
            });
        }
        status
    }
}

impl Inner {
    fn subject_heartbeat(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    fn subject_requests(&self, node: &str) -> String {
        format!("{}.req.{node}", self.prefix)
    }

    fn subject_disconnect(&self) -> String {
        format!("{}.ctl.disconnect", self.prefix)
    }

    /// Closes this node's sessions of the users other nodes were asked to disconnect.
    async fn disconnect_loop(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(message) = requests.next().await {
            let Ok(user) = std::str::from_utf8(&message.payload) else {
                continue;
            };
            if !crate::ids::is_valid_user_id(user) {
                tracing::warn!("mesh: disconnect request with an invalid user id ignored");
                continue;
            }
            let sessions = self.hub.members(&RoomName::for_user(user));
            for session in &sessions {
                session.close(crate::member::CloseReason::Disconnected);
            }
            tracing::info!(
                user,
                sessions = sessions.len(),
                "mesh: user disconnected on request"
            );
        }
    }

    fn subject_room(&self, room: &RoomName) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    fn view(&self) -> Arc<RingView> {
        self.view.read().expect("view lock poisoned").clone()
    }

    fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes with a bound: the NATS client queues while reconnecting and would block once
    /// its queue is full; nothing in the mesh waits longer than a request may take.
    async fn send(
        &self,
        subject: impl async_nats::subject::ToSubject,
        payload: Bytes,
    ) -> Result<(), String> {
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        match tokio::time::timeout(bound, self.nats.publish(subject, payload)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("the NATS client did not take the message in time".into()),
        }
    }

    /// A request with the same bound around the whole call (the client's own timeout starts
    /// only once the request is queued).
    async fn nats_request(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<async_nats::Message, RequestFailure> {
        let bound = Duration::from_millis(self.config.request_timeout_ms + 100);
        match tokio::time::timeout(bound, self.nats.request(subject, payload)).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                Err(RequestFailure::NoResponders)
            }
            Ok(Err(error)) => Err(RequestFailure::Other(error.to_string())),
            Err(_) => Err(RequestFailure::Other("timed out".into())),
        }
    }

    /// Counts the connections made so far: owner state and delivery positions from an earlier
    /// connection are stale (another node may have owned the room meanwhile).
    fn generation(&self) -> u64 {
        self.stats.connects.load(Ordering::Acquire)
    }

    /// Connected, and connected long enough to have heard every live node's heartbeat.
    fn settled(&self) -> bool {
        self.connected()
            && now_ms().saturating_sub(self.link.connected_at_ms.load(Ordering::Acquire))
                >= self.config.settle_ms
    }

    /// This node may sequence `room` now.
    fn owns(&self, room: &RoomName) -> bool {
        self.settled()
            && !self.draining.load(Ordering::Acquire)
            && self
                .view()
                .ring
                .owner(room.as_str())
                .is_some_and(|o| *o == self.node_id)
    }

    /// A new epoch, larger than any this node gave before, with the node's hash in the low
    /// bits so that two nodes starting a room in the same millisecond still differ.
    ///
    /// It is also above any epoch of `room` this node has delivered, so a new owner whose clock
    /// runs behind the previous owner's still moves the room forward.
    fn fresh_epoch(&self, room: &RoomName) -> u64 {
        let known = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .and_then(|i| {
                i.state
                    .lock()
                    .expect("interest lock poisoned")
                    .order
                    .epoch()
            })
            .unwrap_or(0);
        let ms = self.epochs.next(now_ms().max(known / 1024 + 1));
        ms * 1024 + (xxh3_64(self.node_id.as_bytes()) & 1023)
    }

    // ---------------------------------------------------------------- membership

    fn heartbeat(&self, state: NodeState) -> Bytes {
        let beat = Heartbeat {
            id: self.node_id.to_string(),
            region: self.region.to_string(),
            state,
            started_ms: self.started_ms,
            protocol: crate::cluster::membership::MESH_PROTOCOL,
        };
        Bytes::from(serde_json::to_vec(&beat).expect("a heartbeat serializes"))
    }

    fn self_state(&self) -> NodeState {
        if self.draining.load(Ordering::Acquire) {
            NodeState::Draining
        } else {
            NodeState::Active
        }
    }

    async fn send_heartbeat(&self) {
        if self.connected() {
            let beat = self.heartbeat(self.self_state());
            if let Err(error) = self.send(self.subject_heartbeat(), beat).await {
                tracing::debug!(%error, "mesh: heartbeat not sent");
            }
        }
    }

    /// Rebuilds the ring snapshot from the membership; counts and logs a change.
    fn publish_view(&self) {
        // Built and installed under the membership lock, so two callers cannot install their
        // views in the wrong order.
        let membership = self.membership.lock().expect("membership lock poisoned");
        let view = Arc::new(membership.view(now_ms()));
        let previous = std::mem::replace(
            &mut *self.view.write().expect("view lock poisoned"),
            view.clone(),
        );
        drop(membership);
        self.metrics.mesh_nodes.clear();
        for (region, count) in view.nodes_per_region() {
            self.metrics
                .mesh_nodes
                .get_or_create(&vec![("region", region.to_string())])
                .set(count as i64);
        }
        // While (re)learning the mesh after connecting, the view passes through partial rings
        // that nobody acts on: not counted.
        if previous.version != view.version && self.settled() {
            self.ring_changes.fetch_add(1, Ordering::Relaxed);
            self.metrics.mesh_ring_changes.inc();
            let nodes: Vec<&str> = view.ring.nodes().iter().map(|n| &**n).collect();
            tracing::info!(
                version = format!("{:016x}", view.version),
                ?nodes,
                "mesh: ring changed"
            );
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, mut beats: async_nats::Subscriber) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut generation = self.generation();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let now = self.generation();
                    let mut changed = false;
                    {
                        let mut membership = self.membership.lock().expect("membership lock poisoned");
                        if now != generation {
                            // A new connection: nothing heard before is current; learn the mesh
                            // again (and settle from now, should the Connected event be lost).
                            generation = now;
                            membership.forget_peers();
                            self.link.connected_at_ms.store(now_ms(), Ordering::Release);
                            changed = true;
                        }
                        self.metrics.mesh_connected.set(i64::from(self.connected()));
                        membership.set_self_state(self.self_state());
                        changed |= membership.expire(now_ms());
                    }
                    if changed {
                        self.publish_view();
                    }
                    self.send_heartbeat().await;
                }
                beat = beats.next() => {
                    let Some(beat) = beat else { break };
                    let Ok(beat) = serde_json::from_slice::<Heartbeat>(&beat.payload) else {
                        tracing::warn!("mesh: undecodable heartbeat ignored");
                        continue;
                    };
                    let seen = self
                        .membership
                        .lock()
                        .expect("membership lock poisoned")
                        .observe(&beat, now_ms());
                    if seen != Seen::Unchanged {
                        self.publish_view();
                    }
                    if seen == Seen::New {
                        // Let the newcomer learn this node now rather than one period later.
                        self.send_heartbeat().await;
                    }
                }
            }
        }
    }

    /// Measures the round trip of a request through NATS to each other node in turn, one per
    /// heartbeat period (a ping answered at once), per region of the answering node.
    async fn rtt_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        let mut turn = 0usize;
        loop {
            ticker.tick().await;
            if !self.settled() {
                continue;
            }
            let view = self.view();
            let peers: Vec<_> = view.nodes.iter().filter(|n| n.id != self.node_id).collect();
            if peers.is_empty() {
                continue;
            }
            turn = turn.wrapping_add(1);
            let peer = peers[turn % peers.len()];
            let started = Instant::now();
            if let Ok(reply::Kind::Done(_)) =
                self.request(&peer.id, request::Kind::Ping(true)).await
            {
                self.metrics
                    .mesh_nats_rtt
                    .get_or_create(&vec![("region", peer.region.to_string())])
                    .set(started.elapsed().as_secs_f64());
            }
        }
    }

    // ---------------------------------------------------------------- requests between nodes

    async fn request(
        &self,
        node: &str,
        kind: request::Kind,
    ) -> Result<reply::Kind, RequestFailure> {
        let payload = wire::Request { kind: Some(kind) }.encode_to_vec();
        let message = self
            .nats_request(self.subject_requests(node), Bytes::from(payload))
            .await?;
        wire::Reply::decode(message.payload)
            .ok()
            .and_then(|r| r.kind)
            .ok_or_else(|| RequestFailure::Other(format!("undecodable reply from {node}")))
    }

    async fn request_loop(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(message) = requests.next().await {
            let Ok(permit) = self.requests.clone().acquire_owned().await else {
                break;
            };
            let inner = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(reply_to) = message.reply else {
                    return;
                };
                let kind = match wire::Request::decode(message.payload) {
                    Ok(wire::Request { kind: Some(kind) }) => inner.serve(kind).await,
                    _ => reply::Kind::Unavailable("undecodable request".into()),
                };
                let reply = wire::Reply { kind: Some(kind) }.encode_to_vec();
                if let Err(error) = inner.send(reply_to, Bytes::from(reply)).await {
                    tracing::debug!(%error, "mesh: reply not sent");
                }
            });
        }
    }

    async fn serve(self: &Arc<Self>, kind: request::Kind) -> reply::Kind {
        let parse = |room: &str| RoomName::parse_any(room, self.rooms.max_name_bytes);
        match kind {
            request::Kind::Forward(f) => self.serve_forward(f).await,
            request::Kind::ForwardBatch(batch) => {
                // In order. A publish that must be re-routed ends the batch (its reply is the
                // last), and so does half a request's time spent here: the sender gives up on a
                // request after `request_timeout_ms` and sends it again, and a re-sent batch
                // must not find this one still sequencing.
                let budget = Duration::from_millis(self.config.request_timeout_ms / 2);
                let started = Instant::now();
                let mut replies = Vec::with_capacity(batch.publishes.len());
                for f in batch.publishes {
                    if started.elapsed() > budget {
                        break;
                    }
                    let kind = self.serve_forward(f).await;
                    let last =
                        matches!(kind, reply::Kind::NotOwner(_) | reply::Kind::Unavailable(_));
                    replies.push(wire::Reply { kind: Some(kind) });
                    if last {
                        break;
                    }
                }
                reply::Kind::Batch(wire::BatchReply { replies })
            }
            request::Kind::Sync(s) => {
                let Ok(room) = parse(&s.room) else {
                    return reply::Kind::Unavailable("invalid room name".into());
                };
                match self.sync_here(&room, s.token).await {
                    Step::Done(()) => reply::Kind::Done(true),
                    Step::Retry(reason) => reply::Kind::NotOwner(reason),
                    Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
                }
            }
            request::Kind::Release(r) => match parse(&r.room) {
                Ok(room) => self.release(&room, &r.to_node).await,
                Err(_) => reply::Kind::Done(true),
            },
            request::Kind::Ping(_) => reply::Kind::Done(true),
            request::Kind::Handoff(state) => match parse(&state.room) {
                Ok(room) => self.take_handoff(room, state),
                Err(_) => reply::Kind::Done(true),
            },
        }
    }

    async fn serve_forward(self: &Arc<Self>, f: wire::Forward) -> reply::Kind {
        let Ok(room) = RoomName::parse_any(&f.room, self.rooms.max_name_bytes) else {
            return reply::Kind::Unavailable("invalid room name".into());
        };
        let publication = Publication {
            room,
            payload: f.payload,
            publisher: Arc::from(f.publisher.as_str()),
            client_msg_id: f.client_msg_id,
        };
        match self.sequence_here(&publication).await {
            Step::Done(s) => reply::Kind::Sequenced(wire::Sequenced {
                epoch: s.epoch,
                seq: s.seq,
                duplicate: s.duplicate,
            }),
            Step::Retry(reason) => reply::Kind::NotOwner(reason),
            Step::Fail(BusError::TooLarge(max)) => reply::Kind::TooLarge(max as u64),
            Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
        }
    }

    // ---------------------------------------------------------------- ownership

    /// The owner state of `room` on this node, taken over from its previous holder (or started
    /// in a new epoch) on first use. The take-over runs in its own task so that a caller that
    /// gives up (a closed session) cannot drop a room state released to this node.
    async fn owned_room(self: &Arc<Self>, room: &RoomName) -> Result<OwnedCell, BusError> {
        if let Some(cell) = self.owned.lock().expect("owned lock poisoned").get(room) {
            return Ok(cell.clone());
        }
        let inner = self.clone();
        let room = room.clone();
        tokio::spawn(async move { inner.take_over(room).await })
            .await
            .map_err(|e| BusError::Moving(format!("room take-over failed: {e}")))?
    }

    async fn take_over(self: Arc<Self>, room: RoomName) -> Result<OwnedCell, BusError> {
        let claim = self
            .claims
            .lock()
            .expect("claims lock poisoned")
            .entry(room.clone())
            .or_default()
            .clone();
        let _claimed = claim.lock().await;
        let result = self.take_over_claimed(&room).await;
        let mut claims = self.claims.lock().expect("claims lock poisoned");
        if claims.get(&room).is_some_and(|c| Arc::ptr_eq(c, &claim))
            && Arc::strong_count(&claim) <= 2
        {
            claims.remove(&room);
        }
        result
    }

    async fn take_over_claimed(&self, room: &RoomName) -> Result<OwnedCell, BusError> {
        if let Some(cell) = self.owned.lock().expect("owned lock poisoned").get(room) {
            return Ok(cell.clone());
        }
        if self.owned.lock().expect("owned lock poisoned").len() >= self.rooms.max_owned_rooms {
            return Err(BusError::Unavailable(
                "this node holds its maximum number of rooms".into(),
            ));
        }
        let generation = self.generation();
        let pulled = match self.pull(room).await {
            Pulled::State(state) => Some(state),
            Pulled::Nowhere => None,
            Pulled::Busy(reason) => return Err(BusError::Moving(reason)),
        };
        let now = now_ms();
        let (cell, fresh) = {
            let mut owned = self.owned.lock().expect("owned lock poisoned");
            if let Some(cell) = owned.get(room) {
                // Pushed here by a draining node while the pull was under way.
                return Ok(cell.clone());
            }
            let (state, fresh) = match pulled {
                Some(state) => {
                    self.metrics
                        .mesh_handoffs
                        .get_or_create(&[("direction", "in"), ("how", "pulled")])
                        .inc();
                    (owned_from(&state, generation, now), None)
                }
                None => {
                    let epoch = self.fresh_epoch(room);
                    let state = OwnedRoom {
                        sequencer: Sequencer::new(epoch),
                        dedupe: Dedupe::default(),
                        last_active_ms: now,
                        moved: false,
                        generation,
                    };
                    (state, Some(epoch))
                }
            };
            let cell = Arc::new(tokio::sync::Mutex::new(state));
            owned.insert(room.clone(), cell.clone());
            self.metrics.owned_rooms.inc();
            (cell, fresh)
        };
        if let Some(epoch) = fresh {
            // Nothing is sequenced in the new epoch before its marker is out, so members
            // elsewhere learn of it now (EpochChanged), not at the next message.
            let _sequencing = cell.lock().await;
            self.metrics.mesh_epochs_started.inc();
            self.accept(room, epoch, 0, None);
            let marker = Bytes::copy_from_slice(&header(KIND_EPOCH, epoch, 0));
            if let Err(error) = self.send(self.subject_room(room), marker).await {
                tracing::debug!(%error, "mesh: epoch marker not sent");
            }
        }
        Ok(cell)
    }

    /// Asks the nodes that may hold `room` (its owner on the ring without this node, then the
    /// next ones, or where it was sent) to release it to this node. `Nowhere` only when every
    /// node asked answered that it holds nothing, or is gone.
    async fn pull(&self, room: &RoomName) -> Pulled {
        let view = self.view();
        let mut asked: Vec<Arc<str>> = vec![self.node_id.clone()];
        let mut next: Option<Arc<str>> = None;
        for _ in 0..PULL_HOPS * 2 {
            let candidate = match next.take() {
                Some(node) => node,
                None => match view
                    .holders
                    .owner_excluding(room.as_str(), |n| asked.iter().any(|a| **a == *n))
                {
                    Some(node) => node.clone(),
                    None => break,
                },
            };
            let release = request::Kind::Release(wire::Release {
                room: room.to_string(),
                to_node: self.node_id.to_string(),
            });
            match self.request(&candidate, release).await {
                Ok(reply::Kind::State(state)) => return Pulled::State(state),
                Ok(reply::Kind::MovedTo(node)) => {
                    // Given to `node`; if that is this node, the push has been installed.
                    if !asked.iter().any(|a| **a == *node) {
                        next = Some(Arc::from(node.as_str()));
                    }
                }
                Ok(reply::Kind::Done(_)) => {}
                Ok(reply::Kind::NotOwner(reason) | reply::Kind::Unavailable(reason)) => {
                    // It holds the room and does not see this node as its owner yet.
                    return Pulled::Busy(reason);
                }
                Ok(_) => return Pulled::Busy(format!("unexpected reply from {candidate}")),
                Err(RequestFailure::NoResponders) => {}
                Err(RequestFailure::Other(reason)) => {
                    // Alive by its heartbeats but not answering: it may hold the room.
                    return Pulled::Busy(format!("{candidate} did not answer: {reason}"));
                }
            }
            asked.push(candidate);
            if next.is_none() && asked.len() > PULL_HOPS {
                break;
            }
        }
        Pulled::Nowhere
    }

    /// Gives `room` up to `to`: no more sequencing here, and the state travels in the reply.
    async fn release(&self, room: &RoomName, to: &str) -> reply::Kind {
        let cell = self
            .owned
            .lock()
            .expect("owned lock poisoned")
            .get(room)
            .cloned();
        let Some(cell) = cell else {
            return self.moved_to(room);
        };
        let mut state = cell.lock().await;
        if state.moved {
            // Given to another node while this request waited (a drain's push).
            return self.moved_to(room);
        }
        if state.generation != self.generation() {
            // From before a NATS reconnect: stale, and never handed on.
            drop(state);
            self.forget_owned(room, &cell);
            return reply::Kind::Done(true);
        }
        if self.owns(room) {
            // The asker's view is ahead of this node's (or wrong): release only once this node
            // agrees it is not the owner, so two nodes never sequence the room at once.
            return reply::Kind::NotOwner(format!(
                "{} still owns {room} in its view of the ring",
                self.node_id
            ));
        }
        state.moved = true;
        self.forget_owned(room, &cell);
        self.remember_moved(room, to);
        // Everything this node published for the room reaches the NATS server before the new
        // owner can publish the next message.
        let _ = tokio::time::timeout(
            Duration::from_millis(self.config.request_timeout_ms / 2),
            self.nats.flush(),
        )
        .await;
        self.metrics
            .mesh_handoffs
            .get_or_create(&[("direction", "out"), ("how", "pulled")])
            .inc();
        tracing::debug!(%room, %to, "mesh: room released");
        reply::Kind::State(export(room, &state))
    }

    /// Where `room` went, if this node gave it away recently.
    fn moved_to(&self, room: &RoomName) -> reply::Kind {
        match self.moved.lock().expect("moved lock poisoned").get(room) {
            Some((node, _)) => reply::Kind::MovedTo(node.to_string()),
            None => reply::Kind::Done(true),
        }
    }

    fn remember_moved(&self, room: &RoomName, to: &str) {
        let mut moved = self.moved.lock().expect("moved lock poisoned");
        if moved.len() >= self.rooms.max_owned_rooms.min(MOVED_MAX) {
            // Bounded: forget the oldest half (a late puller then starts a new epoch).
            let mut ages: Vec<u64> = moved.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            moved.retain(|_, (_, at)| *at > cut);
        }
        moved.insert(room.clone(), (Arc::from(to), now_ms()));
    }

    /// Installs a room pushed by a draining node, unless this node already holds it.
    fn take_handoff(&self, room: RoomName, state: wire::RoomState) -> reply::Kind {
        if self.draining.load(Ordering::Acquire) || !self.settled() {
            return reply::Kind::Done(false);
        }
        let mut owned = self.owned.lock().expect("owned lock poisoned");
        if owned.contains_key(&room) || owned.len() >= self.rooms.max_owned_rooms {
            return reply::Kind::Done(false);
        }
        let cell = owned_from(&state, self.generation(), now_ms());
        owned.insert(room, Arc::new(tokio::sync::Mutex::new(cell)));
        self.metrics.owned_rooms.inc();
        self.metrics
            .mesh_handoffs
            .get_or_create(&[("direction", "in"), ("how", "pushed")])
            .inc();
        reply::Kind::Done(true)
    }

    fn forget_owned(&self, room: &RoomName, cell: &OwnedCell) {
        let mut owned = self.owned.lock().expect("owned lock poisoned");
        if owned.get(room).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            owned.remove(room);
            self.metrics.owned_rooms.dec();
        }
    }

    /// Locks the owner state of `room` if this node may sequence it now.
    ///
    /// Bounded by most of a request's time: a forwarding node gives up after
    /// `request_timeout_ms` and re-sends, and the re-sent publish must not find the first one
    /// still waiting to be sequenced. (Dropping this wait is harmless: a take-over runs in its
    /// own task.)
    async fn lock_owned(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<tokio::sync::OwnedMutexGuard<OwnedRoom>> {
        let bound = Duration::from_millis(self.config.request_timeout_ms * 4 / 5);
        match tokio::time::timeout(bound, self.lock_owned_unbounded(room)).await {
            Ok(step) => step,
            Err(_) => Step::Retry(format!("{room} is still being taken over")),
        }
    }

    async fn lock_owned_unbounded(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<tokio::sync::OwnedMutexGuard<OwnedRoom>> {
        if !self.owns(room) {
            return Step::Retry(format!("{} is not the owner of {room}", self.node_id));
        }
        let cell = match self.owned_room(room).await {
            Ok(cell) => cell,
            Err(BusError::Moving(reason)) => return Step::Retry(reason),
            Err(error) => return Step::Fail(error),
        };
        let state = cell.clone().lock_owned().await;
        if state.moved || state.generation != self.generation() {
            // Released meanwhile, or from before a NATS disconnect (another node may have
            // sequenced the room since): never reuse it.
            if !state.moved {
                self.forget_owned(room, &cell);
            }
            return Step::Retry(format!("state of {room} moved"));
        }
        // Fencing: the ring may have changed while waiting for the lock.
        if !self.owns(room) {
            return Step::Retry(format!("{} is not the owner of {room}", self.node_id));
        }
        Step::Done(state)
    }

    /// Sequences a publication as the room's owner.
    async fn sequence_here(self: &Arc<Self>, p: &Publication) -> Step<Sequenced> {
        let mut state = match self.lock_owned(&p.room).await {
            Step::Done(state) => state,
            Step::Retry(r) => return Step::Retry(r),
            Step::Fail(e) => return Step::Fail(e),
        };
        let now = now_ms();
        state.last_active_ms = now;
        let dedupe = !p.client_msg_id.is_empty();
        if dedupe
            && let Some(seq) = state.dedupe.lookup(
                &p.publisher,
                &p.client_msg_id,
                now,
                self.rooms.dedupe_window_ms,
            )
        {
            self.metrics.duplicate_publishes.inc();
            return Step::Done(Sequenced {
                epoch: state.sequencer.position().0,
                seq,
                local_deliveries: 0,
                duplicate: true,
            });
        }
        // What cannot be published to the other nodes is refused before it takes a sequence.
        let size = HEADER
            + 64
            + p.payload.len()
            + p.room.as_str().len()
            + p.publisher.len()
            + p.client_msg_id.len();
        let max = self.nats.server_info().max_payload;
        if max > 0 && size > max {
            return Step::Fail(BusError::TooLarge(
                max.saturating_sub(size - p.payload.len()),
            ));
        }
        let (epoch, seq) = state.sequencer.assign();
        if dedupe {
            state.dedupe.record(
                &p.publisher,
                &p.client_msg_id,
                seq,
                now,
                self.rooms.dedupe_max_per_room,
            );
        }
        let frame = super::local::message_frame(p, epoch, seq, now);
        let bytes = frame.encode_after(&header(KIND_MESSAGE, epoch, seq));
        let local_deliveries = self.accept(&p.room, epoch, seq, Some(bytes.slice(HEADER..)));
        if let Err(error) = self.send(self.subject_room(&p.room), bytes).await {
            // Sequenced and delivered here; other nodes' members will see the gap. The client
            // retries with the same id and is answered from the dedupe memory.
            return Step::Fail(BusError::Unavailable(format!(
                "mesh publish failed: {error}"
            )));
        }
        self.metrics.messages_published.inc();
        Step::Done(Sequenced {
            epoch,
            seq,
            local_deliveries,
            duplicate: false,
        })
    }

    /// Publishes a sync marker at the room's current position for a joining node.
    async fn sync_here(self: &Arc<Self>, room: &RoomName, token: u64) -> Step<()> {
        let state = match self.lock_owned(room).await {
            Step::Done(state) => state,
            Step::Retry(r) => return Step::Retry(r),
            Step::Fail(e) => return Step::Fail(e),
        };
        let (epoch, seq) = state.sequencer.position();
        let mut marker = header(KIND_SYNC, epoch, seq).to_vec();
        marker.extend_from_slice(&token.to_be_bytes());
        match self
            .send(self.subject_room(room), Bytes::from(marker))
            .await
        {
            Ok(()) => Step::Done(()),
            Err(error) => Step::Fail(BusError::Unavailable(format!(
                "mesh publish failed: {error}"
            ))),
        }
    }

    fn check_link(&self) -> Result<(), BusError> {
        if self.connected() {
            Ok(())
        } else {
            Err(BusError::Unavailable(
                "this node lost its connection to the mesh (NATS); retry".into(),
            ))
        }
    }

    /// The owner in this node's view, once settled.
    fn owner_of(&self, room: &RoomName) -> Option<Arc<str>> {
        if !self.settled() {
            return None;
        }
        self.view().ring.owner(room.as_str()).cloned()
    }

    async fn publish_batch(
        self: &Arc<Self>,
        publications: Vec<Publication>,
    ) -> Vec<Result<Sequenced, BusError>> {
        // One run per room, in the order given; runs of different rooms proceed concurrently.
        let total = publications.len();
        let mut runs: Vec<(Vec<usize>, Vec<Publication>)> = Vec::new();
        for (i, p) in publications.into_iter().enumerate() {
            match runs.iter_mut().find(|(_, run)| run[0].room == p.room) {
                Some((indices, run)) => {
                    indices.push(i);
                    run.push(p);
                }
                None => runs.push((vec![i], vec![p])),
            }
        }
        let outcomes =
            futures_util::future::join_all(runs.iter().map(|(_, run)| self.publish_run(run))).await;
        let mut results: Vec<Option<Result<Sequenced, BusError>>> =
            std::iter::repeat_with(|| None).take(total).collect();
        for ((indices, _), outcome) in runs.iter().zip(outcomes) {
            for (&i, result) in indices.iter().zip(outcome) {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every publication has a result"))
            .collect()
    }

    /// Sequences publications to one room, in order: here when this node owns the room,
    /// otherwise at the owner, as many per request as fit. Whatever must be re-routed (the owner
    /// changed, the mesh is settling, the owner did not answer) is retried in order until
    /// `route_deadline_ms`; then it fails with the retryable UNAVAILABLE.
    async fn publish_run(
        self: &Arc<Self>,
        run: &[Publication],
    ) -> Vec<Result<Sequenced, BusError>> {
        let mut results = Vec::with_capacity(run.len());
        let mut route = Route::new(&self.config);
        let mut settled = 0;
        while results.len() < run.len() {
            // Each publication gets the whole re-routing budget from where the previous one
            // settled, as a single publish would.
            if results.len() > settled {
                settled = results.len();
                route = Route::new(&self.config);
            }
            let rest = &run[results.len()..];
            // Done: progress (the results say which); Retry: pause, then re-route; Fail: the
            // rest of the run fails with it.
            let step = match self.check_link() {
                Err(error) => Step::Fail(error),
                Ok(()) => match self.owner_of(&rest[0].room) {
                    None => Step::Retry("the mesh is settling".to_string()),
                    Some(owner) if owner == self.node_id => {
                        match self.sequence_here(&rest[0]).await {
                            Step::Done(sequenced) => {
                                results.push(Ok(sequenced));
                                Step::Done(())
                            }
                            // Refused for good (too large): that publication's answer.
                            Step::Fail(error) => {
                                results.push(Err(error));
                                Step::Done(())
                            }
                            Step::Retry(reason) => Step::Retry(reason),
                        }
                    }
                    Some(owner) => {
                        let (done, retry) = self.forward(&owner, rest).await;
                        results.extend(done);
                        retry.map_or(Step::Done(()), Step::Retry)
                    }
                },
            };
            let failed = match step {
                Step::Done(()) => continue,
                Step::Fail(error) => error,
                Step::Retry(reason) => match route.pause(reason).await {
                    Ok(()) => continue,
                    Err(error) => error,
                },
            };
            results.extend(std::iter::repeat_n(Err(failed), run.len() - results.len()));
        }
        results
    }

    /// Sends the first publications of `rest` (as many as fit one request the owner
    /// understands) to `owner`. Returns the results of those it settled, in order, and, when the
    /// rest must be re-routed after a pause, why. Fewer results and no reason: send the rest at
    /// once.
    async fn forward(
        &self,
        owner: &str,
        rest: &[Publication],
    ) -> (Vec<Result<Sequenced, BusError>>, Option<String>) {
        let wire_forward = |p: &Publication| wire::Forward {
            room: p.room.to_string(),
            payload: p.payload.clone(),
            publisher: p.publisher.to_string(),
            client_msg_id: p.client_msg_id.clone(),
        };
        // Half the server's max_payload per request, so a batch never nears it; a publication
        // larger than that goes alone (the owner refuses what cannot cross the mesh).
        let budget = match self.nats.server_info().max_payload {
            0 => 512 * 1024,
            max => max / 2,
        };
        let mut bytes = 0;
        let fits = rest
            .iter()
            .take(MAX_FORWARD_BATCH)
            .take_while(|p| {
                bytes += p.payload.len()
                    + p.room.as_str().len()
                    + p.publisher.len()
                    + p.client_msg_id.len()
                    + 32;
                bytes <= budget
            })
            .count()
            .max(1);
        let batches = self.view().protocol_of(owner) >= 2;
        let sent = if batches { fits } else { 1 };
        self.metrics.mesh_forwarded_publishes.inc_by(sent as u64);
        self.metrics.mesh_forward_requests.inc();
        let request = if sent == 1 {
            request::Kind::Forward(wire_forward(&rest[0]))
        } else {
            request::Kind::ForwardBatch(wire::ForwardBatch {
                publishes: rest[..sent].iter().map(wire_forward).collect(),
            })
        };
        let replies = match self.request(owner, request).await {
            Ok(reply::Kind::Batch(batch)) => batch.replies,
            Ok(single) => vec![wire::Reply { kind: Some(single) }],
            Err(reason) => {
                self.metrics.mesh_unreachable.inc();
                return (
                    Vec::new(),
                    Some(format!("{owner} did not answer: {reason}")),
                );
            }
        };
        let mut done = Vec::with_capacity(sent);
        for reply in replies.into_iter().take(sent) {
            match reply.kind {
                Some(reply::Kind::Sequenced(s)) => done.push(Ok(Sequenced {
                    epoch: s.epoch,
                    seq: s.seq,
                    local_deliveries: 0,
                    duplicate: s.duplicate,
                })),
                Some(reply::Kind::TooLarge(max)) => {
                    done.push(Err(BusError::TooLarge(max as usize)))
                }
                Some(reply::Kind::NotOwner(reason)) => {
                    self.metrics.mesh_not_owner.inc();
                    return (done, Some(reason));
                }
                Some(reply::Kind::Unavailable(reason)) => return (done, Some(reason)),
                _ => return (done, Some(format!("unexpected reply from {owner}"))),
            }
        }
        // A batch the owner cut short for time: the rest goes again at once.
        (done, None)
    }

    async fn publish_unreliable(self: &Arc<Self>, p: Publication) -> UnreliableReport {
        let frame = super::local::message_frame(&p, 0, 0, now_ms());
        let bytes = frame.encode_after(&[KIND_UNRELIABLE]);
        let report = self.hub.deliver_unreliable(&p.room, &bytes.slice(1..));
        if report.too_large.is_none()
            && self.connected()
            && let Err(error) = self.send(self.subject_room(&p.room), bytes).await
        {
            tracing::debug!(%error, "mesh: unreliable message not sent");
        }
        report
    }

    // ---------------------------------------------------------------- interest and delivery

    /// This node's subscription to `room`, created if needed (a join marker proves it live).
    async fn interest(self: &Arc<Self>, room: &RoomName) -> Result<Arc<Interest>, BusError> {
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        let _one_at_a_time = self.subscribing.lock().await;
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        // Bounded like every NATS call of the mesh: while reconnecting the client queues the
        // subscription instead of failing it.
        let bound = Duration::from_millis(self.config.request_timeout_ms);
        let subscriber =
            match tokio::time::timeout(bound, self.nats.subscribe(self.subject_room(room))).await {
                Ok(Ok(subscriber)) => subscriber,
                Ok(Err(e)) => {
                    return Err(BusError::Unavailable(format!("mesh subscribe failed: {e}")));
                }
                Err(_) => return Err(BusError::Unavailable("mesh subscribe timed out".into())),
            };
        let interest = Arc::new(Interest {
            room: room.clone(),
            state: Mutex::new(InterestState {
                generation: self.generation(),
                ..InterestState::default()
            }),
            task: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(self.clone().room_loop(interest.clone(), subscriber));
        *interest.task.lock().expect("task lock poisoned") = Some(task.abort_handle());
        let replaced = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .insert(room.clone(), interest.clone());
        // A closed interest still in the map is being removed by its leave, which will find
        // this one instead and leave the count alone.
        if replaced.is_none() {
            self.metrics.mesh_subscribed_rooms.inc();
        }
        Ok(interest)
    }

    fn live_interest(&self, room: &RoomName) -> Option<Arc<Interest>> {
        self.interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .filter(|i| !i.state.lock().expect("interest lock poisoned").closed)
            .cloned()
    }

    async fn room_loop(
        self: Arc<Self>,
        interest: Arc<Interest>,
        mut subscriber: async_nats::Subscriber,
    ) {
        loop {
            let gap_deadline = interest
                .state
                .lock()
                .expect("interest lock poisoned")
                .order
                .gap_deadline();
            let message = tokio::select! {
                message = subscriber.next() => message,
                _ = tokio::time::sleep_until(gap_deadline.unwrap_or_else(Instant::now)), if gap_deadline.is_some() => {
                    self.skip_gap(&interest);
                    continue;
                }
                // A deadline was set by a delivery from outside this task: look again.
                _ = interest.wake.notified(), if gap_deadline.is_none() => continue,
            };
            let Some(message) = message else { break };
            self.on_room_message(&interest, message.payload);
        }
    }

    fn on_room_message(&self, interest: &Interest, payload: Bytes) {
        match payload.first().copied() {
            Some(KIND_UNRELIABLE) => {
                self.hub
                    .deliver_unreliable(&interest.room, &payload.slice(1..));
            }
            Some(kind @ (KIND_MESSAGE | KIND_SYNC | KIND_EPOCH)) if payload.len() >= HEADER => {
                let (Some(epoch), Some(seq)) = (read_u64(&payload, 1), read_u64(&payload, 9))
                else {
                    return;
                };
                let frame = (kind == KIND_MESSAGE).then(|| payload.slice(HEADER..));
                let token = match kind {
                    KIND_SYNC => read_u64(&payload, HEADER).unwrap_or(0),
                    _ => 0,
                };
                self.accept_in(interest, epoch, seq, frame, token);
            }
            _ => tracing::warn!(room = %interest.room, "mesh: malformed room message ignored"),
        }
    }

    /// Delivers a message sequenced by this node to its local members (if any).
    fn accept(&self, room: &RoomName, epoch: u64, seq: u64, frame: Option<Bytes>) -> usize {
        let interest = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned();
        match interest {
            Some(interest) => self.accept_in(&interest, epoch, seq, frame, 0),
            None => 0,
        }
    }

    /// Hands a message (or a join marker with `token`) to the room's [`RoomOrder`] under the
    /// delivery lock and fans out what it releases; returns the sessions reached by messages.
    fn accept_in(
        &self,
        interest: &Interest,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
        token: u64,
    ) -> usize {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed {
            return 0;
        }
        let wait = Duration::from_millis(self.config.request_timeout_ms / 2);
        let delivered = self.ordered(interest, &mut state, |order, emit| {
            order.accept(epoch, seq, frame, token, Instant::now(), wait, emit)
        });
        if state.order.gap_deadline().is_some() {
            // The room's task sleeps until the deadline; it may be parked on NATS right now.
            interest.wake.notify_one();
        }
        delivered
    }

    /// Runs `step` on the room's order (after noticing a NATS reconnect) and carries out its
    /// output: messages and epoch notices to the local members, pending joins admitted at their
    /// marker. Counts stale messages and skipped gaps.
    fn ordered(
        &self,
        interest: &Interest,
        state: &mut InterestState,
        step: impl FnOnce(&mut RoomOrder, &mut dyn FnMut(Output)) -> Effect,
    ) -> usize {
        let mut delivered = 0;
        let room = &interest.room;
        let InterestState {
            generation,
            pending,
            order,
            ..
        } = state;
        let mut emit = |output: Output| match output {
            Output::Frame(frame) => delivered += self.hub.deliver(room, &frame),
            Output::EpochChanged {
                previous_epoch,
                previous_seq,
                epoch,
            } => {
                let notice = ServerFrame::reply(
                    0,
                    server_frame::Kind::EpochChanged(proto::EpochChanged {
                        room: room.to_string(),
                        epoch,
                        previous_epoch,
                        previous_seq,
                    }),
                );
                self.hub.deliver(room, &notice.encode_shared());
            }
            Output::Join { token, epoch, seq } => {
                if let Some(i) = pending.iter().position(|p| p.token == token) {
                    let join = pending.swap_remove(i);
                    self.admit(interest, &join.session, join.request_id, epoch, seq);
                    let _ = join.done.send(());
                }
            }
        };
        let current = self.generation();
        if *generation != current {
            *generation = current;
            order.reconnected(&mut emit);
        }
        let effect = step(order, &mut emit);
        if effect.stale {
            self.metrics.mesh_stale_messages.inc();
        }
        if effect.gap_skipped {
            self.metrics.mesh_gaps.inc();
        }
        delivered
    }

    fn skip_gap(&self, interest: &Interest) {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed {
            return;
        }
        self.ordered(interest, &mut state, |order, emit| {
            let skipped = order.skip_gap(Instant::now(), emit);
            if skipped {
                tracing::debug!(room = %interest.room, "mesh: sequence gap skipped");
            }
            Effect {
                gap_skipped: skipped,
                ..Effect::default()
            }
        });
    }

    /// Queues `Joined` at `(epoch, seq)` and makes the session a member; under the interest lock
    /// so no message of the room can fall between the two.
    fn admit(
        &self,
        interest: &Interest,
        session: &Arc<Member>,
        request_id: u64,
        epoch: u64,
        seq: u64,
    ) {
        session.push_frame(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Joined(proto::Joined {
                room: interest.room.to_string(),
                epoch,
                seq,
            }),
        ));
        self.hub.add(&interest.room, session);
    }

    async fn join(
        self: &Arc<Self>,
        room: &RoomName,
        session: &Arc<Member>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        let mut route = Route::new(&self.config);
        loop {
            let interest = self.interest(room).await?;
            let outcome = match request_id {
                None => {
                    let state = interest.state.lock().expect("interest lock poisoned");
                    if state.closed {
                        continue;
                    }
                    self.hub.add(room, session);
                    return Ok(());
                }
                Some(request_id) => {
                    self.join_at_position(&interest, session, request_id, &mut route)
                        .await
                }
            };
            match outcome {
                Ok(true) => return Ok(()),
                Ok(false) => continue, // the interest closed under us: take a fresh one
                Err(error) => {
                    // A subscription made for this join alone must not outlive it.
                    self.close_if_unused(&interest);
                    return Err(error);
                }
            }
        }
    }

    /// Joins with a `Joined` position: at once when this node receives the room with nothing
    /// missing; otherwise through a join marker at the owner's position, which the room's order
    /// releases once every message up to it has been delivered. A remote owner publishes the
    /// marker on the room subject, which also proves the subscription is live end to end.
    /// `Ok(false)`: the interest closed meanwhile.
    async fn join_at_position(
        self: &Arc<Self>,
        interest: &Arc<Interest>,
        session: &Arc<Member>,
        request_id: u64,
        route: &mut Route,
    ) -> Result<bool, BusError> {
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).expect("the OS random source is available");
        // Token 0 marks an epoch start, never a join.
        let token = u64::from_be_bytes(token).max(1);
        let (done, mut completed) = oneshot::channel();
        {
            let mut state = interest.state.lock().expect("interest lock poisoned");
            if state.closed {
                return Ok(false);
            }
            let generation_current = state.generation == self.generation();
            if let Some((epoch, seq)) = state.order.position().filter(|_| generation_current) {
                self.admit(interest, session, request_id, epoch, seq);
                return Ok(true);
            }
            state.pending.push(PendingJoin {
                token,
                session: session.clone(),
                request_id,
                done,
            });
        }
        let wait = Duration::from_millis(self.config.request_timeout_ms);
        let result = loop {
            if let Err(error) = self.check_link() {
                break Err(error);
            }
            let step = match self.owner_of(&interest.room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => {
                    // This node sequences the room: its own position, as a local marker.
                    match self.lock_owned(&interest.room).await {
                        Step::Done(owned) => {
                            let (epoch, seq) = owned.sequencer.position();
                            self.accept_in(interest, epoch, seq, None, token);
                            drop(owned);
                            Step::Done(())
                        }
                        Step::Retry(r) => Step::Retry(r),
                        Step::Fail(e) => Step::Fail(e),
                    }
                }
                Some(owner) => {
                    let sync = request::Kind::Sync(wire::Sync {
                        room: interest.room.to_string(),
                        token,
                    });
                    match self.request(&owner, sync).await {
                        Ok(reply::Kind::Done(_)) => Step::Done(()),
                        Ok(reply::Kind::NotOwner(reason)) => {
                            self.metrics.mesh_not_owner.inc();
                            Step::Retry(reason)
                        }
                        Ok(reply::Kind::Unavailable(reason)) => Step::Retry(reason),
                        Ok(_) => Step::Retry(format!("unexpected reply from {owner}")),
                        Err(reason) => {
                            self.metrics.mesh_unreachable.inc();
                            Step::Retry(format!("{owner} did not answer: {reason}"))
                        }
                    }
                }
            };
            let step = match step {
                // The marker is out: the join completes when the room's order reaches it.
                Step::Done(()) => match tokio::time::timeout(wait, &mut completed).await {
                    Ok(_) => Step::Done(()),
                    Err(_) => Step::Retry("the join marker did not arrive".into()),
                },
                other => other,
            };
            match step {
                Step::Done(()) => break Ok(()),
                Step::Fail(error) => break Err(error),
                Step::Retry(reason) => {
                    if let Err(error) = route.pause(reason).await {
                        break Err(error);
                    }
                }
            }
        };
        // No pending entry outlives this call; one that is already gone was admitted by its
        // marker, and the session is a member.
        let mut state = interest.state.lock().expect("interest lock poisoned");
        match state.pending.iter().position(|p| p.token == token) {
            Some(i) => {
                state.pending.swap_remove(i);
                result.map(|()| true)
            }
            None => Ok(true),
        }
    }

    /// Drops the room's subscription when no local member and no pending join needs it.
    fn close_if_unused(&self, interest: &Arc<Interest>) {
        let room = &interest.room;
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed || !state.pending.is_empty() || self.hub.member_count(room) > 0 {
            return;
        }
        state.closed = true;
        drop(state);
        let mut interests = self.interests.lock().expect("interests lock poisoned");
        if interests
            .get(room)
            .is_some_and(|i| Arc::ptr_eq(i, interest))
        {
            interests.remove(room);
            self.metrics.mesh_subscribed_rooms.dec();
        }
        drop(interests);
        // Dropping the subscriber (with its task) unsubscribes.
        if let Some(task) = interest.task.lock().expect("task lock poisoned").take() {
            task.abort();
        }
    }

    fn leave(&self, room: &RoomName, session: &Arc<Member>) {
        self.hub.remove(room, session.key);
        let interest = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned();
        if let Some(interest) = interest {
            self.close_if_unused(&interest);
        }
    }

    fn room_info(&self, room: &RoomName) -> RoomInfo {
        let owned = self
            .owned
            .lock()
            .expect("owned lock poisoned")
            .get(room)
            .cloned();
        let position = owned
            .and_then(|cell| cell.try_lock().ok().map(|s| s.sequencer.position()))
            .or_else(|| {
                let interest = self
                    .interests
                    .lock()
                    .expect("interests lock poisoned")
                    .get(room)
                    .cloned();
                interest.and_then(|i| {
                    i.state
                        .lock()
                        .expect("interest lock poisoned")
                        .order
                        .position()
                })
            });
        RoomInfo {
            room: room.to_string(),
            epoch: position.map(|p| p.0),
            seq: position.map(|p| p.1),
            local_members: self.hub.member_count(room),
        }
    }

    /// Drops owner state idle past the TTL (see `LocalBus::sweep`; members on other nodes do
    /// not keep a room's state alive: its next message starts a new epoch, which they are told).
    fn sweep(&self, now_ms: u64) {
        self.moved
            .lock()
            .expect("moved lock poisoned")
            .retain(|_, (_, at)| now_ms.saturating_sub(*at) < MOVED_TTL_MS);
        let mut owned = self.owned.lock().expect("owned lock poisoned");
        let before = owned.len();
        owned.retain(|room, cell| {
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let Ok(state) = cell.try_lock() else {
                return true;
            };
            now_ms.saturating_sub(state.last_active_ms) < self.rooms.idle_ttl_ms
                || self.hub.member_count(room) > 0
        });
        self.metrics
            .owned_rooms
            .dec_by((before - owned.len()) as i64);
    }

    async fn drain(self: &Arc<Self>) {
        self.draining.store(true, Ordering::Release);
        self.membership
            .lock()
            .expect("membership lock poisoned")
            .set_self_state(NodeState::Draining);
        self.publish_view();
        self.send_heartbeat().await;
        // Push every room to its next owner; nodes that pull first get it from `release`.
        let rooms: Vec<(RoomName, OwnedCell)> = self
            .owned
            .lock()
            .expect("owned lock poisoned")
            .iter()
            .map(|(r, c)| (r.clone(), c.clone()))
            .collect();
        let view = self.view();
        let pushed = AtomicU64::new(0);
        let pushes = futures_util::stream::iter(rooms).for_each_concurrent(
            DRAIN_PUSHES_AT_ONCE,
            |(room, cell)| {
                let view = &view;
                let pushed = &pushed;
                async move {
                    if self.push(view, &room, &cell).await {
                        pushed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        );
        let bound = Duration::from_millis(self.config.route_deadline_ms);
        if tokio::time::timeout(bound, pushes).await.is_err() {
            tracing::warn!(
                "mesh: draining, hand-offs not finished in time; the rest will be pulled"
            );
        }
        let pushed = pushed.into_inner();
        tracing::info!(rooms = pushed, "mesh: draining, rooms handed over");
    }

    /// Hands one room to its next owner, under the room's lock with the room still listed here:
    /// a release request meanwhile waits, then learns where the room went. A failed push leaves
    /// the room here for a pull.
    async fn push(&self, view: &RingView, room: &RoomName, cell: &OwnedCell) -> bool {
        let Some(target) = view.ring.owner(room.as_str()).cloned() else {
            return false;
        };
        let mut state = cell.lock().await;
        if state.moved || state.generation != self.generation() {
            return false;
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms / 2);
        let _ = tokio::time::timeout(timeout, self.nats.flush()).await;
        let handoff = request::Kind::Handoff(export(room, &state));
        if !matches!(
            self.request(&target, handoff).await,
            Ok(reply::Kind::Done(true))
        ) {
            return false;
        }
        state.moved = true;
        self.forget_owned(room, cell);
        self.remember_moved(room, &target);
        self.metrics
            .mesh_handoffs
            .get_or_create(&[("direction", "out"), ("how", "pushed")])
            .inc();
        true
    }

    async fn leave_mesh(&self) {
        if self.connected() {
            let _ = self
                .send(self.subject_heartbeat(), self.heartbeat(NodeState::Leaving))
                .await;
            let _ = tokio::time::timeout(
                Duration::from_millis(self.config.request_timeout_ms),
                self.nats.flush(),
            )
            .await;
        }
    }
}

fn export(room: &RoomName, state: &OwnedRoom) -> wire::RoomState {
    let (epoch, seq) = state.sequencer.position();
    wire::RoomState {
        room: room.to_string(),
        epoch,
        seq,
        dedupe: state
            .dedupe
            .entries()
            .map(|(publisher, id, seq, at)| wire::DedupeEntry {
                publisher: publisher.to_string(),
                client_msg_id: id.to_string(),
                seq,
                at_ms: at,
            })
            .collect(),
    }
}

fn owned_from(state: &wire::RoomState, generation: u64, now: u64) -> OwnedRoom {
    let mut dedupe = Dedupe::default();
    for entry in &state.dedupe {
        dedupe.record(
            &Arc::from(entry.publisher.as_str()),
            &entry.client_msg_id,
            entry.seq,
            entry.at_ms,
            usize::MAX,
        );
    }
    OwnedRoom {
        sequencer: Sequencer::resume(state.epoch, state.seq),
        dedupe,
        last_active_ms: now,
        moved: false,
        generation,
    }
}

/// A NATS URL without its credentials (`nats://user:pass@host` → `nats://host`).
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "(unparsable url)".to_string(),
    }
}
