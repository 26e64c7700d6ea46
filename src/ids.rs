//! The rules for every name and id the node accepts or makes: name segments (room names, user
//! ids, node ids, regions), client message ids, random ids, and address blocks. Pure; the lowest layer, so that
//! tokens, certificates, rooms and the mesh all check names the same way.

/// Longest user id, in bytes (it becomes part of the room name `$user.<id>`).
pub const MAX_USER_ID_BYTES: usize = 64;

/// Longest client message id, in bytes: the owner remembers ids for de-duplication, so they
/// must stay small.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

/// What a user id may be, for error messages.
pub const USER_ID_RULE: &str = "user id must be 1-64 letters, digits or _-:@=";

/// Prefix of the user ids of certificate-identified services (`service:billing`). Token subjects
/// and development ids starting with it are refused, so a token can never act as a service.
pub const SERVICE_PREFIX: &str = "service:";

/// True for a non-empty run of the characters allowed inside one segment of a name.
pub fn is_name_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'='))
}

/// A room pattern: dot-separated segments, each a name segment, `*`, or (last) `>`; the first
/// may start with `$` to name the node's own rooms (`$user.>`, `$broadcast`).
pub fn is_room_pattern(pattern: &str) -> bool {
    if pattern.is_empty() {
        return false;
    }
    let segments: Vec<&str> = pattern.split('.').collect();
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| {
        let s = if i == 0 {
            s.strip_prefix('$').unwrap_or(s)
        } else {
            s
        };
        s == "*" || (s == ">" && i == last) || is_name_segment(s)
    })
}

/// Longest device id (`Connect.device_id`), in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 64;

/// What a device id may be, for error messages.
pub const DEVICE_ID_RULE: &str = "device_id must be 1-64 letters, digits or ._-";

/// A device id: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// User ids become one segment of the room name `$user.<id>`.
pub fn is_valid_user_id(user: &str) -> bool {
    user.len() <= MAX_USER_ID_BYTES && is_name_segment(user)
}

/// True for an id usable as one NATS subject token (what a mesh node id is validated to be).
pub fn is_subject_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `n` random bytes from the OS, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random u64 from the OS.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    u64::from_be_bytes(bytes)
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// An address or a CIDR block (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`): the trusted proxies of
/// `limits.trusted_proxies`. IPv4-mapped IPv6 addresses are taken as the IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    addr: std::net::IpAddr,
    len: u8,
}

impl IpBlock {
    pub fn parse(s: &str) -> Result<IpBlock, String> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or an address/prefix block"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => len
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(IpBlock { addr, len })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let bits = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            std::net::IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((block, width), (ip, ip_width)) = (bits(self.addr), bits(ip.to_canonical()));
        if width != ip_width {
            return false;
        }
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        block & mask == ip & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_blocks_contain_what_their_prefix_covers() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let block = |s: &str| IpBlock::parse(s).unwrap();
        assert!(block("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(block("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!block("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(
            block("127.0.0.1").contains(ip("::ffff:127.0.0.1")),
            "mapped IPv4"
        );
        assert!(block("fd00::/8").contains(ip("fd12::1")));
        assert!(!block("fd00::/8").contains(ip("10.0.0.1")), "other family");
        assert!(block("0.0.0.0/0").contains(ip("203.0.113.9")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129", ""] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_ids_are_one_name_segment_of_at_most_64_bytes() {
        assert!(is_valid_user_id("alice"));
        assert!(is_valid_user_id("user:42@x=y_z-w"));
        assert!(is_valid_user_id(&"a".repeat(64)));
        for bad in ["", "a.b", "a b", "ä", "a*", &"a".repeat(65)] {
            assert!(!is_valid_user_id(bad), "{bad}");
        }
    }

    #[test]
    fn subject_tokens_exclude_nats_wildcards_and_separators() {
        assert!(is_subject_token("eu-1_a"));
        for bad in ["", "a.b", "a*", "a b", ">", "a:b"] {
            assert!(!is_subject_token(bad), "{bad}");
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("héllo".into(), 2), "h");
        assert_eq!(truncate_utf8("abc".into(), 5), "abc");
    }
}
