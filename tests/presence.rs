//! Presence, end to end with real clients: who is in a room (one entry per user, sessions
//! merged, across nodes), diffs batched per interval, the grace period that keeps a reload or a
//! moved session from being a leave and a join, a dead node's members leaving within the
//! documented bound, the class settings (off, list cap, info size), and the HTTP API.
//!
//! Every watcher keeps a view the way a client should: the snapshot (every page), then the
//! diffs in version order, fetching the snapshot again on a new epoch, a gap or a reset. Every
//! wait is on a condition with a deadline.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mesh::rooms_owned_by;
use common::nats::NatsServer;
use common::node_process::{NodeProcess, wait_converged};
use common::*;
use futures_util::StreamExt;
use roomwire::client::{Client, ClientError, Event, JoinOptions};
use roomwire::config::{HistoryMode, RoomClass};
use roomwire::proto::{ErrorCode, PresenceDiff};
use tokio::time::Instant;

/// What a watcher knows of a room's presence.
#[derive(Debug, Default)]
struct View {
    epoch: u64,
    version: u64,
    /// User → sessions.
    users: BTreeMap<String, u32>,
    info: BTreeMap<String, String>,
    /// Every diff received, in order.
    diffs: Vec<PresenceDiff>,
    /// Snapshots fetched (the first, then one per reset, epoch change or gap).
    snapshots: usize,
}

impl View {
    fn leaves_of(&self, user: &str) -> usize {
        self.diffs
            .iter()
            .flat_map(|d| &d.left)
            .filter(|u| *u == user)
            .count()
    }
}

/// A session in a room with its presence diffs, keeping a [`View`].
struct Watcher {
    label: String,
    view: Arc<Mutex<View>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn join(url: &str, user: &str, room: &str, info: &str) -> Watcher {
        let client = Client::connect(url, roomwire::client::ClientOptions::user(user))
            .await
            .expect("watcher connects");
        let options = JoinOptions {
            presence_events: true,
            presence_info: info.as_bytes().to_vec().into(),
            ..JoinOptions::default()
        };
        client.join_with(room, options).await.expect("joins");
        let view = Arc::new(Mutex::new(View::default()));
        let task = tokio::spawn(watch(client, room.to_string(), view.clone()));
        Watcher {
            label: format!("{user}@{url}"),
            view,
            task,
        }
    }

    fn users(&self) -> BTreeMap<String, u32> {
        self.view.lock().unwrap().users.clone()
    }

    /// Waits until the view equals `want` (user → sessions).
    async fn wait_for(&self, want: &[(&str, u32)], within: Duration) {
        let want: BTreeMap<String, u32> = want.iter().map(|(u, n)| (u.to_string(), *n)).collect();
        let deadline = Instant::now() + within;
        loop {
            if self.users() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: presence is {:?}, expected {want:?} ({} diffs)",
                self.label,
                self.users(),
                self.view.lock().unwrap().diffs.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `user` has left this view; the time it took.
    async fn wait_gone(&self, user: &str, within: Duration) -> Duration {
        let started = Instant::now();
        while self.users().contains_key(user) {
            assert!(
                started.elapsed() < within,
                "{}: {user} still present after {within:?}: {:?}",
                self.label,
                self.users()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps `view` up to date from the session's presence diffs.
async fn watch(mut client: Client, room: String, view: Arc<Mutex<View>>) {
    let mut stale = true;
    loop {
        if stale {
            match client.presence(&room).await {
                Ok(snapshot) => {
                    let mut v = view.lock().unwrap();
                    (v.epoch, v.version) = (snapshot.epoch, snapshot.version);
                    v.users = snapshot
                        .members
                        .iter()
                        .map(|m| (m.user_id.clone(), m.sessions))
                        .collect();
                    v.info = snapshot
                        .members
                        .iter()
                        .map(|m| (m.user_id.clone(), String::from_utf8_lossy(&m.info).into()))
                        .collect();
                    v.snapshots += 1;
                    stale = false;
                }
                Err(ClientError::Refused { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => break,
            }
        }
        let Some(event) = client.next_event().await else {
            break;
        };
        let Event::PresenceDiff(diff) = event else {
            if matches!(event, Event::Closed { .. }) {
                break;
            }
            continue;
        };
        let mut v = view.lock().unwrap();
        v.diffs.push(diff.clone());
        if diff.epoch == v.epoch && diff.version <= v.version {
            continue;
        }
        if diff.reset || diff.epoch != v.epoch || diff.version != v.version + 1 {
            stale = true;
            continue;
        }
        v.version = diff.version;
        for m in &diff.joined {
            v.users.insert(m.user_id.clone(), m.sessions);
            v.info
                .insert(m.user_id.clone(), String::from_utf8_lossy(&m.info).into());
        }
        for user in &diff.left {
            v.users.remove(user);
            v.info.remove(user);
        }
    }
}

/// A plain member of `room` (present, no diffs), with `info`.
async fn member(url: &str, user: &str, room: &str, info: &str) -> Client {
    let client = Client::connect(url, roomwire::client::ClientOptions::user(user))
        .await
        .expect("member connects");
    let options = JoinOptions {
        presence_info: info.as_bytes().to_vec().into(),
        ..JoinOptions::default()
    };
    client.join_with(room, options).await.expect("member joins");
    client
}

fn refused_code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const INTERVAL_MS: u64 = 100;
const GRACE_MS: u64 = 1_000;

fn class(name: &str, pattern: &str, presence: bool, list_max: usize) -> RoomClass {
    RoomClass {
        name: name.into(),
        pattern: pattern.into(),
        history: HistoryMode::None,
        max_messages: 0,
        max_age_ms: 0,
        max_bytes: 1024,
        presence,
        presence_list_max: list_max,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_merges_sessions_holds_leaves_for_the_grace_and_applies_the_class() {
    let node = TestNode::start_with(|c| {
        c.rooms.presence_interval_ms = INTERVAL_MS;
        c.rooms.presence_grace_ms = GRACE_MS;
        c.rooms.presence_info_max_bytes = 16;
        c.rooms.classes = vec![
            class("quiet", "quiet.>", false, 1_000),
            class("small", "small.>", true, 2),
            class("chat", ">", true, 1_000),
        ];
    })
    .await;
    let started = Instant::now();
    let url = node.ws_url();
    let room = "chat.presence";
    let w = Watcher::join(&url, "watcher", room, "").await;
    // alice in two tabs, bob once.
    let alice1 = member(&url, "alice", room, "Alice").await;
    let alice2 = member(&url, "alice", room, "").await;
    let bob = member(&url, "bob", room, "Bob").await;
    w.wait_for(
        &[("alice", 2), ("bob", 1), ("watcher", 1)],
        Duration::from_secs(10),
    )
    .await;
    let snapshot = alice1.presence(room).await.unwrap();
    let info: Vec<(String, String)> = snapshot
        .members
        .iter()
        .map(|m| (m.user_id.clone(), String::from_utf8_lossy(&m.info).into()))
        .collect();
    assert_eq!(
        info,
        [
            ("alice".into(), "Alice".into()),
            ("bob".into(), "Bob".into()),
            ("watcher".into(), String::new())
        ],
        "one entry per user; an empty info keeps the one set before"
    );
    let stats = bob.presence_stats(room).await.unwrap();
    assert_eq!((stats.users, stats.sessions), (3, 4));

    // A reload: alice's second tab leaves and comes back within the grace: no leave, no join.
    alice2.close().await;
    w.wait_for(
        &[("alice", 1), ("bob", 1), ("watcher", 1)],
        Duration::from_secs(5),
    )
    .await;
    let alice2 = member(&url, "alice", room, "").await;
    w.wait_for(
        &[("alice", 2), ("bob", 1), ("watcher", 1)],
        Duration::from_secs(5),
    )
    .await;
    alice1.close().await;
    alice2.close().await;
    let _alice = member(&url, "alice", room, "").await;
    tokio::time::sleep(Duration::from_millis(GRACE_MS + 3 * INTERVAL_MS)).await;
    {
        let v = w.view.lock().unwrap();
        assert_eq!(
            v.leaves_of("alice"),
            0,
            "a return within the grace is no leave"
        );
        assert_eq!(v.users.get("alice"), Some(&1));
    }

    // bob leaves for good: gone once the grace has passed, not before.
    bob.close().await;
    let took = w.wait_gone("bob", Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(GRACE_MS - INTERVAL_MS),
        "bob left after {took:?}, before the grace of {GRACE_MS} ms"
    );
    assert_eq!(w.view.lock().unwrap().leaves_of("bob"), 1);

    // Diffs are batched: one per interval at most.
    let diffs = w.view.lock().unwrap().diffs.len();
    let bound = (started.elapsed().as_millis() as u64 / INTERVAL_MS) as usize + 2;
    assert!(
        diffs > 0 && diffs <= bound,
        "{diffs} diffs, at most {bound}"
    );

    // The HTTP API lists and counts the same.
    let (status, body) = http_request(
        node.addr,
        "GET",
        "/api/v1/rooms/chat.presence/presence",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["users"], 2, "{body}");
    assert_eq!(body["members"][0]["user"], "alice", "{body}");
    let (status, body) = http_request(
        node.addr,
        "GET",
        "/api/v1/rooms/chat.presence/presence/stats",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sessions\":2"), "{body}");
    let (status, _) = http_request(
        node.addr,
        "GET",
        "/api/v1/rooms/quiet.x/presence",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The class decides: no presence, a list cap, the size of the info.
    let probe = node.client("probe").await;
    assert_eq!(
        refused_code(probe.presence_stats("quiet.room").await),
        ErrorCode::PresenceOff
    );
    let mut s1 = node.client("s1").await;
    let with_diffs = JoinOptions {
        presence_events: true,
        ..JoinOptions::default()
    };
    s1.join_with("small.room", with_diffs).await.unwrap();
    let _s2 = member(&url, "s2", "small.room", "").await;
    let _s3 = member(&url, "s3", "small.room", "").await;
    // Above the class's cap the diffs carry the counts only.
    let truncated = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s1.next_event().await {
                Some(Event::PresenceDiff(d)) if d.users == 3 => break d,
                Some(_) => {}
                None => panic!("s1's session ended"),
            }
        }
    })
    .await
    .expect("a diff with the three users");
    assert!(
        truncated.truncated && truncated.joined.is_empty(),
        "{truncated:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = probe.presence_stats("small.room").await.unwrap();
        if stats.users == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "small.room stats: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refused_code(probe.presence_page("small.room", "", 0).await),
        ErrorCode::PresenceTooLarge
    );
    let too_long = JoinOptions {
        presence_info: vec![b'x'; 17].into(),
        ..JoinOptions::default()
    };
    assert_eq!(
        refused_code(probe.join_with("chat.presence", too_long).await),
        ErrorCode::PayloadTooLarge
    );
}

/// A token's `info` claim is the member's presence info (the issuer's word: a Join cannot
/// replace it); above the room's cap a presence Join is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_info_claim_is_the_presence_info_and_a_join_cannot_replace_it() {
    const SECRET: &str = "presence-test-secret-of-32-bytes!!";
    let node = TestNode::start_with(|c| {
        c.auth.mode = roomwire::config::AuthMode::Jwt;
        c.auth.jwt.secret = Some(SECRET.into());
        c.rooms.presence_interval_ms = INTERVAL_MS;
        c.rooms.presence_info_max_bytes = 32;
        c.rooms.classes = vec![
            class("quiet", "quiet.>", false, 1_000),
            class("chat", ">", true, 1_000),
        ];
    })
    .await;
    let token = |sub: &str, info: Option<serde_json::Value>| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = serde_json::json!({
            "sub": sub, "aud": "roomwire", "iat": now, "exp": now + 300,
            "jti": roomwire::random_hex(8), "rooms": { "join": [">"], "publish": [">"] },
        });
        if let Some(info) = info {
            claims["info"] = info;
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let connect = |token: String| {
        let url = node.ws_url();
        async move {
            Client::connect(&url, roomwire::client::ClientOptions::user(&token))
                .await
                .expect("connects with its token")
        }
    };
    let room = "chat.badges";
    let claimed = |info: &str| JoinOptions {
        presence_info: info.as_bytes().to_vec().into(),
        ..JoinOptions::default()
    };
    let alice = connect(token("alice", Some(serde_json::json!({"name": "Alice"})))).await;
    alice
        .join_with(room, claimed("I am the admin"))
        .await
        .expect("alice joins");
    let bob = connect(token("bob", None)).await;
    bob.join_with(room, claimed("Bob"))
        .await
        .expect("bob joins");
    let carol = connect(token("carol", Some(serde_json::json!("Carol")))).await;
    carol
        .join_with(room, claimed(""))
        .await
        .expect("carol joins");
    let want: Vec<(String, String)> = vec![
        ("alice".into(), r#"{"name":"Alice"}"#.into()),
        ("bob".into(), "Bob".into()),
        ("carol".into(), "Carol".into()),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = bob.presence(room).await.unwrap();
        let seen: Vec<(String, String)> = page
            .members
            .iter()
            .map(|m| (m.user_id.clone(), String::from_utf8_lossy(&m.info).into()))
            .collect();
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence is {seen:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An info claim above rooms.presence_info_max_bytes: presence rooms refuse the Join with
    // the reason, rooms without presence do not use it and take it.
    let long = connect(token("dave", Some(serde_json::json!("d".repeat(40))))).await;
    match long.join_with(room, JoinOptions::default()).await {
        Err(ClientError::Refused { code, message, .. }) => {
            assert_eq!(code, ErrorCode::PayloadTooLarge);
            assert!(message.contains("info claim"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    long.join("quiet.room").await.expect("no presence, no cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_joins_are_batched_per_interval_and_counted_exactly() {
    const MEMBERS: usize = 5_000;
    const INTERVAL: u64 = 250;
    let node = TestNode::start_with(|c| {
        c.rooms.presence_interval_ms = INTERVAL;
        c.rooms.classes = vec![class("big", ">", true, 10_000)];
        c.limits.connections_per_ip_per_second = 100_000;
        c.limits.connection_burst_per_ip = 100_000;
        c.limits.max_connections_per_ip = 100_000;
    })
    .await;
    let url = node.ws_url();
    let room = "big.room";
    let started = Instant::now();
    let watchers = [
        Watcher::join(&url, "w0", room, "").await,
        Watcher::join(&url, "w1", room, "").await,
    ];
    // Every member asks for diffs too: each counts the frames it gets.
    let counts: Vec<Arc<Mutex<usize>>> = (0..MEMBERS).map(|_| Arc::default()).collect();
    let mut clients = Vec::new();
    let mut joining = futures_util::stream::iter((0..MEMBERS).map(|i| {
        let url = url.clone();
        async move {
            let client = Client::connect(
                &url,
                roomwire::client::ClientOptions::user(&format!("u{i}")),
            )
            .await
            .expect("member connects");
            let options = JoinOptions {
                presence_events: true,
                ..JoinOptions::default()
            };
            client.join_with(room, options).await.expect("member joins");
            (i, client)
        }
    }))
    .buffer_unordered(64);
    let mut tasks = Vec::new();
    while let Some((i, mut client)) = joining.next().await {
        let count = counts[i].clone();
        tasks.push(tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                if matches!(event, Event::PresenceDiff(_)) {
                    *count.lock().unwrap() += 1;
                }
            }
        }));
        clients.push(i);
    }
    let joined_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = node.client("probe").await;
    loop {
        let stats = probe.presence_stats(room).await.unwrap();
        if stats.users as usize == MEMBERS + 2 {
            assert_eq!(stats.sessions as usize, MEMBERS + 2, "sessions exact");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats never reached {}: {stats:?}",
            MEMBERS + 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in &watchers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.users().len() != MEMBERS + 2 {
            assert!(
                Instant::now() < deadline,
                "{} sees {} users",
                w.label,
                w.users().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Each member got at most one diff per interval since it joined (plus the one in flight).
    let elapsed = started.elapsed();
    let bound = (elapsed.as_millis() as u64 / INTERVAL) as usize + 2;
    let most = counts.iter().map(|c| *c.lock().unwrap()).max().unwrap();
    let total: usize = counts.iter().map(|c| *c.lock().unwrap()).sum();
    eprintln!(
        "PRESENCE_JOINS members={MEMBERS} joined_in_ms={} elapsed_ms={} diffs_max_per_member={most} bound={bound} diffs_total={total}",
        joined_in.as_millis(),
        elapsed.as_millis()
    );
    assert!(
        most <= bound,
        "a member got {most} diffs in {elapsed:?} (at most {bound})"
    );
    for w in &watchers {
        let diffs = w.view.lock().unwrap().diffs.len();
        assert!(
            diffs <= bound,
            "{} got {diffs} diffs (at most {bound})",
            w.label
        );
    }
    for task in tasks {
        task.abort();
    }
}

const IDS: [&str; 3] = ["n1", "n2", "n3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_show_one_presence_and_a_dead_or_drained_node_moves_no_one_twice() {
    let timings = [
        "rooms.presence_interval_ms=200",
        "rooms.presence_grace_ms=1500",
    ];
    let nats = NatsServer::start_gateways(&["eu", "us"]).await;
    let n1 = NodeProcess::mesh_with("n1", "eu", &[nats[0].url()], &timings).await;
    let mut n2 = NodeProcess::mesh_with("n2", "eu", &[nats[0].url()], &timings).await;
    let mut n3 = NodeProcess::mesh_with("n3", "us", &[nats[1].url()], &timings).await;
    wait_converged(&[&n1, &n2, &n3]).await;
    for n in [&n1, &n2, &n3] {
        n.wait_ready().await;
    }
    // Owned by n1, so the dead and drained nodes are reporters, not the owner.
    let room = &rooms_owned_by(&IDS, "n1", 1, "chat.presence")[0];
    let w1 = Watcher::join(&n1.ws_url(), "w1", room, "").await;
    let w3 = Watcher::join(&n3.ws_url(), "w3", room, "").await;
    let _w2 = Watcher::join(&n2.ws_url(), "w2", room, "").await;
    // dana in two tabs on two nodes of two regions; erin on n2.
    let _dana1 = member(&n1.ws_url(), "dana", room, "Dana").await;
    let dana3 = member(&n3.ws_url(), "dana", room, "").await;
    let erin = member(&n2.ws_url(), "erin", room, "Erin").await;
    let everyone = [("dana", 2), ("erin", 1), ("w1", 1), ("w2", 1), ("w3", 1)];
    w1.wait_for(&everyone, Duration::from_secs(15)).await;
    w3.wait_for(&everyone, Duration::from_secs(15)).await;
    // A second room, owned by n2: when n2 dies, the next owner rebuilds its presence from the
    // nodes' reports and the watchers fetch it again (a reset), with no leave for who stayed.
    let moved = &rooms_owned_by(&IDS, "n2", 1, "chat.moved")[0];
    let m1 = Watcher::join(&n1.ws_url(), "m1", moved, "").await;
    let m3 = Watcher::join(&n3.ws_url(), "m3", moved, "").await;
    let _fay = member(&n1.ws_url(), "fay", moved, "").await;
    let _gus = member(&n2.ws_url(), "gus", moved, "").await;
    let in_moved = [("fay", 1), ("gus", 1), ("m1", 1), ("m3", 1)];
    m1.wait_for(&in_moved, Duration::from_secs(15)).await;
    m3.wait_for(&in_moved, Duration::from_secs(15)).await;
    assert_eq!(w3.view.lock().unwrap().info["dana"], "Dana");

    // erin's session moves from n2 to n3 (a reconnect within the grace): no leave, no join.
    erin.close().await;
    let _erin = member(&n3.ws_url(), "erin", room, "").await;
    tokio::time::sleep(Duration::from_millis(1_500 + 3 * 200)).await;
    w1.wait_for(&everyone, Duration::from_secs(5)).await;
    for w in [&w1, &w3] {
        let v = w.view.lock().unwrap();
        assert_eq!(
            v.leaves_of("erin"),
            0,
            "{}: erin moved, did not leave",
            w.label
        );
    }

    // kill -9 n2: w2 leaves everyone's presence within node death + grace (+ an interval).
    let killed = Instant::now();
    n2.kill9();
    let bound = Duration::from_millis(1_200 + 1_500 + 2 * 200) + Duration::from_secs(2);
    let took = w1.wait_gone("w2", bound).await;
    w3.wait_gone("w2", bound).await;
    eprintln!(
        "PRESENCE_NODE_DEATH left after {} ms (node_ttl 1200 + grace 1500 + interval 200)",
        killed.elapsed().as_millis().max(took.as_millis())
    );
    let after_kill = [("dana", 2), ("erin", 1), ("w1", 1), ("w3", 1)];
    w1.wait_for(&after_kill, Duration::from_secs(5)).await;
    let rebuilt = [("fay", 1), ("m1", 1), ("m3", 1)];
    for m in [&m1, &m3] {
        m.wait_for(&rebuilt, bound).await;
        let v = m.view.lock().unwrap();
        assert!(
            v.snapshots >= 2 && v.diffs.iter().any(|d| d.reset),
            "{}: the rebuilt presence was not fetched again after a reset ({} snapshots)",
            m.label,
            v.snapshots
        );
        for user in ["fay", "m1", "m3"] {
            assert_eq!(v.leaves_of(user), 0, "{}: {user} stayed", m.label);
        }
    }
    drop((m1, m3));

    // Drain n3: its sessions move to n1 as a client does on GoAway; no one leaves.
    let leaves_before = |w: &Watcher| {
        let v = w.view.lock().unwrap();
        ["dana", "erin", "w3"].map(|u| v.leaves_of(u))
    };
    let before = leaves_before(&w1);
    let drain = tokio::spawn(async move { n3.sigterm().await });
    drop(w3);
    dana3.close().await;
    let _w3 = Watcher::join(&n1.ws_url(), "w3", room, "").await;
    let _dana = member(&n1.ws_url(), "dana", room, "").await;
    let _erin = member(&n1.ws_url(), "erin", room, "").await;
    drain.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500 + 3 * 200)).await;
    w1.wait_for(&after_kill, Duration::from_secs(5)).await;
    assert_eq!(
        leaves_before(&w1),
        before,
        "a drain moved sessions without leaves"
    );
}
