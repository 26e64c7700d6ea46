//! History and resume on one node: a member that comes back with its position gets exactly what
//! it missed, then live messages (over the other transport too, by Join or by Connect.resume);
//! a position older than what the room keeps is a reset naming the oldest position; History
//! pages in both directions, over the protocol and the HTTP API; a huge catch-up is paced by the
//! session's send queue instead of cutting it off as a slow consumer.

mod common;

use std::sync::Arc;

use common::*;
use roomwire::client::{Client, ClientOptions, Event};
use roomwire::config::{HistoryMode, RoomClass};
use roomwire::proto::{self, ErrorCode};

fn class(name: &str, pattern: &str, history: HistoryMode, max_messages: u64) -> RoomClass {
    RoomClass {
        name: name.into(),
        pattern: pattern.into(),
        history,
        max_messages,
        max_age_ms: 3_600_000,
        max_bytes: 64 * 1024 * 1024,
        presence: false,
        presence_list_max: 1_000,
    }
}

/// Publishers here send thousands of frames a second.
fn unthrottled(config: &mut roomwire::Config) {
    config.limits.session_frames_per_second = 1_000_000;
    config.limits.session_frame_burst = 1_000_000;
}

/// A node whose `kept.*` rooms keep 50 messages, `big.*` 200,000, `none.*` none, and every other
/// room 5,000.
async fn node() -> TestNode {
    TestNode::start_with(|config| {
        unthrottled(config);
        config.rooms.classes = vec![
            class("kept", "kept.*", HistoryMode::Memory, 50),
            class("big", "big.*", HistoryMode::Durable, 200_000),
            class("none", "none.*", HistoryMode::None, 0),
            class("rooms", ">", HistoryMode::Durable, 5_000),
        ];
    })
    .await
}

/// Publishes `count` messages `"{prefix}{i}"` to `room` from `publishers` concurrent tasks, each
/// waiting for its acks; returns the acknowledged (seq, payload) in sequence order.
async fn publish_many(
    publisher: &Arc<Client>,
    room: &str,
    prefix: &str,
    count: usize,
) -> Vec<(u64, String)> {
    const TASKS: usize = 8;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = publisher.clone();
        let (room, prefix) = (room.to_string(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in (t..count).step_by(TASKS) {
                let payload = format!("{prefix}{i}");
                let ack = client
                    .publish(&room, payload.clone(), &format!("{prefix}-{i}"))
                    .await
                    .expect("publish acknowledged");
                acked.push((ack.seq, payload));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked.sort();
    acked
}

/// The next `n` Message events of `room` (any other event fails the test).
async fn messages(client: &mut Client, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = next_message(client).await;
        out.push((m.seq, String::from_utf8(m.payload.to_vec()).unwrap()));
    }
    out
}

fn outcome(joined: &proto::Joined) -> proto::Recovery {
    joined
        .recovery
        .expect("a Joined after a position says what became of it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_comes_back_gets_exactly_what_it_missed_then_live_messages() {
    let node = node().await;
    let publisher = Arc::new(node.client("bob").await);
    let mut alice = node.client("alice").await;
    let joined = alice.join("chat.lobby").await.unwrap();
    assert!(
        joined.recovery.is_none(),
        "a plain join carries no recovery"
    );
    let first = publish_many(&publisher, "chat.lobby", "before-", 5).await;
    assert_eq!(messages(&mut alice, 5).await, first);
    let epoch = joined.epoch;
    alice.close().await;

    // 1,000 messages go by while alice is away; she comes back over WebTransport.
    let missed = publish_many(&publisher, "chat.lobby", "missed-", 1_000).await;
    let mut alice = node.wt_client("alice").await;
    let joined = alice
        .join_since("chat.lobby", Some((epoch, 5)))
        .await
        .unwrap();
    let recovery = outcome(&joined);
    assert!(recovery.recovered, "{recovery:?}");
    assert_eq!(recovery.replayed, 1_000);
    assert_eq!((joined.epoch, joined.seq), (epoch, 1_005));
    assert_eq!(
        messages(&mut alice, 1_000).await,
        missed,
        "in order, no gap"
    );

    let live = publish_many(&publisher, "chat.lobby", "live-", 3).await;
    assert_eq!(
        messages(&mut alice, 3).await,
        live,
        "then live, no duplicate"
    );

    // One that missed nothing is recovered with nothing replayed.
    let mut carol = node.client("carol").await;
    let joined = carol
        .join_since("chat.lobby", Some((epoch, 1_008)))
        .await
        .unwrap();
    assert_eq!(outcome(&joined).replayed, 0);
    assert!(outcome(&joined).recovered);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), carol.next_event())
            .await
            .is_err(),
        "nothing replayed"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_position_older_than_what_is_kept_is_a_reset_naming_the_oldest_kept() {
    let node = node().await;
    let publisher = Arc::new(node.client("bob").await);
    let joined = publisher.join("kept.a").await.unwrap();
    publish_many(&publisher, "kept.a", "m", 80).await;
    let epoch = joined.epoch;

    let mut alice = node.client("alice").await;
    let joined = alice.join_since("kept.a", Some((epoch, 10))).await.unwrap();
    let recovery = outcome(&joined);
    assert!(
        !recovery.recovered,
        "messages 11..30 are gone: {recovery:?}"
    );
    assert_eq!((recovery.oldest_epoch, recovery.oldest_seq), (epoch, 31));
    assert_eq!(recovery.replayed, 0);
    assert_eq!(joined.seq, 80);
    // Nothing was replayed: the next message is live.
    publish_many(&publisher, "kept.a", "live", 1).await;
    assert_eq!(next_message(&mut alice).await.seq, 81);

    // Right at the edge, it is recovered.
    let mut dave = node.client("dave").await;
    let joined = dave.join_since("kept.a", Some((epoch, 31))).await.unwrap();
    assert!(outcome(&joined).recovered);
    assert_eq!(messages(&mut dave, 50).await.first().unwrap().0, 32);

    // Another epoch (or one from the future) is a reset too.
    let joined = alice
        .join_since("kept.a", Some((epoch + 1, 3)))
        .await
        .unwrap();
    assert!(!outcome(&joined).recovered);

    // A room that keeps nothing can only say whether nothing was missed.
    let joined = publisher.join("none.x").await.unwrap();
    publish_many(&publisher, "none.x", "n", 3).await;
    let erin = node.client("erin").await;
    let at = (joined.epoch, 3);
    assert!(outcome(&erin.join_since("none.x", Some(at)).await.unwrap()).recovered);
    let joined = erin.join_since("none.x", Some((at.0, 1))).await.unwrap();
    assert!(!outcome(&joined).recovered);
    assert_eq!(
        outcome(&joined).oldest_seq,
        3,
        "nothing kept: the room's position"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_resume_rejoins_every_room_over_the_other_transport_in_one_round_trip() {
    let node = node().await;
    let publisher = Arc::new(node.client("bob").await);
    let alice = node.wt_client("alice").await;
    let a = alice.join("chat.a").await.unwrap();
    let b = alice.join("chat.b").await.unwrap();
    alice.close().await;
    let missed_a = publish_many(&publisher, "chat.a", "a", 20).await;
    let missed_b = publish_many(&publisher, "chat.b", "b", 30).await;

    // Back over WebSocket, resuming both rooms and one she may not join.
    let resume = vec![
        proto::RoomPosition {
            room: "chat.a".into(),
            epoch: a.epoch,
            seq: a.seq,
        },
        proto::RoomPosition {
            room: "chat.b".into(),
            epoch: b.epoch,
            seq: b.seq,
        },
        proto::RoomPosition {
            room: "$user.carol".into(),
            epoch: 1,
            seq: 0,
        },
    ];
    let options = ClientOptions {
        resume,
        ..ClientOptions::user("alice")
    };
    let mut alice = Client::connect(&node.ws_url(), options).await.unwrap();
    let mut got = std::collections::BTreeMap::<String, Vec<(u64, String)>>::new();
    let mut joined = Vec::new();
    let mut errors = Vec::new();
    while joined.len() + errors.len() < 3 {
        match tokio::time::timeout(DEADLINE, alice.next_event())
            .await
            .unwrap()
        {
            Some(Event::Message(m)) => {
                let entry = got.entry(m.room.clone()).or_default();
                entry.push((m.seq, String::from_utf8(m.payload.to_vec()).unwrap()));
            }
            Some(Event::Joined(j)) => {
                let replayed = got.get(&j.room).map_or(0, Vec::len) as u64;
                assert_eq!(
                    outcome(&j).replayed,
                    replayed,
                    "every replayed message came first"
                );
                assert!(outcome(&j).recovered);
                joined.push(j.room);
            }
            Some(Event::Error(e)) => errors.push(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(joined, ["chat.a", "chat.b"]);
    assert_eq!(got["chat.a"], missed_a);
    assert_eq!(got["chat.b"], missed_b);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].room, "$user.carol", "the refused room is named");
    assert_eq!(errors[0].code, ErrorCode::ReservedRoom as i32);

    // Both rooms are joined: live messages follow.
    publisher.publish("chat.b", "live", "live-b").await.unwrap();
    assert_eq!(next_message(&mut alice).await.seq, b.seq + 31);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_message_catch_up_is_paced_not_cut_off() {
    const MISSED: usize = 100_000;
    // A small send queue: the replay must wait for it again and again.
    let node = TestNode::start_with(|config| {
        unthrottled(config);
        config.rooms.classes = vec![class("big", "big.*", HistoryMode::Durable, 200_000)];
        config.session.send_queue_frames = 256;
    })
    .await;
    // The publisher is no member: nothing it receives piles up unread.
    let publisher = Arc::new(node.client("bob").await);
    let first = publisher
        .publish("big.one", "first", "first")
        .await
        .unwrap();
    publish_many(&publisher, "big.one", "m", MISSED - 1).await;

    let options = ClientOptions {
        resume: vec![proto::RoomPosition {
            room: "big.one".into(),
            epoch: first.epoch,
            seq: 0,
        }],
        event_buffer: 64,
        ..ClientOptions::user("alice")
    };
    let mut alice = Client::connect(&node.ws_url(), options).await.unwrap();
    let mut expected = 1;
    loop {
        match tokio::time::timeout(DEADLINE, alice.next_event())
            .await
            .unwrap()
        {
            Some(Event::Message(m)) => {
                assert_eq!(m.seq, expected, "in order, no gap");
                expected += 1;
                // A reader slower than the node, now and then.
                if m.seq % 10_000 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            Some(Event::Joined(j)) => {
                assert_eq!(outcome(&j).replayed, MISSED as u64);
                assert!(outcome(&j).recovered);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(expected, MISSED as u64 + 1);
    assert_eq!(node.metric("roomwire_slow_consumer_drops_total"), 0.0);
    publisher.publish("big.one", "live", "live").await.unwrap();
    assert_eq!(next_message(&mut alice).await.seq, MISSED as u64 + 1);
    node.shutdown().await;
}

#[tokio::test]
async fn history_pages_back_and_forth_over_the_protocol_and_the_http_api() {
    let node = node().await;
    let publisher = Arc::new(node.client("bob").await);
    let joined = publisher.join("chat.h").await.unwrap();
    let sent = publish_many(&publisher, "chat.h", "h", 300).await;
    let epoch = joined.epoch;
    let seqs = |page: &proto::HistoryPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    // The newest, newest first, at most the node's page (128).
    let alice = node.client("alice").await;
    let page = alice.history("chat.h", None, None, 0).await.unwrap();
    assert_eq!(seqs(&page), (173..=300).rev().collect::<Vec<_>>());
    assert!(page.more);
    assert_eq!((page.epoch, page.seq), (epoch, 300));
    assert_eq!((page.oldest_epoch, page.oldest_seq), (epoch, 1));
    assert_eq!(page.messages[0].payload, sent[299].1.as_bytes());
    assert_eq!(page.messages[0].publisher, "bob");

    // Back from there, then forward from the start.
    let page = alice
        .history("chat.h", None, Some((epoch, 173)), 10)
        .await
        .unwrap();
    assert_eq!(seqs(&page), (163..=172).rev().collect::<Vec<_>>());
    let page = alice
        .history("chat.h", Some((epoch, 0)), None, 5)
        .await
        .unwrap();
    assert_eq!(seqs(&page), [1, 2, 3, 4, 5]);
    assert!(page.more);
    let page = alice
        .history("chat.h", Some((epoch, 295)), None, 50)
        .await
        .unwrap();
    assert_eq!(seqs(&page), [296, 297, 298, 299, 300]);
    assert!(!page.more);

    // Bad requests get error frames; the session goes on.
    let error = alice
        .history("chat.h", Some((epoch, 1)), Some((epoch, 5)), 5)
        .await
        .unwrap_err();
    assert_eq!(refused_code(&error), Some(ErrorCode::BadFrame));
    let error = alice.history("$user.bob", None, None, 5).await.unwrap_err();
    assert_eq!(refused_code(&error), Some(ErrorCode::ReservedRoom));
    let error = alice.history("bad room", None, None, 5).await.unwrap_err();
    assert_eq!(refused_code(&error), Some(ErrorCode::InvalidRoom));
    // A room nobody used: an empty page.
    let page = alice.history("chat.empty", None, None, 5).await.unwrap();
    assert!(page.messages.is_empty() && !page.more);

    // The HTTP API, with an API key.
    let path = format!("/api/v1/rooms/chat.h/history?after={epoch}:290&limit=3");
    let (status, body) = node.http("GET", &path, Some(API_KEY), None).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got: Vec<_> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["data"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, sent[290..293].to_vec());
    assert_eq!(body["more"], true);
    assert_eq!(body["seq"], 300);
    assert_eq!(body["oldest"]["seq"], 1);
    let (status, _) = node
        .http("GET", "/api/v1/rooms/chat.h/history", None, None)
        .await;
    assert_eq!(status, 401, "the API key is required");
    let (status, body) = node
        .http(
            "GET",
            "/api/v1/rooms/chat.h/history?before=x",
            Some(API_KEY),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// In a mesh: the owner's history serves members that come back on any node.
// ---------------------------------------------------------------------------------------------

mod mesh {
    use super::*;
    use common::mesh::rooms_owned_by;
    use common::nats::NatsServer;
    use common::node_process::{NodeProcess, wait_converged};

    const MEMORY: &str = r#"rooms.classes=[{name="rooms",pattern=">",history="memory",max_messages=5000,max_age_ms=3600000,max_bytes=67108864}]"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_resumes_on_another_node_with_exactly_what_it_missed() {
        let nats = NatsServer::start().await;
        let urls = [nats.url()];
        let n1 = NodeProcess::mesh_with("n1", "eu", &urls, &[MEMORY]).await;
        let n2 = NodeProcess::mesh_with("n2", "eu", &urls, &[MEMORY]).await;
        let n3 = NodeProcess::mesh_with("n3", "eu", &urls, &[MEMORY]).await;
        wait_converged(&[&n1, &n2, &n3]).await;
        // Owned by n3; alice is on n1, then on n2; the publisher on n2.
        let room = &rooms_owned_by(&["n1", "n2", "n3"], "n3", 1, "chat.mesh")[0];
        let publisher = Arc::new(n2.client("bob").await);
        let mut alice = n1.client("alice").await;
        let joined = alice.join(room).await.unwrap();
        let first = publish_many(&publisher, room, "before-", 5).await;
        assert_eq!(messages(&mut alice, 5).await, first);
        alice.close().await;

        let missed = publish_many(&publisher, room, "missed-", 1_000).await;
        let options = ClientOptions {
            resume: vec![proto::RoomPosition {
                room: room.clone(),
                epoch: joined.epoch,
                seq: 5,
            }],
            ..ClientOptions::user("alice")
        };
        // Live messages keep coming while she catches up: none is missed or repeated.
        let pump = {
            let publisher = publisher.clone();
            let room = room.clone();
            tokio::spawn(async move { publish_many(&publisher, &room, "during-", 200).await })
        };
        let mut alice = Client::connect(&n2.ws_url(), options).await.unwrap();
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, alice.next_event())
                .await
                .unwrap()
            {
                Some(Event::Message(m)) => {
                    got.push((m.seq, String::from_utf8(m.payload.to_vec()).unwrap()))
                }
                Some(Event::Joined(j)) => {
                    assert!(outcome(&j).recovered, "{j:?}");
                    assert_eq!(outcome(&j).replayed, got.len() as u64);
                    assert_eq!(j.seq, 5 + got.len() as u64);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let during = pump.await.unwrap();
        let rest = 1_200 - got.len();
        got.extend(messages(&mut alice, rest).await);
        let mut expected = missed;
        expected.extend(during);
        expected.sort();
        assert_eq!(
            got, expected,
            "exactly the missed messages, in order, then live ones"
        );

        // On the owner itself, by Join.
        let mut carol = n3.client("carol").await;
        let joined = carol
            .join_since(room, Some((joined.epoch, 1_000)))
            .await
            .unwrap();
        assert!(outcome(&joined).recovered);
        assert_eq!(outcome(&joined).replayed, 205);
        assert_eq!(messages(&mut carol, 205).await, expected[995..].to_vec());

        // History reads go to the owner.
        let page = alice.history(room, None, None, 3).await.unwrap();
        let seqs: Vec<_> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1_205, 1_204, 1_203]);
        assert_eq!(page.oldest_seq, 1);
    }

    const DURABLE: &str = r#"rooms.classes=[{name="tiny",pattern="tiny.*",history="durable",max_messages=50,max_age_ms=3600000,max_bytes=1048576},{name="rooms",pattern=">",history="durable",max_messages=5000,max_age_ms=3600000,max_bytes=67108864}]"#;

    /// Publishes `"{prefix}{i}"` for `i` in `0..count`, one at a time, retrying what is refused
    /// as retryable (a room whose owner is moving); the acknowledged `(epoch, seq, payload)`.
    async fn publish_retrying(
        client: &Client,
        room: &str,
        prefix: &str,
        count: usize,
    ) -> Vec<(u64, u64, String)> {
        let mut acked = Vec::new();
        for i in 0..count {
            let payload = format!("{prefix}{i}");
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                match client
                    .publish(room, payload.clone(), &format!("{prefix}-{i}"))
                    .await
                {
                    Ok(ack) => {
                        acked.push((ack.epoch, ack.seq, payload));
                        break;
                    }
                    Err(error) => {
                        assert!(tokio::time::Instant::now() < deadline, "{error}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        acked
    }

    /// The events after a resume until the room's `Joined`: `(epoch, seq, payload)` of each
    /// message, the epochs announced, and the `Joined`.
    async fn resumed(client: &mut Client) -> (Vec<(u64, u64, String)>, Vec<u64>, proto::Joined) {
        let mut got = Vec::new();
        let mut epochs = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, client.next_event())
                .await
                .unwrap()
            {
                Some(Event::Message(m)) => got.push((
                    m.epoch,
                    m.seq,
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                )),
                Some(Event::EpochChanged(e)) => epochs.push(e.epoch),
                Some(Event::Joined(j)) => return (got, epochs, j),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_history_outlives_its_owner_and_a_resume_bridges_the_new_epoch() {
        let nats = NatsServer::start().await;
        let urls = [nats.url()];
        let n1 = NodeProcess::mesh_with("n1", "eu", &urls, &[DURABLE]).await;
        let n2 = NodeProcess::mesh_with("n2", "eu", &urls, &[DURABLE]).await;
        let mut n3 = NodeProcess::mesh_with("n3", "eu", &urls, &[DURABLE]).await;
        wait_converged(&[&n1, &n2, &n3]).await;
        let room = &rooms_owned_by(&["n1", "n2", "n3"], "n3", 1, "chat.durable")[0];
        let publisher = n2.client("bob").await;
        let mut alice = n1.client("alice").await;
        alice.join(room).await.unwrap();
        let before = publish_retrying(&publisher, room, "before-", 5).await;
        let (e1, _, _) = before[0];
        assert_eq!(messages(&mut alice, 5).await.len(), 5);
        alice.close().await;

        // While alice is away: 300 messages, then the owner dies (its state with it), and 100
        // more go into the new owner's epoch.
        let missed = publish_retrying(&publisher, room, "missed-", 300).await;
        assert!(
            n3.metric("roomwire_history_appends_total{outcome=\"stored\"}")
                .await
                >= 305.0
        );
        n3.kill9();
        wait_converged(&[&n1, &n2]).await;
        let after = publish_retrying(&publisher, room, "after-", 100).await;
        let e2 = after[0].0;
        assert!(e2 > e1, "a new epoch after the owner died");
        assert_eq!(after[0].1, 1);

        // She resumes on another node, over WebTransport... (the other transport is covered on
        // one node; here the point is the store): exactly what she missed, across the epochs.
        let options = ClientOptions {
            resume: vec![proto::RoomPosition {
                room: room.clone(),
                epoch: e1,
                seq: 5,
            }],
            ..ClientOptions::user("alice")
        };
        let mut alice = Client::connect(&n2.ws_url(), options).await.unwrap();
        let (got, epochs, joined) = resumed(&mut alice).await;
        let mut expected = missed.clone();
        expected.extend(after.clone());
        assert_eq!(
            got, expected,
            "the missed messages of both epochs, in order"
        );
        assert_eq!(epochs, [e2], "the new epoch announced where it begins");
        assert!(outcome(&joined).recovered, "{joined:?}");
        assert_eq!(outcome(&joined).replayed, 400);
        assert_eq!((joined.epoch, joined.seq), (e2, 100));

        // History reads the stream from any node, across the epochs.
        let page = alice.history(room, None, None, 3).await.unwrap();
        let seqs: Vec<_> = page.messages.iter().map(|m| (m.epoch, m.seq)).collect();
        assert_eq!(seqs, [(e2, 100), (e2, 99), (e2, 98)]);
        assert_eq!((page.oldest_epoch, page.oldest_seq), (e1, 1));
        let page = alice.history(room, None, Some((e2, 2)), 3).await.unwrap();
        let seqs: Vec<_> = page.messages.iter().map(|m| (m.epoch, m.seq)).collect();
        assert_eq!(
            seqs,
            [(e2, 1), (e1, 305), (e1, 304)],
            "newest first, across the epochs"
        );
        let page = alice.history(room, Some((e1, 303)), None, 4).await.unwrap();
        let seqs: Vec<_> = page.messages.iter().map(|m| (m.epoch, m.seq)).collect();
        assert_eq!(seqs, [(e1, 304), (e1, 305), (e2, 1), (e2, 2)]);
        assert!(page.more);

        // A position older than the class keeps: a reset naming the oldest kept.
        let tiny = "tiny.one";
        let kept = publish_retrying(&publisher, tiny, "t-", 80).await;
        let carol = n1.client("carol").await;
        let joined = carol.join_since(tiny, Some((kept[0].0, 3))).await.unwrap();
        assert!(!outcome(&joined).recovered, "{joined:?}");
        let oldest = (outcome(&joined).oldest_epoch, outcome(&joined).oldest_seq);
        assert_eq!(oldest, (kept[30].0, kept[30].1), "the last 50 are kept");
    }

    /// A durable room's appends overlap (several in flight to JetStream at once), yet every
    /// member gets every acknowledged message once, in sequence order, and the stream holds
    /// exactly those, in that order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_appends_keep_a_durable_room_in_order_everywhere() {
        const EACH: usize = 400;
        let nats = NatsServer::start().await;
        let urls = [nats.url()];
        let n1 = NodeProcess::mesh_with("n1", "eu", &urls, &[DURABLE]).await;
        let n2 = NodeProcess::mesh_with("n2", "eu", &urls, &[DURABLE]).await;
        wait_converged(&[&n1, &n2]).await;
        let room = &rooms_owned_by(&["n1", "n2"], "n2", 1, "chat.overlap")[0];
        let mut near = n2.client("near").await;
        let mut far = n1.client("far").await;
        let epoch = near.join(room).await.unwrap().epoch;
        far.join(room).await.unwrap();
        // Two publishers of eight tasks each, one on the owner and one forwarding to it.
        let local = Arc::new(n2.client("local").await);
        let forwarded = Arc::new(n1.client("forwarded").await);
        let (a, b) = tokio::join!(
            publish_many(&local, room, "local-", EACH),
            publish_many(&forwarded, room, "forwarded-", EACH),
        );
        let mut acked = a;
        acked.extend(b);
        acked.sort();
        let seqs: Vec<u64> = acked.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=2 * EACH as u64).collect::<Vec<_>>(),
            "every acknowledged message has its own position, none skipped"
        );
        assert_eq!(messages(&mut near, 2 * EACH).await, acked, "on the owner");
        assert_eq!(
            messages(&mut far, 2 * EACH).await,
            acked,
            "on the other node"
        );

        let mut stored = Vec::new();
        let mut after = Some((epoch, 0));
        loop {
            let page = far.history(room, after, None, 100).await.unwrap();
            stored.extend(
                page.messages
                    .iter()
                    .map(|m| (m.seq, String::from_utf8(m.payload.to_vec()).unwrap())),
            );
            let Some(last) = page.messages.last() else {
                break;
            };
            after = Some((last.epoch, last.seq));
            if !page.more {
                break;
            }
        }
        assert_eq!(stored, acked, "the stream holds them in the same order");
        let appends = n2
            .metric("roomwire_history_appends_total{outcome=\"stored\"}")
            .await;
        assert!(appends >= 2.0 * EACH as f64, "{appends} appends stored");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_jetstream_nothing_is_acknowledged_and_history_survives_its_restart() {
        let mut nats = NatsServer::start().await;
        let urls = [nats.url()];
        let n1 = NodeProcess::mesh_with("n1", "eu", &urls, &[DURABLE]).await;
        let n2 = NodeProcess::mesh_with("n2", "eu", &urls, &[DURABLE]).await;
        wait_converged(&[&n1, &n2]).await;
        let publisher = n1.client("bob").await;
        let first = publish_retrying(&publisher, "chat.kept", "a-", 20).await;

        nats.kill();
        for node in [&n1, &n2] {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while node.readyz().await != Some(503) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} stays ready",
                    node.id
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        // A publish now is refused as retryable, never acknowledged without storage.
        match publisher.publish("chat.kept", "while-down", "down-1").await {
            Ok(ack) => panic!("acknowledged without JetStream: {ack:?}"),
            Err(error) => assert_eq!(
                refused_code(&error),
                Some(ErrorCode::Unavailable),
                "{error}"
            ),
        }
        nats.restart().await;
        nats.wait_jetstream().await;
        wait_converged(&[&n1, &n2]).await;
        let second = publish_retrying(&publisher, "chat.kept", "b-", 20).await;

        // Every acknowledged message is in the history, read on the other node.
        let reader = n2.client("reader").await;
        let page = reader.history("chat.kept", None, None, 100).await.unwrap();
        let mut got: Vec<_> = page
            .messages
            .iter()
            .map(|m| {
                (
                    m.epoch,
                    m.seq,
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                )
            })
            .collect();
        got.reverse();
        let acked: Vec<_> = first.iter().chain(&second).cloned().collect();
        assert_eq!(
            got, acked,
            "every acknowledged message, and nothing refused"
        );
    }

    const OFFLINE: &str = r#"rooms.classes=[{name="users",pattern="$user.>",history="durable",max_messages=100,max_age_ms=3000,max_bytes=1048576},{name="rooms",pattern=">",history="durable",max_messages=5000,max_age_ms=3600000,max_bytes=67108864}]"#;

    /// Sends `text` to `user` through the HTTP API of `node`.
    async fn send_to_user(node: &NodeProcess, user: &str, text: &str) {
        let body = format!(r#"{{"user":"{user}","data":"{text}","client_msg_id":"{text}"}}"#);
        let (status, response) = try_http_request(
            node.addr,
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(&body),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{response}");
    }

    /// Connects `device` of alice to `node`: the messages replayed to it in its user room and
    /// that room's `Joined`.
    async fn device(node: &NodeProcess, device: &str) -> (Client, Vec<String>, proto::Joined) {
        let options = ClientOptions {
            device_id: device.into(),
            ..ClientOptions::user("alice")
        };
        let mut client = Client::connect(&node.ws_url(), options).await.unwrap();
        let (got, _, joined) = resumed(&mut client).await;
        assert_eq!(joined.room, "$user.alice");
        let texts = got.into_iter().map(|(_, _, text)| text).collect();
        // Answered in order: every `seen` before it has been kept.
        client.ping().await.unwrap();
        (client, texts, joined)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_sent_to_an_absent_user_reach_each_device_once_then_expire() {
        let nats = NatsServer::start().await;
        let urls = [nats.url()];
        let n1 = NodeProcess::mesh_with("n1", "eu", &urls, &[OFFLINE]).await;
        let n2 = NodeProcess::mesh_with("n2", "eu", &urls, &[OFFLINE]).await;
        wait_converged(&[&n1, &n2]).await;
        // Her phone and laptop connected once; then she is away.
        for name in ["phone", "laptop"] {
            let (client, texts, joined) = device(&n1, name).await;
            assert!(texts.is_empty() && outcome(&joined).recovered);
            client.close().await;
        }
        for text in ["one", "two", "three"] {
            send_to_user(&n2, "alice", text).await;
        }

        // Each device gets them once, on any node.
        let (phone, texts, joined) = device(&n2, "phone").await;
        assert_eq!(texts, ["one", "two", "three"]);
        assert!(outcome(&joined).recovered);
        assert_eq!(outcome(&joined).replayed, 3);
        phone.close().await;
        let (laptop, texts, _) = device(&n1, "laptop").await;
        assert_eq!(texts, ["one", "two", "three"]);
        laptop.close().await;
        let (phone, texts, joined) = device(&n1, "phone").await;
        assert!(texts.is_empty(), "not again: {texts:?}");
        assert!(outcome(&joined).recovered);
        phone.close().await;
        // A device id that breaks the rule is refused.
        let options = ClientOptions {
            device_id: "no spaces".into(),
            ..ClientOptions::user("alice")
        };
        assert!(Client::connect(&n1.ws_url(), options).await.is_err());

        // Past the users' retention (3 s) what she was sent is gone.
        send_to_user(&n2, "alice", "four").await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let path = "/jsz?streams=true";
            let (_, body) = try_http_request(nats.monitoring_addr(), "GET", path, None, None)
                .await
                .unwrap();
            let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
            let kept: u64 = jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                .filter(|s| {
                    s["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("_history_users"))
                })
                .map(|s| s["state"]["messages"].as_u64().unwrap_or(0))
                .sum();
            if kept == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {kept} kept: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let (_phone, texts, joined) = device(&n2, "phone").await;
        assert!(texts.is_empty(), "expired: {texts:?}");
        assert!(!outcome(&joined).recovered, "a reset: {joined:?}");
    }
}
