//! Durable room history in NATS JetStream (rooms whose class is `durable`).
//!
//! One stream per durable class, `<prefix>_history_<class>` (file storage, `mesh.jetstream_*`
//! placement and replicas, the class's `max_messages` per subject and `max_age`, direct gets
//! allowed), with two subjects per room:
//!
//! - `<prefix>.history.<class>.m.<room>`: the room's records in position order. A message record
//!   is the encoded `ServerFrame` its members received, with headers `Roomwire-Epoch` and
//!   `Roomwire-Seq`. An epoch record (`Roomwire-Seq: 0`) is the `EpochChanged` frame a new owner
//!   wrote before the first message of its new epoch: it names the last position stored before
//!   it, so a reader can tell that nothing acknowledged in the earlier epoch is missing.
//! - `<prefix>.history.<class>.f.<room>`: the room's fence. An owner appends a fence record
//!   (expecting the fence's last sequence it read) before it appends anything, and appends every
//!   record expecting that fence record to be the fence's last
//!   (`Nats-Expected-Last-Subject-Sequence` with `…-Subject`). A node that took the room over
//!   since has appended its own fence record, so the stale owner's appends are refused by
//!   JetStream itself: it cannot store, hence cannot acknowledge, whatever it believes.
//!
//! The owner acknowledges a publish only once JetStream has its record, and publishes to the
//! room's subject only after that, so a member never receives a message that is not stored, and
//! the stream holds every acknowledged message. Any node reads a room's history straight from
//! the stream (direct gets, batched), wherever its owner is.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::sync::Notify;

use super::Inner;
use crate::cluster::BusError;
use crate::config::HistoryMode;
use crate::proto::{self, ServerFrame, server_frame};
use crate::room::{Classes, History, KeptMessage, RoomName};

mod index;
mod open;
mod read;

use index::Index;
use open::open_loop;

const EPOCH: &str = "Roomwire-Epoch";
const SEQ: &str = "Roomwire-Seq";
const EXPECT_LAST: &str = "Nats-Expected-Last-Subject-Sequence";
const EXPECT_LAST_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// Pauses between attempts to open the streams: from the first, doubling to the last.
const OPEN_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// Records asked for in one batched direct get.
const BATCH: usize = 256;
/// History reads (direct gets) in flight at once on one node.
const MAX_READS: usize = 64;

/// Why the store could not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StoreError {
    /// Another node fenced the room since this one did: it no longer owns it.
    Fenced,
    /// JetStream did not answer in time, refused, or the stream is not open (yet).
    Unavailable(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fenced => write!(f, "another node took the room over (its history is fenced)"),
            Self::Unavailable(why) => write!(f, "durable history unavailable: {why}"),
        }
    }
}

impl From<StoreError> for BusError {
    fn from(error: StoreError) -> Self {
        BusError::Unavailable(error.to_string())
    }
}

/// One record of a room's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub stream_seq: u64,
    pub epoch: u64,
    /// 0: an epoch record.
    pub seq: u64,
    pub frame: Bytes,
}

impl Record {
    fn position(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }

    fn is_message(&self) -> bool {
        self.seq > 0
    }

    pub(super) fn kept(self) -> KeptMessage {
        KeptMessage {
            epoch: self.epoch,
            seq: self.seq,
            frame: self.frame,
        }
    }
}

/// The opened stream of one durable class.
pub(super) struct ClassStream {
    stream: stream::Stream,
    name: String,
    /// `<prefix>.history.<class>`.
    subjects: String,
}

impl ClassStream {
    fn messages(&self, room: &RoomName) -> String {
        format!("{}.m.{room}", self.subjects)
    }

    fn fence(&self, room: &RoomName) -> String {
        format!("{}.f.{room}", self.subjects)
    }
}

/// What taking a room's fence found in its stream.
pub(super) struct Fenced {
    /// The sequence of the fence record: appends are accepted while it is the fence's last.
    pub fence: u64,
    /// The last record stored, if any.
    pub last: Option<(u64, u64)>,
}

/// What follows a position in a room's stream.
#[derive(Debug)]
pub(super) enum After {
    /// The records right after it (message and epoch records), none missing; `more` follow.
    Records { records: Vec<Record>, more: bool },
    /// The position is not in the stream (older than what is kept, or never stored there):
    /// messages are kept from `oldest` on (the room's position when it keeps none).
    Reset { oldest: (u64, u64) },
    /// The room has no record at all.
    Empty,
}

/// Where a position is in a room's stream.
enum Located {
    /// The records after it start at this stream sequence.
    Start(u64),
    /// It is not kept; the oldest message kept.
    Reset((u64, u64)),
    /// The room has no record.
    Empty,
}

/// An append sent to JetStream and not yet acknowledged (see [`Store::start_append`]).
pub(super) struct PendingAppend {
    ack: jetstream::context::PublishAckFuture,
    started: Instant,
    room: RoomName,
    position: (u64, u64),
}

impl PendingAppend {
    /// Waits until JetStream has the record (or refused it).
    pub(super) async fn stored(self, store: &Store, inner: &Inner) -> Result<(), StoreError> {
        let result = self.ack.await;
        inner
            .metrics
            .history_append_seconds
            .observe(self.started.elapsed().as_secs_f64());
        match result {
            Ok(ack) => {
                inner
                    .metrics
                    .history_appends
                    .get_or_create(&[("outcome", "stored")])
                    .inc();
                store.index.lock().expect("index lock poisoned").remember(
                    &self.room,
                    self.position,
                    ack.sequence,
                );
                Ok(())
            }
            Err(e) => Err(store.append_failed(inner, e)),
        }
    }
}

/// The durable history streams.
pub(super) struct Store {
    js: jetstream::Context,
    /// The durable classes, by name.
    classes: Vec<History>,
    streams: RwLock<HashMap<Arc<str>, Arc<ClassStream>>>,
    /// Wakes the opener after an operation found a stream gone.
    reopen: Notify,
    /// Reads in flight (see [`Store::reading`]).
    reads: tokio::sync::Semaphore,
    /// Where recent records of each room are in its stream (see [`Index`]).
    index: std::sync::Mutex<Index>,
}

impl Store {
    /// The store of the durable ones among `classes`; nothing is opened yet ([`Self::start`]).
    pub(super) fn new(nats: &async_nats::Client, bound: Duration, classes: &Classes) -> Store {
        Store {
            js: jetstream::ContextBuilder::new()
                .timeout(bound)
                .build(nats.clone()),
            classes: classes
                .all()
                .into_iter()
                .filter(|c| c.mode == HistoryMode::Durable)
                .collect(),
            streams: RwLock::new(HashMap::new()),
            reopen: Notify::new(),
            reads: tokio::sync::Semaphore::new(MAX_READS),
            index: std::sync::Mutex::new(Index::default()),
        }
    }

    /// Opens the streams in the background (see [`open_loop`]).
    pub(super) fn start(self: &Arc<Self>, inner: &Arc<Inner>) {
        if !self.classes.is_empty() {
            tokio::spawn(open_loop(inner.clone(), self.clone()));
        }
    }

    /// Every durable class's stream is open (true when there is none).
    pub(super) fn is_ready(&self) -> bool {
        self.streams.read().expect("store lock poisoned").len() >= self.classes.len()
    }

    /// The stream of a durable class: `None` for other classes, an error while it is not open.
    pub(super) fn stream(&self, history: &History) -> Option<Result<Arc<ClassStream>, StoreError>> {
        if history.mode != HistoryMode::Durable {
            return None;
        }
        let streams = self.streams.read().expect("store lock poisoned");
        Some(
            streams
                .get(&history.class)
                .cloned()
                .ok_or_else(|| StoreError::Unavailable("the history stream is not open".into())),
        )
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(why.to_string())
    }

    /// Takes `room`'s fence for this node: from now on no other node's appends are accepted.
    /// Reads at the stream's leader, so what it finds is what is stored.
    pub(super) async fn fence(
        &self,
        stream: &ClassStream,
        room: &RoomName,
        node_id: &str,
    ) -> Result<Fenced, StoreError> {
        let fence_subject = stream.fence(room);
        let last_fence = match stream
            .stream
            .get_last_raw_message_by_subject(&fence_subject)
            .await
        {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(self.unavailable(format!("reading the fence: {e}"))),
        };
        let mut headers = HeaderMap::new();
        headers.insert(EXPECT_LAST, last_fence.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(
                fence_subject,
                headers,
                Bytes::copy_from_slice(node_id.as_bytes()),
            )
            .await
            .map_err(|e| self.unavailable(e))?
            .await;
        let seq = match ack {
            Ok(ack) => ack.sequence,
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                return Err(StoreError::Fenced);
            }
            Err(e) => {
                self.reopen_if_gone(&e.to_string());
                return Err(self.unavailable(e));
            }
        };
        let last = match stream
            .stream
            .get_last_raw_message_by_subject(&stream.messages(room))
            .await
        {
            Ok(message) => Some(position(&message.headers).ok_or_else(|| {
                self.unavailable(format!("record {} has no position", message.sequence))
            })?),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
            Err(e) => return Err(self.unavailable(format!("reading the last record: {e}"))),
        };
        Ok(Fenced { fence: seq, last })
    }

    /// Appends one record of `room` under `fence`, once JetStream has it.
    pub(super) async fn append(
        &self,
        inner: &Inner,
        (stream, fence): (&ClassStream, u64),
        room: &RoomName,
        position: (u64, u64),
        frame: Bytes,
    ) -> Result<(), StoreError> {
        self.start_append(inner, (stream, fence), room, position, frame)
            .await?
            .stored(self, inner)
            .await
    }

    /// Sends one record of `room` to JetStream under `fence`; [`PendingAppend::stored`] waits
    /// for JetStream to have it. Appends started one after the other reach the stream in that
    /// order (one connection), so a room's appends may be in flight several at a time: they all
    /// expect the same fence record, which none of them changes.
    pub(super) async fn start_append(
        &self,
        inner: &Inner,
        (stream, fence): (&ClassStream, u64),
        room: &RoomName,
        (epoch, seq): (u64, u64),
        frame: Bytes,
    ) -> Result<PendingAppend, StoreError> {
        let started = Instant::now();
        let mut headers = HeaderMap::new();
        headers.insert(EXPECT_LAST, fence.to_string().as_str());
        headers.insert(EXPECT_LAST_SUBJECT, stream.fence(room).as_str());
        headers.insert(EPOCH, epoch.to_string().as_str());
        headers.insert(SEQ, seq.to_string().as_str());
        match self
            .js
            .publish_with_headers(stream.messages(room), headers, frame)
            .await
        {
            Ok(ack) => Ok(PendingAppend {
                ack,
                started,
                room: room.clone(),
                position: (epoch, seq),
            }),
            Err(e) => Err(self.append_failed(inner, e)),
        }
    }

    fn append_failed(&self, inner: &Inner, e: jetstream::context::PublishError) -> StoreError {
        let outcome = if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
            "fenced"
        } else {
            "failed"
        };
        inner
            .metrics
            .history_appends
            .get_or_create(&[("outcome", outcome)])
            .inc();
        if outcome == "fenced" {
            return StoreError::Fenced;
        }
        self.reopen_if_gone(&e.to_string());
        self.unavailable(e)
    }

    fn reopen_if_gone(&self, error: &str) {
        if error.contains("no stream") || error.contains("not found") {
            self.reopen.notify_one();
        }
    }
}

/// The `EpochChanged` frame an epoch record holds.
pub(super) fn epoch_record(room: &RoomName, epoch: u64, previous: (u64, u64)) -> Bytes {
    ServerFrame::reply(
        0,
        server_frame::Kind::EpochChanged(proto::EpochChanged {
            room: room.to_string(),
            epoch,
            previous_epoch: previous.0,
            previous_seq: previous.1,
        }),
    )
    .encode_shared()
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

fn position(headers: &HeaderMap) -> Option<(u64, u64)> {
    Some((number(headers, EPOCH)?, number(headers, SEQ)?))
}
