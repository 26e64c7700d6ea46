//! Publishers for the failure tests: each publishes `<label>#<k>` (payload and client_msg_id)
//! into one room at a steady pace, one publish at a time, the way a careful client does: a
//! retryable UNAVAILABLE (or a request with no answer) is tried again with the *same*
//! client_msg_id until it is acknowledged or a bound passes. Every attempt is recorded with its
//! times (tokio `Instant`), the node that answered and the outcome, so a test can measure
//! failover, fencing and latency afterwards and [`super::audit`] can check delivery.
//!
//! A publisher may hold a second session (on another node): a publish refused by the first is
//! retried on the second, as a client that reconnects elsewhere would, and the next publish
//! starts on the first again, so the first node's behaviour is sampled all the time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roomwire::client::{Client, ClientError};
use roomwire::proto::{self, ErrorCode};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::DEADLINE;
use super::mesh::propagate;

/// A client's pause before it tries a refused publish again.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);

/// How one attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Acked(proto::PublishAck),
    /// The retryable UNAVAILABLE, with the node's message.
    Unavailable(String),
    /// No answer within the client's request timeout.
    Timeout,
    /// Anything else (another error, a closed session): the publisher stops.
    Failed(String),
}

/// One attempt of a publish, on one session.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub sent: Instant,
    pub answered: Instant,
    /// The node of the session that carried it.
    pub node: String,
    pub outcome: Outcome,
}

/// One publish (one client_msg_id) and all its attempts.
#[derive(Debug, Clone)]
pub struct Publish {
    pub publisher: String,
    pub room: String,
    /// Payload and client_msg_id.
    pub id: String,
    pub attempts: Vec<Attempt>,
}

impl Publish {
    /// The acknowledgement and the attempt that got it.
    pub fn acked(&self) -> Option<(&proto::PublishAck, &Attempt)> {
        self.attempts.iter().find_map(|a| match &a.outcome {
            Outcome::Acked(ack) => Some((ack, a)),
            _ => None,
        })
    }

    /// (epoch, seq) of the acknowledgement.
    pub fn position(&self) -> Option<(u64, u64)> {
        self.acked().map(|(ack, _)| (ack.epoch, ack.seq))
    }

    pub fn first_sent(&self) -> Instant {
        self.attempts[0].sent
    }

    /// From the first attempt to the acknowledgement.
    pub fn latency(&self) -> Option<Duration> {
        self.acked().map(|(_, a)| a.answered - self.first_sent())
    }

    pub fn refusals(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Unavailable(_)))
            .count()
    }

    pub fn timeouts(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Timeout))
            .count()
    }

    pub fn failure(&self) -> Option<&str> {
        self.attempts.iter().find_map(|a| match &a.outcome {
            Outcome::Failed(why) => Some(why.as_str()),
            _ => None,
        })
    }
}

/// A running publisher; see the module documentation.
pub struct Publisher {
    pub label: String,
    pub room: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Publish>>>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Publishes into `room` every `every`, on `sessions[0]` first and on the next session after
    /// each refusal; a publish is given up after `give_up_after` (it stays unacknowledged in
    /// the log). `sessions` are (node id, client).
    pub fn start(
        label: &str,
        room: &str,
        every: Duration,
        give_up_after: Duration,
        sessions: Vec<(String, Client)>,
    ) -> Publisher {
        assert!(!sessions.is_empty(), "{label}: no session to publish on");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (label_, room_, stop_, acked_, log_) = (
            label.to_string(),
            room.to_string(),
            stop.clone(),
            acked.clone(),
            log.clone(),
        );
        let task = tokio::spawn(async move {
            let mut pace = tokio::time::interval(every);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for k in 0.. {
                if stop_.load(Ordering::Relaxed) {
                    break;
                }
                pace.tick().await;
                let index = log_.lock().unwrap().len();
                log_.lock().unwrap().push(Publish {
                    publisher: label_.clone(),
                    room: room_.clone(),
                    id: format!("{label_}#{k}"),
                    attempts: Vec::new(),
                });
                let id = format!("{label_}#{k}");
                let started = Instant::now();
                let mut turn = 0usize;
                let done = loop {
                    let (node, client) = &sessions[turn % sessions.len()];
                    let sent = Instant::now();
                    let outcome = match client.publish(&room_, id.clone(), &id).await {
                        Ok(ack) => Outcome::Acked(ack),
                        Err(ClientError::Refused {
                            code: ErrorCode::Unavailable,
                            retryable: true,
                            message,
                        }) => Outcome::Unavailable(message),
                        Err(ClientError::Timeout(_)) => Outcome::Timeout,
                        Err(other) => Outcome::Failed(other.to_string()),
                    };
                    let attempt = Attempt {
                        sent,
                        answered: Instant::now(),
                        node: node.clone(),
                        outcome,
                    };
                    let settled = match &attempt.outcome {
                        Outcome::Acked(_) => Some(true),
                        Outcome::Failed(_) => Some(false),
                        _ => None,
                    };
                    log_.lock().unwrap()[index].attempts.push(attempt);
                    match settled {
                        Some(true) => {
                            acked_.fetch_add(1, Ordering::Relaxed);
                            break true;
                        }
                        Some(false) => break false,
                        None if started.elapsed() >= give_up_after => break true,
                        None => {
                            turn += 1;
                            tokio::time::sleep(RETRY_BACKOFF).await;
                        }
                    }
                };
                if !done {
                    break;
                }
            }
            for (_, client) in sessions {
                client.close().await;
            }
        });
        Publisher {
            label: label.into(),
            room: room.into(),
            stop,
            acked,
            log,
            task,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` publishes were acknowledged. A publisher that stopped on an
    /// error, or that makes no progress for [`DEADLINE`], fails the test here.
    pub async fn wait_acked(&mut self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.acked() < n {
            if self.task.is_finished() {
                propagate((&mut self.task).await);
                let failure = self
                    .publishes()
                    .iter()
                    .find_map(|p| p.failure().map(|why| format!("{} failed: {why}", p.id)));
                panic!(
                    "{}: stopped after {} acks: {failure:?}",
                    self.label,
                    self.acked()
                );
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

    /// Every publish so far (the one in flight included, with the attempts it has had).
    pub fn publishes(&self) -> Vec<Publish> {
        self.log.lock().unwrap().clone()
    }

    /// Stops after the publish in flight and returns every publish.
    pub async fn finish(self) -> Vec<Publish> {
        self.stop.store(true, Ordering::Relaxed);
        propagate(
            tokio::time::timeout(DEADLINE, self.task)
                .await
                .unwrap_or_else(|_| panic!("{}: publisher stops in time", self.label)),
        );
        Arc::try_unwrap(self.log)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|log| log.lock().unwrap().clone())
    }
}

/// Waits for `publishers` to finish, all publishes in one list.
pub async fn finish_all(publishers: Vec<Publisher>) -> Vec<Publish> {
    let mut all = Vec::new();
    for p in publishers {
        all.extend(p.finish().await);
    }
    all
}

/// `p`-th percentile (0–100) of `values` (sorted here), nearest rank.
pub fn percentile(values: &mut [Duration], p: f64) -> Duration {
    assert!(!values.is_empty(), "no values");
    values.sort();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
