//! The real `roomwire` binary as a child process, for tests that kill, drain and restart nodes
//! (an in-process [`super::TestNode`] cannot be SIGKILLed).
//!
//! A node is started with `--set` overrides on top of the embedded defaults: port 0, no
//! WebTransport, a known API key, client limits lifted for test traffic and, in a mesh, short
//! mesh timings. Its HTTP address is read from the `serving HTTP and WebSocket (/ws)` log line;
//! its stderr is drained continuously into a bounded buffer (so the pipe never fills) whose tail
//! is printed when a test fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roomwire::client::{Client, ClientOptions};

use super::{API_KEY, DEADLINE, eventually, try_http_request};

const BIN: &str = env!("CARGO_BIN_EXE_roomwire");
/// Log lines kept per node (the oldest are dropped).
const LOG_LINES: usize = 5_000;

/// Mesh timings for tests: a dead node leaves the ring within ~1.2 s, a (re)connected node is
/// ready after 0.6 s, an owner that cannot renew stops acknowledging after 0.9 s.
pub const MESH_TIMINGS: &[&str] = &[
    "mesh.heartbeat_ms=200",
    "mesh.node_ttl_ms=1200",
    "mesh.settle_ms=600",
    "mesh.lease_ms=900",
];

#[derive(Default)]
struct Log {
    lines: VecDeque<String>,
    addr: Option<SocketAddr>,
    closed: bool,
}

/// A running `roomwire` process; SIGKILLed on drop.
pub struct NodeProcess {
    pub id: String,
    pub region: String,
    /// The HTTP + WebSocket address.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
    /// SIGSTOPped and not yet continued.
    stopped: bool,
}

impl NodeProcess {
    /// A mesh node `id` in `region`, connected to `nats_urls`, with the test timings.
    pub async fn mesh(id: &str, region: &str, nats_urls: &[String]) -> NodeProcess {
        Self::mesh_with(id, region, nats_urls, &[]).await
    }

    /// [`NodeProcess::mesh`] with more `--set` overrides (later ones win).
    pub async fn mesh_with(
        id: &str,
        region: &str,
        nats_urls: &[String],
        extra: &[&str],
    ) -> NodeProcess {
        Self::mesh_with_env(id, region, nats_urls, extra, &[]).await
    }

    /// [`NodeProcess::mesh_with`] with environment variables for the process (e.g. the
    /// `LD_PRELOAD` of libfaketime, see [`super::faketime`]).
    pub async fn mesh_with_env(
        id: &str,
        region: &str,
        nats_urls: &[String],
        extra: &[&str],
        env: &[(String, String)],
    ) -> NodeProcess {
        let urls = serde_json::to_string(nats_urls).unwrap();
        let mut overrides = vec![format!("mesh.nats_urls={urls}")];
        overrides.extend(MESH_TIMINGS.iter().map(|s| s.to_string()));
        overrides.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with_env(id, region, &overrides, env).await
    }

    /// A node `id` with the test defaults and `overrides` (`section.key=value`), started and
    /// serving HTTP (not necessarily ready: see [`NodeProcess::wait_ready`]).
    pub async fn start(id: &str, region: &str, overrides: &[String]) -> NodeProcess {
        Self::start_with_env(id, region, overrides, &[]).await
    }

    /// [`NodeProcess::start`] with environment variables set for the process (on top of the
    /// test run's environment, minus its `ROOMWIRE_*` variables).
    pub async fn start_with_env(
        id: &str,
        region: &str,
        overrides: &[String],
        env: &[(String, String)],
    ) -> NodeProcess {
        let mut args: Vec<String> = vec![
            r#"server.listen=["127.0.0.1:0"]"#.into(),
            "webtransport.enabled=false".into(),
            format!("node.id={id}"),
            format!("node.region={region}"),
            format!(r#"api.keys=["{API_KEY}"]"#),
            "server.drain_grace_ms=5000".into(),
            // Test clients publish as fast as acknowledgements come back, all from 127.0.0.1.
            "limits.session_frames_per_second=1000000".into(),
            "limits.session_frame_burst=1000000".into(),
            "limits.session_bytes_per_second=1000000000".into(),
            "limits.session_byte_burst=1000000000".into(),
            "limits.connections_per_ip_per_second=10000".into(),
            "limits.connection_burst_per_ip=10000".into(),
        ];
        args.extend(overrides.iter().cloned());
        let mut command = Command::new(BIN);
        for arg in &args {
            command.arg("--set").arg(arg);
        }
        // Only what the test says configures the node, not the environment of the test run.
        for (key, _) in std::env::vars() {
            if key.starts_with(roomwire::config::ENV_PREFIX) {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .env(
                "RUST_LOG",
                std::env::var("ROOMWIRE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn roomwire");
        let log = Arc::new(Mutex::new(Log::default()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        // A thread, not a task: it must outlive nothing and block nobody's runtime.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                if log.addr.is_none() && line.contains("serving HTTP and WebSocket") {
                    log.addr = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse().ok());
                }
                if log.lines.len() == LOG_LINES {
                    log.lines.pop_front();
                }
                log.lines.push_back(line);
            }
            sink.lock().unwrap().closed = true;
        });
        let mut node = NodeProcess {
            id: id.into(),
            region: region.into(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            child: Some(child),
            log,
            stopped: false,
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (addr, closed) = {
                let log = node.log.lock().unwrap();
                (log.addr, log.closed)
            };
            if let Some(addr) = addr {
                node.addr = addr;
                return node;
            }
            assert!(
                !closed && tokio::time::Instant::now() < deadline,
                "node {id} did not start serving HTTP ({}):\n{}",
                if closed { "its log ended" } else { "timed out" },
                node.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A connected client whose token (insecure mode) is `user`.
    pub async fn client(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(), ClientOptions::user(user))
            .await
            .unwrap_or_else(|e| panic!("client {user} connects to {}: {e}", self.id))
    }

    /// One HTTP request with the API key; `None` when the connection fails.
    pub async fn try_get(&self, path: &str) -> Option<(u16, String)> {
        try_http_request(self.addr, "GET", path, Some(API_KEY), None)
            .await
            .ok()
    }

    /// The status of `GET /readyz`; `None` when the node does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        self.try_get("/readyz").await.map(|(status, _)| status)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let what = format!("node {} ready", self.id);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.readyz().await != Some(200) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /api/v1/cluster[?room=ROOM]`, which must answer 200 with JSON.
    pub async fn cluster(&self, room: Option<&str>) -> serde_json::Value {
        let path = match room {
            Some(room) => format!("/api/v1/cluster?room={room}"),
            None => "/api/v1/cluster".into(),
        };
        let (status, body) = self
            .try_get(&path)
            .await
            .unwrap_or_else(|| panic!("node {} does not answer {path}", self.id));
        assert_eq!(status, 200, "{} {path}: {body}", self.id);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{} {path}: not JSON ({e}): {body}", self.id))
    }

    /// The node this node names as the owner of `room`.
    pub async fn owner_of(&self, room: &str) -> String {
        let cluster = self.cluster(Some(room)).await;
        cluster["owner"]["node"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no owner.node for {room}: {cluster}", self.id))
            .to_string()
    }

    /// The ids on this node's ring with their states, sorted: `[("n1", "active"), ...]`.
    pub async fn ring(&self) -> Vec<(String, String)> {
        let cluster = self.cluster(None).await;
        let mut ring: Vec<(String, String)> = cluster["ring"]["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no ring.nodes: {cluster}", self.id))
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or_default().to_string(),
                    n["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        ring.sort();
        ring
    }

    /// Current value of a metric line from `GET /metrics` (see [`super::TestNode::metric`]).
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let (_, body) = self.try_get("/metrics").await.expect("metrics answer");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Current value of a metric line from `GET /metrics`, `None` when the node does not export
    /// it (a metric a newer build adds) or does not answer.
    pub async fn try_metric(&self, line_prefix: &str) -> Option<f64> {
        let (_, body) = self.try_get("/metrics").await?;
        body.lines().find_map(|l| {
            l.strip_prefix(line_prefix)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node runs").id()
    }

    /// SIGSTOP: the process stalls (as in a long GC pause or a frozen VM) with every socket
    /// open, so the NATS server keeps its connection and its subscriptions; peers only stop
    /// hearing its heartbeats. Its monotonic clock keeps running.
    pub fn stop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`NodeProcess::stop`]: the process resumes where it was.
    pub fn cont(&mut self) {
        self.signal("CONT");
        self.stopped = false;
    }

    /// Waits until the kernel reports the process stopped (state `T` in /proc/<pid>/stat): a
    /// SIGSTOP takes effect a moment after `kill` returns, and what the process does in that
    /// moment counts as done before the stop.
    pub async fn wait_stopped(&self) {
        let path = format!("/proc/{}/stat", self.pid());
        super::eventually(&format!("{} stopped", self.id), || {
            let path = path.clone();
            async move {
                std::fs::read_to_string(&path).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            }
        })
        .await;
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -{name}: {e}"));
        assert!(status.success(), "kill -{name} {} failed", self.id);
    }

    /// SIGKILL: no drain, no goodbye, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a stopped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }

    /// SIGTERM (graceful drain), then waits for the process to exit.
    pub async fn sigterm(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("node runs");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for node") {
                self.child = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} did not exit after SIGTERM:\n{}",
                self.id,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The last `lines` lines the node logged.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap();
        let skip = log.lines.len().saturating_sub(lines);
        log.lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every logged line containing `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The whole log (as far as kept) goes to a file named after the test.
            let test = std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-");
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-logs");
            let path = dir.join(format!("{test}-{}.log", self.id));
            let saved = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&path, self.log_tail(LOG_LINES) + "\n"));
            eprintln!(
                "---- node {} ({}) log (tail; all of it in {}) ----\n{}",
                self.id,
                self.region,
                if saved.is_ok() {
                    path.display().to_string()
                } else {
                    "no file".into()
                },
                self.log_tail(40)
            );
        }
        self.kill9();
    }
}

/// Waits until every node is ready and has exactly the ids of `nodes` on its ring, all active.
pub async fn wait_converged(nodes: &[&NodeProcess]) {
    let mut want: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.id.clone(), "active".to_string()))
        .collect();
    want.sort();
    for node in nodes {
        node.wait_ready().await;
    }
    for node in nodes {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let ring = node.ring().await;
            if ring == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} never saw the ring {want:?}; last: {ring:?}\n{}",
                node.id,
                node.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until every one of `nodes` names `owner` as the owner of `room`.
pub async fn wait_owner(nodes: &[&NodeProcess], room: &str, owner: &str) {
    for node in nodes {
        eventually(
            &format!("{} names {owner} owner of {room}", node.id),
            || async { node.owner_of(room).await == owner },
        )
        .await;
    }
}
