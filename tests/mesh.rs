//! The mesh, end to end: real nats-server processes (joined by gateways where a test spans
//! regions), real `roomwire` processes, real WebSocket clients. These are the acceptance tests of
//! the mesh: order across nodes and regions, an owner killed with SIGKILL, a node joining and one
//! leaving gracefully, a NATS server restarting under load, messages to a user and broadcasts
//! reaching sessions on every node and a user's disconnect closing them there; plus the
//! harness's own checks and the validity of the files in regions/.
//!
//! Every wait is on a condition with a deadline. A failing test prints the log tails of its
//! nodes and NATS servers; `ROOMWIRE_TEST_LOG=roomwire=debug` makes the nodes log more.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::mesh::*;
use common::nats::{NatsServer, nats_server_bin};
use common::node_process::{NodeProcess, wait_converged, wait_owner};
use common::*;
use futures_util::StreamExt;
use roomwire::proto::{self, CloseCode};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_roomwire");

// ---------------------------------------------------------------------------------------------
// a. Two regions: one order for every member
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_every_member_sees_every_message_in_one_order() {
    let (_nats, [n1, n2, n3]) = two_regions_three_nodes().await;
    let nodes = [&n1, &n2, &n3];

    let room = "chat.two-regions";
    let owner = n1.owner_of(room).await;
    for node in &nodes {
        assert_eq!(node.owner_of(room).await, owner, "{} disagrees", node.id);
    }
    let mut members = Vec::new();
    for node in &nodes {
        for i in 0..2 {
            members.push(Member::join(node, &format!("m{i}-{}", node.id), room).await);
        }
    }
    let first = &members[0].joined;
    for m in &members {
        assert_eq!(
            (m.joined.epoch, m.joined.seq),
            (first.epoch, first.seq),
            "{} joined at another position than {}",
            m.label,
            members[0].label
        );
    }

    // One publisher per node, all at once, 100 messages each; a steady mesh refuses none.
    const EACH: usize = 100;
    let mut clients = Vec::new();
    for node in &nodes {
        let label = format!("pub-{}", node.id);
        clients.push((node.client(&label).await, label));
    }
    let mut publishers = Vec::new();
    for (client, label) in clients {
        publishers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for k in 0..EACH {
                let payload = format!("{label}#{k}");
                sent.push(publish_until_acked(&client, &label, room, &payload).await);
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for p in publishers {
        let mine = propagate(p.await);
        // One publisher's messages keep its order: their seqs grow.
        assert!(
            mine.windows(2)
                .all(|w| (w[0].ack.epoch, w[0].ack.seq) < (w[1].ack.epoch, w[1].ack.seq)),
            "a publisher's acknowledgements are out of order: {mine:?}"
        );
        sent.extend(mine);
    }
    let refused: Vec<&Sent> = sent.iter().filter(|s| !s.refusals.is_empty()).collect();
    assert!(
        refused.is_empty(),
        "a steady mesh refused publishes: {refused:?}"
    );

    let member_refs: Vec<&Member> = members.iter().collect();
    wait_received(&member_refs, &sent).await;
    let reference = members[0].received();
    assert_eq!(reference.len(), 3 * EACH, "{}", members[0].summary());
    for (i, (epoch, seq, _)) in reference.iter().enumerate() {
        assert_eq!(
            (*epoch, *seq),
            (first.epoch, first.seq + 1 + i as u64),
            "{}: message {i} is not at the next seq of the joined epoch",
            members[0].label
        );
    }
    assert_acks_match(&members[0].label, &reference, &sent);
    for m in &members {
        assert_eq!(
            m.received(),
            reference,
            "{} and {} saw different sequences",
            m.label,
            members[0].label
        );
        assert!(m.other_events().is_empty(), "{}", m.summary());
    }

    // The contract's metrics: the mesh by region, each node's identity, forwarded publishes on
    // the nodes that do not own the room.
    for node in &nodes {
        let mut by_region = metric_lines(node, "roomwire_mesh_nodes{").await;
        by_region.sort();
        assert_eq!(
            by_region,
            [
                r#"roomwire_mesh_nodes{region="eu"} 2"#,
                r#"roomwire_mesh_nodes{region="us"} 1"#
            ],
            "{}",
            node.id
        );
        let info = metric_lines(node, "roomwire_node_info{").await;
        assert!(
            info.iter()
                .any(|l| l.contains(&format!("node=\"{}\"", node.id))
                    && l.contains(&format!("region=\"{}\"", node.region))
                    && l.ends_with(" 1")),
            "{}: {info:?}",
            node.id
        );
        // One node is pinged through NATS per heartbeat, in turn: wait for this node's first.
        eventually(
            &format!("{}: roomwire_mesh_nats_rtt_seconds", node.id),
            || async {
                !metric_lines(node, "roomwire_mesh_nats_rtt_seconds{")
                    .await
                    .is_empty()
            },
        )
        .await;
        let forwarded = node.metric("roomwire_mesh_forwarded_publishes_total").await;
        if node.id != owner {
            assert!(
                forwarded >= EACH as f64,
                "{}: forwarded {forwarded} publishes to {owner}",
                node.id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// b. The owner of a busy room is killed
// ---------------------------------------------------------------------------------------------

/// What the survivors of an owner crash must see, and why:
/// - every acknowledged message is delivered: the owner publishes a message to the room's NATS
///   subject before it answers the forwarded publish, on the same connection, so an
///   acknowledgement that reached a surviving node means the NATS server had the message;
/// - all members on surviving nodes see the identical list: one NATS publish reaches all of
///   them or none;
/// - the epoch changes exactly once, to a larger one, announced to each member by one
///   `EpochChanged` right before the new epoch's seq 1; within each epoch seqs are contiguous;
/// - a payload may appear twice only if its publish was in flight when the owner died: the dead
///   owner sequenced and fanned it out, its acknowledgement was lost, and the publish was tried
///   again (by the client after UNAVAILABLE, or by the node re-routing it) at the new owner,
///   which cannot know the id (de-duplication does not survive the owner). A publisher has one
///   publish in flight at a time, so that is at most one payload per publisher: its last one
///   in the old epoch, acknowledged in the new one. Any other duplicate is a bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_of_a_busy_room_loses_no_acknowledged_message() {
    let nats = NatsServer::start().await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(NodeProcess::mesh(id, "local", &[nats.url()]).await);
    }
    wait_converged(&nodes.iter().collect::<Vec<_>>()).await;

    let room = "chat.busy";
    let owner_id = nodes[0].owner_of(room).await;
    let owner_index = nodes.iter().position(|n| n.id == owner_id).unwrap();
    let mut owner = nodes.remove(owner_index);
    let survivors: Vec<&NodeProcess> = nodes.iter().collect();
    for node in &survivors {
        assert_eq!(node.owner_of(room).await, owner_id, "{} disagrees", node.id);
    }

    // Members: two on each surviving node, one on the owner (it dies with it).
    let mut members = Vec::new();
    for node in &survivors {
        for i in 0..2 {
            members.push(Member::join(node, &format!("m{i}-{}", node.id), room).await);
        }
    }
    let _doomed = Member::join(&owner, "m-owner", room).await;
    let epoch1 = members[0].joined.epoch;
    // One more member leaves before the crash and comes back after it, on another node.
    let leaver = Member::join(survivors[1], "m-leaver", room).await;

    let mut pumps = Vec::new();
    for node in &survivors {
        let label = format!("pub-{}", node.id);
        pumps.push(Pump::start(&label, node.client(&label).await, room));
    }
    for p in &mut pumps {
        p.wait_acked(30).await;
    }
    let since = leaver.last_position();
    drop(leaver);

    owner.kill9();
    wait_converged(&survivors).await;
    let new_owner = survivors[0].owner_of(room).await;
    assert_ne!(new_owner, owner_id);
    wait_owner(&survivors, room, &new_owner).await;
    // Keep publishing well past the hand-over.
    for p in &mut pumps {
        let n = p.acked() + 30;
        p.wait_acked(n).await;
    }
    let mut sent = Vec::new();
    for p in pumps {
        sent.extend(p.finish().await);
    }
    let retried: HashSet<&str> = sent
        .iter()
        .filter(|s| !s.refusals.is_empty())
        .map(|s| s.payload.as_str())
        .collect();

    let member_refs: Vec<&Member> = members.iter().collect();
    wait_received(&member_refs, &sent).await;
    let reference = members[0].received();
    for m in &members {
        let got = m.received();
        assert_eq!(
            got, reference,
            "{} and {} differ",
            m.label, members[0].label
        );
    }
    let label = &members[0].label;

    // The epoch changed exactly once, from the one the members joined in to a larger one.
    let epochs: Vec<u64> = {
        let mut e: Vec<u64> = reference.iter().map(|(e, _, _)| *e).collect();
        e.dedup();
        e
    };
    assert_eq!(epochs.len(), 2, "{label}: epochs {epochs:?}");
    assert_eq!(epochs[0], epoch1, "{label}: epochs {epochs:?}");
    assert!(epochs[1] > epochs[0], "{label}: epochs {epochs:?}");
    let split = reference.iter().position(|(e, _, _)| *e != epoch1).unwrap();
    // Each member was told, once, right before the first message of the new epoch, where the
    // old one ended for it (the protocol's EpochChanged); nothing else happened to its session.
    for m in &members {
        assert_eq!(
            m.assert_epoch_changes_announced(),
            epochs,
            "{}",
            m.summary()
        );
    }
    assert_eq!(
        reference[0].1,
        members[0].joined.seq + 1,
        "{label}: the first message after Joined"
    );
    assert_eq!(
        reference[split].1, 1,
        "{label}: the new epoch starts at seq 1"
    );
    assert_eq!(first_gap(&reference), None, "{label}: a seq gap");
    assert_acks_match(label, &reference, &sent);

    // Every received message was acknowledged; a duplicate only for the publish each publisher
    // had in flight at the crash.
    let acked: HashMap<&str, &Sent> = sent.iter().map(|s| (s.payload.as_str(), s)).collect();
    let mut count: HashMap<&str, Vec<u64>> = HashMap::new();
    for (e, _, p) in &reference {
        assert!(
            acked.contains_key(p.as_str()),
            "{label}: {p} was never acknowledged"
        );
        count.entry(p).or_default().push(*e);
    }
    let mut twice = Vec::new();
    for (p, in_epochs) in &count {
        if in_epochs.len() > 1 {
            assert_eq!(
                in_epochs,
                &vec![epochs[0], epochs[1]],
                "{label}: {p} delivered more than once per epoch"
            );
            let publisher = p.split('#').next().unwrap();
            let last_old = reference[..split]
                .iter()
                .rev()
                .find(|(_, _, q)| q.starts_with(&format!("{publisher}#")))
                .map(|(_, _, q)| q.as_str());
            assert_eq!(
                last_old,
                Some(*p),
                "{label}: {p} delivered in both epochs, but it was not the publish {publisher} \
                 had in flight at the crash"
            );
            assert_eq!(acked[p].ack.epoch, epochs[1], "{label}: {p}");
            twice.push(*p);
        }
    }
    // The member that was away gets, from the room's durable history, everything acknowledged
    // after where it left, across the crash's new epoch.
    let replayed =
        assert_resume_replays_everything(survivors[0], "m-leaver", room, since, &sent, &reference)
            .await;
    eprintln!(
        "owner crash: {} messages, {} publishes refused at least once, delivered twice: {twice:?}, \
         {replayed} replayed to a member that resumed after it",
        sent.len(),
        retried.len(),
    );
}

// ---------------------------------------------------------------------------------------------
// c. A node joins, a node leaves: only its share moves, without a gap
// ---------------------------------------------------------------------------------------------

/// Ownership moves by the ring: a fourth node takes about a quarter of the rooms, all of them
/// from the others to itself, and leaving gives exactly those back. Both are graceful hand-offs:
/// the old owner passes the room's (epoch, seq) and its de-duplication state on, so members on
/// the other nodes see one epoch, contiguous seqs, every acknowledged message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_and_a_leaving_node_move_only_their_share_without_a_gap() {
    let nats = NatsServer::start().await;
    let n1 = NodeProcess::mesh("n1", "local", &[nats.url()]).await;
    let n2 = NodeProcess::mesh("n2", "local", &[nats.url()]).await;
    let n3 = NodeProcess::mesh("n3", "local", &[nats.url()]).await;
    let three = [&n1, &n2, &n3];
    wait_converged(&three).await;

    let rooms: Vec<String> = (0..1000).map(|i| format!("rooms.r{i}")).collect();
    let before = owners(&n1, &rooms).await;
    assert_eq!(
        before,
        ring_owners(&["n1", "n2", "n3"], &rooms),
        "the mesh must place rooms with roomwire::Ring over the live node ids \
         and mesh.vnodes"
    );
    for node in [&n2, &n3] {
        assert_eq!(
            owners(node, &rooms[..50]).await,
            before[..50],
            "{}",
            node.id
        );
    }
    let predicted = ring_owners(&["n1", "n2", "n3", "n4"], &rooms);
    // Six busy rooms that will move to n4, two from each old owner. Several, so that handing
    // them over takes a while and publishes keep arriving while some are on their way.
    let mut moving: Vec<usize> = Vec::new();
    for i in 0..rooms.len() {
        if predicted[i] == "n4" && moving.iter().filter(|&&j| before[j] == before[i]).count() < 2 {
            moving.push(i);
        }
    }
    assert_eq!(moving.len(), 6, "rooms moving to n4 from each node");

    let mut members = Vec::new(); // (room index, member)
    let mut pumps = Vec::new();
    for (k, &i) in moving.iter().enumerate() {
        for node in three {
            members.push((
                i,
                Member::join(node, &format!("m-{}", node.id), &rooms[i]).await,
            ));
        }
        let node = three[k % 3];
        let label = format!("pub{k}-{}", node.id);
        pumps.push(Pump::start(&label, node.client(&label).await, &rooms[i]));
    }
    for p in &mut pumps {
        p.wait_acked(20).await;
    }
    let changes_before = n1.metric("roomwire_mesh_ring_changes_total").await;

    // Join.
    let mut n4 = NodeProcess::mesh("n4", "local", &[nats.url()]).await;
    wait_converged(&[&n1, &n2, &n3, &n4]).await;
    for &i in &moving {
        wait_owner(&[&n1, &n2, &n3, &n4], &rooms[i], "n4").await;
    }
    let after_join = owners(&n1, &rooms).await;
    let moved: Vec<usize> = (0..rooms.len())
        .filter(|&i| after_join[i] != before[i])
        .collect();
    let share = moved.len() as f64 / rooms.len() as f64;
    assert!(
        (0.15..=0.35).contains(&share),
        "{} of {} rooms changed owner when a 4th node joined",
        moved.len(),
        rooms.len()
    );
    for &i in &moved {
        assert_eq!(after_join[i], "n4", "{} moved between old nodes", rooms[i]);
    }
    assert_eq!(after_join, predicted);
    for p in &mut pumps {
        let n = p.acked() + 20;
        p.wait_acked(n).await;
    }

    // Graceful leave: n4 drains and hands its rooms back.
    let status = n4.sigterm().await;
    assert!(status.success(), "n4 exit: {status}\n{}", n4.log_tail(30));
    wait_converged(&three).await;
    for &i in &moving {
        wait_owner(&three, &rooms[i], &before[i]).await;
    }
    assert_eq!(
        owners(&n1, &rooms).await,
        before,
        "after the leave every room is back with its first owner"
    );
    for p in &mut pumps {
        let n = p.acked() + 20;
        p.wait_acked(n).await;
    }

    let mut sent_by_room: HashMap<usize, Vec<Sent>> = HashMap::new();
    for (p, &i) in pumps.into_iter().zip(&moving) {
        sent_by_room.insert(i, p.finish().await);
    }
    for &i in &moving {
        let sent = &sent_by_room[&i];
        let in_room: Vec<&Member> = members
            .iter()
            .filter(|(r, _)| *r == i)
            .map(|(_, m)| m)
            .collect();
        wait_received(&in_room, sent).await;
        for m in &in_room {
            let label = format!("{} in {}", m.label, rooms[i]);
            let got = m.received();
            assert!(
                got.iter().all(|(e, _, _)| *e == m.joined.epoch),
                "{label}: the epoch changed across a graceful hand-off: {}",
                m.summary()
            );
            assert_eq!(
                got[0].1,
                m.joined.seq + 1,
                "{label}: first seq after Joined"
            );
            assert_eq!(first_gap(&got), None, "{label}: a seq gap");
            let received: Vec<String> = got.iter().map(|(_, _, p)| p.clone()).collect();
            assert_eq!(
                received,
                payloads(sent),
                "{label}: not every acknowledged message exactly once, in publish order"
            );
            assert_acks_match(&label, &got, sent);
            assert!(
                m.other_events().is_empty(),
                "{label}: a graceful hand-off must not touch members: {}",
                m.summary()
            );
        }
    }
    let changes = n1.metric("roomwire_mesh_ring_changes_total").await - changes_before;
    assert!(
        changes >= 2.0,
        "n1 counted {changes} ring changes for a join and a leave"
    );
}

// ---------------------------------------------------------------------------------------------
// d. The NATS server restarts under load
// ---------------------------------------------------------------------------------------------

/// While NATS is down a node cannot reach the other nodes, so what is assertable is:
/// - every publish is answered: acknowledged, or refused with the retryable UNAVAILABLE (never
///   a request that times out without an answer, never a closed session);
/// - an acknowledged message is delivered to the members on the owner's node (the owner
///   delivers locally, under its sequencing lock, before it acknowledges). Members on other nodes
///   may miss what was published while their node was cut off: they see a seq gap, which a
///   client repairs by resuming from history;
/// - no two members disagree on what sits at an (epoch, seq), and no member sees a position
///   twice or out of order: however the outage went, there was one sequencer for the room;
/// - `/readyz` turns 503 while NATS is away and 200 again after, and the node keeps serving;
/// - after recovery the mesh works: new publishes from the owner's node and from another node
///   reach the members on every node, contiguously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_loses_no_acknowledged_message_on_the_owner() {
    let mut nats = NatsServer::start().await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(NodeProcess::mesh(id, "local", &[nats.url()]).await);
    }
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all).await;

    let room = "chat.nats-restart";
    let owner_id = nodes[0].owner_of(room).await;
    let owner = all.iter().find(|n| n.id == owner_id).copied().unwrap();
    let other = all.iter().find(|n| n.id != owner_id).copied().unwrap();
    let mut members = Vec::new();
    for node in &all {
        members.push(Member::join(node, &format!("m-{}", node.id), room).await);
    }
    let on_owner = members
        .iter()
        .position(|m| m.label.ends_with(&owner_id))
        .unwrap();
    let leaver = Member::join(other, "m-leaver", room).await;

    let mut pumps = vec![
        Pump::start("pub-owner", owner.client("pub-owner").await, room),
        Pump::start("pub-other", other.client("pub-other").await, room),
    ];
    for p in &mut pumps {
        p.wait_acked(20).await;
    }

    let since = leaver.last_position();
    drop(leaver);
    let at_kill: Vec<usize> = pumps.iter().map(|p| p.acked()).collect();
    nats.kill();
    for node in &all {
        eventually(&format!("{} not ready without NATS", node.id), || async {
            node.readyz().await == Some(503)
        })
        .await;
    }
    let at_restart: Vec<usize> = pumps.iter().map(|p| p.acked()).collect();
    nats.restart().await;
    wait_converged(&all).await;
    for node in &all {
        assert_eq!(
            node.owner_of(room).await,
            owner_id,
            "{}: the owner moved",
            node.id
        );
        // Ready again (a node may settle once more right after the restart, while the server
        // recovers its JetStream streams and confirms a heartbeat late: a lapsed lease).
        eventually(&format!("{} connected and ready", node.id), || async {
            let cluster = node.cluster(None).await;
            cluster["nats"]["connected"] == true && cluster["ready"] == true
        })
        .await;
    }
    for p in &mut pumps {
        let n = p.acked() + 20;
        p.wait_acked(n).await;
    }
    let mut sent = Vec::new();
    for p in pumps {
        sent.extend(p.finish().await);
    }
    eprintln!(
        "nats restart: {} publishes; acknowledged while NATS was down (owner's node, other node): \
         {:?}; refused at least once: {}",
        sent.len(),
        [at_restart[0] - at_kill[0], at_restart[1] - at_kill[1]],
        sent.iter().filter(|s| !s.refusals.is_empty()).count()
    );

    // After recovery: a batch from another node, then one from the owner's node, reaches every
    // member on every node, contiguously.
    let mut fresh = Vec::new();
    for node in [other, owner] {
        let client = node.client(&format!("after-{}", node.id)).await;
        for k in 0..10 {
            let payload = format!("after-{}#{k}", node.id);
            let s = publish_until_acked(&client, "after", room, &payload).await;
            assert!(s.refusals.is_empty(), "refused after recovery: {s:?}");
            fresh.push(s);
        }
    }
    let member_refs: Vec<&Member> = members.iter().collect();
    wait_received(&member_refs, &fresh).await;
    for m in &members {
        let got = m.received();
        let tail = &got[got.len() - fresh.len()..];
        assert_eq!(
            tail.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
            payloads(&fresh),
            "{}: the last messages are not the post-recovery batch in order",
            m.label
        );
        assert_eq!(first_gap(tail), None, "{}: a gap after recovery", m.label);
        assert!(
            tail.iter().all(|(e, _, _)| *e == tail[0].0),
            "{}: epochs {tail:?}",
            m.label
        );
        assert_acks_match(&m.label, &got, &fresh);
        // The owner fences itself while cut off from NATS, so the room may continue in a new
        // epoch; a member is then told so, like after an owner crash, and nothing else happens
        // to its session (it stays connected, NATS is the nodes' business).
        m.assert_epoch_changes_announced();
        // One sequencer: positions strictly increase within an epoch, never repeat.
        let mut seen = HashSet::new();
        for w in got.windows(2) {
            if w[0].0 == w[1].0 {
                assert!(w[0].1 < w[1].1, "{}: out of order: {w:?}", m.label);
            }
        }
        for (e, s, _) in &got {
            assert!(seen.insert((*e, *s)), "{}: ({e}, {s}) twice", m.label);
        }
    }
    let mut at: HashMap<(u64, u64), (String, String)> = HashMap::new();
    for m in &members {
        for (e, s, p) in m.received() {
            if let Some((who, other_p)) = at.get(&(e, s)) {
                assert_eq!(
                    &p, other_p,
                    "({e}, {s}) holds different messages for {} and {who}",
                    m.label
                );
            } else {
                at.insert((e, s), (m.label.clone(), p));
            }
        }
    }

    // The owner's members got every acknowledged message, at its acknowledged position.
    let owner_member = &members[on_owner];
    wait_received(&[owner_member], &sent).await;
    assert_acks_match(&owner_member.label, &owner_member.received(), &sent);

    // A member that left before NATS went away resumes on the owner's node: everything
    // acknowledged after it left, from the durable history.
    sent.extend(fresh);
    let replayed = assert_resume_replays_everything(
        owner,
        "m-leaver",
        room,
        since,
        &sent,
        &owner_member.received(),
    )
    .await;
    eprintln!("nats restart: {replayed} replayed to a member that resumed after it");
}

// ---------------------------------------------------------------------------------------------
// e. Users and broadcasts: every session on every node, and a disconnect that reaches them all
// ---------------------------------------------------------------------------------------------

/// `POST path` with the API key and a JSON body; the node must answer 200 with JSON.
async fn api_post(node: &NodeProcess, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let (status, response) = http_request(
        node.addr,
        "POST",
        path,
        Some(API_KEY),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{} POST {path} {body}: {response}", node.id);
    serde_json::from_str(&response)
        .unwrap_or_else(|e| panic!("{} POST {path}: not JSON ({e}): {response}", node.id))
}

/// Publishes `data` through `node`'s HTTP API to `target` (`{"user": ...}` or
/// `{"broadcast": true}`); checks the answer names `room`, and that `local_deliveries` counts
/// `local` sessions when `node` owns the room and none otherwise (a forwarded publish is
/// answered by the owner before the message comes back to this node's members through NATS).
async fn api_publish(
    node: &NodeProcess,
    mut target: serde_json::Value,
    data: &str,
    room: &str,
    local: u64,
) -> Sent {
    target["data"] = data.into();
    let answer = api_post(node, "/api/v1/publish", &target).await;
    let owner = node.owner_of(room).await;
    assert_eq!(answer["room"], room, "{}: {answer}", node.id);
    assert_eq!(answer["duplicate"], false, "{}: {answer}", node.id);
    assert_eq!(
        answer["local_deliveries"].as_u64(),
        Some(if owner == node.id { local } else { 0 }),
        "{} (owner of {room}: {owner}): {answer}",
        node.id
    );
    let position = |key: &str| {
        answer[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no {key}: {answer}", node.id))
    };
    Sent {
        payload: data.into(),
        ack: proto::PublishAck {
            room: room.into(),
            epoch: position("epoch"),
            seq: position("seq"),
            ..Default::default()
        },
        refusals: Vec::new(),
    }
}

/// The requirement "user-directed messages and broadcasts reach sessions on every node", and
/// the disconnect of a user, which the node that gets the request passes on to every other node
/// (`roomwire.ctl.disconnect`). Three nodes in two regions; alice has a session on each of them,
/// joined to no room (her user room and the broadcast room are all she is in); bob (on n1) and
/// carol (on n3) share a room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_messages_broadcasts_and_disconnects_reach_every_node() {
    let (_nats, [n1, n2, n3]) = two_regions_three_nodes().await;
    let nodes = [&n1, &n2, &n3];

    let room = "chat.friends";
    let bob = Member::join(&n1, "bob", room).await;
    let carol = Member::join(&n3, "carol", room).await;
    let alice_room = "$user.alice";
    let owner = n1.owner_of(alice_room).await;
    let at = nodes.iter().position(|n| n.id == owner).unwrap();
    // The owner of alice's user room first, then the other two.
    let turns: Vec<&NodeProcess> = (0..3).map(|i| nodes[(at + i) % 3]).collect();

    // a. Alice has sessions on the two nodes that do not own her user room; a first message to
    //    her, through the owner, reaches both.
    let mut alice = vec![
        Member::connect(turns[1], "alice").await,
        Member::connect(turns[2], "alice").await,
    ];
    let data = format!("to-alice#0 via {}", turns[0].id);
    let first = api_publish(turns[0], json!({"user": "alice"}), &data, alice_room, 0).await;
    wait_received(
        &alice.iter().collect::<Vec<_>>(),
        std::slice::from_ref(&first),
    )
    .await;
    // Then she opens a session on the owner, and the next message goes out through the owner
    // at once: `Connected` means the session is a member of `$user.alice`, and the owner
    // delivers to its own members before it answers. Four more follow, one after the other,
    // through each node in turn (forwarded to the owner; across the gateway for one of them).
    alice.push(Member::connect(turns[0], "alice").await);
    let mut to_alice = vec![first];
    for k in 1..6 {
        let node = turns[(k - 1) % 3];
        let data = format!("to-alice#{k} via {}", node.id);
        to_alice.push(api_publish(node, json!({"user": "alice"}), &data, alice_room, 1).await);
    }
    for w in to_alice.windows(2) {
        assert_eq!(
            (w[1].ack.epoch, w[1].ack.seq),
            (w[0].ack.epoch, w[0].ack.seq + 1),
            "one after the other, the owner gave them consecutive positions: {to_alice:?}"
        );
    }
    let alice_refs: Vec<&Member> = alice.iter().collect();
    wait_received(&alice_refs[..2], &to_alice).await;
    wait_received(&alice_refs[2..], &to_alice[1..]).await;
    for (m, expected) in alice
        .iter()
        .zip([&to_alice[..], &to_alice[..], &to_alice[1..]])
    {
        let got = m.received_in(alice_room);
        assert_eq!(
            got.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
            payloads(expected),
            "{}: not every message to alice since it connected exactly once, in the order sent",
            m.label
        );
        // At the acknowledged (epoch, seq), hence where every other session of alice has it.
        assert_acks_match(&m.label, &got, expected);
    }
    let everyone: Vec<&Member> = alice.iter().chain([&bob, &carol]).collect();

    // b. One broadcast, through n3 (us): every session on every node.
    let broadcast_room = "$broadcast";
    let shout = api_publish(
        &n3,
        json!({"broadcast": true}),
        "to everyone",
        broadcast_room,
        2,
    )
    .await;
    wait_received(&everyone, std::slice::from_ref(&shout)).await;
    let shouted = vec![(shout.ack.epoch, shout.ack.seq, shout.payload.clone())];
    for m in &everyone {
        assert_eq!(m.received_in(broadcast_room), shouted, "{}", m.label);
        assert!(m.other_events().is_empty(), "{}", m.summary());
    }
    // Nothing meant for alice reached bob or carol: the broadcast is all they got.
    for m in [&bob, &carol] {
        assert_eq!(m.received(), shouted, "{}", m.summary());
    }

    // c. Disconnect alice through n2: her sessions close on every node with 4005
    //    (DISCONNECTED); bob's and carol's stay, and keep working.
    let answer = api_post(&n2, "/api/v1/users/alice/disconnect", &json!({})).await;
    assert_eq!(
        answer,
        json!({"user": "alice", "disconnected": 1, "other_nodes_told": true})
    );
    for m in &alice {
        eventually(&format!("{} closed", m.label), || async {
            m.closed().is_some()
        })
        .await;
        assert_eq!(
            m.closed(),
            Some(Some(CloseCode::Disconnected as u16)),
            "{}",
            m.summary()
        );
        assert_eq!(
            m.other_events().len(),
            1,
            "{}: more than the close",
            m.summary()
        );
    }
    for node in &nodes {
        eventually(
            &format!("{}: no session of alice left", node.id),
            || async {
                let (_, body) = node
                    .try_get("/api/v1/rooms/$user.alice")
                    .await
                    .expect("the node answers");
                body.contains(r#""local_members":0"#)
            },
        )
        .await;
        // One session closed on each node: by n2 itself, and by the others on its NATS message
        // (a node does not hear its own, the mesh connection does not echo).
        assert_eq!(
            node.metric(r#"roomwire_sessions_closed_total{reason="disconnected"}"#)
                .await,
            1.0,
            "{}",
            node.id
        );
    }
    let mut after = Vec::new();
    for m in [&bob, &carol] {
        assert_eq!(m.closed(), None, "{}", m.summary());
        let payload = format!("{} is still here", m.label);
        let ack = m
            .publish(room, &payload)
            .await
            .unwrap_or_else(|e| panic!("{}: publish after the disconnect: {e}", m.label));
        after.push(Sent {
            payload,
            ack,
            refusals: Vec::new(),
        });
    }
    wait_received(&[&bob, &carol], &after).await;
    for m in [&bob, &carol] {
        let got = m.received_in(room);
        assert_eq!(
            got.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
            payloads(&after),
            "{}",
            m.label
        );
        assert_acks_match(&m.label, &got, &after);
    }
    // A message to bob, through the other region, still reaches him.
    let to_bob = api_publish(&n3, json!({"user": "bob"}), "to-bob", "$user.bob", 0).await;
    wait_received(&[&bob], std::slice::from_ref(&to_bob)).await;
    for m in [&bob, &carol] {
        assert!(m.other_events().is_empty(), "{}", m.summary());
    }
}

// ---------------------------------------------------------------------------------------------
// f. Publishes pipelined through a node that does not own the room
// ---------------------------------------------------------------------------------------------

/// A client that sends many publishes without waiting for each acknowledgement, through a node
/// that does not own the room: its node carries them to the owner several per request (a
/// session is not held to one publish per round trip), and they take their positions in the
/// order the client sent them, for every member on either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_travel_to_the_owner_together_and_keep_their_order() {
    let nats = NatsServer::start().await;
    let n1 = NodeProcess::mesh("n1", "local", &[nats.url()]).await;
    let n2 = NodeProcess::mesh("n2", "local", &[nats.url()]).await;
    wait_converged(&[&n1, &n2]).await;
    let room = (0..)
        .map(|i| format!("chat.pipelined{i}"))
        .find(|r| ring_owners(&["n1", "n2"], std::slice::from_ref(r))[0] == "n2")
        .unwrap();
    assert_eq!(n1.owner_of(&room).await, "n2");
    let members = [
        Member::join(&n1, "m-n1", &room).await,
        Member::join(&n2, "m-n2", &room).await,
    ];
    let forwarded_before = n1.metric("roomwire_mesh_forwarded_publishes_total").await;
    let requests_before = n1.metric("roomwire_mesh_forward_requests_total").await;

    const N: usize = 300;
    let publisher = n1.client("pub").await;
    let sent: Vec<String> = (0..N).map(|i| format!("p#{i}")).collect();
    // Every publish is written before the first acknowledgement is awaited.
    let acks =
        futures_util::future::join_all(sent.iter().map(|p| publisher.publish(&room, p.clone(), p)))
            .await;
    let acks: Vec<proto::PublishAck> = acks
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.unwrap_or_else(|e| panic!("publish {i}: {e}")))
        .collect();
    for w in acks.windows(2) {
        assert!(
            (w[0].epoch, w[0].seq) < (w[1].epoch, w[1].seq),
            "acknowledged out of the order sent: {} at {}:{}, then {} at {}:{}",
            w[0].client_msg_id,
            w[0].epoch,
            w[0].seq,
            w[1].client_msg_id,
            w[1].epoch,
            w[1].seq
        );
    }
    for m in &members {
        eventually(&format!("{} receives all {N}", m.label), || async {
            m.received_in(&room).len() >= N
        })
        .await;
        let got = m.received_in(&room);
        let payloads: Vec<String> = got.iter().map(|(_, _, p)| p.clone()).collect();
        assert_eq!(payloads, sent, "{}: not in the order sent", m.label);
        let positions: Vec<(u64, u64)> = got.iter().map(|(e, s, _)| (*e, *s)).collect();
        let acked: Vec<(u64, u64)> = acks.iter().map(|a| (a.epoch, a.seq)).collect();
        assert_eq!(
            positions, acked,
            "{}: not at the acknowledged positions",
            m.label
        );
    }
    let forwarded = n1.metric("roomwire_mesh_forwarded_publishes_total").await - forwarded_before;
    let requests = n1.metric("roomwire_mesh_forward_requests_total").await - requests_before;
    // Each attempt counts: a re-sent request (a slow owner) would add to it.
    assert!(
        forwarded >= N as f64,
        "{forwarded} of {N} publishes forwarded"
    );
    assert!(
        requests < forwarded,
        "{forwarded} publishes took {requests} requests: none travelled together"
    );
    eprintln!("pipelined: {N} publishes in {requests} requests to the owner");

    // A client that publishes and closes at once, waiting for no acknowledgement: what the node
    // read is still sequenced, in the order sent.
    let hasty = n1.client("hasty").await;
    let more: Vec<String> = (0..100).map(|i| format!("h#{i}")).collect();
    for (i, p) in more.iter().enumerate() {
        hasty
            .send(roomwire::proto::ClientFrame {
                request_id: 1_000 + i as u64,
                kind: Some(roomwire::proto::client_frame::Kind::Publish(
                    proto::Publish {
                        room: room.clone(),
                        payload: p.clone().into(),
                        client_msg_id: p.clone(),
                        unreliable: false,
                    },
                )),
            })
            .await
            .unwrap();
    }
    hasty.close().await;
    for m in &members {
        eventually(
            &format!("{} receives the hasty client's 100", m.label),
            || async { m.received_in(&room).len() >= N + more.len() },
        )
        .await;
        let tail: Vec<String> = m.received_in(&room)[N..]
            .iter()
            .map(|(_, _, p)| p.clone())
            .collect();
        assert_eq!(tail, more, "{}: the hasty client's publishes", m.label);
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness, standalone mode, the harness itself, regions/
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_mesh_node_is_ready_only_once_connected_to_nats_and_settled() {
    let mut nats = NatsServer::start().await;
    nats.kill();
    let node = NodeProcess::mesh("lonely", "local", &[nats.url()]).await;
    // With no NATS the node serves HTTP but never reports ready: watch it for well over
    // settle_ms (0.6 s).
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert_eq!(node.readyz().await, Some(503), "ready without NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cluster = node.cluster(None).await;
    assert_eq!(cluster["mode"], "mesh", "{cluster}");
    assert_eq!(cluster["ready"], false, "{cluster}");
    assert_eq!(cluster["nats"]["connected"], false, "{cluster}");

    nats.restart().await;
    node.wait_ready().await;
    let cluster = node.cluster(Some("chat.x")).await;
    assert_eq!(cluster["node"]["id"], "lonely", "{cluster}");
    assert_eq!(cluster["node"]["region"], "local", "{cluster}");
    assert_eq!(cluster["ready"], true, "{cluster}");
    assert_eq!(cluster["nats"]["connected"], true, "{cluster}");
    assert_eq!(cluster["owner"]["room"], "chat.x", "{cluster}");
    assert_eq!(cluster["owner"]["node"], "lonely", "{cluster}");
    assert_eq!(cluster["owner"]["region"], "local", "{cluster}");
    assert!(
        cluster["ring"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_hexdigit())),
        "{cluster}"
    );
    assert!(cluster["ring"]["changes"].as_u64().is_some(), "{cluster}");
    assert_eq!(node.ring().await, [("lonely".into(), "active".into())]);
    // The cluster status is an API route: it needs the key.
    let (status, _) = http_request(node.addr, "GET", "/api/v1/cluster", None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_node_without_nats_urls_runs_standalone() {
    let node = NodeProcess::start("solo", "local", &[]).await;
    node.wait_ready().await;
    let cluster = node.cluster(Some("chat.x")).await;
    assert_eq!(cluster["mode"], "standalone", "{cluster}");
    assert_eq!(cluster["node"]["id"], "solo", "{cluster}");
    assert_eq!(cluster["ready"], true, "{cluster}");
    assert_eq!(cluster["owner"]["node"], "solo", "{cluster}");
    // And it works as a standalone node does.
    let member = Member::join(&node, "alice", "chat.x").await;
    let bob = node.client("bob").await;
    let s = publish_until_acked(&bob, "bob", "chat.x", "hello").await;
    wait_received(&[&member], &[s]).await;
}

#[tokio::test]
async fn the_nats_harness_restarts_on_the_same_port_and_joins_gateways() {
    // Three regions: a message published in eu reaches a subscriber in ap through the gateway,
    // also after eu was killed and restarted (clients reconnect to the same URL).
    let mut regions = NatsServer::start_gateways(&["eu", "us", "ap"]).await;
    assert_eq!(
        regions.iter().map(|r| r.name()).collect::<Vec<_>>(),
        ["eu", "us", "ap"]
    );
    let eu = async_nats::connect(regions[0].url()).await.unwrap();
    let ap = async_nats::connect(regions[2].url()).await.unwrap();
    let mut sub = ap.subscribe("harness.check").await.unwrap();
    ap.flush().await.unwrap();
    let mut delivered = async || {
        // Gateway interest spreads asynchronously: publish until one arrives.
        let deadline = Instant::now() + DEADLINE;
        loop {
            eu.publish("harness.check", "ping".into()).await.unwrap();
            let _ = eu.flush().await;
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                return m.payload;
            }
            assert!(Instant::now() < deadline, "no message across the gateway");
        }
    };
    assert_eq!(&delivered().await[..], b"ping");

    let url = regions[0].url();
    regions[0].kill();
    assert!(!regions[0].is_running());
    eventually("the eu client notices", || async {
        eu.connection_state() != async_nats::connection::State::Connected
    })
    .await;
    regions[0].restart().await;
    assert_eq!(regions[0].url(), url);
    eventually("the eu client reconnects", || async {
        eu.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    assert_eq!(&delivered().await[..], b"ping");

    // Servers started at the same time get distinct ports.
    let (a, b) = tokio::join!(NatsServer::start(), NatsServer::start());
    assert_ne!(a.url(), b.url());
}

#[tokio::test]
async fn the_region_files_are_valid_and_consistent() {
    let regions = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regions");
    let mut listen_ports = HashSet::new();
    for name in ["eu", "us", "ap"] {
        // The node config is accepted as a whole...
        let toml = regions.join(format!("{name}.toml"));
        let out = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&toml)
            .arg("--print-config")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            toml.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let config: roomwire::Config =
            toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(config.node.region, name);
        assert_eq!(
            config.mesh.nats_urls.len(),
            1,
            "{name}: one NATS server per region"
        );
        for addr in config
            .server
            .listen
            .iter()
            .chain(&config.webtransport.listen)
        {
            assert!(
                listen_ports.insert((addr.port(), addr.ip())),
                "{name}: {addr} is used by another region"
            );
        }
        // ...and the NATS config it points at parses and listens where the node looks.
        let conf = regions.join(format!("{name}.nats.conf"));
        let out = std::process::Command::new(nats_server_bin())
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            conf.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&conf).unwrap();
        let port = config.mesh.nats_urls[0]
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("listen") && l.contains(&port)),
            "{name}: the node connects to port {port}, which {} does not listen on",
            conf.display()
        );
        for peer in ["eu", "us", "ap"].iter().filter(|p| **p != name) {
            assert!(
                text.contains(&format!("name: {peer}")),
                "{}: no gateway to {peer}",
                conf.display()
            );
        }
    }
    // The one-command topology script at least parses.
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(regions.join("run.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
