//! Rooms over real WebSocket connections: ordering, acknowledgements, membership, routing.

mod common;

use common::*;
use roomwire::proto::ErrorCode;

#[tokio::test]
async fn two_clients_exchange_messages_in_order_and_acks_carry_the_sequence() {
    let node = TestNode::start().await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    let joined = alice.join("lobby").await.unwrap();
    assert_eq!((joined.room.as_str(), joined.seq), ("lobby", 0));
    bob.join("lobby").await.unwrap();

    let ack1 = alice.publish("lobby", "hello bob", "a1").await.unwrap();
    let ack2 = bob.publish("lobby", "hi alice", "b1").await.unwrap();
    assert_eq!((ack1.seq, ack2.seq), (1, 2));
    assert_eq!(ack1.epoch, ack2.epoch);
    assert_eq!(ack1.client_msg_id, "a1");

    for client in [&mut alice, &mut bob] {
        let m1 = next_message(client).await;
        let m2 = next_message(client).await;
        assert_eq!(
            (
                m1.seq,
                &m1.payload[..],
                m1.publisher.as_str(),
                m1.client_msg_id.as_str()
            ),
            (1, &b"hello bob"[..], "alice", "a1")
        );
        assert_eq!(
            (m2.seq, &m2.payload[..], m2.publisher.as_str()),
            (2, &b"hi alice"[..], "bob")
        );
        assert_eq!(m1.epoch, ack1.epoch);
        assert!(m1.server_time_ms > 0);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_members_see_five_hundred_messages_from_several_publishers_in_one_order() {
    const MEMBERS: usize = 50;
    const PUBLISHERS: usize = 5;
    const PER_PUBLISHER: usize = 100;
    let node = TestNode::start().await;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let client = node.client(&format!("member{i}")).await;
        client.join("busy").await.unwrap();
        members.push(client);
    }
    // The first PUBLISHERS members publish concurrently, each waiting for its own acks.
    let publishers: Vec<_> = members.drain(..PUBLISHERS).collect();
    let publishers: Vec<_> = publishers.into_iter().map(std::sync::Arc::new).collect();
    let mut tasks = Vec::new();
    for (p, client) in publishers.iter().enumerate() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_PUBLISHER {
                let ack = client
                    .publish("busy", format!("{p}:{i}"), &format!("{p}-{i}"))
                    .await
                    .unwrap();
                seqs.push(ack.seq);
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one publisher's acks grow"
        );
        acked.extend(seqs);
    }
    acked.sort();
    let total = PUBLISHERS * PER_PUBLISHER;
    assert_eq!(
        acked,
        (1..=total as u64).collect::<Vec<_>>(),
        "every seq assigned exactly once"
    );

    // Every member (publishers included) sees seq 1..=total, and the same payload at each seq.
    let mut reference: Option<Vec<bytes::Bytes>> = None;
    let publishers: Vec<_> = publishers
        .into_iter()
        .map(|p| std::sync::Arc::into_inner(p).unwrap())
        .collect();
    for mut client in members.into_iter().chain(publishers) {
        let mut payloads = Vec::with_capacity(total);
        for expected in 1..=total as u64 {
            let m = next_message(&mut client).await;
            assert_eq!(m.seq, expected, "no gap, no reorder");
            payloads.push(m.payload);
        }
        match &reference {
            None => reference = Some(payloads),
            Some(r) => assert_eq!(r, &payloads, "same order for every member"),
        }
    }
    // Within each publisher, its messages appear in the order it sent them.
    let order = reference.unwrap();
    for p in 0..PUBLISHERS {
        let own: Vec<usize> = order
            .iter()
            .filter_map(|b| {
                std::str::from_utf8(b)
                    .unwrap()
                    .split_once(':')
                    .filter(|(q, _)| *q == p.to_string())
                    .map(|(_, i)| i.parse().unwrap())
            })
            .collect();
        assert_eq!(own, (0..PER_PUBLISHER).collect::<Vec<_>>());
    }
    node.shutdown().await;
}

#[tokio::test]
async fn joined_reports_the_position_and_later_messages_follow_it() {
    let node = TestNode::start().await;
    let early = node.client("early").await;
    for i in 0..3 {
        early.publish("news", format!("old {i}"), "").await.unwrap();
    }
    let mut late = node.client("late").await;
    let joined = late.join("news").await.unwrap();
    assert_eq!(joined.seq, 3);
    early.publish("news", "new", "").await.unwrap();
    let m = next_message(&mut late).await;
    assert_eq!((m.seq, m.epoch), (4, joined.epoch));
    node.shutdown().await;
}

#[tokio::test]
async fn leave_stops_delivery_and_membership_errors_are_clear() {
    let node = TestNode::start_with(|c| c.session.max_rooms = 2).await;
    let mut a = node.client("a").await;
    let b = node.client("b").await;
    a.join("r1").await.unwrap();
    a.join("r2").await.unwrap();
    let refused = a.join("r3").await.unwrap_err();
    assert_eq!(
        refused_code(&refused),
        Some(ErrorCode::TooManyRooms),
        "{refused}"
    );
    a.leave("r1").await.unwrap();
    let refused = a.leave("r1").await.unwrap_err();
    assert_eq!(
        refused_code(&refused),
        Some(ErrorCode::NotMember),
        "{refused}"
    );
    a.join("r3").await.unwrap();

    b.publish("r1", "not for a", "").await.unwrap();
    b.publish("r3", "for a", "").await.unwrap();
    let m = next_message(&mut a).await;
    assert_eq!((m.room.as_str(), &m.payload[..]), ("r3", &b"for a"[..]));
    node.shutdown().await;
}

#[tokio::test]
async fn room_names_are_validated_and_reserved_rooms_refused() {
    let node = TestNode::start().await;
    let c = node.client("c").await;
    for bad in ["", "a..b", "has space", "a*", "x".repeat(129).as_str()] {
        let e = c.join(bad).await.unwrap_err();
        assert_eq!(
            refused_code(&e),
            Some(ErrorCode::InvalidRoom),
            "{bad:?}: {e}"
        );
    }
    for reserved in ["$broadcast", "$user.c"] {
        let e = c.join(reserved).await.unwrap_err();
        assert_eq!(refused_code(&e), Some(ErrorCode::ReservedRoom), "{e}");
        let e = c.publish(reserved, "x", "").await.unwrap_err();
        assert_eq!(refused_code(&e), Some(ErrorCode::ReservedRoom), "{e}");
    }
    // The session survives refused requests (they are not protocol violations).
    c.join("ok.room").await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn messages_to_a_user_reach_every_session_of_that_user_and_broadcast_reaches_all() {
    let node = TestNode::start().await;
    let mut alice_phone = node.client("alice").await;
    let mut alice_laptop = node.client("alice").await;
    let mut bob = node.client("bob").await;

    let (status, body) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(r#"{"user":"alice","data":"for alice"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut alice_phone, &mut alice_laptop] {
        let m = next_message(client).await;
        assert_eq!(
            (m.room.as_str(), &m.payload[..], m.publisher.as_str()),
            ("$user.alice", &b"for alice"[..], "$server")
        );
    }
    let (status, _) = node
        .http(
            "POST",
            "/api/v1/publish",
            Some(API_KEY),
            Some(r#"{"broadcast":true,"data":"to all"}"#),
        )
        .await;
    assert_eq!(status, 200);
    // Bob's first message is the broadcast: the message to alice never reached him.
    for client in [&mut bob, &mut alice_phone, &mut alice_laptop] {
        let m = next_message(client).await;
        assert_eq!(
            (m.room.as_str(), &m.payload[..]),
            ("$broadcast", &b"to all"[..])
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn unreliable_publishes_are_delivered_unsequenced_without_ack() {
    let node = TestNode::start().await;
    let mut member = node.client("m").await;
    member.join("cursors").await.unwrap();
    let sender = node.client("s").await;
    sender.publish_unreliable("cursors", "x=1").await.unwrap();
    let m = next_message(&mut member).await;
    assert_eq!((m.epoch, m.seq, &m.payload[..]), (0, 0, &b"x=1"[..]));
    // A reliable publish afterwards still starts the room's sequence at 1.
    assert_eq!(sender.publish("cursors", "r", "").await.unwrap().seq, 1);
    assert_eq!(next_message(&mut member).await.seq, 1);
    node.shutdown().await;
}
