//! Room patterns in the NATS style: dot-separated segments, `*` matching one segment and a final
//! `>` one or more. Tokens and certificates grant rooms by pattern; room classes (history) are
//! chosen by pattern. A wildcard never matches a first segment that starts with `$`: the node's
//! own rooms (`$user.<id>`, `$broadcast`) are matched only by patterns that name them.

use std::fmt;

use super::RoomName;
use crate::ids::is_room_pattern;

/// A parsed room pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern(Vec<String>);

/// A pattern that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad room pattern {0:?}: dot-separated segments of letters, digits and _-:@=, `*` for one segment, a final `>` for the rest (a `$` may start the first)"
)]
pub struct PatternError(String);

impl RoomPattern {
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        if !is_room_pattern(pattern) {
            return Err(PatternError(pattern.to_string()));
        }
        Ok(Self(pattern.split('.').map(str::to_string).collect()))
    }

    pub fn matches(&self, room: &RoomName) -> bool {
        let mut parts = room.as_str().split('.');
        for (i, segment) in self.0.iter().enumerate() {
            let part = parts.next();
            // The node's own rooms are only matched by name.
            let reserved = i == 0 && part.is_some_and(|p| p.starts_with('$'));
            match segment.as_str() {
                ">" => return part.is_some() && !reserved && i == self.0.len() - 1,
                "*" if part.is_none() || reserved => return false,
                "*" => {}
                literal => {
                    if part != Some(literal) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse_any(name, 128).unwrap()
    }

    #[test]
    fn patterns_match_like_nats_subjects() {
        let p = |s: &str| RoomPattern::parse(s).unwrap();
        assert!(p("chat.lobby").matches(&room("chat.lobby")));
        assert!(!p("chat.lobby").matches(&room("chat.lobby.x")));
        assert!(p("chat.*").matches(&room("chat.lobby")));
        assert!(!p("chat.*").matches(&room("chat")));
        assert!(!p("chat.*").matches(&room("chat.a.b")));
        assert!(p("chat.>").matches(&room("chat.a.b")));
        assert!(!p("chat.>").matches(&room("chat")));
        assert!(p(">").matches(&room("anything.at.all")));
        assert!(p("*.eu.*").matches(&room("chat.eu.lobby")));
        for bad in ["", "a..b", "a.>.b", "a b", "chat.>x", "a.$b", "$"] {
            assert!(RoomPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_nodes_own_rooms_are_matched_only_by_name() {
        let p = |s: &str| RoomPattern::parse(s).unwrap();
        assert!(!p(">").matches(&room("$user.alice")));
        assert!(!p("*").matches(&room("$broadcast")));
        assert!(!p("*.alice").matches(&room("$user.alice")));
        assert!(p("$user.>").matches(&room("$user.alice")));
        assert!(p("$user.*").matches(&room("$user.alice")));
        assert!(p("$broadcast").matches(&room("$broadcast")));
        assert!(!p("$user.>").matches(&room("user.alice")));
    }
}
