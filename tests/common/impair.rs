//! A user-space impairment proxy for UDP (QUIC) between one client and a node: every datagram,
//! in either direction, is dropped with probability `loss` or else delayed by `delay` plus up to
//! `jitter` (jitter reorders), and the impairment can change while it runs (a blackout). The
//! kernel here has no `netem`, so the bad network is made here.
//! Deterministic under a seed: the drop and delay of the n-th datagram of a direction depend only
//! on the seed and n. The client is the first address that sends to the proxy.
//!
//! Like [`super::proxy::TcpProxy`], it runs on its own thread and runtime, so it keeps moving
//! datagrams whatever the test's runtime is doing; dropping it stops it.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::RngCore;
use proptest::test_runner::{RngAlgorithm, TestRng};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// What happens to the datagrams of each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
    pub delay: Duration,
    /// Up to this much more delay, uniformly drawn per datagram.
    pub jitter: Duration,
    pub seed: u8,
}

impl Impairment {
    /// No loss, no delay: a clear path (change fields with `..Impairment::clear(seed)`).
    pub fn clear(seed: u8) -> Impairment {
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed,
        }
    }
}

/// Datagrams carried and dropped, per direction (0: client to node, 1: node to client).
#[derive(Debug, Default)]
pub struct Counts {
    pub forwarded: [AtomicU64; 2],
    pub dropped: [AtomicU64; 2],
}

impl Counts {
    /// The share dropped in `direction`.
    pub fn loss(&self, direction: usize) -> f64 {
        let dropped = self.dropped[direction].load(Ordering::Relaxed) as f64;
        let all = dropped + self.forwarded[direction].load(Ordering::Relaxed) as f64;
        if all == 0.0 { 0.0 } else { dropped / all }
    }
}

pub struct UdpImpair {
    /// Where the client sends (in place of the node's address).
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    /// What happens to datagrams from now on (see [`UdpImpair::set`]).
    current: Arc<std::sync::Mutex<Impairment>>,
    /// Asks the proxy to send from a new port (see [`UdpImpair::rebind`]).
    rebind: Arc<tokio::sync::Notify>,
    /// The proxy's address towards the node: where the node sees the client.
    pub node_side: Arc<std::sync::Mutex<SocketAddr>>,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpImpair {
    /// Starts the proxy in front of `target` (a UDP address).
    pub fn start(target: SocketAddr, impairment: Impairment) -> UdpImpair {
        let front = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let back = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        front.set_nonblocking(true).unwrap();
        back.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let node_side = Arc::new(std::sync::Mutex::new(back.local_addr().unwrap()));
        let rebind = Arc::new(tokio::sync::Notify::new());
        let (task_rebind, task_node_side) = (rebind.clone(), node_side.clone());
        let counts = Arc::new(Counts::default());
        let cancel = CancellationToken::new();
        let current = Arc::new(std::sync::Mutex::new(impairment));
        let (task_counts, task_cancel) = (counts.clone(), cancel.clone());
        let task_current = current.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let front = Arc::new(UdpSocket::from_std(front).unwrap());
                let mut back = Arc::new(UdpSocket::from_std(back).unwrap());
                let rng = |direction: u8| {
                    let mut seed = [impairment.seed; 32];
                    seed[0] = direction;
                    TestRng::from_seed(RngAlgorithm::ChaCha, &seed)
                };
                let (mut up_rng, mut down_rng) = (rng(0), rng(1));
                let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
                let mut up = vec![0u8; 65_536];
                let mut down = vec![0u8; 65_536];
                loop {
                    tokio::select! {
                        _ = task_cancel.cancelled() => return,
                        _ = task_rebind.notified() => {
                            // A NAT that gives the flow a new port: the node sees the client
                            // at a new address, and what it sends to the old one is lost.
                            let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                            fresh.connect(target).await.unwrap();
                            *task_node_side.lock().unwrap() = fresh.local_addr().unwrap();
                            back = Arc::new(fresh);
                        }
                        received = front.recv_from(&mut up) => {
                            let Ok((n, from)) = received else { continue };
                            client.lock().unwrap().get_or_insert(from);
                            let back = back.clone();
                            let datagram = up[..n].to_vec();
                            let now = *task_current.lock().unwrap();
                            pass(&mut up_rng, now, &task_counts, 0, async move {
                                let _ = back.send(&datagram).await;
                            });
                        }
                        received = back.recv(&mut down) => {
                            let Ok(n) = received else { continue };
                            let Some(to) = *client.lock().unwrap() else { continue };
                            let front = front.clone();
                            let datagram = down[..n].to_vec();
                            let now = *task_current.lock().unwrap();
                            pass(&mut down_rng, now, &task_counts, 1, async move {
                                let _ = front.send_to(&datagram, to).await;
                            });
                        }
                    }
                }
            });
        });
        UdpImpair {
            addr,
            counts,
            current,
            rebind,
            node_side,
            cancel,
            thread: Some(thread),
        }
    }
}

impl UdpImpair {
    /// Changes what happens to the datagrams that arrive from now on (a blackout: `loss: 1.0`;
    /// its end: the previous impairment again). The seeded draws go on where they were.
    pub fn set(&self, impairment: Impairment) {
        *self.current.lock().unwrap() = impairment;
    }

    /// From now on the client's datagrams reach the node from a new address (NAT rebinding):
    /// the address the node sees, once it changed.
    pub async fn rebind(&self) -> SocketAddr {
        let before = *self.node_side.lock().unwrap();
        self.rebind.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = *self.node_side.lock().unwrap();
            if now != before {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy did not rebind"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Drops the datagram, or sends it (`send`) after its delay.
fn pass(
    rng: &mut TestRng,
    impairment: Impairment,
    counts: &Counts,
    direction: usize,
    send: impl Future<Output = ()> + Send + 'static,
) {
    let draw = |rng: &mut TestRng| f64::from(rng.next_u32()) / f64::from(u32::MAX);
    if draw(rng) < impairment.loss {
        counts.dropped[direction].fetch_add(1, Ordering::Relaxed);
        return;
    }
    counts.forwarded[direction].fetch_add(1, Ordering::Relaxed);
    let delay = impairment.delay + impairment.jitter.mul_f64(draw(rng));
    if delay.is_zero() {
        tokio::spawn(send);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send.await;
        });
    }
}

impl Drop for UdpImpair {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
