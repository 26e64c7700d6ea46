//! Network faults on a real path: a WebTransport session through a user-space impairment proxy
//! ([`common::impair`]) — 30 % of datagrams lost each way, or 500 ms of delay each way — stays
//! up and receives every acknowledged message of its room, in order, once. The proxy itself is
//! checked first: it must measurably drop 30 % and delay by 500 ms. A 10 s blackout (WebSocket
//! through [`common::proxy`], WebTransport through the impairment proxy) ends with the same
//! session getting everything acknowledged meanwhile. A client whose address changes mid-session
//! (the proxy rebinds, as a NAT would) keeps its WebTransport session (QUIC migration), and a
//! WebSocket session 500 ms away each way stays up (a TCP proxy that delays every chunk).

mod common;

use std::time::{Duration, Instant};

use common::TestNode;
use common::impair::{Impairment, UdpImpair};
use common::proxy::TcpProxy;
use roomwire::client::{Client, Event};

/// Loss and delay as asked, measured through the proxy against a UDP echo.
#[tokio::test]
async fn the_impairment_proxy_drops_and_delays_as_configured() {
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();

    let lossy = UdpImpair::start(
        echo_addr,
        Impairment {
            loss: 0.3,
            ..Impairment::clear(7)
        },
    );
    client.connect(lossy.addr).await.unwrap();
    let client = std::sync::Arc::new(client);
    // Read while sending, so no echo is lost in this socket's own buffer.
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut back = 0;
            // Everything sent has been decided once the echoes stop coming.
            while tokio::time::timeout(Duration::from_millis(1000), client.recv(&mut buf))
                .await
                .is_ok()
            {
                back += 1;
            }
            back
        })
    };
    for i in 0..2000u32 {
        client.send(&i.to_be_bytes()).await.unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let back = reader.await.unwrap();
    let mut buf = [0u8; 16];
    let up = lossy.counts.loss(0);
    let down = lossy.counts.loss(1);
    eprintln!("loss up {up:.3}, down {down:.3}, {back} of 2000 came back");
    // Each share is over ~2,000 and ~1,400 seeded draws: 0.3 ± 0.05 is about four standard
    // deviations either side.
    assert!((0.25..=0.35).contains(&up), "up {up}");
    assert!((0.25..=0.35).contains(&down), "down {down}");
    assert!(
        (840..=1120).contains(&back),
        "{back} of 2000 echoed (0.7² expected)"
    );
    drop(lossy);

    let slow = UdpImpair::start(
        echo_addr,
        Impairment {
            delay: Duration::from_millis(500),
            ..Impairment::clear(7)
        },
    );
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(slow.addr).await.unwrap();
    let sent = Instant::now();
    client.send(b"ping").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .expect("the echo comes back")
        .unwrap();
    let rtt = sent.elapsed();
    eprintln!("round trip through 500 ms each way: {rtt:?}");
    assert!(rtt >= Duration::from_millis(1000), "{rtt:?}");
    assert!(rtt < Duration::from_millis(2500), "{rtt:?}");
}

/// A WebTransport member behind `impairment` gets every acknowledged message of its room, in
/// order, once, and its session stays up.
async fn a_member_behind(impairment: Impairment, messages: u64) {
    let node = TestNode::start().await;
    let proxy = UdpImpair::start(node.wt_addr.unwrap(), impairment);
    let url = format!("https://{}/wt", proxy.addr);
    let started = Instant::now();
    let mut member = Client::connect(&url, node.wt_options("far"))
        .await
        .expect("connects through the impaired path");
    member.join("faults").await.expect("joins");
    let connected = started.elapsed();
    let publisher = node.client("near").await;
    for i in 1..=messages {
        publisher
            .publish("faults", format!("m{i}"), &format!("f-{i}"))
            .await
            .expect("acknowledged");
    }
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < messages {
        let message =
            tokio::time::timeout(Duration::from_secs(60), next_message_or_end(&mut member))
                .await
                .unwrap_or_else(|_| panic!("{} of {messages} arrived", seqs.len()));
        assert_eq!(
            &message.payload[..],
            format!("m{}", seqs.len() + 1).as_bytes(),
            "in order, once"
        );
        seqs.push(message.seq);
    }
    eprintln!(
        "{impairment:?}: connected and joined in {connected:?}, {messages} messages in {:?}; \
         datagrams lost up {:.2} down {:.2}",
        started.elapsed(),
        proxy.counts.loss(0),
        proxy.counts.loss(1)
    );
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // Still the same session: a round trip on it is answered.
    member
        .presence_stats("faults")
        .await
        .expect("the session is still up");
    node.shutdown().await;
}

/// The next message; panics if the session ends first.
async fn next_message_or_end(client: &mut Client) -> roomwire::proto::Message {
    loop {
        match client.next_event().await {
            Some(Event::Message(m)) => return m,
            Some(Event::Closed { code, reason }) => panic!("session closed: {code:?} {reason}"),
            None => panic!("session ended"),
            Some(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_survives_30_percent_loss_each_way() {
    a_member_behind(
        Impairment {
            loss: 0.3,
            ..Impairment::clear(11)
        },
        200,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_survives_500_ms_delay_each_way() {
    a_member_behind(
        Impairment {
            delay: Duration::from_millis(500),
            ..Impairment::clear(11)
        },
        50,
    )
    .await;
}

/// A WebSocket member 500 ms away each way (a TCP proxy that holds every chunk) gets every
/// acknowledged message of its room, in order, once, on the same session: the heartbeat and
/// idle defaults do not cut a slow but healthy path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_survives_500_ms_delay_each_way() {
    let node = TestNode::start().await;
    let proxy = TcpProxy::start_delayed(node.addr, Duration::from_millis(500));
    let started = Instant::now();
    let mut member = Client::connect(
        &format!("ws://{}/ws", proxy.addr),
        roomwire::client::ClientOptions::user("far"),
    )
    .await
    .expect("connects through the delayed path");
    member.join("slow").await.expect("joins");
    let joined = started.elapsed();
    assert!(
        joined >= Duration::from_secs(2),
        "the path is delayed: upgrade, Connect and Join are three round trips ({joined:?})"
    );
    let publisher = node.client("near").await;
    for i in 1..=50u64 {
        publisher
            .publish("slow", format!("s{i}"), &format!("s-{i}"))
            .await
            .expect("acknowledged");
    }
    for i in 1..=50u64 {
        let message =
            tokio::time::timeout(Duration::from_secs(30), next_message_or_end(&mut member))
                .await
                .unwrap_or_else(|_| panic!("s{i} never arrived"));
        assert_eq!(
            &message.payload[..],
            format!("s{i}").as_bytes(),
            "in order, once"
        );
    }
    member
        .presence_stats("slow")
        .await
        .expect("the same session is still up");
    eprintln!(
        "joined in {joined:?}; 50 messages in {:?}",
        started.elapsed()
    );
    node.shutdown().await;
}

const BLACKOUT: Duration = Duration::from_secs(10);

/// `member` (in room "dark") gets the messages published during a blackout that `heal` ends,
/// in order, once, on the same session.
async fn through_a_blackout(
    node: &TestNode,
    mut member: Client,
    dark: impl FnOnce(),
    heal: impl FnOnce(),
) {
    member.join("dark").await.expect("joins");
    let publisher = node.client("near").await;
    dark();
    let started = Instant::now();
    for i in 1..=20u64 {
        publisher
            .publish("dark", format!("d{i}"), &format!("d-{i}"))
            .await
            .expect("acknowledged during the blackout");
    }
    tokio::time::sleep(BLACKOUT.saturating_sub(started.elapsed())).await;
    heal();
    let healed = Instant::now();
    for i in 1..=20u64 {
        let message =
            tokio::time::timeout(Duration::from_secs(60), next_message_or_end(&mut member))
                .await
                .unwrap_or_else(|_| panic!("message {i} never arrived after the blackout"));
        assert_eq!(
            &message.payload[..],
            format!("d{i}").as_bytes(),
            "in order, once"
        );
    }
    eprintln!(
        "all 20 delivered {:?} after the blackout ended",
        healed.elapsed()
    );
    member
        .presence_stats("dark")
        .await
        .expect("the same session is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_survives_a_ten_second_blackout() {
    let node = TestNode::start().await;
    let proxy = TcpProxy::start(node.addr);
    let member = Client::connect(
        &format!("ws://{}/ws", proxy.addr),
        roomwire::client::ClientOptions::user("far"),
    )
    .await
    .expect("connects through the proxy");
    through_a_blackout(&node, member, || proxy.blackhole(), || proxy.forward()).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_survives_a_ten_second_blackout() {
    let node = TestNode::start().await;
    let clear = Impairment::clear(3);
    let proxy = UdpImpair::start(node.wt_addr.unwrap(), clear);
    let member = Client::connect(
        &format!("https://{}/wt", proxy.addr),
        node.wt_options("far"),
    )
    .await
    .expect("connects through the impairment proxy");
    through_a_blackout(
        &node,
        member,
        || proxy.set(Impairment { loss: 1.0, ..clear }),
        || proxy.set(clear),
    )
    .await;
    node.shutdown().await;
}

/// QUIC connection migration: the client's address changes mid-session (the proxy sends from a
/// new port, as a NAT that rebinds the flow would), and the WebTransport session goes on over
/// the new path without a reconnect. The old port is closed, so everything after the change
/// reached the client over the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_survives_its_address_changing() {
    let node = TestNode::start().await;
    let proxy = UdpImpair::start(node.wt_addr.unwrap(), Impairment::clear(5));
    let mut member = Client::connect(
        &format!("https://{}/wt", proxy.addr),
        node.wt_options("mover"),
    )
    .await
    .expect("connects through the proxy");
    member.join("moving").await.expect("joins");
    let publisher = node.client("near").await;
    let publish = async |from: u64, to: u64| {
        for i in from..=to {
            publisher
                .publish("moving", format!("m{i}"), &format!("m-{i}"))
                .await
                .expect("acknowledged");
        }
    };
    let receive = async |from: u64, to: u64, member: &mut Client| {
        for i in from..=to {
            let message =
                tokio::time::timeout(Duration::from_secs(30), next_message_or_end(member))
                    .await
                    .unwrap_or_else(|_| panic!("m{i} never arrived"));
            assert_eq!(
                &message.payload[..],
                format!("m{i}").as_bytes(),
                "in order, once"
            );
        }
    };
    publish(1, 5).await;
    receive(1, 5, &mut member).await;

    let before = *proxy.node_side.lock().unwrap();
    let after = proxy.rebind().await;
    assert_ne!(before, after);
    // The client's next request is its first packet from the new address.
    member
        .presence_stats("moving")
        .await
        .expect("answered on the same session, over the new path");
    publish(6, 10).await;
    receive(6, 10, &mut member).await;
    assert_eq!(
        node.metric(r#"roomwire_sessions_opened_total{transport="webtransport"}"#),
        1.0,
        "no second session: the connection migrated"
    );
    node.shutdown().await;
}
