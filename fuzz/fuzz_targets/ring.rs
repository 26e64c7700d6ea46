//! The consistent-hash ring (cluster/ring.rs) over arbitrary node sets and room names:
//! - the owner is one of the nodes (none on an empty ring), the node list is sorted and deduped;
//! - every node computes the same owners whatever order (and repeats) it learned the ids in;
//! - a joining node takes rooms only for itself, and excluding it gives the owner from before.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use roomwire::Ring;

#[derive(Arbitrary, Debug)]
struct Input {
    nodes: Vec<String>,
    joining: String,
    vnodes: u8,
    rooms: Vec<String>,
    rotate: u8,
}

fuzz_target!(|input: Input| {
    let nodes: Vec<String> = input.nodes.into_iter().take(16).collect();
    let vnodes = u32::from(input.vnodes % 65);
    let rooms: Vec<String> = input.rooms.into_iter().take(32).collect();
    let ring = Ring::new(&nodes, vnodes);

    let mut expected = nodes.clone();
    expected.sort();
    expected.dedup();
    let listed: Vec<&str> = ring.nodes().iter().map(|n| &**n).collect();
    assert_eq!(listed, expected);
    assert_eq!(ring.is_empty(), nodes.is_empty());

    let mut shuffled = nodes.clone();
    if !shuffled.is_empty() {
        let k = usize::from(input.rotate) % shuffled.len();
        shuffled.rotate_left(k);
        shuffled.push(shuffled[0].clone());
    }
    let same = Ring::new(&shuffled, vnodes);

    let mut grown = nodes.clone();
    grown.push(input.joining.clone());
    let grown = Ring::new(&grown, vnodes);
    let joined = !nodes.contains(&input.joining);

    for room in &rooms {
        let owner = ring.owner(room);
        match owner {
            None => assert!(nodes.is_empty()),
            Some(owner) => assert!(nodes.iter().any(|n| **n == **owner)),
        }
        assert_eq!(same.owner(room), owner, "order of the ids matters");
        assert_eq!(ring.owner_excluding(room, |_| false), owner);
        assert_eq!(ring.owner_excluding(room, |_| true), None);
        let after = grown.owner(room).expect("a grown ring has a node");
        if joined {
            assert!(
                owner == Some(after) || **after == *input.joining,
                "{room:?} moved between old nodes"
            );
            assert_eq!(grown.owner_excluding(room, |n| n == input.joining), owner);
        } else {
            assert_eq!(Some(after), owner);
        }
    }
});
