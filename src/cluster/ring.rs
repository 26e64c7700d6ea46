//! The consistent-hash ring: which node owns a room. Pure (no IO, no clock): the same set of node
//! ids gives the same owner for every room on every node, whatever order the ids arrived in.
//!
//! Each node is placed on a 64-bit circle at `vnodes` points (`xxh3(node id + '#' + i)`); a room
//! belongs to the first point at or after `xxh3(room)`, wrapping around. xxh3 is a specified,
//! stable algorithm, so nodes built by different compiler versions agree (std's default hasher
//! makes no such promise). When a node joins or leaves, only the rooms on the arcs next to its
//! points move: about 1/N of all rooms.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

pub use crate::config::DEFAULT_VNODES;

/// An immutable ring over a set of node ids.
#[derive(Debug, Clone)]
pub struct Ring {
    /// (point, index into `nodes`), sorted by point.
    points: Vec<(u64, u32)>,
    nodes: Vec<Arc<str>>,
}

impl Ring {
    /// A ring over `nodes` (duplicates ignored) with `vnodes` points each.
    pub fn new<I, S>(nodes: I, vnodes: u32) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut nodes: Vec<Arc<str>> = nodes.into_iter().map(|n| Arc::from(n.as_ref())).collect();
        nodes.sort();
        nodes.dedup();
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (index, node) in nodes.iter().enumerate() {
            for v in 0..vnodes.max(1) {
                points.push((xxh3_64(format!("{node}#{v}").as_bytes()), index as u32));
            }
        }
        // Ties (vanishingly rare) are broken by node index, which is itself sorted: deterministic.
        points.sort_unstable();
        Ring { points, nodes }
    }

    /// The node that owns `room`; `None` on an empty ring.
    pub fn owner(&self, room: &str) -> Option<&Arc<str>> {
        if self.points.is_empty() {
            return None;
        }
        let hash = xxh3_64(room.as_bytes());
        let i = self.points.partition_point(|(point, _)| *point < hash);
        let (_, node) = self.points[i % self.points.len()];
        Some(&self.nodes[node as usize])
    }

    /// The owner of `room` on this ring with the nodes `skip` accepts removed: the node that
    /// owned it before those nodes joined (consistent hashing moves a room only to the node whose
    /// point now comes first). Where a room's previous owner is found during a hand-off.
    pub fn owner_excluding(&self, room: &str, skip: impl Fn(&str) -> bool) -> Option<&Arc<str>> {
        if self.points.is_empty() {
            return None;
        }
        let hash = xxh3_64(room.as_bytes());
        let start = self.points.partition_point(|(point, _)| *point < hash);
        (0..self.points.len())
            .map(|k| &self.nodes[self.points[(start + k) % self.points.len()].1 as usize])
            .find(|node| !skip(node))
    }

    /// The node ids, sorted.
    pub fn nodes(&self) -> &[Arc<str>] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod owner_excluding_tests {
    use super::*;

    #[test]
    fn excluding_a_node_gives_the_owner_of_the_ring_without_it() {
        let all = Ring::new(["a", "b", "c", "d"], 64);
        let without_d = Ring::new(["a", "b", "c"], 64);
        for i in 0..2_000 {
            let room = format!("room-{i}");
            assert_eq!(
                all.owner_excluding(&room, |n| n == "d"),
                without_d.owner(&room),
                "{room}"
            );
        }
        assert_eq!(all.owner_excluding("x", |_| true), None);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn rooms(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("chat.room-{i}")).collect()
    }

    fn owners(ring: &Ring, rooms: &[String]) -> Vec<Arc<str>> {
        rooms
            .iter()
            .map(|r| ring.owner(r).unwrap().clone())
            .collect()
    }

    #[test]
    fn an_empty_ring_owns_nothing_and_one_node_owns_everything() {
        assert!(Ring::new(Vec::<String>::new(), 8).owner("a").is_none());
        let ring = Ring::new(["n1"], 8);
        assert!(rooms(100).iter().all(|r| &**ring.owner(r).unwrap() == "n1"));
    }

    #[test]
    fn ten_thousand_rooms_spread_evenly_over_five_nodes() {
        let ring = Ring::new(["eu-1", "eu-2", "us-1", "us-2", "ap-1"], DEFAULT_VNODES);
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for owner in owners(&ring, &rooms(10_000)) {
            *counts.entry(owner).or_default() += 1;
        }
        let max = *counts.values().max().unwrap() as f64;
        let mean = 10_000.0 / 5.0;
        // The figure the mesh issue asks for; printed with --nocapture.
        eprintln!(
            "ring balance over 10k rooms, 5 nodes x {DEFAULT_VNODES} vnodes: max/mean = {:.3}",
            max / mean
        );
        assert!(
            max / mean < 1.25,
            "max/mean = {:.3}: {counts:?}",
            max / mean
        );
        assert_eq!(counts.len(), 5);
    }

    proptest! {
        #[test]
        fn every_node_computes_the_same_owners_whatever_the_order(mut nodes in proptest::collection::vec("[a-z]{1,6}-[0-9]{1,3}", 1..8), seed in any::<u64>()) {
            let a = Ring::new(nodes.clone(), 32);
            // Another node learned the same members in another order, with a duplicate.
            let k = (seed as usize) % nodes.len();
            nodes.rotate_left(k);
            nodes.push(nodes[0].clone());
            let b = Ring::new(nodes, 32);
            let rooms = rooms(200);
            prop_assert_eq!(owners(&a, &rooms), owners(&b, &rooms));
        }

        #[test]
        fn a_join_or_leave_moves_about_one_nth_of_the_rooms_and_only_to_or_from_that_node(n in 3usize..8) {
            let nodes: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let rooms = rooms(2_000);
            let before = Ring::new(&nodes, 128);
            let mut grown = nodes.clone();
            grown.push("node-new".into());
            let after = Ring::new(&grown, 128);
            let (old, new) = (owners(&before, &rooms), owners(&after, &rooms));
            let moved: Vec<usize> = (0..rooms.len()).filter(|&i| old[i] != new[i]).collect();
            prop_assert!(moved.iter().all(|&i| &*new[i] == "node-new"), "rooms moved between old nodes");
            let share = moved.len() as f64 / rooms.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            prop_assert!(share > ideal * 0.6 && share < ideal * 1.4, "moved {share:.3}, ideal {ideal:.3}");
            // Leaving is the mirror image: the new node's rooms go back where they were.
            prop_assert_eq!(owners(&Ring::new(&nodes, 128), &rooms), old);
        }
    }
}
