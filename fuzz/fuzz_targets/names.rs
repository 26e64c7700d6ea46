//! The small parsers of names a client or an operator hands the node: room names (src/room),
//! room patterns (src/room/pattern.rs) and address blocks (`IpBlock`, src/ids.rs). Refusal is an
//! error, never a panic, and what is accepted keeps its meaning:
//! - a room name is its own pattern, which matches it;
//! - a pattern prints as it was written; `*` for any segments and a final `>` still match;
//! - an address block contains its own address, and an address exactly when the prefix agrees.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use roomwire::RoomName;
use roomwire::fuzzing::{IpBlock, RoomNameError, RoomPattern, is_room_pattern};

#[derive(Arbitrary, Debug)]
struct Input {
    room: String,
    pattern: String,
    /// Segments of `room` replaced by `*`, and how many last segments a `>` replaces.
    wild: u64,
    tail: u8,
    max_bytes: u16,
    block: String,
    addr: [u8; 16],
    v4: bool,
    prefix: u8,
}

fn room_and_patterns(input: &Input) {
    let max = usize::from(input.max_bytes);
    let any = RoomName::parse_any(&input.room, max);
    match RoomName::parse_client(&input.room, max) {
        Ok(name) => {
            assert_eq!(name.as_str(), input.room);
            assert_eq!(any.as_ref().ok(), Some(&name));
        }
        Err(RoomNameError::Reserved) => assert!(input.room.starts_with('$')),
        Err(error) => assert_eq!(any, Err(error)),
    }

    if let Ok(pattern) = RoomPattern::parse(&input.pattern) {
        assert_eq!(pattern.to_string(), input.pattern);
    }

    let Ok(room) = any else { return };
    assert!(room.as_str().len() <= max && !room.as_str().is_empty());
    assert!(is_room_pattern(room.as_str()), "a room name is a pattern");
    let exact = RoomPattern::parse(room.as_str()).expect("a room name is a pattern");
    assert!(exact.matches(&room));
    if let Ok(pattern) = RoomPattern::parse(&input.pattern) {
        let wildcards = input.pattern.split('.').any(|s| s == "*" || s == ">");
        if !wildcards {
            assert_eq!(pattern.matches(&room), input.pattern == room.as_str());
        }
    }

    // Wildcards in place of some of its segments (never the node's own first one) still match.
    let segments: Vec<&str> = room.as_str().split('.').collect();
    let reserved = room.as_str().starts_with('$');
    let tail = usize::from(input.tail) % (segments.len() + 1);
    let mut wild: Vec<&str> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let own = i == 0 && reserved;
            if !own && (input.wild >> (i % 64)) & 1 == 1 {
                "*"
            } else {
                s
            }
        })
        .collect();
    if tail > 0 && !(reserved && tail == segments.len()) {
        wild.truncate(segments.len() - tail);
        wild.push(">");
    }
    let wild = wild.join(".");
    let pattern = RoomPattern::parse(&wild).expect("wildcards over a room name make a pattern");
    assert!(pattern.matches(&room), "{wild} does not match {room:?}");
    // One segment more or fewer than the room has: no match (unless a `>` takes the rest).
    if !wild.ends_with('>') {
        let longer = RoomPattern::parse(&format!("{wild}.*")).expect("a pattern");
        assert!(!longer.matches(&room));
    }
}

fn prefix_bits(ip: IpAddr) -> (u128, u32) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn blocks(input: &Input) {
    if let Ok(block) = IpBlock::parse(&input.block) {
        let addr = input.block.split('/').next().unwrap_or("").trim();
        let addr: IpAddr = addr.parse().expect("a parsed block has an address");
        assert!(
            block.contains(addr),
            "{:?} does not contain itself",
            input.block
        );
    }

    // A block written from parts parses when its prefix fits the family, and contains an address
    // exactly when their first `prefix` bits agree.
    let addr = if input.v4 {
        IpAddr::from([input.addr[0], input.addr[1], input.addr[2], input.addr[3]])
    } else {
        IpAddr::from(input.addr)
    };
    let text = format!("{addr}/{}", input.prefix);
    let (bits, width) = prefix_bits(addr);
    let Ok(block) = IpBlock::parse(&text) else {
        assert!(u32::from(input.prefix) > width, "{text} refused");
        return;
    };
    assert!(u32::from(input.prefix) <= width, "{text} accepted");
    let probe = IpAddr::from(input.addr);
    let (probe_bits, probe_width) = prefix_bits(probe);
    let shift = width - u32::from(input.prefix);
    let agree = probe_width == width
        && (shift == width || bits.checked_shr(shift) == probe_bits.checked_shr(shift));
    assert_eq!(block.contains(probe), agree, "{text} contains {probe}?");
}

fuzz_target!(|input: Input| {
    room_and_patterns(&input);
    blocks(&input);
});
