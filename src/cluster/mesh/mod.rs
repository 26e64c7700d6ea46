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
use tokio::sync::Semaphore;

use crate::clock::{mono_ms, wall_ms};
use crate::cluster::membership::{Membership, RingView};
use crate::cluster::owners::Owners;
use crate::cluster::presence::Presence;
use crate::cluster::{
    BusError, ClusterStatus, NatsStatus, NodeRef, OwnerRef, RingStatus, RoomInfo,
};
use crate::config::{MeshConfig, RoomsConfig};
use crate::fanout::{Hub, UnreliableReport};
use crate::member::Member;
use crate::metrics::Metrics;
use crate::room::{
    Classes, EpochClock, HistoryPage, HistoryQuery, Publication, RoomName, Sequenced,
};
use crate::telemetry::Telemetry;

mod devices;
mod interest;
mod lease;
mod link;
mod members;
mod owning;
mod presence;
mod recovery;
mod replay;
mod routing;
mod sequencing;
mod store;
// pub(crate) only so that the crate root can re-export its parser for fuzzing.
pub(crate) mod wire;

pub use replay::TokenClaim;

use interest::Interest;
use link::Link;

/// Node-to-node requests handled at once; more wait in the subscription's bounded buffer.
const MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Rooms a draining node hands over at once.
const DRAIN_PUSHES_AT_ONCE: usize = 32;
/// Rooms remembered as given away, at most; and for how long.
const MOVED_MAX: usize = 100_000;
const MOVED_TTL_MS: u64 = 60_000;

/// The NATS mesh bus.
pub struct MeshBus {
    inner: Arc<Inner>,
    devices: Arc<devices::DeviceStore>,
    token_ids: Arc<replay::TokenIds>,
}

struct Inner {
    nats: Client,
    node_id: Arc<str>,
    region: Arc<str>,
    started_ms: u64,
    prefix: String,
    config: MeshConfig,
    rooms: RoomsConfig,
    /// What each room keeps (`rooms.classes`).
    classes: Classes,
    /// Durable rooms' history, in JetStream.
    store: Arc<store::Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Spans of publishes crossing this node, and their context in NATS headers (when on).
    telemetry: Arc<Telemetry>,
    link: Arc<Link>,
    stats: Arc<async_nats::Statistics>,
    membership: Mutex<Membership>,
    view: RwLock<Arc<RingView>>,
    /// Told every time the view changes (requests to a node that leaves it stop waiting).
    view_changes: tokio::sync::watch::Sender<()>,
    ring_changes: AtomicU64,
    owned: Owners,
    /// Rooms this node gave away recently, to whom, and when (monotonic ms): a late release
    /// request is sent on.
    moved: Mutex<HashMap<RoomName, (Arc<str>, u64)>>,
    /// Messages this node sequenced and could not confirm (its state was retired): per room, the
    /// epoch and the first such seq, and when (monotonic ms). Nobody will ever sequence that
    /// epoch from there on, so their echo, should NATS deliver it late (after a reconnect), is
    /// dropped here as it is everywhere else.
    abandoned: Mutex<HashMap<RoomName, (u64, u64, u64)>>,
    /// Rooms being taken over right now (one pull per room at a time).
    claims: Mutex<HashMap<RoomName, Arc<tokio::sync::Mutex<()>>>>,
    interests: Mutex<HashMap<RoomName, Arc<Interest>>>,
    /// Serializes creating subscriptions, so one room never gets two.
    subscribing: tokio::sync::Mutex<()>,
    epochs: EpochClock,
    draining: AtomicBool,
    requests: Arc<Semaphore>,
    presence: Arc<Presence>,
    /// The ring version of the last presence reports (a change: every room is reported again
    /// to its owner, which may be new to it).
    presence_ring: AtomicU64,
}

impl MeshBus {
    /// Connects to NATS (in the background: a node starts, not ready, while NATS is away) and
    /// starts the heartbeat, request and round-trip tasks.
    pub async fn start(
        config: &crate::config::Config,
        node_id: Arc<str>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        telemetry: Arc<Telemetry>,
    ) -> anyhow::Result<MeshBus> {
        let mesh = config.mesh.clone();
        let link = Arc::new(Link::default());
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("roomwire {node_id}"))
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
                                link.connected_at_ms.store(mono_ms(), Ordering::Release);
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
        let view = Arc::new(membership.view(mono_ms()));
        let stats = nats.statistics();
        let owned = Owners::new(&config.rooms, metrics.clone());
        let classes = Classes::new(&config.rooms.classes);
        let store = Arc::new(store::Store::new(
            &nats,
            Duration::from_millis(mesh.request_timeout_ms),
            &classes,
        ));
        // A new owner waits for every node's next reports before its first diff.
        let presence = Arc::new(Presence::new(
            &config.rooms,
            metrics.clone(),
            3 * config.rooms.presence_interval_ms,
        ));
        let inner = Arc::new(Inner {
            nats,
            stats,
            node_id,
            region,
            started_ms: wall_ms(),
            prefix: mesh.subject_prefix.clone(),
            config: mesh,
            rooms: config.rooms.clone(),
            classes,
            store,
            hub,
            metrics,
            telemetry,
            link,
            membership: Mutex::new(membership),
            view: RwLock::new(view),
            view_changes: tokio::sync::watch::Sender::new(()),
            ring_changes: AtomicU64::new(0),
            owned,
            moved: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            interests: Mutex::new(HashMap::new()),
            subscribing: tokio::sync::Mutex::new(()),
            epochs: EpochClock::default(),
            draining: AtomicBool::new(false),
            requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            presence,
            presence_ring: AtomicU64::new(0),
        });
        inner.publish_view();
        let heartbeats = inner.nats.subscribe(inner.subject_heartbeat()).await?;
        let requests = inner
            .nats
            .subscribe(inner.subject_requests(&inner.node_id))
            .await?;
        let control = inner.nats.subscribe(inner.subject_disconnect()).await?;
        let gone = inner.nats.subscribe(inner.subject_gone()).await?;
        let diffs = inner
            .nats
            .subscribe(inner.subject_presence(&inner.node_id))
            .await?;
        tokio::spawn(inner.clone().presence_loop(diffs));
        tokio::spawn(inner.clone().gone_loop(gone));
        tokio::spawn(inner.clone().disconnect_loop(control));
        tokio::spawn(inner.clone().heartbeat_loop(heartbeats));
        tokio::spawn(inner.clone().lease_loop());
        tokio::spawn(inner.clone().request_loop(requests));
        tokio::spawn(inner.clone().rtt_loop());
        inner.store.start(&inner);
        let token_ids = replay::TokenIds::start(&inner, config);
        let devices = devices::DeviceStore::start(&inner);
        Ok(MeshBus {
            inner,
            devices,
            token_ids,
        })
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
        member: &Arc<Member>,
        request_id: Option<u64>,
        since: Option<(u64, u64)>,
    ) -> Result<(), BusError> {
        self.inner.join(room, member, request_id, since).await
    }

    /// A page of `room`'s history, read at its owner.
    pub async fn history(
        &self,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        self.inner.history_page(room, query, limit).await
    }

    /// Where `device` of `user` has read the user's room to.
    pub async fn device_position(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<(u64, u64)>, BusError> {
        self.devices.position(&self.inner, user, device).await
    }

    /// `device` of `user` has read the user's room to `position`.
    pub async fn device_seen(
        &self,
        user: &str,
        device: &str,
        position: (u64, u64),
    ) -> Result<(), BusError> {
        self.devices.seen(&self.inner, user, device, position).await
    }

    pub fn leave(&self, room: &RoomName, member: &Arc<Member>) {
        self.inner.leave(room, member)
    }

    pub fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    /// A page of `room`'s presence or its counts, from its owner.
    pub async fn presence_query(
        &self,
        room: &RoomName,
        q: crate::proto::mesh::PresenceQuery,
    ) -> Result<crate::proto::mesh::PresenceReply, BusError> {
        self.inner.presence_query(room, q).await
    }

    /// One presence interval: reports to the owners, diffs to the nodes.
    pub async fn presence_tick(&self) {
        self.inner.presence_tick().await
    }

    pub fn room_info(&self, room: &RoomName) -> RoomInfo {
        self.inner.room_info(room)
    }

    pub fn sweep(&self) {
        self.inner.sweep(mono_ms())
    }

    /// Connected to NATS, settled, not draining, and the durable history streams open.
    pub fn is_ready(&self) -> bool {
        self.inner.settled()
            && !self.inner.draining.load(Ordering::Acquire)
            && self.inner.store.is_ready()
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
    pub fn status(&self, room: Option<&RoomName>) -> ClusterStatus {
        let inner = &self.inner;
        let view = inner.view();
        let rtt_seconds_by_region = view
            .nodes_per_region()
            .keys()
            .filter_map(|region| {
                let labels = vec![("region", region.to_string())];
                let rtt = inner.metrics.mesh_nats_rtt.get(&labels)?;
                Some((region.to_string(), rtt.get()))
            })
            .collect();
        ClusterStatus {
            mode: "mesh",
            node: NodeRef {
                id: inner.node_id.to_string(),
                region: inner.region.to_string(),
            },
            ready: self.is_ready(),
            nats: Some(NatsStatus {
                connected: inner.connected(),
                urls: inner
                    .config
                    .nats_urls
                    .iter()
                    .map(|u| link::redact(u))
                    .collect(),
                rtt_seconds_by_region,
            }),
            ring: RingStatus {
                version: Some(format!("{:016x}", view.version)),
                changes: Some(inner.ring_changes.load(Ordering::Relaxed)),
                vnodes: Some(inner.config.vnodes),
                nodes: view.nodes.clone(),
            },
            owned_rooms: inner.owned.len(),
            owner: room.map(|room| {
                let owner = view.ring.owner(room.as_str());
                OwnerRef {
                    room: room.to_string(),
                    node: owner.map(|o| o.to_string()),
                    region: owner.and_then(|o| view.region_of(o)).map(|r| r.to_string()),
                }
            }),
        }
    }
}

impl Inner {
    pub(super) fn view(&self) -> Arc<RingView> {
        self.view.read().expect("view lock poisoned").clone()
    }
}
