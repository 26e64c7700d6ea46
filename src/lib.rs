//! roomwire: a regional edge node for real-time rooms.
//!
//! Clients connect over WebTransport or WebSocket, join rooms and publish into them;
//! every member receives every message of a room in one order, sequenced by the room's owner.
//!
//! Map of the modules, in the order a message travels:
//! - [`config`]: the one configuration struct (TOML file, environment, CLI overrides), validated
//!   before anything is bound.
//! - [`limits`]: per-address gates at accept and per-session rate budgets.
//! - [`tls`]: TLS and mutual TLS for the WebSocket port, service identity from certificates;
//!   [`certs`] makes development certificates.
//! - [`auth`]: JWT connection tokens, room permissions, anti-replay.
//! - [`proto`]: the Protobuf wire contract (`proto/roomwire/v1/roomwire.proto`) and its encoding.
//! - [`transport`]: adapters that turn a connection into frames in and frames out
//!   ([`transport::ws`] for WebSocket, [`transport::webtransport`] for WebTransport over QUIC with
//!   its certificate in [`transport::certs`]); nothing else knows the wire.
//! - [`session`]: one connection's life cycle, its reader and writer tasks, the bounded send queue
//!   and the slow-consumer policy.
//! - [`room`]: validated room names and the owner's sequencer (epoch, seq).
//! - [`cluster`]: the routing interface to room owners: standalone in-process, or the NATS mesh
//!   (heartbeat membership, consistent-hash ring, forwarding, hand-off; docs/CLUSTER.md).
//! - [`fanout`]: local membership and the encode-once push of a frame to every member's queue.
//! - [`http`]: health, readiness, metrics and the server API, on the WebSocket port.
//! - [`metrics`]: the Prometheus registry.
//! - [`node`]: binds, accepts, runs and drains the whole node.
//! - [`client`]: the Rust client library used by the CLI, the tests and the load generator.
//! - [`web`]: the embedded browser client (ES module) and the demo chat page.
#![forbid(unsafe_code)]

pub mod auth;
pub mod certs;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod context;
pub mod fanout;
pub mod http;
pub mod ids;
pub mod limits;
pub mod member;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod room;
pub mod session;
pub mod tls;
pub mod transport;
pub mod web;

pub use config::Config;
pub use context::NodeContext;
pub use node::Node;
