//! Fenced ownership, end to end (the scenarios follow): first the harness's own pieces for
//! them, a TCP proxy that can blackhole a node's NATS connection ([`common::proxy`]) and a wall
//! clock moved with libfaketime ([`common::faketime`]).

mod common;

use std::time::Duration;

use common::faketime::{FakeClock, libfaketime, real_wall_ms};
use common::nats::free_port;
use common::proxy::TcpProxy;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// The harness: the proxy and libfaketime
// ---------------------------------------------------------------------------------------------

/// Reads what arrives on `stream` within `window` (nothing: empty; `None`: the peer closed).
async fn read_within(stream: &mut TcpStream, window: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(window, stream.read(&mut buf)).await {
        Err(_) => Some(Vec::new()),
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
    }
}

/// Reads exactly `want` from `stream` within the harness deadline.
async fn expect_bytes(stream: &mut TcpStream, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("the connection stays open");
    assert_eq!(buf, want);
}

/// The proxy forwards both ways; a blackhole holds bytes in both directions and a close too,
/// without closing anything, and also holds connections made meanwhile; forwarding again
/// delivers what was held, in order.
#[tokio::test]
async fn the_proxy_forwards_and_its_blackhole_holds_bytes_both_ways() {
    let upstream = TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
    let proxy = TcpProxy::start(upstream.local_addr().unwrap());
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut server, _) = tokio::time::timeout(DEADLINE, upstream.accept())
        .await
        .expect("the proxy connects upstream")
        .unwrap();
    client.write_all(b"ping").await.unwrap();
    expect_bytes(&mut server, b"ping").await;
    server.write_all(b"pong").await.unwrap();
    expect_bytes(&mut client, b"pong").await;

    proxy.blackhole();
    client.write_all(b"held-up").await.unwrap();
    server.write_all(b"held-down").await.unwrap();
    // Asserting that nothing arrives needs a window; 300 ms is ages on loopback.
    let window = Duration::from_millis(300);
    assert_eq!(read_within(&mut server, window).await, Some(Vec::new()));
    assert_eq!(read_within(&mut client, window).await, Some(Vec::new()));
    // A connection made during the blackhole is accepted and held too.
    let mut late = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut late_server, _) = tokio::time::timeout(DEADLINE, upstream.accept())
        .await
        .expect("the proxy connects upstream")
        .unwrap();
    late.write_all(b"late").await.unwrap();
    assert_eq!(
        read_within(&mut late_server, window).await,
        Some(Vec::new())
    );
    assert_eq!(proxy.accepted(), 2);

    proxy.forward();
    expect_bytes(&mut server, b"held-up").await;
    expect_bytes(&mut client, b"held-down").await;
    expect_bytes(&mut late_server, b"late").await;

    // A close during a blackhole reaches the other side only when it heals.
    proxy.blackhole();
    drop(client);
    assert_eq!(read_within(&mut server, window).await, Some(Vec::new()));
    proxy.forward();
    assert_eq!(read_within(&mut server, DEADLINE).await, None);
    drop(proxy);
    // Dropping the proxy closes what it carried.
    assert_eq!(read_within(&mut late_server, DEADLINE).await, None);
}

/// libfaketime moves a child's wall clock by the offset in the file, re-read at every call, and
/// leaves its monotonic clock alone.
#[tokio::test]
async fn libfaketime_moves_a_child_wall_clock_from_a_file() {
    libfaketime();
    let clock = FakeClock::new();
    let date = || {
        let out = std::process::Command::new("date")
            .arg("+%s")
            .envs(clock.env())
            .output()
            .expect("run date");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        text.parse::<i64>()
            .unwrap_or_else(|_| panic!("date printed {text:?}"))
    };
    let real = || real_wall_ms() / 1000;
    assert!((date() - real()).abs() <= 1, "+0");
    clock.set("+10s");
    assert!((date() - real() - 10).abs() <= 1, "+10s");
    clock.set("-10s");
    assert!((date() - real() + 10).abs() <= 1, "-10s");
}
