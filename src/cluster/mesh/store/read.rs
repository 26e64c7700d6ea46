//! Reading a room's records: batched direct gets, the binary search for a position, what
//! follows a position (a resume), and pages of history.

use std::time::Duration;

use async_nats::StatusCode;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{After, BATCH, ClassStream, Located, Record, Store, StoreError, number, position};
use crate::cluster::mesh::Inner;
use crate::room::{HistoryPage, HistoryQuery, RoomName};

impl Store {
    /// Up to `max` records of `room` from stream sequence `from` on, and how many follow them.
    async fn batch(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        from: u64,
        max: usize,
    ) -> Result<(Vec<Record>, u64), StoreError> {
        let _reading = self.reading(inner).await?;
        inner.metrics.history_reads.inc();
        let bound = Duration::from_millis(inner.config.request_timeout_ms);
        let inbox = inner.nats.new_inbox();
        let mut replies = inner
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| self.unavailable(e))?;
        let ask = serde_json::json!({
            "seq": from.max(1),
            "next_by_subj": stream.messages(room),
            "batch": max,
        });
        inner
            .nats
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", stream.name),
                inbox,
                Bytes::from(ask.to_string()),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut records = Vec::new();
        let mut pending = 0;
        loop {
            let reply = match tokio::time::timeout(bound, replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Err(self.unavailable("the reply subscription closed")),
                Err(_) => return Err(self.unavailable("a history read timed out")),
            };
            match reply.status {
                None | Some(StatusCode::OK) => {}
                // Nothing (more) at or after `from`.
                Some(StatusCode::NOT_FOUND) => break,
                // The end of a batch.
                Some(status) if status.as_u16() == 204 => break,
                Some(status) => {
                    return Err(self.unavailable(format!(
                        "direct get answered {status}: {}",
                        reply.description.unwrap_or_default()
                    )));
                }
            }
            let headers = reply.headers.unwrap_or_default();
            let Some(stream_seq) = number(&headers, "Nats-Sequence") else {
                return Err(self.unavailable("a direct get reply without a sequence"));
            };
            pending = number(&headers, "Nats-Num-Pending").unwrap_or(0);
            let Some((epoch, seq)) = position(&headers) else {
                return Err(self.unavailable(format!("record {stream_seq} has no position")));
            };
            records.push(Record {
                stream_seq,
                epoch,
                seq,
                frame: reply.payload,
            });
            if records.len() >= max {
                break;
            }
        }
        let _ = replies.unsubscribe().await;
        let mut index = self.index.lock().expect("index lock poisoned");
        for r in &records {
            index.remember(room, r.position(), r.stream_seq);
        }
        drop(index);
        // The server counts the last record returned among the pending ones.
        Ok((records, pending.saturating_sub(1)))
    }

    /// The first record of `room` at or after stream sequence `from`.
    async fn next(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        from: u64,
    ) -> Result<Option<Record>, StoreError> {
        let _reading = self.reading(inner).await?;
        inner.metrics.history_reads.inc();
        let got = stream
            .stream
            .direct_get_next_for_subject(stream.messages(room), Some(from.max(1)))
            .await;
        self.record(got)
    }

    /// One direct get's record (`None`: nothing there).
    fn record(
        &self,
        got: Result<jetstream::message::StreamMessage, stream::DirectGetError>,
    ) -> Result<Option<Record>, StoreError> {
        match got {
            Ok(message) => {
                let (epoch, seq) = position(&message.headers).ok_or_else(|| {
                    self.unavailable(format!("record {} has no position", message.sequence))
                })?;
                Ok(Some(Record {
                    stream_seq: message.sequence,
                    epoch,
                    seq,
                    frame: message.payload,
                }))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// A permit to read: reads in flight are bounded, so a storm of returning members (every
    /// session of a failed node resuming here at once) queues here instead of flooding the NATS
    /// connection the node's heartbeats and leases share.
    async fn reading(&self, inner: &Inner) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        let bound = Duration::from_millis(inner.config.request_timeout_ms * 4);
        match tokio::time::timeout(bound, self.reads.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.unavailable("too many history reads waiting")),
        }
    }

    /// The last record of `room`.
    async fn last(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
    ) -> Result<Option<Record>, StoreError> {
        let _reading = self.reading(inner).await?;
        inner.metrics.history_reads.inc();
        let got = stream
            .stream
            .direct_get_last_for_subject(stream.messages(room))
            .await;
        self.record(got)
    }

    /// The last record of `room` at or before `target`, and the first record of the room;
    /// `None` when the room has none. A binary search over stream sequences: the records of
    /// one room are stored in position order.
    async fn locate(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        target: (u64, u64),
    ) -> Result<Option<(Option<Record>, Record)>, StoreError> {
        let Some(first) = self.next(inner, stream, room, 1).await? else {
            return Ok(None);
        };
        if first.position() > target {
            return Ok(Some((None, first)));
        }
        let Some(last) = self.last(inner, stream, room).await? else {
            return Ok(None);
        };
        if last.position() <= target {
            return Ok(Some((Some(last), first)));
        }
        // first <= target < last: the answer lies in [lo, limit).
        let mut lo = first.clone();
        let mut limit = last.stream_seq;
        while limit - lo.stream_seq > 1 {
            let mid = lo.stream_seq + (limit - lo.stream_seq) / 2;
            match self.next(inner, stream, room, mid).await? {
                Some(r) if r.stream_seq < limit => {
                    if r.position() <= target {
                        lo = r;
                    } else {
                        limit = r.stream_seq;
                    }
                }
                _ => limit = mid,
            }
        }
        Ok(Some((Some(lo), first)))
    }

    /// The oldest message (not epoch record) of `room` from `first` on.
    async fn oldest_message(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        first: Record,
    ) -> Result<(u64, u64), StoreError> {
        if first.is_message() {
            return Ok(first.position());
        }
        let (records, _) = self
            .batch(inner, stream, room, first.stream_seq, 16)
            .await?;
        Ok(records
            .iter()
            .find(|r| r.is_message())
            .map_or_else(|| first.position(), Record::position))
    }

    /// What follows `since` in `room`'s stream, up to `limit` records, none missing: the next
    /// message of its epoch, or the record of a later epoch when `since` was its epoch's last.
    pub(in crate::cluster::mesh) async fn after(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        since: (u64, u64),
        limit: usize,
    ) -> Result<After, StoreError> {
        // The common case first: the member has everything stored (one read).
        match self.last(inner, stream, room).await? {
            None => return Ok(After::Empty),
            Some(last) if last.position() == since => {
                return Ok(After::Records {
                    records: Vec::new(),
                    more: false,
                });
            }
            Some(_) => {}
        }
        let known = self
            .index
            .lock()
            .expect("index lock poisoned")
            .find(room, since);
        let start = match known {
            Some(stream_seq) => stream_seq + 1,
            None => match self.locate_after(inner, stream, room, since).await? {
                Located::Start(start) => start,
                Located::Reset(oldest) => return Ok(After::Reset { oldest }),
                Located::Empty => return Ok(After::Empty),
            },
        };
        let (read, pending) = self.batch(inner, stream, room, start, limit.max(1)).await?;
        let read_count = read.len();
        let mut records = Vec::with_capacity(read.len());
        let mut at = since;
        for record in read {
            let continues = (record.epoch == at.0 && record.seq == at.1 + 1)
                || (record.epoch > at.0 && record.seq == 0);
            if !continues {
                break;
            }
            at = record.position();
            records.push(record);
        }
        if records.is_empty() && read_count > 0 {
            let oldest = match self.next(inner, stream, room, 1).await? {
                Some(first) => self.oldest_message(inner, stream, room, first).await?,
                None => since,
            };
            return Ok(After::Reset { oldest });
        }
        let more = pending > 0 || records.len() < read_count;
        Ok(After::Records { records, more })
    }

    /// Where the records after `since` start in `room`'s stream, by a binary search.
    async fn locate_after(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        since: (u64, u64),
    ) -> Result<Located, StoreError> {
        let Some((found, first)) = self.locate(inner, stream, room, since).await? else {
            return Ok(Located::Empty);
        };
        Ok(match found {
            Some(found) if found.position() == since => {
                self.index.lock().expect("index lock poisoned").remember(
                    room,
                    since,
                    found.stream_seq,
                );
                Located::Start(found.stream_seq + 1)
            }
            // Right before the oldest record kept: nothing in between can be missing.
            None if first.position() == (since.0, since.1 + 1) => Located::Start(first.stream_seq),
            _ => Located::Reset(self.oldest_message(inner, stream, room, first).await?),
        })
    }

    /// A page of `room`'s history as a `History` request asks for it; `None` when the room has
    /// no record.
    pub(in crate::cluster::mesh) async fn history(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let target = match query {
            HistoryQuery::Newest => return self.before(inner, stream, room, None, limit).await,
            HistoryQuery::Before(e, s) => {
                return self.before(inner, stream, room, Some((e, s)), limit).await;
            }
            HistoryQuery::After(e, s) => (e, s),
        };
        let Some(last) = self.last(inner, stream, room).await? else {
            return Ok(None);
        };
        let Some((found, first)) = self.locate(inner, stream, room, target).await? else {
            return Ok(None);
        };
        let mut from = found.map_or(first.stream_seq, |f| f.stream_seq + 1);
        let oldest = self.oldest_message(inner, stream, room, first).await?;
        let limit = limit.max(1);
        let mut messages = Vec::new();
        let mut more = false;
        loop {
            let want = (limit + 1 - messages.len()).min(BATCH);
            let (records, pending) = self.batch(inner, stream, room, from, want).await?;
            let Some(tail) = records.last().map(|r| r.stream_seq) else {
                break;
            };
            messages.extend(
                records
                    .into_iter()
                    .filter(Record::is_message)
                    .map(Record::kept),
            );
            if messages.len() > limit {
                more = true;
                messages.truncate(limit);
                break;
            }
            if pending == 0 {
                break;
            }
            from = tail + 1;
        }
        Ok(Some(HistoryPage {
            messages,
            more,
            position: last.position(),
            oldest: Some(oldest),
        }))
    }

    /// A page of `room`'s messages newest first, before `before` (or the newest), with the
    /// room's stored position and oldest message; `None` when the room has no record.
    pub(in crate::cluster::mesh) async fn before(
        &self,
        inner: &Inner,
        stream: &ClassStream,
        room: &RoomName,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let Some(last) = self.last(inner, stream, room).await? else {
            return Ok(None);
        };
        let Some(first) = self.next(inner, stream, room, 1).await? else {
            return Ok(None);
        };
        let oldest = self
            .oldest_message(inner, stream, room, first.clone())
            .await?;
        let position = last.position();
        // Records before stream sequence `end` are candidates.
        let end = match before {
            None => last.stream_seq + 1,
            Some(target) => match self.locate(inner, stream, room, target).await? {
                Some((Some(found), _)) if found.position() == target => found.stream_seq,
                Some((Some(found), _)) => found.stream_seq + 1,
                _ => first.stream_seq,
            },
        };
        let limit = limit.max(1);
        // Walk backwards in growing spans of stream sequences until `limit` messages are read
        // or the room's first record is reached.
        let mut newest_first: Vec<Record> = Vec::new();
        let mut upto = end;
        let mut span = (limit as u64 * 2).max(64);
        while upto > first.stream_seq && newest_first.len() < limit {
            let start = upto.saturating_sub(span).max(first.stream_seq);
            let mut chunk = Vec::new();
            let mut from = start;
            'read: loop {
                let (records, pending) = self.batch(inner, stream, room, from, BATCH).await?;
                let Some(tail) = records.last().map(|r| r.stream_seq) else {
                    break;
                };
                for record in records {
                    if record.stream_seq >= upto {
                        break 'read;
                    }
                    chunk.push(record);
                }
                if pending == 0 {
                    break;
                }
                from = tail + 1;
            }
            newest_first.extend(chunk.into_iter().rev().filter(Record::is_message));
            upto = start;
            span = span.saturating_mul(4);
        }
        newest_first.truncate(limit);
        let more = newest_first.last().is_some_and(|r| r.position() > oldest);
        Ok(Some(HistoryPage {
            messages: newest_first.into_iter().map(Record::kept).collect(),
            more,
            position,
            oldest: Some(oldest),
        }))
    }
}
