//! The mesh's membership loop: heartbeats out and in, the ring view built from them, the
//! round-trip probes, and the disconnect requests every node obeys.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::Inner;
use super::link::RequestFailure;
use crate::clock::mono_ms;
use crate::cluster::membership::{Heartbeat, NodeState, Seen};
use crate::member::CloseReason;

/// Gone notices checked at once at most (each a ping to the node); more are dropped (the
/// heartbeat TTL still catches the node).
const GONE_CHECKS_AT_ONCE: usize = 16;
use crate::proto::mesh::{reply, request};

impl Inner {
    /// Closes this node's sessions of the users other nodes were asked to disconnect.
    pub(super) async fn disconnect_loop(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(message) = requests.next().await {
            let Ok(user) = std::str::from_utf8(&message.payload) else {
                continue;
            };
            if !crate::ids::is_valid_user_id(user) {
                tracing::warn!("mesh: disconnect request with an invalid user id ignored");
                continue;
            }
            let sessions = self.hub.close_user(user, CloseReason::Disconnected);
            tracing::info!(user, sessions, "mesh: user disconnected on request");
        }
    }

    pub(super) fn heartbeat(&self, state: NodeState) -> Bytes {
        let beat = Heartbeat {
            id: self.node_id.to_string(),
            region: self.region.to_string(),
            state,
            started_ms: self.started_ms,
            protocol: crate::cluster::membership::MESH_PROTOCOL,
            connection: self.stats.connects.load(Ordering::Acquire),
            clock_ms: self.epochs.reading().max(crate::clock::wall_ms()),
        };
        Bytes::from(serde_json::to_vec(&beat).expect("a heartbeat serializes"))
    }

    pub(super) fn self_state(&self) -> NodeState {
        if self.draining.load(Ordering::Acquire) {
            NodeState::Draining
        } else {
            NodeState::Active
        }
    }

    pub(super) async fn send_heartbeat(&self) {
        if self.connected() {
            let beat = self.heartbeat(self.self_state());
            if let Err(error) = self.send(self.subject_heartbeat(), beat).await {
                tracing::debug!(%error, "mesh: heartbeat not sent");
            }
        }
    }

    /// Rebuilds the ring snapshot from the membership; counts and logs a change.
    pub(super) fn publish_view(&self) {
        // Built and installed under the membership lock, so two callers cannot install their
        // views in the wrong order.
        let membership = self.membership.lock().expect("membership lock poisoned");
        let view = Arc::new(membership.view(mono_ms()));
        let previous = std::mem::replace(
            &mut *self.view.write().expect("view lock poisoned"),
            view.clone(),
        );
        drop(membership);
        if previous.version != view.version || previous.nodes.len() != view.nodes.len() {
            self.view_changes.send_replace(());
        }
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

    pub(super) async fn heartbeat_loop(self: Arc<Self>, mut beats: async_nats::Subscriber) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut generation = self.generation();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // A lease that ended is noticed here within a period even while the lease
                    // loop waits on a slow confirmation, so the node re-learns the mesh from
                    // then, not from whenever the wait ends.
                    self.lease_valid();
                    let now = self.generation();
                    let mut changed = false;
                    {
                        let mut membership = self.membership.lock().expect("membership lock poisoned");
                        if now != generation {
                            // A new connection or a lapsed lease: nothing heard before is
                            // current; learn the mesh again (and settle from now, should the
                            // Connected event be lost).
                            generation = now;
                            membership.forget_peers();
                            self.link.connected_at_ms.store(mono_ms(), Ordering::Release);
                            changed = true;
                        }
                        self.metrics.mesh_connected.set(i64::from(self.connected()));
                        membership.set_self_state(self.self_state());
                        changed |= membership.expire(mono_ms());
                    }
                    if changed {
                        self.publish_view();
                    }
                }
                beat = beats.next() => {
                    let Some(beat) = beat else { break };
                    let Ok(beat) = serde_json::from_slice::<Heartbeat>(&beat.payload) else {
                        tracing::warn!("mesh: undecodable heartbeat ignored");
                        continue;
                    };
                    if *beat.id != *self.node_id {
                        // The sender may have handed out epochs up to its clock, and for up to a
                        // heartbeat period (and the delivery) after it announced it.
                        self.epochs
                            .observe(beat.clock_ms.saturating_add(2 * self.config.heartbeat_ms));
                    }
                    let seen = self
                        .membership
                        .lock()
                        .expect("membership lock poisoned")
                        .observe(&beat, mono_ms());
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

    /// NATS answered a request to `node` with "no responders": nobody serves its subject, so its
    /// connection is gone (killed, crashed, or dropped by the server), and with it every room
    /// state it held (state never outlives its connection). It leaves this node's ring at once
    /// instead of after `node_ttl_ms`, and the other nodes are told, so the rooms it owned are
    /// taken over in tens of milliseconds.
    pub(super) async fn peer_gone(&self, node: &str) {
        if *node == *self.node_id {
            return;
        }
        let gone = self
            .membership
            .lock()
            .expect("membership lock poisoned")
            .declare_gone(node, mono_ms());
        if !gone {
            return;
        }
        self.metrics.mesh_nodes_gone.inc();
        tracing::info!(
            node,
            "mesh: node gone (its NATS connection closed); its rooms move now"
        );
        self.publish_view();
        if let Err(error) = self
            .send(self.subject_gone(), Bytes::copy_from_slice(node.as_bytes()))
            .await
        {
            tracing::debug!(%error, "mesh: gone notice not sent");
        }
    }

    /// Notices from other nodes that a node is gone. Each is checked before it is believed: a
    /// ping to the node must itself find no responders (a notice may be late, or wrong).
    pub(super) async fn gone_loop(self: Arc<Self>, mut notices: async_nats::Subscriber) {
        let checking = Arc::new(tokio::sync::Semaphore::new(GONE_CHECKS_AT_ONCE));
        while let Some(notice) = notices.next().await {
            let Ok(node) = std::str::from_utf8(&notice.payload) else {
                continue;
            };
            if !crate::ids::is_subject_token(node) || *node == *self.node_id {
                continue;
            }
            if !self.view().nodes.iter().any(|n| *n.id == *node) {
                continue;
            }
            let Ok(permit) = checking.clone().try_acquire_owned() else {
                continue;
            };
            let inner = self.clone();
            let node = node.to_string();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(RequestFailure::NoResponders) =
                    inner.request(&node, request::Kind::Ping(true)).await
                {
                    inner.peer_gone(&node).await;
                }
            });
        }
    }

    /// Publishes this node's heartbeat every `heartbeat_ms` and renews the lease with it: once
    /// the NATS server confirms it has the heartbeat (and so every peer will hear it), the lease
    /// holds until `lease_ms` after the heartbeat was sent. A separate task from the heartbeat
    /// loop, so a slow confirmation never delays reading the peers' heartbeats.
    pub(super) async fn lease_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lapses = self.link.lease.lapses();
        loop {
            ticker.tick().await;
            if self.connected() {
                let started = mono_ms();
                self.send_heartbeat().await;
                match self.confirm().await {
                    Ok(()) => self
                        .link
                        .lease
                        .renewed(started, mono_ms(), self.config.lease_ms),
                    Err(error) => tracing::debug!(%error, "mesh: lease not renewed"),
                }
            }
            let now = mono_ms();
            let valid = self.link.lease.is_valid(now);
            self.metrics
                .mesh_lease_remaining
                .set(self.link.lease.remaining(now) as f64 / 1000.0);
            let seen = self.link.lease.lapses();
            if seen != lapses {
                self.metrics.mesh_lease_lapses.inc_by(seen - lapses);
                lapses = seen;
                tracing::warn!(
                    renewed = valid,
                    "mesh: the ownership lease lapsed (the node was stalled or NATS did not confirm in time); every room it held is dropped, and it learns the mesh again before starting rooms"
                );
            }
        }
    }

    /// Measures the round trip of a request through NATS to each other node in turn, one per
    /// heartbeat period (a ping answered at once), per region of the answering node.
    pub(super) async fn rtt_loop(self: Arc<Self>) {
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
            match self.request(&peer.id, request::Kind::Ping(true)).await {
                Ok(reply::Kind::Done(_)) => {
                    self.metrics
                        .mesh_nats_rtt
                        .get_or_create(&vec![("region", peer.region.to_string())])
                        .set(started.elapsed().as_secs_f64());
                }
                Err(RequestFailure::NoResponders) => self.peer_gone(&peer.id).await,
                _ => {}
            }
        }
    }
}
