//! roomwire behind a real nginx (Debian's, started by the test; `scripts/test.sh` installs
//! nginx-light), running the shipped example `deploy/nginx/roomwire.conf` with its ports
//! rewritten, in front of two meshed nodes: WebSocket clients chat through it, each client is
//! limited by the address nginx forwards (the nodes trust nginx's address), and a node that
//! drains answers new upgrades 503 so nginx sends them to the other node.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::nats::{NatsServer, TempDir, free_port};
use common::node_process::{NodeProcess, wait_converged};
use common::{eventually, next_message};
use roomwire::client::{Client, ClientOptions};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground with the example configuration in front of `nodes`.
struct Nginx {
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: TempDir,
}

impl Nginx {
    async fn start(nodes: [SocketAddr; 2]) -> Nginx {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "{NGINX} is missing: scripts/test.sh installs nginx-light"
        );
        let dir = TempDir::new("nginx");
        let port = free_port();
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/roomwire.conf"),
        )
        .unwrap();
        for placeholder in ["127.0.0.1:8080", "127.0.0.1:8081", "listen 8000;"] {
            assert!(
                example.contains(placeholder),
                "the example names {placeholder}"
            );
        }
        let site = example
            .replace("127.0.0.1:8080", &nodes[0].to_string())
            .replace("127.0.0.1:8081", &nodes[1].to_string())
            .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"));
        let d = dir.path().display();
        std::fs::write(dir.path().join("roomwire.conf"), site).unwrap();
        // The main file a distribution ships, reduced to what a test run needs (its own pid,
        // logs and temporary files).
        let main = format!(
            "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{}}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  include {d}/roomwire.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let child = tokio::process::Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let nginx = Nginx {
            addr,
            child,
            _dir: dir,
        };
        eventually("nginx listens", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        nginx
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A WebSocket upgrade through nginx from source address `source`: the open connection on 101
/// (the sessions held are what the limit counts), else the error (an HTTP status shows in it).
async fn upgrade_from(nginx: &Nginx, source: &str) -> Result<common::RawWs, String> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket
        .connect(nginx.addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = nginx.ws_url().into_client_request().unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_chat_through_nginx_are_limited_by_their_own_address_and_leave_a_draining_node() {
    let nats = NatsServer::start().await;
    let urls = [nats.url()];
    let extra = [
        r#"limits.trusted_proxies=["127.0.0.1"]"#,
        // At least what this test's own clients from 127.0.0.1 (alice, bob, three late ones and
        // the last one: six) may put on one node.
        "limits.max_connections_per_ip=6",
        "server.drain_grace_ms=3000",
    ];
    let a = NodeProcess::mesh_with("ng-a", "eu", &urls, &extra).await;
    let mut b = NodeProcess::mesh_with("ng-b", "eu", &urls, &extra).await;
    wait_converged(&[&a, &b]).await;
    let nginx = Nginx::start([a.addr, b.addr]).await;

    // Chat through nginx (round robin: the two clients land on different nodes).
    let alice = Client::connect(&nginx.ws_url(), ClientOptions::user("alice"))
        .await
        .expect("alice connects through nginx");
    let mut bob = Client::connect(&nginx.ws_url(), ClientOptions::user("bob"))
        .await
        .expect("bob connects through nginx");
    alice.join("lobby").await.unwrap();
    bob.join("lobby").await.unwrap();
    alice
        .publish("lobby", "hello via nginx", "n-1")
        .await
        .unwrap();
    let got = next_message(&mut bob).await;
    assert_eq!(&got.payload[..], b"hello via nginx");
    let nodes = [
        alice.connected().node_id.clone(),
        bob.connected().node_id.clone(),
    ];
    eprintln!("alice on {}, bob on {}", nodes[0], nodes[1]);

    // The nodes see each client's own address: 127.0.0.5 may hold six sessions on each node
    // (the limit is per node), then it is refused 429 whichever node nginx picks, while
    // 127.0.0.6, behind the same nginx, still connects.
    let mut held = Vec::new();
    let refused = loop {
        match upgrade_from(&nginx, "127.0.0.5").await {
            Ok(ws) => held.push(ws),
            Err(error) => break error,
        }
        let accepted = held.len();
        assert!(
            accepted <= 12,
            "more than 6 sessions per node from one client"
        );
    };
    let accepted = held.len();
    assert!(refused.contains("429"), "{refused}");
    assert!(
        accepted >= 6,
        "refused after {accepted} sessions: {refused}"
    );
    held.push(
        upgrade_from(&nginx, "127.0.0.6")
            .await
            .expect("another client behind the same nginx"),
    );

    // b drains: it answers new upgrades 503 and nginx sends them to a; once b is gone every
    // connection through nginx lands on a.
    std::process::Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap();
    eventually("b draining", || async { b.readyz().await != Some(200) }).await;
    for i in 0..3 {
        let client = Client::connect(&nginx.ws_url(), ClientOptions::user(&format!("late{i}")))
            .await
            .expect("a client connects through nginx while b drains");
        assert_eq!(
            client.connected().node_id,
            "ng-a",
            "nginx sent a new session to the draining node"
        );
    }
    // (A second SIGTERM is harmless; this waits for b's exit.)
    assert!(b.sigterm().await.success());
    let after = Client::connect(&nginx.ws_url(), ClientOptions::user("after"))
        .await
        .expect("a client connects through nginx once b is gone");
    assert_eq!(after.connected().node_id, "ng-a");
}
