//! OpenTelemetry across the mesh, checked end to end: two real nodes (the binary) export their
//! spans over OTLP/HTTP to a small receiver started here, which decodes each protobuf
//! `ExportTraceServiceRequest`. A publish from a client on the node that does not own the room
//! is one trace on both nodes (`room.publish` → `mesh.forward` → `room.sequence` → one
//! `room.deliver` per node), carried by `traceparent` headers on the NATS messages between
//! them; publishes batched into one forward request each stay a trace of their own. A
//! standalone node (in this process) records the same chain, and its HTTP API continues the
//! trace of a backend that sends a `traceparent`. With telemetry off, not one span reaches a
//! collector, even one the standard OTLP environment variables name, and no NATS message
//! carries trace context.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use roomwire::proto::mesh::{Request, request};

use common::mesh::{Member, rooms_owned_by};
use common::nats::NatsServer;
use common::node_process::{NodeProcess, wait_converged};
use common::{DEADLINE, TestNode, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One span as the receiver got it: hex ids, the node that sent it (`service.instance.id`).
#[derive(Debug, Clone)]
struct Got {
    service: String,
    node: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
    links: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A small OTLP/HTTP trace receiver on 127.0.0.1:0: `POST /v1/traces`, protobuf.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(spans.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Receiver { addr, spans, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// The one span on `node` named `name` in `trace`.
    fn one(&self, node: &str, name: &str, trace: &str) -> Option<Got> {
        let mut found: Vec<Got> = self
            .spans()
            .into_iter()
            .filter(|s| s.node == node && s.name == name && s.trace == trace)
            .collect();
        assert!(found.len() <= 1, "{name} on {node} twice in {trace}");
        found.pop()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn export(
    State(spans): State<Arc<Mutex<Vec<Got>>>>,
    body: Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut got = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let resource = |key: &str| resource.get(key).cloned().unwrap_or_default();
        let (service, node) = (resource("service.name"), resource("service.instance.id"));
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                got.push(Got {
                    service: service.clone(),
                    node: node.clone(),
                    name: span.name,
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    let reply = ExportTraceServiceResponse::default().encode_to_vec();
    (axum::http::StatusCode::OK, reply)
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// (epoch, seq) of a sequenced message on a room's subject (kind byte 1), if it is one.
fn room_message_position(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() < 17 || payload[0] != 1 {
        return None;
    }
    let read = |at: usize| u64::from_be_bytes(payload[at..at + 8].try_into().unwrap());
    Some((read(1), read(9)))
}

/// Whether a request on a node's request subject forwards publishes.
fn is_forward(payload: &Bytes) -> bool {
    matches!(
        Request::decode(payload.clone()),
        Ok(Request {
            kind: Some(request::Kind::Forward(_) | request::Kind::ForwardBatch(_))
        })
    )
}

fn traceparent(message: &async_nats::Message) -> Option<String> {
    message
        .headers
        .as_ref()?
        .get("traceparent")
        .map(|v| v.as_str().to_string())
}

/// Two meshed nodes n1 and n2 on one NATS server, with `extra` overrides (and `env`).
async fn two_nodes(
    nats: &NatsServer,
    extra: &[String],
    env: &[(String, String)],
) -> (NodeProcess, NodeProcess) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let n1 = NodeProcess::mesh_with_env("n1", "local", &[nats.url()], &extra, env).await;
    let n2 = NodeProcess::mesh_with_env("n2", "local", &[nats.url()], &extra, env).await;
    wait_converged(&[&n1, &n2]).await;
    (n1, n2)
}

/// Rooms `live.*` keep nothing; every other room is durable (JetStream).
const LIVE: &str = r#"{name="live",pattern="live.>",history="none"}"#;
const DURABLE: &str = r#"{name="rooms",pattern=">",history="durable",max_messages=5000,max_age_ms=3600000,max_bytes=67108864}"#;

/// A member on each node joins `room` (owned by n2), the one on n1 publishes, and the publish
/// is one trace: its spans on both nodes, their parents, and the `traceparent` headers of the
/// forward request and of the room message on NATS. Returns the members (n1's, n2's).
/// A client of `nats` that sees what crosses it for `room`: the requests to n2 (its owner in
/// these tests) and the room's subject. Keep the client while reading.
async fn watch_nats(
    nats: &NatsServer,
    room: &str,
) -> (
    async_nats::Client,
    async_nats::Subscriber,
    async_nats::Subscriber,
) {
    let watcher = async_nats::connect(nats.url()).await.unwrap();
    let requests = watcher.subscribe("roomwire.req.n2").await.unwrap();
    let room_subject = watcher
        .subscribe(format!("roomwire.room.{room}"))
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    (watcher, requests, room_subject)
}

async fn one_publish_is_one_trace(
    nats: &NatsServer,
    receiver: &Receiver,
    (n1, n2): (&NodeProcess, &NodeProcess),
    room: &str,
) -> (Member, Member) {
    assert_eq!(n1.owner_of(room).await, "n2");
    // What crosses NATS: forwarded publishes to n2, messages on the room's subject.
    let (_watcher, mut requests, mut room_subject) = watch_nats(nats, room).await;

    let alice = Member::join(n1, "alice", room).await;
    let bob = Member::join(n2, "bob", room).await;
    let ack = alice.publish(room, "hello").await.unwrap();
    for member in [&alice, &bob] {
        eventually("both members receive the message", || async {
            member.received().iter().any(|m| m.1 == ack.seq)
        })
        .await;
    }

    // The spans of the publish: found by its position, which its span records with the ack.
    let seq = ack.seq.to_string();
    let find_publish = || {
        receiver.spans().into_iter().find(|s| {
            s.node == "n1"
                && s.name == "room.publish"
                && s.attr("roomwire.room") == Some(room)
                && s.attr("roomwire.seq") == Some(seq.as_str())
        })
    };
    eventually("n1 exports the publish's span", || async {
        find_publish().is_some()
    })
    .await;
    let publish = find_publish().unwrap();
    let trace = publish.trace.clone();
    assert_eq!(publish.parent, "", "a client's publish starts its trace");
    assert_eq!(publish.service, "roomwire");
    assert_eq!(publish.attr("enduser.id"), Some("alice"));
    eventually("both nodes export the rest of the trace", || async {
        [
            ("n1", "mesh.forward"),
            ("n2", "room.sequence"),
            ("n1", "room.deliver"),
            ("n2", "room.deliver"),
        ]
        .iter()
        .all(|(node, name)| receiver.one(node, name, &trace).is_some())
    })
    .await;
    let forward = receiver.one("n1", "mesh.forward", &trace).unwrap();
    let sequence = receiver.one("n2", "room.sequence", &trace).unwrap();
    let deliveries = ["n1", "n2"].map(|n| receiver.one(n, "room.deliver", &trace).unwrap());
    assert_eq!(
        forward.parent, publish.id,
        "the forward is the publish's child"
    );
    assert_eq!(forward.attr("roomwire.owner"), Some("n2"));
    assert_eq!(
        sequence.parent, forward.id,
        "the owner's sequencing continues the forward's trace (n1 → n2)"
    );
    assert_eq!(sequence.attr("roomwire.room"), Some(room));
    assert_eq!(
        sequence.attr("roomwire.epoch"),
        Some(ack.epoch.to_string().as_str())
    );
    assert_eq!(sequence.attr("roomwire.seq"), Some(seq.as_str()));
    for delivery in &deliveries {
        assert_eq!(
            delivery.parent, sequence.id,
            "{}'s delivery is the sequencing's child (n2 → every node with members)",
            delivery.node
        );
        assert_eq!(delivery.attr("roomwire.seq"), Some(seq.as_str()));
        assert_eq!(delivery.attr("roomwire.deliveries"), Some("1"));
    }

    // The context crossed NATS in headers: the forward request's is the forward span's, the
    // room message's the sequencing's.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let forwarded = loop {
        let message = tokio::time::timeout_at(deadline, requests.next())
            .await
            .expect("the forward request")
            .unwrap();
        if is_forward(&message.payload) {
            break message;
        }
        assert_eq!(traceparent(&message), None, "only forwards are traced");
    };
    let header = traceparent(&forwarded).expect("a traceparent on the forward request");
    assert_eq!(header, format!("00-{trace}-{}-01", forward.id));
    let sent = loop {
        let message = tokio::time::timeout_at(deadline, room_subject.next())
            .await
            .expect("the room message")
            .unwrap();
        if room_message_position(&message.payload) == Some((ack.epoch, ack.seq)) {
            break message;
        }
    };
    let header = traceparent(&sent).expect("a traceparent on the room message");
    assert_eq!(header, format!("00-{trace}-{}-01", sequence.id));

    (alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_through_a_non_owner_is_one_trace_across_both_nodes() {
    let receiver = Receiver::start().await;
    let nats = NatsServer::start().await;
    let traced = [
        format!(r#"telemetry.otlp_endpoint="{}""#, receiver.endpoint()),
        "telemetry.batch_delay_ms=100".to_string(),
        format!("rooms.classes=[{LIVE},{DURABLE}]"),
    ];
    let (n1, n2) = two_nodes(&nats, &traced, &[]).await;
    let room = rooms_owned_by(&["n1", "n2"], "n2", 1, "traced.").remove(0);

    // A durable room (its message goes out once stored) and one that keeps nothing (out under
    // the room's lock): two ways out to the members, one trace each.
    let _members = one_publish_is_one_trace(&nats, &receiver, (&n1, &n2), &room).await;
    let live = rooms_owned_by(&["n1", "n2"], "n2", 1, "live.").remove(0);
    let _live_members = one_publish_is_one_trace(&nats, &receiver, (&n1, &n2), &live).await;

    // Connects and joins are spans of their own on the node that served them.
    for (node, user) in [("n1", "alice"), ("n2", "bob")] {
        for name in ["session.connect", "room.join"] {
            eventually(&format!("{node} exports {user}'s {name}"), || async {
                receiver
                    .spans()
                    .iter()
                    .any(|s| s.node == node && s.name == name && s.attr("enduser.id") == Some(user))
            })
            .await;
        }
    }

    // Publishes sent faster than a round trip to the owner travel in one forward request, yet
    // each stays one trace: its sequencing and both deliveries are in it.
    // (A client of its own: a Member publishes one at a time.)
    let carol = n1.client("carol").await;
    let payloads: Vec<String> = (0..20).map(|i| format!("burst {i}")).collect();
    let publishes = payloads.iter().map(|p| carol.publish(&room, p.clone(), p));
    let acks: Vec<_> = futures_util::future::join_all(publishes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let by_seq = |node: &str, name: &str, seq: u64| {
        let seq = seq.to_string();
        receiver.spans().into_iter().find(|s| {
            s.node == node
                && s.name == name
                && s.attr("roomwire.room") == Some(room.as_str())
                && s.attr("roomwire.seq") == Some(seq.as_str())
        })
    };
    eventually("every burst publish's spans are exported", || async {
        acks.iter().all(|ack| {
            by_seq("n1", "room.publish", ack.seq).is_some_and(|p| {
                receiver.one("n2", "room.sequence", &p.trace).is_some()
                    && receiver.one("n1", "room.deliver", &p.trace).is_some()
                    && receiver.one("n2", "room.deliver", &p.trace).is_some()
            })
        })
    })
    .await;
    let forwards: Vec<Got> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "mesh.forward")
        .collect();
    let batch = forwards
        .iter()
        .find(|f| f.attr("roomwire.publishes").is_some_and(|n| n != "1"))
        .expect("a forward request carried several publishes");
    for ack in &acks {
        let publish = by_seq("n1", "room.publish", ack.seq).unwrap();
        let sequence = receiver.one("n2", "room.sequence", &publish.trace).unwrap();
        assert_eq!(
            sequence.attr("roomwire.seq"),
            Some(ack.seq.to_string().as_str())
        );
        // The first publish of a request rides on its forward span; a later one on its own
        // context, and the forward span links to it.
        let via_forward = forwards
            .iter()
            .any(|f| f.id == sequence.parent && f.parent == publish.id);
        assert!(
            via_forward || sequence.parent == publish.id,
            "the sequencing of #{} is in its own publish's trace",
            ack.seq
        );
        if !via_forward {
            assert!(
                forwards.iter().any(|f| f
                    .links
                    .contains(&(publish.trace.clone(), publish.id.clone()))),
                "a batch's forward links to #{}",
                ack.seq
            );
        }
    }
    assert!(!batch.links.is_empty(), "{batch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_telemetry_off_nothing_is_exported_and_no_context_crosses_nats() {
    let receiver = Receiver::start().await;
    let nats = NatsServer::start().await;
    // The standard OTLP variables name the receiver: off still means no exporter at all.
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            receiver.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "50".to_string()),
    ];
    let (mut n1, mut n2) = two_nodes(&nats, &[], &env).await;
    let room = rooms_owned_by(&["n1", "n2"], "n2", 1, "untraced.").remove(0);
    assert_eq!(n1.owner_of(&room).await, "n2");

    let (_watcher, mut requests, mut room_subject) = watch_nats(&nats, &room).await;

    let alice = Member::join(&n1, "alice", &room).await;
    let bob = Member::join(&n2, "bob", &room).await;
    let ack = alice.publish(&room, "hello").await.unwrap();
    eventually("bob receives the message", || async {
        bob.received().iter().any(|m| m.1 == ack.seq)
    })
    .await;

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let forwarded = loop {
        let message = tokio::time::timeout_at(deadline, requests.next())
            .await
            .expect("the forward request")
            .unwrap();
        assert_eq!(traceparent(&message), None);
        if is_forward(&message.payload) {
            break message;
        }
    };
    assert!(forwarded.headers.is_none(), "{:?}", forwarded.headers);
    loop {
        let message = tokio::time::timeout_at(deadline, room_subject.next())
            .await
            .expect("the room message")
            .unwrap();
        assert!(message.headers.is_none(), "{:?}", message.headers);
        if room_message_position(&message.payload) == Some((ack.epoch, ack.seq)) {
            break;
        }
    }

    // A node that exported anything would flush it on the way out.
    drop((alice, bob));
    assert!(n1.sigterm().await.success());
    assert!(n2.sigterm().await.success());
    assert!(
        receiver.spans().is_empty(),
        "spans exported with telemetry off: {:?}",
        receiver.spans()
    );
}

/// `POST /api/v1/publish` with a `traceparent` header, as a backend that traces its own call
/// sends it; returns the status line.
async fn publish_over_http_with(node: &TestNode, traceparent: &str, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         traceparent: {traceparent}\r\nContent-Length: {}\r\n\r\n{body}",
        common::API_KEY,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_a_publish_is_one_trace_and_the_api_continues_a_callers_trace() {
    let receiver = Receiver::start().await;
    let endpoint = receiver.endpoint();
    let node = TestNode::start_with(|config| {
        config.telemetry.otlp_endpoint = endpoint;
        config.telemetry.batch_delay_ms = 100;
    })
    .await;
    let mut bob = node.client("bob").await;
    bob.join("lobby").await.unwrap();
    let alice = node.client("alice").await;
    let ack = alice.publish("lobby", "hi", "m1").await.unwrap();
    common::next_message(&mut bob).await;

    let node_id = "test-node";
    let publish_of = |seq: u64| {
        let seq = seq.to_string();
        receiver.spans().into_iter().find(|s| {
            s.name == "room.publish"
                && s.attr("roomwire.room") == Some("lobby")
                && s.attr("roomwire.seq") == Some(seq.as_str())
        })
    };
    eventually("the publish's trace is exported", || async {
        publish_of(ack.seq).is_some_and(|p| {
            receiver.one(node_id, "room.sequence", &p.trace).is_some()
                && receiver.one(node_id, "room.deliver", &p.trace).is_some()
        })
    })
    .await;
    let publish = publish_of(ack.seq).unwrap();
    let sequence = receiver
        .one(node_id, "room.sequence", &publish.trace)
        .unwrap();
    let delivery = receiver
        .one(node_id, "room.deliver", &publish.trace)
        .unwrap();
    assert_eq!(publish.node, node_id);
    assert_eq!(sequence.parent, publish.id);
    assert_eq!(delivery.parent, sequence.id);
    assert_eq!(delivery.attr("roomwire.deliveries"), Some("1"));

    // A backend's own trace continues through the HTTP API.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let status = publish_over_http_with(
        &node,
        &format!("00-{caller_trace}-{caller_span}-01"),
        r#"{"room":"lobby","data":"from the backend"}"#,
    )
    .await;
    assert!(status.contains(" 200 "), "{status}");
    eventually(
        "the API's publish is exported in the caller's trace",
        || async {
            receiver
                .one(node_id, "room.deliver", caller_trace)
                .is_some()
        },
    )
    .await;
    let api = receiver.one(node_id, "room.publish", caller_trace).unwrap();
    assert_eq!(api.parent, caller_span);
    assert_eq!(api.attr("enduser.id"), Some("$server"));
    assert_eq!(
        receiver
            .one(node_id, "room.sequence", caller_trace)
            .unwrap()
            .parent,
        api.id
    );
    node.shutdown().await;
}
