//! The mesh tests' members and publishers, shared by tests/mesh.rs and tests/fencing.rs: a
//! [`Member`] joins a room on a node and records everything its session receives, in order;
//! [`publish_until_acked`] and [`Pump`] publish the way a client must (a retryable UNAVAILABLE is
//! retried with the same client_msg_id); the checks on what members received; where the ring
//! puts rooms; and the two-region, three-node mesh several tests start from.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use roomwire::client::{Client, ClientError, Event};
use roomwire::proto::{self, ErrorCode};
use roomwire::{DEFAULT_VNODES, Ring};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::DEADLINE;
use super::nats::NatsServer;
use super::node_process::{NodeProcess, wait_converged};

/// A publish the member's task makes on the member's own session: room, payload (also the
/// client_msg_id), and where the outcome goes.
pub type PublishOrder = (
    String,
    String,
    oneshot::Sender<Result<proto::PublishAck, ClientError>>,
);

/// A client that joined a room; a task collects everything the node sends it, in order, and
/// publishes on its session when asked ([`Member::publish`]).
pub struct Member {
    pub label: String,
    pub joined: proto::Joined,
    /// When the join was answered: a publish sent after it is sequenced after `joined`.
    pub joined_at: tokio::time::Instant,
    pub events: Arc<Mutex<Vec<Event>>>,
    publishes: mpsc::Sender<PublishOrder>,
    task: JoinHandle<()>,
}

impl Member {
    pub async fn join(node: &NodeProcess, user: &str, room: &str) -> Member {
        let client = node.client(user).await;
        let joined = client
            .join(room)
            .await
            .unwrap_or_else(|e| panic!("{user}@{} joins {room}: {e}", node.id));
        Self::watch(format!("{user}@{}", node.id), client, joined)
    }

    /// A session of `user` that joined no room: it is a member of its implicit rooms only
    /// (`$user.<user>` and `$broadcast`); `joined` is left empty.
    pub async fn connect(node: &NodeProcess, user: &str) -> Member {
        let client = node.client(user).await;
        Self::watch(
            format!("{user}@{}", node.id),
            client,
            proto::Joined::default(),
        )
    }

    pub fn watch(label: String, mut client: Client, joined: proto::Joined) -> Member {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        // One publish at a time; nobody asks for more.
        let (publishes, mut orders) = mpsc::channel::<PublishOrder>(1);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = client.next_event() => match event {
                        Some(event) => sink.lock().unwrap().push(event),
                        None => break,
                    },
                    Some((room, payload, done)) = orders.recv() => {
                        let _ = done.send(client.publish(&room, payload.clone(), &payload).await);
                    }
                }
            }
        });
        Member {
            label,
            joined,
            joined_at: tokio::time::Instant::now(),
            events,
            publishes,
            task,
        }
    }

    /// Publishes `payload` (its own client_msg_id) into `room` on this member's session.
    pub async fn publish(
        &self,
        room: &str,
        payload: &str,
    ) -> Result<proto::PublishAck, ClientError> {
        let (done, outcome) = oneshot::channel();
        self.publishes
            .send((room.into(), payload.into(), done))
            .await
            .unwrap_or_else(|_| panic!("{}: the session's task has ended", self.label));
        outcome
            .await
            .unwrap_or_else(|_| panic!("{}: the session's task has ended", self.label))
    }

    /// (epoch, seq, payload) of every message received so far, in arrival order.
    pub fn received(&self) -> Vec<(u64, u64, String)> {
        self.received_where(|_| true)
    }

    /// [`Member::received`], of the messages of `room` only.
    pub fn received_in(&self, room: &str) -> Vec<(u64, u64, String)> {
        self.received_where(|m| m.room == room)
    }

    pub fn received_where(
        &self,
        keep: impl Fn(&proto::Message) -> bool,
    ) -> Vec<(u64, u64, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) if keep(m) => Some((
                    m.epoch,
                    m.seq,
                    String::from_utf8_lossy(&m.payload).into_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The close code, once the session has closed (`Some(None)`: closed without a code).
    pub fn closed(&self) -> Option<Option<u16>> {
        self.events.lock().unwrap().iter().find_map(|e| match e {
            Event::Closed { code, .. } => Some(*code),
            _ => None,
        })
    }

    /// Every event other than a message (GoAway, Closed, EpochChanged...), in order.
    pub fn other_events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| !matches!(e, Event::Message(_)))
            .map(describe)
            .collect()
    }

    /// The position of the last message received (where `Joined` put it when none yet).
    pub fn last_position(&self) -> (u64, u64) {
        self.received()
            .last()
            .map_or((self.joined.epoch, self.joined.seq), |(e, s, _)| (*e, *s))
    }

    /// The timeline for failure messages: runs of contiguous messages as `epoch:first..last`.
    pub fn summary(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        let mut run: Option<(u64, u64, u64)> = None;
        let flush = |run: &mut Option<(u64, u64, u64)>, out: &mut Vec<String>| {
            if let Some((e, a, b)) = run.take() {
                out.push(format!("{e}:{a}..{b}"));
            }
        };
        for event in self.events.lock().unwrap().iter() {
            match event {
                Event::Message(m) => match &mut run {
                    Some((e, _, b)) if *e == m.epoch && *b + 1 == m.seq => *b = m.seq,
                    _ => {
                        flush(&mut run, &mut out);
                        run = Some((m.epoch, m.seq, m.seq));
                    }
                },
                other => {
                    flush(&mut run, &mut out);
                    out.push(describe(other));
                }
            }
        }
        flush(&mut run, &mut out);
        format!("{}: {}", self.label, out.join(", "))
    }

    /// Every change of epoch in the messages is announced by exactly one `EpochChanged` right
    /// before the new epoch's first message, naming the last (epoch, seq) delivered before it;
    /// no other event (GoAway, Closed, Error...) reached the member. Returns the epochs seen.
    pub fn assert_epoch_changes_announced(&self) -> Vec<u64> {
        let events = self.events.lock().unwrap().clone();
        let mut last = Some((self.joined.epoch, self.joined.seq));
        let mut announced: Option<(u64, u64, u64)> = None;
        let mut epochs = Vec::new();
        for event in &events {
            match event {
                Event::Message(m) => {
                    let changed = last.is_some_and(|(e, _)| e != m.epoch);
                    if changed {
                        let (e, s) = last.unwrap();
                        assert_eq!(
                            announced,
                            Some((e, s, m.epoch)),
                            "{}: epoch {e} -> {} without EpochChanged({e}:{s} -> {}) right \
                             before it",
                            self.summary(),
                            m.epoch,
                            m.epoch
                        );
                    } else {
                        assert_eq!(
                            announced,
                            None,
                            "{}: EpochChanged without a new epoch after it",
                            self.summary()
                        );
                    }
                    if epochs.last() != Some(&m.epoch) {
                        epochs.push(m.epoch);
                    }
                    announced = None;
                    last = Some((m.epoch, m.seq));
                }
                Event::EpochChanged(c) => {
                    assert!(
                        announced.is_none(),
                        "{}: two EpochChanged in a row",
                        self.summary()
                    );
                    announced = Some((c.previous_epoch, c.previous_seq, c.epoch));
                }
                other => panic!("{}: unexpected {other:?}", self.summary()),
            }
        }
        assert_eq!(
            announced,
            None,
            "{}: a trailing EpochChanged",
            self.summary()
        );
        epochs
    }
}

/// A message as `epoch:seq`, an EpochChanged as `EpochChanged(prev_epoch:prev_seq -> epoch)`,
/// anything else in its Debug form.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Message(m) => format!("{}:{}", m.epoch, m.seq),
        Event::EpochChanged(c) => format!(
            "EpochChanged({}:{} -> {})",
            c.previous_epoch, c.previous_seq, c.epoch
        ),
        other => format!("{other:?}"),
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One publish as it ended: acknowledged, after `refusals` retryable refusals.
#[derive(Debug, Clone)]
pub struct Sent {
    pub payload: String,
    pub ack: proto::PublishAck,
    /// Messages of the retryable refusals before the acknowledgement (same client_msg_id).
    pub refusals: Vec<String>,
}

/// Publishes `payload` (its own client_msg_id) until it is acknowledged, retrying a retryable
/// UNAVAILABLE with the same id, as a client must. Anything else — a request that times out with
/// no answer, a closed session, another error — fails the test: the node must always answer.
pub async fn publish_until_acked(client: &Client, who: &str, room: &str, payload: &str) -> Sent {
    let deadline = Instant::now() + DEADLINE;
    let mut refusals = Vec::new();
    loop {
        match client.publish(room, payload.to_string(), payload).await {
            Ok(ack) => {
                return Sent {
                    payload: payload.into(),
                    ack,
                    refusals,
                };
            }
            Err(ClientError::Refused {
                code: ErrorCode::Unavailable,
                retryable: true,
                message,
            }) => {
                refusals.push(message);
                assert!(
                    Instant::now() < deadline,
                    "{who}: {payload} still refused after {DEADLINE:?}: {refusals:?}"
                );
                // A client's retry backoff (not a wait for a condition).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!(
                "{who}: publish {payload} got neither an acknowledgement nor a retryable \
                 refusal: {other} (after {} refusals)",
                refusals.len()
            ),
        }
    }
}

/// A publisher publishing `<label>#<k>` into a room, one at a time, paced, until stopped.
pub struct Pump {
    label: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    task: JoinHandle<Vec<Sent>>,
}

impl Pump {
    pub fn start(label: &str, client: Client, room: &str) -> Pump {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let (label_, room, stop_, acked_) = (
            label.to_string(),
            room.to_string(),
            stop.clone(),
            acked.clone(),
        );
        let task = tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(4));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = Vec::new();
            for k in 0.. {
                if stop_.load(Ordering::Relaxed) {
                    break;
                }
                pace.tick().await;
                let payload = format!("{label_}#{k}");
                sent.push(publish_until_acked(&client, &label_, &room, &payload).await);
                acked_.fetch_add(1, Ordering::Relaxed);
            }
            client.close().await;
            sent
        });
        Pump {
            label: label.into(),
            stop,
            acked,
            task,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` publishes were acknowledged (a failed pump fails the test here).
    pub async fn wait_acked(&mut self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.acked() < n {
            if self.task.is_finished() {
                propagate((&mut self.task).await);
            }
            assert!(
                Instant::now() < deadline,
                "{}: only {} of {n} publishes acknowledged in time",
                self.label,
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops after the publish in flight and returns every publish, all acknowledged.
    pub async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        propagate(
            tokio::time::timeout(DEADLINE, self.task)
                .await
                .expect("publisher stops in time"),
        )
    }
}

/// A task's result, or its panic re-raised with the original message.
pub fn propagate<T>(result: Result<T, tokio::task::JoinError>) -> T {
    result.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Waits until every member has received every payload of `sent`.
pub async fn wait_received(members: &[&Member], sent: &[Sent]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let missing: Vec<(String, usize, Vec<String>)> = members
            .iter()
            .filter_map(|m| {
                let got: HashSet<String> = m.received().into_iter().map(|(_, _, p)| p).collect();
                let missing: Vec<String> = sent
                    .iter()
                    .filter(|s| !got.contains(&s.payload))
                    .map(|s| s.payload.clone())
                    .collect();
                (!missing.is_empty()).then(|| {
                    let n = missing.len();
                    (m.label.clone(), n, missing.into_iter().take(5).collect())
                })
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged messages never reached these members (member, count missing, first \
             ones): {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acknowledgement names the position at which `received` holds its payload.
pub fn assert_acks_match(label: &str, received: &[(u64, u64, String)], sent: &[Sent]) {
    let at: HashMap<(u64, u64), &str> = received
        .iter()
        .map(|(e, s, p)| ((*e, *s), p.as_str()))
        .collect();
    for s in sent {
        let position = (s.ack.epoch, s.ack.seq);
        assert_eq!(
            at.get(&position).copied(),
            Some(s.payload.as_str()),
            "{label}: {} was acknowledged at (epoch, seq) {position:?}, which holds {:?}",
            s.payload,
            at.get(&position)
        );
    }
}

/// Seqs of one epoch run k, k+1, k+2...; returns the first offending pair.
pub fn first_gap(received: &[(u64, u64, String)]) -> Option<(u64, u64, u64, u64)> {
    received.windows(2).find_map(|w| {
        let ((e1, s1, _), (e2, s2, _)) = (&w[0], &w[1]);
        (e1 == e2 && *s2 != s1 + 1).then_some((*e1, *s1, *e2, *s2))
    })
}

pub fn payloads(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(|s| s.payload.clone()).collect()
}

/// Owners of `rooms` as `node` reports them, in order.
pub async fn owners(node: &NodeProcess, rooms: &[String]) -> Vec<String> {
    futures_util::stream::iter(rooms)
        .map(|room| node.owner_of(room))
        .buffered(8)
        .collect()
        .await
}

pub fn ring_owners(ids: &[&str], rooms: &[String]) -> Vec<String> {
    let ring = Ring::new(ids, DEFAULT_VNODES);
    rooms
        .iter()
        .map(|r| ring.owner(r).unwrap().to_string())
        .collect()
}

/// The first `n` rooms named `<prefix><i>` that the ring of `ids` gives to `owner`.
pub fn rooms_owned_by(ids: &[&str], owner: &str, n: usize, prefix: &str) -> Vec<String> {
    let ring = Ring::new(ids, DEFAULT_VNODES);
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|room| ring.owner(room).is_some_and(|o| **o == *owner))
        .take(n)
        .collect()
}

/// Lines of `GET /metrics` starting with `name` (label sets included).
pub async fn metric_lines(node: &NodeProcess, name: &str) -> Vec<String> {
    let (_, body) = node.try_get("/metrics").await.expect("metrics answer");
    body.lines()
        .filter(|l| l.starts_with(name))
        .map(str::to_string)
        .collect()
}

/// Two regions (`eu`, `us`: two nats-servers joined by a gateway) and three nodes, n1 and n2 in
/// eu, n3 in us, each seeing all three.
pub async fn two_regions_three_nodes() -> (Vec<NatsServer>, [NodeProcess; 3]) {
    let nats = NatsServer::start_gateways(&["eu", "us"]).await;
    let n1 = NodeProcess::mesh("n1", "eu", &[nats[0].url()]).await;
    let n2 = NodeProcess::mesh("n2", "eu", &[nats[0].url()]).await;
    let n3 = NodeProcess::mesh("n3", "us", &[nats[1].url()]).await;
    wait_converged(&[&n1, &n2, &n3]).await;
    (nats, [n1, n2, n3])
}

/// Connects `user` to `node` resuming `room` from `since` (`Connect.resume`) and checks what it
/// is replayed against what was acknowledged and what the live members received: every
/// publish acknowledged after `since` at its acknowledged position, every message the live
/// members got after `since`, in position order, no position twice, and `Joined` saying
/// `recovered`. (It may also get a message a crashed owner stored but never sent nor
/// acknowledged.) Returns how many messages were replayed.
pub async fn assert_resume_replays_everything(
    node: &NodeProcess,
    user: &str,
    room: &str,
    since: (u64, u64),
    sent: &[Sent],
    live: &[(u64, u64, String)],
) -> usize {
    let options = roomwire::client::ClientOptions {
        resume: vec![proto::RoomPosition {
            room: room.into(),
            epoch: since.0,
            seq: since.1,
        }],
        ..roomwire::client::ClientOptions::user(user)
    };
    let mut client = Client::connect(&node.ws_url(), options).await.unwrap();
    let mut got: Vec<(u64, u64, String)> = Vec::new();
    let joined = loop {
        match tokio::time::timeout(DEADLINE, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("{user}: no Joined in time after {} messages", got.len()))
        {
            Some(Event::Message(m)) => got.push((
                m.epoch,
                m.seq,
                String::from_utf8(m.payload.to_vec()).unwrap(),
            )),
            Some(Event::EpochChanged(_)) => {}
            Some(Event::Joined(j)) => break j,
            other => panic!("{user}: unexpected {other:?}"),
        }
    };
    let recovery = joined
        .recovery
        .expect("a resumed Joined says what became of it");
    assert!(recovery.recovered, "{user}: {joined:?}");
    assert_eq!(recovery.replayed as usize, got.len(), "{user}");
    for w in got.windows(2) {
        assert!(
            (w[0].0, w[0].1) < (w[1].0, w[1].1),
            "{user}: not in position order: {w:?}"
        );
    }
    assert!(got.iter().all(|(e, s, _)| (*e, *s) > since), "{user}");
    for s in sent {
        let at = (s.ack.epoch, s.ack.seq);
        if at > since {
            assert!(
                got.iter()
                    .any(|(e, q, p)| (*e, *q) == at && *p == s.payload),
                "{user}: acknowledged {} at {at:?} not replayed",
                s.payload
            );
        }
    }
    for m in live.iter().filter(|(e, s, _)| (*e, *s) > since) {
        assert!(
            got.contains(m),
            "{user}: {m:?} reached the live members, not the replay"
        );
    }
    client.close().await;
    got.len()
}
