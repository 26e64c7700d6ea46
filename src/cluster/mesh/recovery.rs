//! History in the mesh: a room's kept messages are read at its owner (node-to-node `History`
//! requests), and a member that comes back with a position is caught up from there, page by
//! page, then admitted at a join marker with the last few messages taken from what this node
//! delivered most recently ([`Recent`]), so it misses nothing and gets nothing twice.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::Inner;
use super::link::RequestFailure;
use super::routing::Route;
use super::store::{After, ClassStream, Record};
use super::wire::Step;
use crate::clock::mono_ms;
use crate::cluster::REPLAY_PAGE;
use crate::cluster::{BusError, fit_to_share, page_size};
use crate::member::Member;
use crate::proto::mesh::{self as wire, reply, request};
use crate::room::{HistoryPage, HistoryQuery, KeptMessage, RoomName};

/// Frames a node keeps of each room it delivers, for admitting returning members.
const RECENT_FRAMES: usize = 1024;
const RECENT_BYTES: usize = 1024 * 1024;

/// The frames this node delivered most recently for one room, with their positions.
#[derive(Debug, Default)]
pub(super) struct Recent {
    frames: VecDeque<(u64, u64, Bytes)>,
    bytes: usize,
}

impl Recent {
    pub(super) fn push(&mut self, epoch: u64, seq: u64, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back((epoch, seq, frame));
        while self.frames.len() > RECENT_FRAMES || self.bytes > RECENT_BYTES {
            if let Some((_, _, old)) = self.frames.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// Every frame of `epoch` after `seq` up to `to_seq`, when all of them are here (else
    /// `None`: the member must be caught up from the owner first).
    pub(super) fn between(&self, epoch: u64, seq: u64, to_seq: u64) -> Option<Vec<Bytes>> {
        if seq >= to_seq {
            return Some(Vec::new());
        }
        let start = self
            .frames
            .iter()
            .position(|(e, s, _)| *e == epoch && *s == seq + 1)?;
        let mut out = Vec::new();
        let mut expected = seq + 1;
        for (e, s, frame) in self.frames.iter().skip(start) {
            if *e != epoch || *s != expected || *s > to_seq {
                break;
            }
            out.push(frame.clone());
            expected += 1;
        }
        (expected == to_seq + 1).then_some(out)
    }
}

/// What a joining member that came back with a position gets at its admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Comeback {
    /// No position given: join live.
    Fresh,
    /// Caught up to `since` (`replayed` messages so far); the rest comes at admission.
    Recover { since: (u64, u64), replayed: u64 },
    /// Its position cannot be served (any more: `replayed` messages were already sent): the
    /// room keeps messages from `(epoch, oldest_seq)` on.
    Reset {
        epoch: u64,
        oldest_seq: u64,
        replayed: u64,
    },
}

/// Pushes what fits of a page to `member` (its replay share of the send queue, at least one
/// message) once its send queue has room for it: the position of the last one pushed, how many
/// messages were pushed (epoch records are not counted), and whether some were left over.
async fn push_page(
    member: &Arc<Member>,
    mut messages: Vec<KeptMessage>,
) -> Result<((u64, u64), u64, bool), BusError> {
    let read = messages.len();
    fit_to_share(member, &mut messages);
    let cut = messages.len() < read;
    let last = messages.last().expect("at least one message stays");
    let at = (last.epoch, last.seq);
    let (frames, bytes) = page_size(&messages);
    if !member.room_for(frames, bytes).await {
        return Err(BusError::Unavailable("the session is closing".into()));
    }
    let pushed = messages.iter().filter(|m| m.seq > 0).count() as u64;
    for message in messages {
        member.push(message.frame);
    }
    Ok((at, pushed, cut))
}

impl Inner {
    /// Catches `member` up on `room` from `since` with pages of the owner's history, each pushed
    /// once its send queue has room for it, until the owner had nothing more.
    pub(super) async fn catch_up(
        self: &Arc<Self>,
        room: &RoomName,
        member: &Arc<Member>,
        since: (u64, u64),
        replayed: u64,
    ) -> Result<Comeback, BusError> {
        if let Some(stream) = self.store.stream(&self.classes.of(room))
            && let Some(comeback) = self
                .catch_up_stored(room, member, &*stream?, since, replayed)
                .await?
        {
            return Ok(comeback);
        }
        self.catch_up_at_owner(room, member, since, replayed).await
    }

    /// [`Self::catch_up`] from a durable room's stream, across epochs (their epoch records
    /// prove that nothing stored is skipped); `None` when the room has nothing stored.
    async fn catch_up_stored(
        self: &Arc<Self>,
        room: &RoomName,
        member: &Arc<Member>,
        stream: &ClassStream,
        mut since: (u64, u64),
        mut replayed: u64,
    ) -> Result<Option<Comeback>, BusError> {
        loop {
            let page = self
                .store
                .after(self, stream, room, since, REPLAY_PAGE)
                .await?;
            let (records, more) = match page {
                After::Empty => return Ok(None),
                After::Reset { oldest } => {
                    return Ok(Some(Comeback::Reset {
                        epoch: oldest.0,
                        oldest_seq: oldest.1,
                        replayed,
                    }));
                }
                After::Records { records, more } => (records, more),
            };
            if records.is_empty() {
                return Ok(Some(Comeback::Recover { since, replayed }));
            }
            let messages = records.into_iter().map(Record::kept).collect();
            let (at, pushed, cut) = push_page(member, messages).await?;
            since = at;
            replayed += pushed;
            if !more && !cut {
                return Ok(Some(Comeback::Recover { since, replayed }));
            }
        }
    }

    /// [`Self::catch_up`] from the pages of the room's owner (a `memory` room).
    async fn catch_up_at_owner(
        self: &Arc<Self>,
        room: &RoomName,
        member: &Arc<Member>,
        since: (u64, u64),
        mut replayed: u64,
    ) -> Result<Comeback, BusError> {
        let mut since = since;
        loop {
            let page = self
                .history_page(room, HistoryQuery::After(since.0, since.1), REPLAY_PAGE)
                .await?;
            let (epoch, seq) = page.position;
            let reset = Comeback::Reset {
                epoch,
                oldest_seq: page.oldest.map_or(seq, |(_, oldest)| oldest),
                replayed,
            };
            if since.0 != epoch {
                return Ok(reset);
            }
            if since.1 >= seq {
                return Ok(Comeback::Recover { since, replayed });
            }
            let continues = page
                .messages
                .iter()
                .zip(since.1 + 1..)
                .all(|(m, expected)| m.epoch == epoch && m.seq == expected);
            if page.messages.is_empty() || !continues {
                return Ok(reset);
            }
            let (at, pushed, cut) = push_page(member, page.messages).await?;
            since = at;
            replayed += pushed;
            if !page.more && !cut {
                return Ok(Comeback::Recover { since, replayed });
            }
        }
    }

    /// A page of `room`'s history, read at its owner (here, or by a `History` request).
    pub(super) async fn history_page(
        self: &Arc<Self>,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        // A durable room's history is read from its stream by whoever asks; a room with nothing
        // stored yet falls back to its owner's memory.
        if let Some(stream) = self.store.stream(&self.classes.of(room))
            && let Some(page) = self
                .store
                .history(self, &*stream?, room, query, limit)
                .await?
        {
            return Ok(page);
        }
        let mut route = Route::new(&self.config);
        loop {
            self.check_link()?;
            let step = match self.owner_of(room) {
                None => Step::Retry("the mesh is settling".into()),
                Some(owner) if owner == self.node_id => self.history_here(room, query, limit).await,
                Some(owner) if self.view().protocol_of(&owner) < 3 => Step::Fail(
                    BusError::Unavailable(format!("{owner} is too old to serve history")),
                ),
                Some(owner) => self.history_at(&owner, room, query, limit).await,
            };
            match step {
                Step::Done(page) => return Ok(page),
                Step::Fail(error) => return Err(error),
                Step::Retry(reason) => route.pause(reason).await?,
            }
        }
    }

    /// Reads the history of a room this node owns.
    pub(super) async fn history_here(
        self: &Arc<Self>,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Step<HistoryPage> {
        match self.lock_owned_out(room).await {
            Step::Done(mut held) => Step::Done(held.room.history(query, limit, mono_ms())),
            Step::Retry(reason) => Step::Retry(reason),
            Step::Fail(error) => Step::Fail(error),
        }
    }

    async fn history_at(
        &self,
        owner: &str,
        room: &RoomName,
        query: HistoryQuery,
        limit: usize,
    ) -> Step<HistoryPage> {
        let (direction, epoch, seq) = match query {
            HistoryQuery::Newest => (0, 0, 0),
            HistoryQuery::After(e, s) => (1, e, s),
            HistoryQuery::Before(e, s) => (2, e, s),
        };
        let ask = request::Kind::History(wire::HistoryRequest {
            room: room.to_string(),
            direction,
            epoch,
            seq,
            limit: limit as u32,
        });
        match self.request(owner, ask).await {
            Ok(reply::Kind::History(page)) => Step::Done(HistoryPage {
                messages: page
                    .messages
                    .into_iter()
                    .map(|m| KeptMessage {
                        epoch: m.epoch,
                        seq: m.seq,
                        frame: m.frame,
                    })
                    .collect(),
                more: page.more,
                position: (page.epoch, page.seq),
                oldest: page
                    .has_oldest
                    .then_some((page.oldest_epoch, page.oldest_seq)),
            }),
            Ok(reply::Kind::NotOwner(reason) | reply::Kind::Unavailable(reason)) => {
                Step::Retry(reason)
            }
            Ok(_) => Step::Retry(format!("unexpected reply from {owner}")),
            Err(RequestFailure::NoResponders) => {
                self.peer_gone(owner).await;
                Step::Retry(format!("{owner} is gone"))
            }
            Err(reason) => Step::Retry(format!("{owner} did not answer: {reason}")),
        }
    }

    /// Serves a `History` request as the room's owner.
    pub(super) async fn serve_history(self: &Arc<Self>, ask: wire::HistoryRequest) -> reply::Kind {
        let Ok(room) = RoomName::parse_any(&ask.room, self.rooms.max_name_bytes) else {
            return reply::Kind::Unavailable("invalid room name".into());
        };
        let query = match ask.direction {
            1 => HistoryQuery::After(ask.epoch, ask.seq),
            2 => HistoryQuery::Before(ask.epoch, ask.seq),
            _ => HistoryQuery::Newest,
        };
        let limit = (ask.limit as usize).clamp(1, REPLAY_PAGE);
        match self.history_here(&room, query, limit).await {
            Step::Done(page) => reply::Kind::History(wire::HistoryReply {
                messages: page
                    .messages
                    .into_iter()
                    .map(|m| wire::KeptMessage {
                        epoch: m.epoch,
                        seq: m.seq,
                        frame: m.frame,
                    })
                    .collect(),
                more: page.more,
                epoch: page.position.0,
                seq: page.position.1,
                has_oldest: page.oldest.is_some(),
                oldest_epoch: page.oldest.map_or(0, |o| o.0),
                oldest_seq: page.oldest.map_or(0, |o| o.1),
            }),
            Step::Retry(reason) => reply::Kind::NotOwner(reason),
            Step::Fail(error) => reply::Kind::Unavailable(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Bytes {
        Bytes::from(seq.to_string())
    }

    #[test]
    fn recent_frames_give_a_tail_only_when_all_of_it_is_there() {
        let mut recent = Recent::default();
        for seq in 5..=9 {
            recent.push(1, seq, frame(seq));
        }
        let tail = recent.between(1, 6, 9).unwrap();
        assert_eq!(tail, vec![frame(7), frame(8), frame(9)]);
        assert_eq!(recent.between(1, 9, 9), Some(Vec::new()), "nothing missed");
        assert_eq!(recent.between(1, 3, 9), None, "4 and 5 are not here");
        assert_eq!(recent.between(2, 6, 9), None, "another epoch");
        assert_eq!(recent.between(1, 6, 12), None, "10 to 12 are not here yet");
        for seq in 0..RECENT_FRAMES as u64 {
            recent.push(1, 100 + seq, frame(seq));
        }
        assert_eq!(recent.between(1, 6, 9), None, "evicted");
    }
}
