//! A session's bounded send queue.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

/// A session's send queue: what fan-out pushes into and the writer drains.
///
/// A mutex around a `VecDeque` rather than a channel: an idle session's queue owns no allocation
/// (tokio's bounded mpsc allocates a 32-slot block and a cache-padded channel up front, ~1.5 KB,
/// a fifth of an idle session), both bounds (frames and bytes) are checked under the one lock a
/// push takes, and the writer takes a whole batch under one lock. Nobody holds the lock across
/// anything but a few memory operations.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    /// The writer task, woken by the push that finds the queue empty.
    writer: AtomicWaker,
    /// A replay waiting for room in the queue (one at a time: a session's joins run in turn),
    /// woken as the writer releases bytes.
    space: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Bytes accepted and not yet written: in `frames` or in the writer's batch.
    bytes: usize,
    /// Set by the writer as it ends; later pushes are refused.
    closed: bool,
}

/// Why a push was refused.
#[derive(Debug)]
pub(crate) enum PushRefused {
    /// Over the frame or byte bound: the slow-consumer policy applies.
    Full,
    /// The writer has ended.
    Closed,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("send queue lock poisoned")
    }

    pub(crate) fn push(
        &self,
        frame: Bytes,
        max_frames: usize,
        max_bytes: usize,
    ) -> Result<(), PushRefused> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(PushRefused::Closed);
        }
        if queue.frames.len() >= max_frames || queue.bytes + frame.len() > max_bytes {
            return Err(PushRefused::Full);
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        drop(queue);
        // Only the push that makes the queue non-empty wakes the writer: it takes every frame
        // waiting when it runs, and re-registers before it looks again.
        if was_empty {
            self.writer.wake();
        }
        Ok(())
    }

    /// Takes up to `max` waiting frames, oldest first. Usually the whole queue is taken, buffer
    /// and all, so an empty queue owns no memory: an idle session does not keep the buffer of
    /// its last burst.
    pub(crate) fn take(&self, max: usize) -> VecDeque<Bytes> {
        let mut queue = self.lock();
        if queue.frames.len() <= max {
            std::mem::take(&mut queue.frames)
        } else {
            queue.frames.drain(..max).collect()
        }
    }

    /// Resolves with the waiting frames (up to `max`) once there is at least one.
    pub(crate) fn ready(&self, max: usize) -> impl Future<Output = VecDeque<Bytes>> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before looking, so a push in between finds the waker.
            self.writer.register(cx.waker());
            let batch = self.take(max);
            if batch.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(batch)
            }
        })
    }

    /// Bytes accepted and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Takes `bytes` off the accounting once written (or dropped).
    pub(crate) fn release(&self, bytes: usize) {
        let mut queue = self.lock();
        queue.bytes = queue.bytes.saturating_sub(bytes);
        drop(queue);
        self.space.wake();
    }

    /// Whether `frames` more frames and `bytes` more bytes fit within the bounds now.
    pub(crate) fn fits(
        &self,
        frames: usize,
        bytes: usize,
        max_frames: usize,
        max_bytes: usize,
    ) -> bool {
        let queue = self.lock();
        !queue.closed
            && queue.frames.len() + frames <= max_frames
            && queue.bytes + bytes <= max_bytes
    }

    /// Resolves once the queue has room for `frames` more frames and `bytes` more bytes within
    /// the bounds (true), or the writer has ended (false).
    pub(crate) fn room_for(
        &self,
        frames: usize,
        bytes: usize,
        max_frames: usize,
        max_bytes: usize,
    ) -> impl Future<Output = bool> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before looking, so a release in between finds the waker.
            self.space.register(cx.waker());
            let queue = self.lock();
            if queue.closed {
                return Poll::Ready(false);
            }
            if queue.frames.len() + frames <= max_frames && queue.bytes + bytes <= max_bytes {
                Poll::Ready(true)
            } else {
                Poll::Pending
            }
        })
    }

    /// Refuses every later push and returns what is still waiting.
    pub(crate) fn close(&self) -> VecDeque<Bytes> {
        let mut queue = self.lock();
        queue.closed = true;
        let rest = std::mem::take(&mut queue.frames);
        drop(queue);
        self.space.wake();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn the_send_queue_refuses_past_either_bound_and_after_close() {
        let outbox = Outbox::default();
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        // Third frame: over the frame bound.
        assert!(matches!(
            outbox.push(frame(1), 2, 25),
            Err(PushRefused::Full)
        ));
        let batch = outbox.take(1);
        assert_eq!(batch.len(), 1);
        // Taken but not yet written: its bytes still count against the byte bound.
        assert!(matches!(
            outbox.push(frame(10), 2, 25),
            Err(PushRefused::Full)
        ));
        outbox.release(10);
        assert!(outbox.push(frame(10), 2, 25).is_ok());
        let rest = outbox.close();
        assert_eq!(rest.len(), 2);
        assert!(matches!(
            outbox.push(frame(1), 2, 25),
            Err(PushRefused::Closed)
        ));
    }

    #[test]
    fn an_emptied_send_queue_keeps_no_buffer() {
        let outbox = Outbox::default();
        for _ in 0..100 {
            outbox.push(frame(8), 1024, 1 << 20).unwrap();
        }
        assert_eq!(outbox.take(usize::MAX).len(), 100);
        assert_eq!(outbox.lock().frames.capacity(), 0);
        // A partial take keeps the rest, in order.
        for i in 0..10u8 {
            outbox.push(Bytes::from(vec![i]), 1024, 1 << 20).unwrap();
        }
        let first: Vec<u8> = outbox.take(4).iter().map(|b| b[0]).collect();
        let rest: Vec<u8> = outbox.take(100).iter().map(|b| b[0]).collect();
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(rest, [4, 5, 6, 7, 8, 9]);
    }
}
