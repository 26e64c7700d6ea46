//! Presence at scale (roomwire only): `members` sessions of this generator join one room that
//! keeps presence, every one asking for its diffs; the room's presence is read until it counts
//! every member of every generator (`expect_users`); then a steady window, then a churn window
//! (sessions of a pool closed and replaced by new users: one leave and one join each), then the
//! time until the presence counts are exact again once the churn stops (the leaves wait out the
//! node's grace period). Measured per window: PresenceDiff frames and bytes per member per
//! second, the CPU of the room's owner and of every node. Several generator processes share the
//! room (`first_user` keeps their user ids apart), each reports its own line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use roomwire::proto::{self, ServerFrame, server_frame};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as Ws;

use super::{Common, Sampler, client_frame, emit, open, proc_sample};

#[derive(clap::Args, Clone)]
pub struct Presence {
    #[arg(long, default_value = "bench.presence")]
    room: String,
    /// Sessions of this generator that stay for the whole run.
    #[arg(long)]
    members: usize,
    /// Sessions of this generator's churn pool (they stay too, each replaced in turn).
    #[arg(long, default_value_t = 100)]
    pool: usize,
    /// The first user id number of this generator (users are `p<n>`, churners `c<n>`).
    #[arg(long, default_value_t = 0)]
    first_user: usize,
    /// Users the room holds when every generator has joined (members and pools of all).
    #[arg(long)]
    expect_users: usize,
    /// Joins plus leaves per second offered by this generator in the churn window.
    #[arg(long, default_value_t = 1000.0)]
    churn: f64,
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    #[arg(long, default_value_t = 10)]
    churn_secs: u64,
    /// The room owner's process (its CPU is reported apart).
    #[arg(long)]
    owner_pid: Option<u32>,
}

/// What every member session of this generator received.
#[derive(Default)]
struct Tally {
    frames: AtomicU64,
    bytes: AtomicU64,
    joined: AtomicU64,
    /// Connections opened again (refused, or lost), and Joins asked again (refused).
    reconnects: AtomicU64,
}

/// One session in the room until aborted: counts the diffs it receives. A connection refused
/// or lost is opened again (a client would reconnect), and counted.
async fn session(common: Arc<Common>, index: usize, user: String, room: String, tally: Arc<Tally>) {
    let url = common.url[index % common.url.len()].clone();
    let mut joined = false;
    for attempt in 0u64.. {
        if attempt > 0 {
            tally.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100 * attempt.min(20))).await;
        }
        let Ok(mut ws) = open(&common, index, &url).await else {
            continue;
        };
        let connect = proto::client_frame::Kind::Connect(proto::Connect {
            token: user.clone(),
            ..Default::default()
        });
        let join = proto::client_frame::Kind::Join(proto::Join {
            room: room.clone(),
            presence_events: true,
            ..Default::default()
        });
        if ws.send(client_frame(1, connect)).await.is_err()
            || ws.send(client_frame(2, join)).await.is_err()
        {
            continue;
        }
        while let Some(Ok(frame)) = ws.next().await {
            let Ws::Binary(bytes) = frame else { continue };
            let len = bytes.len() as u64;
            match ServerFrame::decode(bytes).map(|f| f.kind) {
                Ok(Some(server_frame::Kind::PresenceDiff(_))) => {
                    tally.frames.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(len, Ordering::Relaxed);
                }
                Ok(Some(server_frame::Kind::Joined(_))) if !joined => {
                    joined = true;
                    tally.joined.fetch_add(1, Ordering::Relaxed);
                }
                // The Join refused (the mesh settling, the owner moving): asked again, as a
                // client does with a retryable error.
                Ok(Some(server_frame::Kind::Error(e))) if e.retryable && !joined => {
                    tally.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let again = proto::client_frame::Kind::Join(proto::Join {
                        room: room.clone(),
                        presence_events: true,
                        ..Default::default()
                    });
                    if ws.send(client_frame(2, again)).await.is_err() {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The room's presence counts, read through a session of its own.
async fn stats(probe: &roomwire::client::Client, room: &str) -> (u32, u32) {
    match probe.presence_stats(room).await {
        Ok(s) => (s.users, s.sessions),
        Err(_) => (0, 0),
    }
}

/// Frames and bytes per member per second over `secs`, from two readings of the tally.
fn per_member(
    before: (u64, u64),
    after: (u64, u64),
    members: usize,
    secs: f64,
) -> serde_json::Value {
    let per = |a: u64, b: u64| (b - a) as f64 / members as f64 / secs;
    json!({
        "frames_per_member_per_sec": per(before.0, after.0),
        "bytes_per_member_per_sec": per(before.1, after.1),
    })
}

pub async fn run(common: Common, p: Presence, threads: usize) -> anyhow::Result<()> {
    let common = Arc::new(common);
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let spawn = |index: usize, user: String| -> JoinHandle<()> {
        tokio::spawn(session(
            common.clone(),
            index,
            user,
            p.room.clone(),
            tally.clone(),
        ))
    };
    let mut members = Vec::with_capacity(p.members);
    for i in 0..p.members {
        members.push(spawn(i, format!("p{}", p.first_user + i)));
        while (i as u64).saturating_sub(tally.joined.load(Ordering::Relaxed))
            > common.connect_concurrency as u64
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut pool: std::collections::VecDeque<JoinHandle<()>> = (0..p.pool)
        .map(|k| spawn(p.members + k, format!("c{}-{k}", p.first_user)))
        .collect();
    let total = (p.members + p.pool) as u64;
    while tally.joined.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "only {} of {total} sessions joined",
            tally.joined.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = start.elapsed().as_secs_f64();
    let options = roomwire::client::ClientOptions {
        token: format!("probe-{}", p.first_user),
        ..Default::default()
    };
    let probe = roomwire::client::Client::connect(&common.url[0], options).await?;
    // Every generator's sessions counted (the probe is no member).
    let counted = Instant::now();
    while stats(&probe, &p.room).await.0 < p.expect_users as u32 {
        anyhow::ensure!(
            counted.elapsed() < Duration::from_secs(300),
            "the presence never counted {} users: {:?}",
            p.expect_users,
            stats(&probe, &p.room).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reading = || {
        (
            tally.frames.load(Ordering::Relaxed),
            tally.bytes.load(Ordering::Relaxed),
        )
    };
    let n = p.members + p.pool;

    let steady_from = reading();
    tokio::time::sleep(Duration::from_secs(p.steady_secs)).await;
    let steady = per_member(steady_from, reading(), n, p.steady_secs as f64);

    // Churn: every 2/churn seconds the oldest pool session leaves and a new user joins.
    let owner0 = p.owner_pid.and_then(|pid| proc_sample(&pid.to_string()));
    let sampler = Sampler::start(&common.pid);
    let churn_from = reading();
    let churning = Instant::now();
    let period = Duration::from_secs_f64(2.0 / p.churn);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut replaced = 0usize;
    while churning.elapsed() < Duration::from_secs(p.churn_secs) {
        ticker.tick().await;
        if let Some(old) = pool.pop_front() {
            old.abort();
        }
        replaced += 1;
        let index = p.members + p.pool + replaced;
        pool.push_back(spawn(
            index,
            format!("c{}-{}", p.first_user, p.pool + replaced),
        ));
    }
    let churn_secs = churning.elapsed().as_secs_f64();
    let churn = per_member(churn_from, reading(), n, churn_secs);
    let resources = sampler.finish();
    let owner_cores = match (
        owner0,
        p.owner_pid.and_then(|pid| proc_sample(&pid.to_string())),
    ) {
        (Some(a), Some(b)) => Some((b.0 - a.0) / churn_secs),
        _ => None,
    };

    // Until the counts are exact again: the replaced users' leaves wait out the grace period.
    let stopped = Instant::now();
    let (mut sessions_exact, mut users_exact) = (None, None);
    while users_exact.is_none() || sessions_exact.is_none() {
        anyhow::ensure!(
            stopped.elapsed() < Duration::from_secs(120),
            "the counts never settled: {:?}, expected {}",
            stats(&probe, &p.room).await,
            p.expect_users
        );
        let (users, sessions) = stats(&probe, &p.room).await;
        if sessions as usize == p.expect_users {
            sessions_exact.get_or_insert(stopped.elapsed().as_secs_f64());
        }
        if users as usize == p.expect_users && sessions as usize == p.expect_users {
            users_exact.get_or_insert(stopped.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in members.into_iter().chain(pool) {
        task.abort();
    }
    emit(
        json!({
            "scenario": "presence", "target": "roomwire", "label": common.label, "threads": threads,
            "nodes": common.url.len(), "room_users": p.expect_users, "sessions_here": n,
            "first_user": p.first_user, "connect_secs": connect_secs,
            "churn_offered_per_sec": p.churn, "churn_done_per_sec": 2.0 * replaced as f64 / churn_secs,
            "steady": steady, "churn": churn, "owner_cpu_cores": owner_cores,
            "resources": resources,
            "sessions_exact_after_secs": sessions_exact, "users_exact_after_secs": users_exact,
            "reconnects": tally.reconnects.load(Ordering::Relaxed),
        }),
        json!({}),
    );
    Ok(())
}
