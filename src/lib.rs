//! roomwire: a regional edge node for real-time rooms.
//!
//! Clients connect over WebTransport or WebSocket, join rooms and publish into them; every
//! member receives every message of a room in one order, sequenced by the room's owner. The
//! layers and where a feature goes: docs/ARCHITECTURE.md. Dependencies between the modules point
//! one way, from the leaves up:
//!
//! - leaves: [`proto`] (the wire contract and its framing), `ids` (every name and id rule),
//!   `clock` (monotonic time for deadlines, wall time for the wire), `metrics`.
//! - domain: [`config`] (one struct, validated before anything is bound), `room` (names, what a
//!   publish carries, the owner's state of a room: the one place a message is deduped and
//!   numbered), `auth` (tokens, client-certificate identity, API keys), `limits`, `tls`, `certs`,
//!   `telemetry` (OpenTelemetry spans and the trace context a publish carries across the mesh).
//! - `member`: the face a session shows the rest of the node (bounded send queue, close reason).
//! - `fanout` (who is a member where on this node, encode-once delivery) and `cluster` (the bus to
//!   each room's owner: standalone, or the NATS mesh with its pure ring, membership, order and
//!   ownership rules).
//! - `context` (the node's shared state) and `session` (one connection's life, written against
//!   the `FrameSource`/`FrameSink` port).
//! - adapters: `transport` (WebSocket, WebTransport), `http` (health, metrics, the server API),
//!   `web` (the embedded browser client and demo page).
//! - [`Node`]: binds, accepts, runs and drains. [`client`] and [`cli`] (the Rust client library
//!   and the command line) depend on [`proto`] only.
//!
//! Modules are private; what tests, benchmarks and the binary use is re-exported here.
#![forbid(unsafe_code)]

mod auth;
mod certs;
pub mod cli;
pub mod client;
mod clock;
mod cluster;
pub mod config;
mod context;
mod fanout;
mod http;
mod ids;
mod limits;
mod member;
mod metrics;
mod node;
pub mod proto;
mod room;
mod session;
mod telemetry;
mod tls;
mod transport;
mod web;

pub use certs::{DevCa, Issued, init as init_dev_certs, service_uri};
pub use cluster::ring::{DEFAULT_VNODES, Ring};
pub use config::Config;
pub use context::NodeContext;
pub use fanout::Hub;
pub use ids::random_hex;
pub use member::{Member, Transport};
pub use node::Node;
pub use room::RoomName;

/// The pure parsers and state machines the fuzz targets in `fuzz/` drive (see README, Fuzzing):
/// not an API, hidden from the docs, and with no promise of stability.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::cluster::mesh::wire::{
        HEADER, KIND_EPOCH, KIND_MESSAGE, KIND_SYNC, KIND_UNRELIABLE, RoomMessage, epoch_marker,
        header, join_marker,
    };
    pub use crate::cluster::order::{Effect, HOLD_MAX, Output, RoomOrder};
    pub use crate::ids::{
        IpBlock, is_name_segment, is_room_pattern, is_subject_token, is_valid_device_id,
        is_valid_user_id,
    };
    pub use crate::room::{RoomNameError, RoomPattern};
}
