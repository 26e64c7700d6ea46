//! A room's presence on its owner: the one authority for who is in the room. Every node with
//! members reports them (one entry per user, sessions merged), the owner merges the nodes'
//! reports, holds a leave for the grace period, and batches joins and leaves into one diff per
//! interval. Pure: time comes in as monotonic milliseconds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::mesh::{PresenceEntry, PresenceReply, RoomPresenceReport};
use crate::proto::{PresenceDiff, PresenceMember};

/// One node's members of the room, as it last reported them.
#[derive(Debug, Default)]
struct NodeMembers {
    /// The `seq` of the node's last report taken.
    seq: u64,
    users: HashMap<Arc<str>, (u32, Bytes)>,
}

/// A user in the room.
#[derive(Debug)]
struct Present {
    sessions: u32,
    info: Bytes,
    /// Monotonic ms when a user with no session left is removed (its grace period's end).
    leaving_at: Option<u64>,
    /// What the last diff told the subscribers about this user (`None`: nothing yet).
    shown: Option<(u32, Bytes)>,
}

/// The owner's presence state of one room.
#[derive(Debug)]
pub struct RoomPresence {
    epoch: u64,
    version: u64,
    nodes: HashMap<Arc<str>, NodeMembers>,
    users: BTreeMap<Arc<str>, Present>,
    sessions: u64,
    /// Users whose entry changed since the last diff.
    changed: BTreeSet<Arc<str>>,
    /// Users whose grace period ended since the last diff, and who had been shown.
    left: Vec<Arc<str>>,
    /// Users in their grace period, by its end (monotonic ms): a tick looks at the due ones
    /// only, not at every user.
    leaving: BTreeSet<(u64, Arc<str>)>,
    /// Until then the state is being rebuilt from the nodes' reports: no diff goes out, and
    /// the first one after says `reset`.
    warm_until: u64,
    warm: bool,
    list_max: usize,
    /// The counts the last diff carried.
    last_counts: (u32, u32),
}

impl RoomPresence {
    /// A new state under `epoch` (unique to this owner's state of the room), rebuilt from the
    /// nodes' reports for `warm_ms` before its first diff.
    pub fn new(epoch: u64, now: u64, warm_ms: u64, list_max: usize) -> Self {
        Self {
            epoch,
            version: 0,
            nodes: HashMap::new(),
            users: BTreeMap::new(),
            sessions: 0,
            changed: BTreeSet::new(),
            left: Vec::new(),
            leaving: BTreeSet::new(),
            warm_until: now + warm_ms,
            warm: true,
            list_max,
            last_counts: (0, 0),
        }
    }

    /// Takes `node`'s report; `false` when it does not follow the node's previous one (a report
    /// was lost): the node must report the room whole.
    pub fn apply(
        &mut self,
        node: &Arc<str>,
        report: &RoomPresenceReport,
        now: u64,
        grace_ms: u64,
    ) -> bool {
        let known = self.nodes.get(node).map(|n| n.seq);
        if !report.full && known.is_none_or(|seq| report.seq != seq + 1) {
            return false;
        }
        let mut members = self.nodes.remove(node).unwrap_or_default();
        if report.full {
            // Everything the node had and does not name any more is gone from it.
            let named: BTreeSet<&str> = report.entries.iter().map(|e| e.user.as_str()).collect();
            let gone: Vec<Arc<str>> = members
                .users
                .keys()
                .filter(|u| !named.contains(&***u))
                .cloned()
                .collect();
            for user in gone {
                self.set(&mut members, &user, 0, Bytes::new(), now, grace_ms);
            }
        }
        for entry in &report.entries {
            let user: Arc<str> = match self.users.get_key_value(entry.user.as_str()) {
                Some((user, _)) => user.clone(),
                None => Arc::from(entry.user.as_str()),
            };
            let info = entry.info.clone();
            self.set(&mut members, &user, entry.sessions, info, now, grace_ms);
        }
        members.seq = report.seq;
        self.nodes.insert(node.clone(), members);
        true
    }

    /// `node` is gone (dead, or dropped from the mesh): its members leave, after the grace.
    pub fn node_gone(&mut self, node: &str, now: u64, grace_ms: u64) {
        let Some(mut members) = self.nodes.remove(node) else {
            return;
        };
        let users: Vec<Arc<str>> = members.users.keys().cloned().collect();
        for user in users {
            self.set(&mut members, &user, 0, Bytes::new(), now, grace_ms);
        }
    }

    /// The nodes with members here.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.nodes.keys()
    }

    /// `user` has `sessions` on the node whose members are `members`.
    fn set(
        &mut self,
        members: &mut NodeMembers,
        user: &Arc<str>,
        sessions: u32,
        info: Bytes,
        now: u64,
        grace_ms: u64,
    ) {
        let before = match sessions {
            0 => members.users.remove(user),
            n => {
                let previous = members.users.get(user).cloned();
                let info = if info.is_empty() {
                    previous.as_ref().map(|p| p.1.clone()).unwrap_or_default()
                } else {
                    info.clone()
                };
                members.users.insert(user.clone(), (n, info));
                previous
            }
        };
        let old = before.map_or(0, |b| b.0);
        if old == sessions {
            if sessions > 0 && !info.is_empty() {
                self.set_info(user, info);
            }
            return;
        }
        self.sessions = (self.sessions + sessions as u64).saturating_sub(old as u64);
        let present = self.users.entry(user.clone()).or_insert(Present {
            sessions: 0,
            info: Bytes::new(),
            leaving_at: None,
            shown: None,
        });
        present.sessions = (present.sessions + sessions).saturating_sub(old);
        if sessions > 0 && !info.is_empty() {
            present.info = info;
        }
        match (present.sessions, present.leaving_at) {
            (0, None) => {
                present.leaving_at = Some(now + grace_ms);
                self.leaving.insert((now + grace_ms, user.clone()));
                // Pages list a user in her grace period with no session: her return is told
                // even when it restores what the last diff said, or a view fetched meanwhile
                // would keep the 0.
                if let Some(shown) = &mut present.shown {
                    shown.0 = 0;
                }
            }
            (1.., Some(at)) => {
                present.leaving_at = None;
                self.leaving.remove(&(at, user.clone()));
            }
            _ => {}
        }
        self.changed.insert(user.clone());
    }

    fn set_info(&mut self, user: &Arc<str>, info: Bytes) {
        if let Some(present) = self.users.get_mut(user)
            && present.info != info
        {
            present.info = info;
            self.changed.insert(user.clone());
        }
    }

    /// Users and sessions now (a user in its grace period counts, with no session).
    pub fn counts(&self) -> (u32, u32) {
        (self.users.len() as u32, self.sessions as u32)
    }

    /// Nothing here any more: no user, nothing left to tell.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.left.is_empty() && self.nodes.is_empty()
    }

    /// Ends the grace periods due at `now` and returns the diff due, if anything changed.
    pub fn tick(&mut self, room: &str, now: u64) -> Option<PresenceDiff> {
        while let Some((at, _)) = self.leaving.first()
            && *at <= now
        {
            let (_, user) = self.leaving.pop_first().expect("a first entry");
            if let Some(p) = self.users.remove(&user)
                && p.shown.is_some()
            {
                self.left.push(user.clone());
            }
            self.changed.remove(&user);
        }
        if self.warm {
            if now < self.warm_until {
                return None;
            }
            // Rebuilt: what is here now is what the subscribers fetch with the reset.
            self.warm = false;
            for p in self.users.values_mut() {
                p.shown = Some((p.sessions, p.info.clone()));
            }
            self.changed.clear();
            self.left.clear();
            return Some(self.diff(room, Vec::new(), true));
        }
        let mut joined = Vec::new();
        for user in std::mem::take(&mut self.changed) {
            let Some(p) = self.users.get_mut(&user) else {
                continue;
            };
            // A user in its grace period is told about when it leaves or comes back.
            if p.sessions == 0 {
                continue;
            }
            let now_shown = (p.sessions, p.info.clone());
            if p.shown.as_ref() != Some(&now_shown) {
                joined.push(PresenceMember {
                    user_id: user.to_string(),
                    sessions: p.sessions,
                    info: p.info.clone(),
                });
                p.shown = Some(now_shown);
            }
        }
        if joined.is_empty() && self.left.is_empty() && self.counts() == self.last_counts {
            return None;
        }
        Some(self.diff(room, joined, false))
    }

    fn diff(&mut self, room: &str, joined: Vec<PresenceMember>, reset: bool) -> PresenceDiff {
        self.version += 1;
        let left: Vec<String> = self.left.drain(..).map(|u| u.to_string()).collect();
        let (users, sessions) = self.counts();
        self.last_counts = (users, sessions);
        let truncated = users as usize > self.list_max;
        PresenceDiff {
            room: room.to_string(),
            epoch: self.epoch,
            version: self.version,
            joined: if truncated { Vec::new() } else { joined },
            left: if truncated { Vec::new() } else { left },
            users,
            sessions,
            truncated,
            reset,
        }
    }

    /// A page of the users after `after` (at most `limit`), or the counts only; refused (too
    /// large) when the room lists more users than its class allows and `uncapped` is false.
    pub fn page(
        &self,
        after: &str,
        limit: usize,
        stats_only: bool,
        uncapped: bool,
    ) -> PresenceReply {
        let (users, sessions) = self.counts();
        let mut reply = PresenceReply {
            epoch: self.epoch,
            version: self.version,
            users,
            sessions,
            ..PresenceReply::default()
        };
        if stats_only {
            return reply;
        }
        if !uncapped && users as usize > self.list_max {
            reply.too_large = true;
            return reply;
        }
        let range = match after {
            "" => self.users.range::<str, _>(..),
            after => self
                .users
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
        };
        let mut range = range.peekable();
        while reply.members.len() < limit {
            let Some((user, p)) = range.next() else {
                break;
            };
            reply.members.push(PresenceEntry {
                user: user.to_string(),
                sessions: p.sessions,
                info: p.info.clone(),
            });
        }
        if range.peek().is_some()
            && let Some(last) = reply.members.last()
        {
            reply.next = last.user.clone();
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 1_000;

    fn report(seq: u64, full: bool, entries: &[(&str, u32)]) -> RoomPresenceReport {
        RoomPresenceReport {
            room: "r".into(),
            seq,
            full,
            entries: entries
                .iter()
                .map(|(user, sessions)| PresenceEntry {
                    user: user.to_string(),
                    sessions: *sessions,
                    info: Bytes::new(),
                })
                .collect(),
        }
    }

    fn warmed() -> RoomPresence {
        let mut p = RoomPresence::new(7, 0, 100, 1_000);
        let reset = p.tick("r", 100).expect("the reset after warming");
        assert!(reset.reset);
        p
    }

    fn joined(diff: &PresenceDiff) -> Vec<(&str, u32)> {
        diff.joined
            .iter()
            .map(|m| (m.user_id.as_str(), m.sessions))
            .collect()
    }

    #[test]
    fn sessions_of_one_user_on_two_nodes_are_one_entry() {
        let mut p = warmed();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(p.apply(&a, &report(1, true, &[("alice", 1)]), 200, GRACE));
        assert!(p.apply(
            &b,
            &report(1, true, &[("alice", 1), ("bob", 1)]),
            200,
            GRACE
        ));
        let diff = p.tick("r", 300).unwrap();
        assert_eq!(joined(&diff), [("alice", 2), ("bob", 1)]);
        assert_eq!((diff.users, diff.sessions, diff.version), (2, 3, 2));
        assert!(p.tick("r", 400).is_none(), "nothing changed, nothing sent");
    }

    #[test]
    fn a_leave_waits_out_the_grace_and_a_return_within_it_is_no_leave() {
        let mut p = warmed();
        let a: Arc<str> = "a".into();
        p.apply(
            &a,
            &report(1, true, &[("alice", 1), ("bob", 1)]),
            200,
            GRACE,
        );
        p.tick("r", 300).unwrap();
        // alice leaves and comes back (a reload) within the grace: no leave, only the counts
        // move; a page meanwhile lists her with no session.
        p.apply(&a, &report(2, false, &[("alice", 0)]), 400, GRACE);
        let counts = p.tick("r", 500).unwrap();
        assert!(counts.joined.is_empty() && counts.left.is_empty());
        assert_eq!((counts.users, counts.sessions), (2, 1));
        let page = p.page("", 10, false, false);
        assert_eq!(
            (page.members[0].user.as_str(), page.members[0].sessions),
            ("alice", 0)
        );
        // Her return names her again (an upsert: no join for a view that kept her), so a view
        // fetched during the grace does not keep the 0.
        p.apply(&a, &report(3, false, &[("alice", 1)]), 600, GRACE);
        let back = p.tick("r", 2_000).unwrap();
        assert_eq!(joined(&back), [("alice", 1)]);
        assert!(back.left.is_empty());
        assert!(p.tick("r", 2_050).is_none());
        // bob leaves for good: told once the grace has passed, not before.
        p.apply(&a, &report(4, false, &[("bob", 0)]), 2_100, GRACE);
        assert!(p.tick("r", 2_200).unwrap().left.is_empty());
        assert!(p.tick("r", 3_000).is_none());
        let diff = p.tick("r", 3_100).unwrap();
        assert_eq!(diff.left, ["bob"]);
        assert_eq!((diff.users, diff.sessions), (1, 1));
    }

    #[test]
    fn a_dead_node_takes_its_members_along_after_the_grace() {
        let mut p = warmed();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        p.apply(&a, &report(1, true, &[("alice", 1)]), 200, GRACE);
        p.apply(
            &b,
            &report(1, true, &[("alice", 1), ("bob", 1)]),
            200,
            GRACE,
        );
        p.tick("r", 300).unwrap();
        p.node_gone("b", 400, GRACE);
        let diff = p.tick("r", 1_400).unwrap();
        assert_eq!(diff.left, ["bob"]);
        assert_eq!(joined(&diff), [("alice", 1)], "alice is still there, once");
        assert_eq!(p.nodes().count(), 1);
    }

    #[test]
    fn a_report_that_does_not_follow_the_last_is_refused_until_a_full_one() {
        let mut p = warmed();
        let a: Arc<str> = "a".into();
        assert!(!p.apply(&a, &report(1, false, &[("alice", 1)]), 0, GRACE));
        assert!(p.apply(&a, &report(5, true, &[("alice", 1), ("bob", 2)]), 0, GRACE));
        assert!(!p.apply(&a, &report(7, false, &[("bob", 0)]), 0, GRACE));
        assert!(p.apply(&a, &report(6, false, &[("bob", 1)]), 0, GRACE));
        // A full report forgets what it does not name.
        assert!(p.apply(&a, &report(9, true, &[("bob", 1)]), 10, GRACE));
        assert_eq!(
            p.counts(),
            (2, 1),
            "alice in her grace period, with no session"
        );
        p.tick("r", 10);
        p.tick("r", 2_000);
        assert_eq!(p.counts(), (1, 1));
    }

    #[test]
    fn a_rebuilt_state_starts_with_a_reset_and_no_join_storm() {
        let mut p = RoomPresence::new(9, 0, 500, 1_000);
        let a: Arc<str> = "a".into();
        p.apply(&a, &report(1, true, &[("alice", 1), ("bob", 1)]), 10, GRACE);
        assert!(p.tick("r", 100).is_none(), "no diff while rebuilding");
        let reset = p.tick("r", 500).unwrap();
        assert!(reset.reset && reset.joined.is_empty());
        assert_eq!((reset.epoch, reset.version, reset.users), (9, 1, 2));
        p.apply(&a, &report(2, false, &[("carol", 1)]), 600, GRACE);
        assert_eq!(joined(&p.tick("r", 700).unwrap()), [("carol", 1)]);
    }

    #[test]
    fn above_the_list_cap_diffs_carry_counts_and_pages_are_refused() {
        let mut p = RoomPresence::new(1, 0, 0, 2);
        p.tick("r", 0);
        let a: Arc<str> = "a".into();
        p.apply(
            &a,
            &report(1, true, &[("u1", 1), ("u2", 1), ("u3", 1)]),
            0,
            GRACE,
        );
        let diff = p.tick("r", 10).unwrap();
        assert!(diff.truncated && diff.joined.is_empty());
        assert_eq!(diff.users, 3);
        assert!(p.page("", 10, false, false).too_large);
        let uncapped = p.page("", 2, false, true);
        assert_eq!(uncapped.members.len(), 2);
        assert_eq!(uncapped.next, "u2");
        let rest = p.page("u2", 2, false, true);
        assert_eq!(rest.members[0].user, "u3");
        assert!(rest.next.is_empty());
        assert_eq!(p.page("", 0, true, false).users, 3);
    }

    #[test]
    fn info_is_the_last_joining_sessions_and_an_empty_one_keeps_it() {
        let mut p = warmed();
        let a: Arc<str> = "a".into();
        let mut first = report(1, true, &[("alice", 1)]);
        first.entries[0].info = Bytes::from_static(b"Alice");
        p.apply(&a, &first, 0, GRACE);
        p.apply(&a, &report(2, false, &[("alice", 2)]), 0, GRACE);
        let diff = p.tick("r", 200).unwrap();
        assert_eq!(&diff.joined[0].info[..], b"Alice");
        assert_eq!(diff.joined[0].sessions, 2);
    }
}
