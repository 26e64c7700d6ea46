//! The reconnect storm (roomwire mesh only): every member session sits on the first node, in
//! `rooms` rooms, while a publisher on another node publishes into each; the first node is killed
//! (SIGKILL), and every session reconnects to the surviving nodes at once, resuming its room
//! (`Connect.resume`) from the last message it got. Measured: how long until every session is
//! back and caught up (its resume answered: the replay is done and it is live again), what was
//! replayed, and, once publishing stops, that every session has every acknowledged message of its
//! room, in order, once (gaps, repeats and missing messages must all be 0).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use roomwire::proto::{self, ServerFrame, server_frame};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as Ws;

use super::{Common, client_frame, emit, open};

/// What one member session saw over the whole run.
#[derive(Default)]
struct Seen {
    /// The last message's position.
    position: (u64, u64),
    /// Messages received, in total.
    messages: u64,
    /// Messages whose position did not follow the previous one (and no epoch change said why).
    gaps: u64,
    /// Messages at or before a position already received.
    repeats: u64,
    /// From the kill until this session's resume was answered.
    back_after: Option<Duration>,
    /// Messages replayed on resume (`Joined.recovery.replayed`).
    replayed: u64,
    /// Resumes that came back as a reset.
    resets: u64,
}

impl Seen {
    /// A message at `(epoch, seq)`; `announced` is the epoch change received just before, if any.
    fn message(&mut self, epoch: u64, seq: u64, announced: Option<(u64, u64, u64)>) {
        self.messages += 1;
        let (last_epoch, last_seq) = self.position;
        if (epoch, seq) <= self.position {
            self.repeats += 1;
            return;
        }
        let follows = if epoch == last_epoch {
            seq == last_seq + 1
        } else {
            // A new epoch continues the stream only where it was announced to begin after the
            // position this session has.
            seq == 1 && announced == Some((epoch, last_epoch, last_seq))
        };
        if !follows && last_epoch != 0 {
            self.gaps += 1;
        }
        self.position = (epoch, seq);
    }
}

#[derive(clap::Args, Clone)]
pub struct Storm {
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    #[arg(long, default_value_t = 100)]
    members_per_room: usize,
    /// Messages per second into each room.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// The first node's process, killed with SIGKILL.
    #[arg(long)]
    kill_pid: u32,
    /// Seconds of publishing before the kill, and after it.
    #[arg(long, default_value_t = 3)]
    before_secs: u64,
    #[arg(long, default_value_t = 10)]
    after_secs: u64,
}

fn room_of(i: usize, members_per_room: usize) -> String {
    format!("bench.storm.r{}", i / members_per_room)
}

/// One member session for the whole run: on the first node, then (after losing it) on a
/// surviving one, resuming from its position; until the run aborts it.
async fn member(
    common: Arc<Common>,
    (i, room): (usize, String),
    seen: Arc<Mutex<Seen>>,
    killed_at: Arc<Mutex<Option<Instant>>>,
    joined_first: Arc<AtomicU64>,
) {
    let survivors = &common.url[1..];
    let mut url = common.url[0].clone();
    let mut attempt = 0u64;
    loop {
        let Ok(mut ws) = open(&common, i, &url).await else {
            attempt += 1;
            url = survivors[(i + attempt as usize) % survivors.len()].clone();
            // A client's retry pause, spread so the storm is not one instant.
            tokio::time::sleep(Duration::from_millis(
                50 + (i as u64 * 7 + attempt * 13) % 200,
            ))
            .await;
            continue;
        };
        let position = seen.lock().await.position;
        let resume = (position.0 != 0).then(|| proto::Resume {
            rooms: vec![proto::RoomPosition {
                room: room.clone(),
                epoch: position.0,
                seq: position.1,
            }],
            ..Default::default()
        });
        let resuming = resume.is_some();
        let connect = client_frame(
            1,
            proto::client_frame::Kind::Connect(proto::Connect {
                token: format!("u{i}"),
                resume,
                ..Default::default()
            }),
        );
        if ws.send(connect).await.is_err() {
            continue;
        }
        if !resuming {
            let join = client_frame(
                2,
                proto::client_frame::Kind::Join(proto::Join {
                    room: room.clone(),
                    ..Default::default()
                }),
            );
            if ws.send(join).await.is_err() {
                continue;
            }
        }
        let mut announced = None;
        while let Some(Ok(frame)) = ws.next().await {
            let Ws::Binary(bytes) = frame else { continue };
            let Ok(frame) = ServerFrame::decode(bytes) else {
                continue;
            };
            match frame.kind {
                Some(server_frame::Kind::Message(m)) if m.room == room && m.seq > 0 => {
                    seen.lock().await.message(m.epoch, m.seq, announced.take());
                }
                Some(server_frame::Kind::EpochChanged(e)) if e.room == room => {
                    announced = Some((e.epoch, e.previous_epoch, e.previous_seq));
                }
                Some(server_frame::Kind::Joined(j)) if j.room == room => {
                    let mut seen = seen.lock().await;
                    if seen.position.0 == 0 {
                        seen.position = (j.epoch, j.seq);
                        joined_first.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(recovery) = j.recovery {
                        seen.replayed += recovery.replayed;
                        if !recovery.recovered {
                            seen.resets += 1;
                        }
                        if let Some(at) = *killed_at.lock().await {
                            seen.back_after.get_or_insert(at.elapsed());
                        }
                    }
                }
                _ => {}
            }
        }
        // The node went away: reconnect to a survivor.
        attempt += 1;
        url = survivors[(i + attempt as usize) % survivors.len()].clone();
        tokio::time::sleep(Duration::from_millis((i as u64 * 7 + attempt * 13) % 250)).await;
    }
}

pub async fn run(common: Common, storm: Storm, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        common.url.len() >= 2,
        "storm needs the node to kill and a survivor"
    );
    let common = Arc::new(common);
    let n = storm.rooms * storm.members_per_room;
    let killed_at = Arc::new(Mutex::new(None));
    let joined_first = Arc::new(AtomicU64::new(0));
    let targets = Arc::new(Mutex::new(HashMap::new()));
    let mut seen = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        tasks.push(tokio::spawn(member(
            common.clone(),
            (i, room_of(i, storm.members_per_room)),
            s,
            killed_at.clone(),
            joined_first.clone(),
        )));
        if i % common.connect_concurrency.max(1) == 0 {
            while (joined_first.load(Ordering::Relaxed) as usize) + common.connect_concurrency < i {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while (joined_first.load(Ordering::Relaxed) as usize) < n {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "only {} of {n} sessions joined",
            joined_first.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = start.elapsed().as_secs_f64();

    // The publisher, on a survivor: `rate` messages per second into every room, each retried
    // with its id until acknowledged (across the owner's crash).
    let options = roomwire::client::ClientOptions {
        token: "storm-publisher".into(),
        ..Default::default()
    };
    let publisher = Arc::new(roomwire::client::Client::connect(&common.url[1], options).await?);
    let publishing = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for r in 0..storm.rooms {
        let (publisher, publishing, targets) =
            (publisher.clone(), publishing.clone(), targets.clone());
        let room = format!("bench.storm.r{r}");
        let period = Duration::from_secs_f64(1.0 / storm.rate);
        publishers.push(tokio::spawn(async move {
            let mut k = 0u64;
            let mut refused = 0u64;
            tokio::time::sleep(period.mul_f64((r % 100) as f64 / 100.0)).await;
            while publishing.load(Ordering::Acquire) {
                let id = format!("{room}#{k}");
                loop {
                    match publisher.publish(&room, id.clone(), &id).await {
                        Ok(ack) => {
                            let mut targets = targets.lock().await;
                            let t = targets.entry(room.clone()).or_insert((0, 0));
                            *t = (*t).max((ack.epoch, ack.seq));
                            break;
                        }
                        Err(_) => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                k += 1;
                tokio::time::sleep(period).await;
            }
            (k, refused)
        }));
    }
    tokio::time::sleep(Duration::from_secs(storm.before_secs)).await;

    let status = std::process::Command::new("kill")
        .args(["-9", &storm.kill_pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {} failed", storm.kill_pid);
    *killed_at.lock().await = Some(Instant::now());
    tokio::time::sleep(Duration::from_secs(storm.after_secs)).await;
    publishing.store(false, Ordering::Release);
    let (mut published, mut refused) = (0, 0);
    for p in publishers {
        let (k, r) = p.await?;
        published += k;
        refused += r;
    }
    // Wait until every session has its room's last acknowledged message (or a minute).
    let targets = targets.lock().await.clone();
    let target_of = |i: usize| {
        targets
            .get(&room_of(i, storm.members_per_room))
            .copied()
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut behind = 0;
        for (i, s) in seen.iter().enumerate() {
            if s.lock().await.position < target_of(i) {
                behind += 1;
            }
        }
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in &tasks {
        task.abort();
    }
    let mut back: Vec<f64> = Vec::with_capacity(n);
    let (mut gaps, mut repeats, mut replayed, mut resets, mut behind, mut not_back) =
        (0, 0, 0, 0, 0, 0);
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().await;
        gaps += s.gaps;
        repeats += s.repeats;
        replayed += s.replayed;
        resets += s.resets;
        match s.back_after {
            Some(d) => back.push(d.as_secs_f64()),
            None => not_back += 1,
        }
        if s.position < target_of(i) {
            behind += 1;
        }
    }
    back.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        back.get(((back.len() as f64 * p) as usize).min(back.len().saturating_sub(1)))
            .copied()
    };
    emit(
        json!({
            "scenario": "storm", "target": "roomwire", "label": common.label, "threads": threads,
            "sessions": n, "rooms": storm.rooms, "rate_per_room": storm.rate,
            "connect_secs": connect_secs, "published": published, "publish_refusals": refused,
            "back_p50_secs": pct(0.5), "back_p99_secs": pct(0.99), "back_max_secs": back.last(),
            "not_back": not_back, "replayed": replayed, "resets": resets,
            "gaps": gaps, "repeats": repeats, "behind_at_end": behind,
        }),
        json!({}),
    );
    Ok(())
}
