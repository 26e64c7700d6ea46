//! Presence through the client: the options of a Join, and the room's presence read page by
//! page or as counts (see PROTOCOL.md section 5b).

use super::{Client, ClientError};
use crate::proto::{self, client_frame, server_frame};

/// The options of [`Client::join_with`].
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// The last message this client has of the room (epoch, seq): what follows is replayed.
    pub since: Option<(u64, u64)>,
    /// Receive the room's presence diffs ([`Event::PresenceDiff`]).
    pub presence_events: bool,
    /// Shown with this user in the room's presence.
    pub presence_info: bytes::Bytes,
}

/// A room's whole presence, read page by page ([`Client::presence`]).
#[derive(Debug, Clone, Default)]
pub struct PresenceView {
    pub members: Vec<proto::PresenceMember>,
    pub epoch: u64,
    pub version: u64,
    pub users: u32,
    pub sessions: u32,
}

impl Client {
    /// One page of `room`'s presence: the users after `after` (empty: from the first), at most
    /// `limit` (0: the node's default).
    pub async fn presence_page(
        &self,
        room: &str,
        after: &str,
        limit: u32,
    ) -> Result<proto::PresencePage, ClientError> {
        match self
            .request(client_frame::Kind::Presence(proto::GetPresence {
                room: room.into(),
                after: after.into(),
                limit,
            }))
            .await?
        {
            server_frame::Kind::PresencePage(page) => Ok(page),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every user in `room`'s presence, page after page; with the epoch and version of the last
    /// page (apply diffs after it).
    pub async fn presence(&self, room: &str) -> Result<PresenceView, ClientError> {
        let mut view = PresenceView::default();
        let mut after = String::new();
        loop {
            let page = self.presence_page(room, &after, 0).await?;
            view.members.extend(page.members);
            (view.epoch, view.version) = (page.epoch, page.version);
            (view.users, view.sessions) = (page.users, page.sessions);
            if page.next.is_empty() {
                return Ok(view);
            }
            after = page.next;
        }
    }

    /// How many users and sessions are in `room`.
    pub async fn presence_stats(&self, room: &str) -> Result<proto::PresenceStats, ClientError> {
        match self
            .request(client_frame::Kind::PresenceStats(proto::GetPresenceStats {
                room: room.into(),
            }))
            .await?
        {
            server_frame::Kind::PresenceStats(stats) => Ok(stats),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
