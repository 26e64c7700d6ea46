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

use std::collections::{BTreeMap, HashMap};
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

use crate::cluster::membership::{Heartbeat, Membership, NodeState, RingView, Seen};
use crate::cluster::{BusError, Publication, RoomInfo, Sequenced};
use crate::config::{MeshConfig, RoomsConfig};
use crate::fanout::{Hub, UnreliableReport};
use crate::metrics::Metrics;
use crate::proto::mesh::{self as wire, reply, request};
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{Dedupe, EpochClock, RoomName, Sequencer};
use crate::session::{SessionHandle, now_ms};

/// First byte of a room-subject message.
const KIND_MESSAGE: u8 = 1; // + epoch, seq (u64 BE), then an encoded ServerFrame
const KIND_UNRELIABLE: u8 = 2; // then an encoded ServerFrame
const KIND_SYNC: u8 = 3; // + epoch, seq, join token
const KIND_EPOCH: u8 = 4; // + epoch, 0: a new epoch starts here
const HEADER: usize = 17;

/// Messages held per room while an earlier one is missing.
const REORDER_MAX: usize = 4096;
/// Node-to-node requests handled at once; more wait in the subscription's bounded buffer.
const MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Rooms searched for a previous holder: the ring's successors, at most this many.
const PULL_HOPS: usize = 3;
const RTT_INTERVAL: Duration = Duration::from_secs(2);

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

/// The NATS connection's state, updated by the client's event callback.
#[derive(Default)]
struct Link {
    connected: AtomicBool,
    /// Bumped at every disconnect: owner state and positions from an older generation are stale.
    generation: AtomicU64,
    connected_at_ms: AtomicU64,
}

impl Link {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

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
    session: Arc<SessionHandle>,
    request_id: u64,
    done: oneshot::Sender<()>,
}

/// This node's subscription to one room, while it has local members.
struct Interest {
    room: RoomName,
    state: Mutex<InterestState>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct InterestState {
    closed: bool,
    /// Position of the last message delivered to local members.
    last: Option<(u64, u64)>,
    generation: u64,
    pending: Vec<PendingJoin>,
    /// Messages that arrived ahead of a missing one: seq → frame (same epoch as `last`).
    reorder: BTreeMap<u64, Bytes>,
    /// When the oldest missing message is given up on.
    gap_deadline: Option<Instant>,
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
    membership: Mutex<Membership>,
    view: RwLock<Arc<RingView>>,
    ring_changes: AtomicU64,
    owned: Mutex<HashMap<RoomName, OwnedCell>>,
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
                                link.connected.store(true, Ordering::Release);
                                metrics.mesh_connected.set(1);
                                tracing::info!("mesh: connected to NATS");
                            }
                            async_nats::Event::Disconnected => {
                                link.connected.store(false, Ordering::Release);
                                link.generation.fetch_add(1, Ordering::AcqRel);
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
        let inner = Arc::new(Inner {
            nats,
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

    pub async fn publish(&self, p: Publication) -> Result<Sequenced, BusError> {
        self.inner.publish(p).await
    }

    pub async fn publish_unreliable(&self, p: Publication) -> UnreliableReport {
        self.inner.publish_unreliable(p).await
    }

    pub async fn join(
        &self,
        room: &RoomName,
        session: &Arc<SessionHandle>,
        request_id: Option<u64>,
    ) -> Result<(), BusError> {
        self.inner.join(room, session, request_id).await
    }

    pub fn leave(&self, room: &RoomName, session: &Arc<SessionHandle>) {
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
            .nats
            .publish(
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
                "connected": inner.link.connected.load(Ordering::Acquire),
                "urls": &inner.config.nats_urls,
                "rtt_seconds": inner.metrics.mesh_nats_rtt.get(),
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
            if !crate::session::is_valid_user_id(user) {
                tracing::warn!("mesh: disconnect request with an invalid user id ignored");
                continue;
            }
            let sessions = self.hub.members(&RoomName::for_user(user));
            for session in &sessions {
                session.close(crate::session::CloseReason::Disconnected);
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
        self.link.connected.load(Ordering::Acquire)
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
    fn fresh_epoch(&self) -> u64 {
        let ms = self.epochs.next(now_ms());
        ms * 1024 + (xxh3_64(self.node_id.as_bytes()) & 1023)
    }

    // ---------------------------------------------------------------- membership

    fn heartbeat(&self, state: NodeState) -> Bytes {
        let beat = Heartbeat {
            id: self.node_id.to_string(),
            region: self.region.to_string(),
            state,
            started_ms: self.started_ms,
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
            if let Err(error) = self.nats.publish(self.subject_heartbeat(), beat).await {
                tracing::debug!(%error, "mesh: heartbeat not sent");
            }
        }
    }

    /// Rebuilds the ring snapshot from the membership; counts and logs a change.
    fn publish_view(&self) {
        let view = Arc::new(
            self.membership
                .lock()
                .expect("membership lock poisoned")
                .view(now_ms()),
        );
        let previous = std::mem::replace(
            &mut *self.view.write().expect("view lock poisoned"),
            view.clone(),
        );
        self.metrics.mesh_nodes.clear();
        for (region, count) in view.nodes_per_region() {
            self.metrics
                .mesh_nodes
                .get_or_create(&vec![("region", region.to_string())])
                .set(count as i64);
        }
        if previous.version != view.version {
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
        let mut generation = self.link.generation();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let now = self.link.generation();
                    let mut changed = false;
                    {
                        let mut membership = self.membership.lock().expect("membership lock poisoned");
                        if now != generation {
                            // Nothing heard before the disconnect is current: learn the mesh again.
                            generation = now;
                            membership.forget_peers();
                            changed = true;
                        }
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

    async fn rtt_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(RTT_INTERVAL);
        loop {
            ticker.tick().await;
            if !self.connected() {
                continue;
            }
            let started = Instant::now();
            let timeout = Duration::from_millis(self.config.request_timeout_ms);
            if let Ok(Ok(())) = tokio::time::timeout(timeout, self.nats.flush()).await {
                self.metrics
                    .mesh_nats_rtt
                    .set(started.elapsed().as_secs_f64());
            }
        }
    }

    // ---------------------------------------------------------------- requests between nodes

    async fn request(&self, node: &str, kind: request::Kind) -> Result<reply::Kind, String> {
        let payload = wire::Request { kind: Some(kind) }.encode_to_vec();
        match self
            .nats
            .request(self.subject_requests(node), Bytes::from(payload))
            .await
        {
            Ok(message) => wire::Reply::decode(message.payload)
                .ok()
                .and_then(|r| r.kind)
                .ok_or_else(|| format!("undecodable reply from {node}")),
            Err(error) => Err(format!("{node} did not answer: {error}")),
        }
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
                if let Err(error) = inner.nats.publish(reply_to, Bytes::from(reply)).await {
                    tracing::debug!(%error, "mesh: reply not sent");
                }
            });
        }
    }

    async fn serve(self: &Arc<Self>, kind: request::Kind) -> reply::Kind {
        let parse = |room: &str| RoomName::parse_any(room, self.rooms.max_name_bytes);
        match kind {
            request::Kind::Forward(f) => {
                let Ok(room) = parse(&f.room) else {
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
                    Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
                }
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
            request::Kind::Handoff(state) => match parse(&state.room) {
                Ok(room) => self.take_handoff(room, state),
                Err(_) => reply::Kind::Done(true),
            },
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
            .map_err(|e| BusError::Unavailable(format!("room take-over failed: {e}")))?
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
        let generation = self.link.generation();
        let pulled = self.pull(room).await;
        let now = now_ms();
        let state = match pulled {
            Some(state) => {
                self.metrics
                    .mesh_handoffs
                    .get_or_create(&[("direction", "in"), ("how", "pulled")])
                    .inc();
                owned_from(&state, generation, now)
            }
            None => {
                let epoch = self.fresh_epoch();
                self.metrics.mesh_epochs_started.inc();
                // Members elsewhere learn the new epoch now, not at the next message.
                let marker = Bytes::copy_from_slice(&header(KIND_EPOCH, epoch, 0));
                self.accept(room, KIND_EPOCH, epoch, 0, None);
                if let Err(error) = self.nats.publish(self.subject_room(room), marker).await {
                    tracing::debug!(%error, "mesh: epoch marker not sent");
                }
                OwnedRoom {
                    sequencer: Sequencer::new(epoch),
                    dedupe: Dedupe::default(),
                    last_active_ms: now,
                    moved: false,
                    generation,
                }
            }
        };
        let cell = Arc::new(tokio::sync::Mutex::new(state));
        self.owned
            .lock()
            .expect("owned lock poisoned")
            .insert(room.clone(), cell.clone());
        self.metrics.owned_rooms.inc();
        Ok(cell)
    }

    /// Asks the nodes that may hold `room` (its owner on the ring without this node, then the
    /// next ones) to release it to this node.
    async fn pull(&self, room: &RoomName) -> Option<wire::RoomState> {
        let view = self.view();
        let mut asked: Vec<Arc<str>> = vec![self.node_id.clone()];
        for _ in 0..PULL_HOPS {
            let candidate = view
                .holders
                .owner_excluding(room.as_str(), |n| asked.iter().any(|a| **a == *n))?
                .clone();
            let release = request::Kind::Release(wire::Release {
                room: room.to_string(),
                to_node: self.node_id.to_string(),
            });
            match self.request(&candidate, release).await {
                Ok(reply::Kind::State(state)) => return Some(state),
                Ok(_) => {}
                Err(reason) => tracing::debug!(%room, %reason, "mesh: hand-off source unreachable"),
            }
            asked.push(candidate);
        }
        None
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
            return reply::Kind::Done(true);
        };
        let mut state = cell.lock().await;
        if state.moved {
            return reply::Kind::Done(true);
        }
        state.moved = true;
        self.forget_owned(room, &cell);
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

    /// Installs a room pushed by a draining node, unless this node already holds it.
    fn take_handoff(&self, room: RoomName, state: wire::RoomState) -> reply::Kind {
        let mut owned = self.owned.lock().expect("owned lock poisoned");
        if owned.contains_key(&room) || owned.len() >= self.rooms.max_owned_rooms {
            return reply::Kind::Done(false);
        }
        let cell = owned_from(&state, self.link.generation(), now_ms());
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
    async fn lock_owned(
        self: &Arc<Self>,
        room: &RoomName,
    ) -> Step<tokio::sync::OwnedMutexGuard<OwnedRoom>> {
        if !self.owns(room) {
            return Step::Retry(format!("{} is not the owner of {room}", self.node_id));
        }
        let cell = match self.owned_room(room).await {
            Ok(cell) => cell,
            Err(error) => return Step::Fail(error),
        };
        let state = cell.clone().lock_owned().await;
        if state.moved || state.generation != self.link.generation() {
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
        let local_deliveries = self.accept(
            &p.room,
            KIND_MESSAGE,
            epoch,
            seq,
            Some(bytes.slice(HEADER..)),
        );
        if let Err(error) = self.nats.publish(self.subject_room(&p.room), bytes).await {
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
            .nats
            .publish(self.subject_room(room), Bytes::from(marker))
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

    async fn publish(self: &Arc<Self>, p: Publication) -> Result<Sequenced, BusError> {
        let mut route = Route::new(&self.config);
        loop {
            self.check_link()?;
            let step = match self.owner_of(&p.room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => self.sequence_here(&p).await,
                Some(owner) => self.forward(&owner, &p).await,
            };
            match step {
                Step::Done(sequenced) => return Ok(sequenced),
                Step::Fail(error) => return Err(error),
                Step::Retry(reason) => route.pause(reason).await?,
            }
        }
    }

    async fn forward(&self, owner: &str, p: &Publication) -> Step<Sequenced> {
        self.metrics.mesh_forwarded_publishes.inc();
        let forward = request::Kind::Forward(wire::Forward {
            room: p.room.to_string(),
            payload: p.payload.clone(),
            publisher: p.publisher.to_string(),
            client_msg_id: p.client_msg_id.clone(),
        });
        match self.request(owner, forward).await {
            Ok(reply::Kind::Sequenced(s)) => Step::Done(Sequenced {
                epoch: s.epoch,
                seq: s.seq,
                local_deliveries: 0,
                duplicate: s.duplicate,
            }),
            Ok(reply::Kind::NotOwner(reason)) => {
                self.metrics.mesh_not_owner.inc();
                Step::Retry(reason)
            }
            Ok(reply::Kind::Unavailable(reason)) => Step::Retry(reason),
            Ok(_) => Step::Retry(format!("unexpected reply from {owner}")),
            Err(reason) => {
                self.metrics.mesh_unreachable.inc();
                Step::Retry(reason)
            }
        }
    }

    async fn publish_unreliable(self: &Arc<Self>, p: Publication) -> UnreliableReport {
        let frame = super::local::message_frame(&p, 0, 0, now_ms());
        let bytes = frame.encode_after(&[KIND_UNRELIABLE]);
        let report = self.hub.deliver_unreliable(&p.room, &bytes.slice(1..));
        if report.too_large.is_none()
            && self.connected()
            && let Err(error) = self.nats.publish(self.subject_room(&p.room), bytes).await
        {
            tracing::debug!(%error, "mesh: unreliable message not sent");
        }
        report
    }

    // ---------------------------------------------------------------- interest and delivery

    /// This node's subscription to `room`, created (and flushed to the server) if needed.
    async fn interest(self: &Arc<Self>, room: &RoomName) -> Result<Arc<Interest>, BusError> {
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        let _one_at_a_time = self.subscribing.lock().await;
        if let Some(interest) = self.live_interest(room) {
            return Ok(interest);
        }
        let subscriber = self
            .nats
            .subscribe(self.subject_room(room))
            .await
            .map_err(|e| BusError::Unavailable(format!("mesh subscribe failed: {e}")))?;
        let interest = Arc::new(Interest {
            room: room.clone(),
            state: Mutex::new(InterestState {
                generation: self.link.generation(),
                ..InterestState::default()
            }),
            task: Mutex::new(None),
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
                .gap_deadline;
            let message = tokio::select! {
                message = subscriber.next() => message,
                _ = tokio::time::sleep_until(gap_deadline.unwrap_or_else(Instant::now)), if gap_deadline.is_some() => {
                    self.skip_gap(&interest);
                    continue;
                }
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
                if kind == KIND_SYNC {
                    let token = read_u64(&payload, HEADER).unwrap_or(0);
                    self.accept_sync(interest, epoch, seq, token);
                } else {
                    let frame = (kind == KIND_MESSAGE).then(|| payload.slice(HEADER..));
                    self.accept_in(interest, kind, epoch, seq, frame);
                }
            }
            _ => tracing::warn!(room = %interest.room, "mesh: malformed room message ignored"),
        }
    }

    /// Delivers a message sequenced by this node to its local members (if any).
    fn accept(
        &self,
        room: &RoomName,
        kind: u8,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
    ) -> usize {
        let interest = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned();
        match interest {
            Some(interest) => self.accept_in(&interest, kind, epoch, seq, frame),
            None => 0,
        }
    }

    /// Delivers `(epoch, seq)` to local members in order: older than delivered → dropped; the
    /// next one → delivered with whatever it unblocks; further ahead → held until the gap fills
    /// or its wait ends; a newer epoch → `EpochChanged`, then delivered.
    fn accept_in(
        &self,
        interest: &Interest,
        kind: u8,
        epoch: u64,
        seq: u64,
        frame: Option<Bytes>,
    ) -> usize {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        self.refresh_generation(&mut state);
        let mut delivered = 0;
        match state.last {
            None => {
                state.last = Some((epoch, seq));
                if let Some(frame) = frame {
                    delivered += self.hub.deliver(&interest.room, &frame);
                }
            }
            Some((last_epoch, last_seq)) if epoch == last_epoch => {
                if seq <= last_seq {
                    if kind == KIND_MESSAGE {
                        self.metrics.mesh_stale_messages.inc();
                    }
                } else if seq == last_seq + 1 || frame.is_none() {
                    // The next message, or a marker: whatever was held below the marker's
                    // position came before it (the rest of that gap is not coming).
                    let later = state.reorder.split_off(&(seq + 1));
                    for (_, held) in std::mem::replace(&mut state.reorder, later) {
                        delivered += self.hub.deliver(&interest.room, &held);
                    }
                    state.last = Some((epoch, seq));
                    if let Some(frame) = frame {
                        delivered += self.hub.deliver(&interest.room, &frame);
                    }
                    delivered += self.release_ready(interest, &mut state);
                } else if let Some(frame) = frame {
                    if state.reorder.len() >= REORDER_MAX {
                        delivered += self.flush_reorder(interest, &mut state);
                        self.metrics.mesh_gaps.inc();
                    }
                    state.reorder.insert(seq, frame);
                    if state.gap_deadline.is_none() {
                        state.gap_deadline = Some(
                            Instant::now()
                                + Duration::from_millis(self.config.request_timeout_ms / 2),
                        );
                    }
                }
            }
            Some((last_epoch, last_seq)) if epoch > last_epoch => {
                delivered += self.flush_reorder(interest, &mut state);
                let previous_seq = state.last.map_or(last_seq, |l| l.1);
                let notice = ServerFrame::reply(
                    0,
                    server_frame::Kind::EpochChanged(proto::EpochChanged {
                        room: interest.room.to_string(),
                        epoch,
                        previous_epoch: last_epoch,
                        previous_seq,
                    }),
                );
                self.hub.deliver(&interest.room, &notice.encode_shared());
                state.last = Some((epoch, seq));
                if let Some(frame) = frame {
                    delivered += self.hub.deliver(&interest.room, &frame);
                }
            }
            Some(_) => {
                self.metrics.mesh_stale_messages.inc();
            }
        }
        delivered
    }

    /// After a NATS reconnect, positions from before are not a basis for ordering any more.
    fn refresh_generation(&self, state: &mut InterestState) {
        let generation = self.link.generation();
        if state.generation != generation {
            state.generation = generation;
            state.last = None;
            state.reorder.clear();
            state.gap_deadline = None;
        }
    }

    /// Delivers held messages that are now next in line.
    fn release_ready(&self, interest: &Interest, state: &mut InterestState) -> usize {
        let mut delivered = 0;
        while let Some((epoch, last)) = state.last {
            let Some(frame) = state.reorder.remove(&(last + 1)) else {
                break;
            };
            state.last = Some((epoch, last + 1));
            delivered += self.hub.deliver(&interest.room, &frame);
        }
        // Anything at or below the position is a duplicate.
        if let Some((_, last)) = state.last {
            state.reorder = state.reorder.split_off(&(last + 1));
        }
        if state.reorder.is_empty() {
            state.gap_deadline = None;
        }
        delivered
    }

    /// Gives up on the missing messages: delivers everything held, in order.
    fn flush_reorder(&self, interest: &Interest, state: &mut InterestState) -> usize {
        let mut delivered = 0;
        let held = std::mem::take(&mut state.reorder);
        for (seq, frame) in held {
            if let Some((epoch, _)) = state.last {
                state.last = Some((epoch, seq));
            }
            delivered += self.hub.deliver(&interest.room, &frame);
        }
        state.gap_deadline = None;
        delivered
    }

    fn skip_gap(&self, interest: &Interest) {
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.gap_deadline.is_some_and(|d| d <= Instant::now()) {
            self.metrics.mesh_gaps.inc();
            tracing::debug!(room = %interest.room, "mesh: sequence gap skipped");
            self.flush_reorder(interest, &mut state);
        }
    }

    /// The owner's marker for a joining node: completes the matching pending join exactly at
    /// this point of the room's stream.
    fn accept_sync(&self, interest: &Interest, epoch: u64, seq: u64, token: u64) {
        // Messages up to the marker's position are before it; the marker moves the position
        // like an epoch start does.
        self.accept_in(interest, KIND_SYNC, epoch, seq, None);
        let mut state = interest.state.lock().expect("interest lock poisoned");
        let Some(i) = state.pending.iter().position(|p| p.token == token) else {
            return;
        };
        let pending = state.pending.swap_remove(i);
        let (epoch, seq) = state.last.unwrap_or((epoch, seq));
        self.admit(interest, &pending.session, pending.request_id, epoch, seq);
        let _ = pending.done.send(());
    }

    /// Queues `Joined` at `(epoch, seq)` and makes the session a member; under the interest lock
    /// so no message of the room can fall between the two.
    fn admit(
        &self,
        interest: &Interest,
        session: &Arc<SessionHandle>,
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
        session: &Arc<SessionHandle>,
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
                Err(error) => return Err(error),
            }
        }
    }

    /// Joins with a `Joined` position. Fast when this node already receives the room; otherwise
    /// the owner publishes a sync marker on the room subject and the session joins when the
    /// marker arrives (which also proves the subscription is live). `Ok(false)`: the interest
    /// closed meanwhile.
    async fn join_at_position(
        self: &Arc<Self>,
        interest: &Arc<Interest>,
        session: &Arc<SessionHandle>,
        request_id: u64,
        route: &mut Route,
    ) -> Result<bool, BusError> {
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).expect("the OS random source is available");
        let token = u64::from_be_bytes(token);
        let (done, mut completed) = oneshot::channel();
        {
            let mut state = interest.state.lock().expect("interest lock poisoned");
            self.refresh_generation(&mut state);
            if state.closed {
                return Ok(false);
            }
            if let Some((epoch, seq)) = state.last {
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
        let result = loop {
            if let Err(error) = self.check_link() {
                break Err(error);
            }
            let step = match self.owner_of(&interest.room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => {
                    // This node sequences the room: the position is its own, exactly.
                    match self.lock_owned(&interest.room).await {
                        Step::Done(owned) => {
                            let (epoch, seq) = owned.sequencer.position();
                            let mut state = interest.state.lock().expect("interest lock poisoned");
                            if let Some(i) = state.pending.iter().position(|p| p.token == token) {
                                let pending = state.pending.swap_remove(i);
                                let at = match state.last {
                                    Some(last) if last > (epoch, seq) => last,
                                    _ => (epoch, seq),
                                };
                                state.last = Some(at);
                                self.admit(interest, &pending.session, request_id, at.0, at.1);
                            }
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
                        Ok(reply::Kind::Done(_)) => {
                            let wait = Duration::from_millis(self.config.request_timeout_ms);
                            match tokio::time::timeout(wait, &mut completed).await {
                                Ok(_) => Step::Done(()),
                                Err(_) => {
                                    Step::Retry("the owner's sync marker did not arrive".into())
                                }
                            }
                        }
                        Ok(reply::Kind::NotOwner(reason)) => {
                            self.metrics.mesh_not_owner.inc();
                            Step::Retry(reason)
                        }
                        Ok(reply::Kind::Unavailable(reason)) => Step::Retry(reason),
                        Ok(_) => Step::Retry(format!("unexpected reply from {owner}")),
                        Err(reason) => {
                            self.metrics.mesh_unreachable.inc();
                            Step::Retry(reason)
                        }
                    }
                }
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
        // Whatever happened, no pending entry outlives this call; one that is already gone
        // was completed by a marker, and the session is a member.
        let mut state = interest.state.lock().expect("interest lock poisoned");
        match state.pending.iter().position(|p| p.token == token) {
            Some(i) => {
                state.pending.swap_remove(i);
                result.map(|()| true)
            }
            None => Ok(true),
        }
    }

    fn leave(&self, room: &RoomName, session: &Arc<SessionHandle>) {
        self.hub.remove(room, session.key);
        let Some(interest) = self
            .interests
            .lock()
            .expect("interests lock poisoned")
            .get(room)
            .cloned()
        else {
            return;
        };
        let mut state = interest.state.lock().expect("interest lock poisoned");
        if state.closed || !state.pending.is_empty() || self.hub.member_count(room) > 0 {
            return;
        }
        state.closed = true;
        drop(state);
        let mut interests = self.interests.lock().expect("interests lock poisoned");
        if interests
            .get(room)
            .is_some_and(|i| Arc::ptr_eq(i, &interest))
        {
            interests.remove(room);
            self.metrics.mesh_subscribed_rooms.dec();
        }
        // Dropping the subscriber (with its task) unsubscribes.
        if let Some(task) = interest.task.lock().expect("task lock poisoned").take() {
            task.abort();
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
                interest.and_then(|i| i.state.lock().expect("interest lock poisoned").last)
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
        let mut pushed = 0usize;
        for (room, cell) in rooms {
            let Some(target) = view.ring.owner(room.as_str()).cloned() else {
                continue;
            };
            let mut state = cell.lock().await;
            if state.moved {
                continue;
            }
            state.moved = true;
            self.forget_owned(&room, &cell);
            let handoff = request::Kind::Handoff(export(&room, &state));
            drop(state);
            if let Ok(reply::Kind::Done(true)) = self.request(&target, handoff).await {
                pushed += 1;
                self.metrics
                    .mesh_handoffs
                    .get_or_create(&[("direction", "out"), ("how", "pushed")])
                    .inc();
            }
        }
        tracing::info!(rooms = pushed, "mesh: draining, rooms handed over");
    }

    async fn leave_mesh(&self) {
        if self.connected() {
            let _ = self
                .nats
                .publish(self.subject_heartbeat(), self.heartbeat(NodeState::Leaving))
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
