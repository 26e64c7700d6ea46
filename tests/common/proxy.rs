//! A TCP proxy a test puts between a node and its nats-server (the node's `mesh.nats_urls`
//! names the proxy), to cut the node off from NATS in the worst way: [`TcpProxy::blackhole`]
//! keeps every TCP connection open on both sides but stops moving bytes in both directions. No
//! side sees a close or a reset; each only stops hearing the other, as when a network path
//! silently drops packets. [`TcpProxy::forward`] heals it: what was held moves on, in order,
//! and a close that happened meanwhile reaches the other side only then.
//!
//! [`TcpProxy::cut`] closes the connections it carries at that moment (a network loss both sides
//! see at once), for clients that must notice and reconnect.
//!
//! [`TcpProxy::start_delayed`] holds every chunk for a fixed time in each direction instead (a
//! long path: what a WebSocket client behind 500 ms each way sees).
//!
//! The proxy runs on its own thread and runtime, so it keeps forwarding whatever the test's
//! runtime is doing; dropping it closes every connection it carries.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::nats::free_port;

/// What the proxy does with the bytes of every connection it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Nothing is read from either side (bytes and closes wait in the kernel's buffers, then
    /// the senders' writes block); new connections are accepted and held the same way.
    Blackhole,
}

/// A running proxy from 127.0.0.1:`port` to one upstream address.
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    /// Cancelled by [`TcpProxy::cut`]: every connection accepted before it, then replaced.
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts forwarding from a free port (see [`free_port`]) to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        Self::start_delayed(upstream, Duration::ZERO)
    }

    /// Starts forwarding with every chunk held `delay` in each direction, in order (no
    /// blackhole: the mode is not looked at).
    pub fn start_delayed(upstream: SocketAddr, delay: Duration) -> TcpProxy {
        let listener = (0..10)
            .find_map(|_| StdListener::bind(("127.0.0.1", free_port())).ok())
            .expect("a free port for the proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watching) = watch::channel(Mode::Forward);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (count, stopped, cuts) = (accepted.clone(), stop.clone(), cut.clone());
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("proxy listener");
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = accept_loop(listener, upstream, watching, count, cuts, delay) => {}
                    }
                });
                // Dropping the runtime drops every connection's tasks, closing their sockets.
            })
            .expect("spawn the proxy thread");
        TcpProxy {
            addr,
            mode,
            accepted,
            cut,
            stop,
            thread: Some(thread),
        }
    }

    /// `nats://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Stops moving bytes in both directions on every connection, present and future.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Moves bytes again (what was held first).
    pub fn forward(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Closes every connection carried now, both sides (held bytes are dropped); later
    /// connections are carried as the mode says.
    pub fn cut(&self) {
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    accepted: Arc<AtomicUsize>,
    cuts: Arc<Mutex<CancellationToken>>,
    delay: Duration,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let mode = mode.clone();
        let cut = cuts.lock().unwrap().clone();
        // Dropping the connection's future (on a cut) drops both sockets: each side sees a close.
        tokio::spawn(cut.run_until_cancelled_owned(async move {
            // Upstream refused (the server is down): the client's connection closes.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            if !delay.is_zero() {
                tokio::join!(
                    delayed(client_read, server_write, delay),
                    delayed(server_read, client_write, delay),
                );
                return;
            }
            tokio::join!(
                pump(client_read, server_write, mode.clone()),
                pump(server_read, client_write, mode),
            );
        }));
    }
}

/// Copies one direction while the mode is [`Mode::Forward`]; an end of stream is passed on as a
/// half close (a FIN), so each direction ends on its own.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !until(&mut mode, Mode::Forward).await {
            return;
        }
        // A read is cancel-safe: a blackhole starting while it waits loses no bytes.
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    if until(&mut mode, Mode::Forward).await {
                        let _ = to.shutdown().await;
                    }
                    return;
                }
                Ok(n) => n,
            },
            _ = until(&mut mode, Mode::Blackhole) => continue,
        };
        // Bytes read just before a blackhole wait for the next forward.
        if !until(&mut mode, Mode::Forward).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Copies one direction, each chunk written `delay` after it was read (a bounded line: when it
/// is full, reading stops and TCP pushes back); an end of stream follows the last chunk.
async fn delayed(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (line, mut out) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || line
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .await
                    .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = out.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Waits until the mode is `want`; false when the proxy is gone.
async fn until(mode: &mut watch::Receiver<Mode>, want: Mode) -> bool {
    mode.wait_for(|m| *m == want).await.is_ok()
}
