//! The writer task of a session.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{MissedTickBehavior, timeout};

use super::io::FrameSink;
use crate::context::NodeContext;
use crate::member::{CloseReason, Member, Waiter};

/// Frames taken from the queue per write at most; bounds the writer's batch buffer.
const MAX_BATCH: usize = 256;
/// Time allowed for the last writes (queued frames on a graceful close, the close frame).
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The writer task: drains the send queue into the transport, one coalesced write per batch,
/// sends heartbeats, and writes the close frame when the session closes.
///
/// A batch in flight when the session starts closing is finished (within CLOSE_WRITE_TIMEOUT)
/// when the close reason keeps what was accepted, so the peer never sees a hole followed by later
/// frames; it is abandoned only for a slow consumer or a dead connection. A write that makes no
/// progress for `idle_timeout_ms` counts as a failed write.
///
/// What waits between batches is kept small (it is most of an idle session's writer); each
/// write, heartbeat and the close run boxed, since their futures are several times larger.
pub(super) async fn write_loop<K: FrameSink>(
    ctx: Arc<NodeContext>,
    handle: Arc<Member>,
    mut sink: K,
) {
    let heartbeat = ctx.config.heartbeat_interval();
    let idle = ctx.config.idle_timeout();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let cancelled = handle.closing(Waiter::Writer);
    tokio::pin!(cancelled);
    // Whether everything taken from the queue so far reached the transport in order.
    let intact = loop {
        let written = tokio::select! {
            biased;
            _ = &mut cancelled => break true,
            mut batch = handle.ready(MAX_BATCH) => {
                let written =
                    Box::pin(write_batch(&handle, idle, &mut sink, batch.make_contiguous(), cancelled.as_mut()))
                        .await;
                account_written(&ctx, &handle, batch.make_contiguous());
                written
            }
            _ = ticker.tick() => Box::pin(send_heartbeat(idle, &mut sink, cancelled.as_mut())).await,
        };
        if !written {
            break false;
        }
    };
    Box::pin(finish_writing(&ctx, &handle, &mut sink, intact)).await;
}

/// Writes one batch; `false` when it failed or stalled past `idle_timeout_ms`.
async fn write_batch<K: FrameSink>(
    handle: &Member,
    idle: Duration,
    sink: &mut K,
    batch: &[Bytes],
    cancelled: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let send = timeout(idle, sink.send_batch(batch));
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => matches!(r, Ok(Ok(()))),
        _ = cancelled => {
            if handle.reason().flushes_queue() {
                matches!(timeout(CLOSE_WRITE_TIMEOUT, &mut send).await, Ok(Ok(Ok(()))))
            } else {
                false
            }
        }
    }
}

/// Sends the transport's heartbeat; `false` when it failed or stalled.
async fn send_heartbeat<K: FrameSink>(
    idle: Duration,
    sink: &mut K,
    cancelled: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    tokio::select! {
        r = timeout(idle, sink.heartbeat()) => matches!(r, Ok(Ok(()))),
        _ = cancelled => true,
    }
}

/// The writer's end: what is still queued is written (or dropped, for a slow consumer or a dead
/// connection), then the close frame.
async fn finish_writing<K: FrameSink>(
    ctx: &NodeContext,
    handle: &Member,
    sink: &mut K,
    intact: bool,
) {
    if !intact {
        // No-op when a reason was already set (e.g. slow consumer); otherwise the write failed.
        handle.close(CloseReason::WriteFailed);
    }
    let reason = handle.reason();
    let mut rest = handle.close_queue();
    if reason.flushes_queue() && intact && !rest.is_empty() {
        let _ = timeout(CLOSE_WRITE_TIMEOUT, sink.send_batch(rest.make_contiguous())).await;
        account_written(ctx, handle, rest.make_contiguous());
    } else {
        // A slow consumer's queue (or one behind a dead connection) is dropped, its bytes
        // released.
        handle.written(&rest);
    }
    if reason != CloseReason::WriteFailed {
        let _ = timeout(
            CLOSE_WRITE_TIMEOUT,
            sink.close(reason.code() as u16, &reason.text()),
        )
        .await;
    }
}

fn account_written(ctx: &NodeContext, handle: &Member, batch: &[Bytes]) {
    let bytes: usize = batch.iter().map(Bytes::len).sum();
    handle.release(bytes);
    let metrics = &ctx.metrics;
    metrics.frames_out.inc_by(batch.len() as u64);
    metrics.bytes_out.inc_by(bytes as u64);
    metrics.write_batches.inc();
}
