//! The node's metrics as Prometheus and Grafana see them, on a busy node: two nodes meshed over
//! a JetStream nats-server, JWT auth, WebSocket and WebTransport sessions, a durable room, a
//! refused token, a forbidden join, an API call, an oversized datagram, and the second node
//! draining its rooms into the first. A labelled metric appears in `/metrics` only once it has a
//! value, so this is what makes every series the dashboard shows exist.
//!
//! - The Grafana dashboard `deploy/grafana/roomwire.json` asks only for metrics that node
//!   exports (a counter `x` is stored as `x_total`, a histogram as `x_bucket`/`_sum`/`_count`).
//! - Debian's `prometheus` (installed by `scripts/test.sh`, started here on its own port, data
//!   directory and configuration) scrapes it and answers a query with the node's own values,
//!   which proves the exposition format and the names; every panel's query evaluates there and
//!   returns data, the variables find the node, and the sessions panel shows the sessions.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mesh::publish_until_acked;
use common::nats::{NatsServer, TempDir, free_port};
use common::{API_KEY, DEADLINE, TestNode, eventually, http_request};
use roomwire::client::{Client, ClientOptions};
use roomwire::config::AuthMode;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const JWT_SECRET: &str = "a-prometheus-test-hs256-secret-of-32-bytes";
/// The metrics every roomwire dashboard must show (README, Operations guide).
const ESSENTIAL: [&str; 8] = [
    "roomwire_sessions",
    "roomwire_deliveries_total",
    "roomwire_slow_consumer_drops_total",
    "roomwire_connections_refused_total",
    "roomwire_mesh_connected",
    "roomwire_mesh_nodes",
    "roomwire_history_appends_total",
    "roomwire_presence_rooms",
];

/// The series names Prometheus stores for a node's exposition: a counter `x` as `x_total`, a
/// histogram as `x_bucket`, `x_sum` and `x_count`, a gauge (or untyped) as `x`, an info as
/// `x_info`; and every sample line's name.
fn stored_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `roomwire_*` name in a PromQL expression.
fn referenced_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("roomwire_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/roomwire.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is JSON")
}

/// (panel title, expression) of every query target, rows' nested panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            let targets = panel["targets"].as_array();
            if panel["type"] != "row" {
                assert!(
                    targets.is_some_and(|t| !t.is_empty()),
                    "panel {title:?} has no query"
                );
            }
            for target in targets.into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a PromQL expr");
                out.push((title.to_string(), expr.to_string()));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The metric selectors of the template variables' `label_values(selector, label)` queries.
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("a label_values query: {query}"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            (selector.trim().to_string(), label.trim().to_string())
        })
        .collect()
}

/// A dashboard expression as Grafana sends it with every node selected.
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$region", ".*")
}

/// Two meshed nodes, `a` and `b`, and the traffic that makes every metric family appear on `a`;
/// `b` has drained its rooms into `a` and stopped.
struct BusyNode {
    a: TestNode,
    /// Sessions kept open on `a` (a WebSocket and a WebTransport one).
    sessions: Vec<Client>,
    _nats: NatsServer,
}

/// `GET /metrics`, empty when the node does not answer.
async fn scrape(node: SocketAddr) -> String {
    match common::try_http_request(node, "GET", "/metrics", None, None).await {
        Ok((200, text)) => text,
        _ => String::new(),
    }
}

/// A token for `user`, minted by `roomwire token` from the nodes' configuration.
fn token(user: &str) -> String {
    common::stdout_of(
        Command::new(env!("CARGO_BIN_EXE_roomwire"))
            .args(["token", "--set", "auth.mode=jwt"])
            .args(["--set", &format!("auth.jwt.secret={JWT_SECRET}")])
            .args(["--sub", user, "--join", "room.>", "--publish", "room.>"])
            .args(["--ttl", "1h"])
            .env_clear(),
    )
}

impl BusyNode {
    async fn start() -> BusyNode {
        let nats = NatsServer::start().await;
        let mesh_node = |id: &'static str, url: String| {
            move |c: &mut roomwire::Config| {
                c.node.id = id.into();
                c.node.region = "eu".into();
                c.mesh.nats_urls = vec![url];
                c.mesh.heartbeat_ms = 200;
                c.mesh.node_ttl_ms = 1200;
                c.mesh.settle_ms = 600;
                c.mesh.lease_ms = 900;
                c.auth.mode = AuthMode::Jwt;
                c.auth.jwt.secret = Some(JWT_SECRET.into());
                // Polling /metrics, Prometheus's scrapes and the clients all come from 127.0.0.1.
                c.limits.connections_per_ip_per_second = 10_000;
                c.limits.connection_burst_per_ip = 10_000;
            }
        };
        let a = TestNode::start_with(mesh_node("a", nats.url())).await;
        let b = TestNode::start_with(mesh_node("b", nats.url())).await;
        for node in [&a, &b] {
            eventually("both nodes ready, each seeing two", || async {
                let ready = matches!(
                    common::try_http_request(node.addr, "GET", "/readyz", None, None).await,
                    Ok((200, _))
                );
                let metrics = scrape(node.addr).await;
                ready
                    && metrics
                        .lines()
                        .any(|l| l == "roomwire_mesh_nodes{region=\"eu\"} 2")
            })
            .await;
        }
        let connect = |node: &TestNode, user: &str| {
            let (url, options) = (
                node.ws_url(),
                ClientOptions {
                    token: token(user),
                    ..Default::default()
                },
            );
            async move {
                Client::connect(&url, options)
                    .await
                    .expect("client connects")
            }
        };
        // Durable rooms sequenced on both nodes (the ring splits them), with the mesh's
        // token-id checks and history appends.
        let alice = connect(&a, "alice").await;
        let bob = connect(&b, "bob").await;
        for i in 0..8 {
            let room = format!("room.r{i}");
            alice.join(&room).await.unwrap();
            publish_until_acked(&bob, "bob", &room, &format!("m{i}")).await;
        }
        // A WebTransport member and an unreliable message too large for a datagram.
        let carol = Client::connect(
            &a.wt_url(),
            ClientOptions {
                token: token("carol"),
                ..a.wt_options("carol")
            },
        )
        .await
        .expect("webtransport client");
        carol.join("room.r0").await.unwrap();
        alice
            .publish_unreliable("room.r0", vec![b'x'; 4000])
            .await
            .unwrap();
        // A refused token (auth failure, refused connection, error), a forbidden join (error),
        // an API call.
        let refused = Client::connect(
            &a.ws_url(),
            ClientOptions {
                token: "not-a-jwt".into(),
                ..Default::default()
            },
        )
        .await;
        assert!(refused.is_err(), "a bad token is refused");
        assert!(
            alice.join("secret").await.is_err(),
            "a join outside the token's rooms"
        );
        let (status, _) = http_request(a.addr, "GET", "/api/v1/node", Some(API_KEY), None).await;
        assert_eq!(status, 200);
        // A session that ends, and b draining: its rooms are pushed to a.
        drop(connect(&a, "dave").await);
        drop(bob);
        b.shutdown().await;
        let families = [
            "roomwire_mesh_handoffs_total{",
            "roomwire_sessions_closed_total{",
            "roomwire_datagrams_dropped_total{",
        ];
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let metrics = scrape(a.addr).await;
            let missing: Vec<&str> = families
                .into_iter()
                .filter(|f| !metrics.contains(f))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node a never counted {missing:?}:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BusyNode {
            a,
            sessions: vec![alice, carol],
            _nats: nats,
        }
    }

    async fn exposition(&self) -> String {
        let (status, text) = http_request(self.a.addr, "GET", "/metrics", None, None).await;
        assert_eq!(status, 200);
        text
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let busy = BusyNode::start().await;
    // The round trip to each region is a gauge per region, there once the node has measured it
    // (every heartbeat interval).
    eventually("the node measured its NATS round trip", || async {
        busy.exposition()
            .await
            .contains("roomwire_mesh_nats_rtt_seconds{")
    })
    .await;
    let exported = stored_names(&busy.exposition().await);
    let dashboard = dashboard();
    let queries = panel_queries(&dashboard);
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = referenced_names(expr);
        assert!(
            !names.is_empty(),
            "panel {title:?} queries no roomwire metric: {expr}"
        );
        for name in names {
            assert!(
                exported.contains(&name),
                "panel {title:?} queries {name}, which the node does not export: {expr}"
            );
            used.insert(name);
        }
    }
    for (selector, _) in variable_queries(&dashboard) {
        for name in referenced_names(&selector) {
            assert!(exported.contains(&name), "variable query on {name}");
        }
    }
    for name in ESSENTIAL {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
    drop(busy.sessions);
    busy.a.shutdown().await;
}

/// Prometheus on its own port and data directory; killed on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: scripts/test.sh installs Debian's prometheus"
        );
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: roomwire\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus { addr, child, dir };
        eventually("prometheus ready", || async {
            matches!(
                common::try_http_request(addr, "GET", "/-/ready", None, None).await,
                Ok((200, _))
            )
        })
        .await;
        prometheus
    }

    /// `GET /api/v1/query?query=…`: the JSON answer (status "success" or "error").
    async fn query(&self, promql: &str) -> Value {
        let encoded: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (_, body) = common::try_http_request(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            None,
            None,
        )
        .await
        .expect("prometheus answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// The instant vector's values of `promql`, as strings.
    async fn values(&self, promql: &str) -> Vec<String> {
        let answer = self.query(promql).await;
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"][1].as_str().unwrap().to_string())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_node_and_the_dashboard_queries_it() {
    let busy = BusyNode::start().await;
    let prometheus = Prometheus::start(busy.a.addr).await;

    // The node's own values come back from Prometheus.
    let exposition = busy.exposition().await;
    let own = |prefix: &str| -> String {
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix} in {exposition}"))
            .trim()
            .to_string()
    };
    let (ws, published) = (
        own("roomwire_sessions{transport=\"ws\"} "),
        own("roomwire_messages_published_total "),
    );
    assert_eq!(ws, "1", "alice's session");
    assert_ne!(published, "0");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let sessions = prometheus
            .values("roomwire_sessions{transport=\"ws\"}")
            .await;
        let published_there = prometheus.values("roomwire_messages_published_total").await;
        if sessions == [ws.clone()] && published_there == [published.clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "prometheus has sessions {sessions:?}, published {published_there:?}; targets: {}",
            prometheus.query("up").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} scraped the node",
        String::from_utf8_lossy(
            &Command::new(PROMETHEUS)
                .arg("--version")
                .output()
                .unwrap()
                .stdout
        )
        .lines()
        .next()
        .unwrap_or_default()
    );

    // Every dashboard expression is PromQL this Prometheus evaluates, and shows data (rates
    // need two scrapes); the variables find the node; the sessions panel shows the sessions.
    let dashboard = dashboard();
    for (title, expr) in panel_queries(&dashboard) {
        let promql = as_grafana_sends_it(&expr);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let answer = prometheus.query(&promql).await;
            assert_eq!(
                answer["status"], "success",
                "panel {title:?}: {expr}: {answer}"
            );
            if answer["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "panel {title:?} shows nothing: {promql}: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for (selector, label) in variable_queries(&dashboard) {
        let answer = prometheus.query(&as_grafana_sends_it(&selector)).await;
        let series = answer["data"]["result"].as_array().unwrap();
        assert!(
            series.iter().any(|s| s["metric"][&label].is_string()),
            "variable {label}: {selector} finds no node: {answer}"
        );
    }
    let (title, expr) = panel_queries(&dashboard)
        .into_iter()
        .find(|(_, e)| e.contains("roomwire_sessions{"))
        .expect("a sessions panel");
    let answer = prometheus.query(&as_grafana_sends_it(&expr)).await;
    let panel_ws = answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metric"]["transport"] == "ws")
        .map(|s| s["value"][1].clone());
    assert_eq!(panel_ws, Some("1".into()), "panel {title:?}: {answer}");
    drop(busy.sessions);
    busy.a.shutdown().await;
}
