//! Room classes: which history a room keeps, chosen by the first configured pattern that
//! matches its name (`rooms.classes`).

use std::sync::Arc;

use super::{OwnedRoom, RoomName, RoomPattern, Window};
use crate::config::{HistoryMode, RoomClass};

/// What a room keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The class's name.
    pub class: Arc<str>,
    pub mode: HistoryMode,
    pub max_messages: u64,
    pub max_age_ms: u64,
    pub max_bytes: u64,
    /// Users listed in the room's presence at most; `None`: the class keeps no presence.
    pub presence: Option<usize>,
}

impl History {
    /// Nothing kept (a room no class matches).
    pub fn none() -> Self {
        Self {
            class: Arc::from(""),
            mode: HistoryMode::None,
            max_messages: 0,
            max_age_ms: 0,
            max_bytes: 0,
            presence: None,
        }
    }

    pub fn keeps(&self) -> bool {
        self.mode != HistoryMode::None
    }
}

/// The configured classes, in order.
#[derive(Debug, Clone)]
pub struct Classes(Vec<(RoomPattern, History)>);

impl Classes {
    /// From validated configuration (`Config::validate` checked the patterns).
    pub fn new(classes: &[RoomClass]) -> Self {
        Self(
            classes
                .iter()
                .filter_map(|c| {
                    let pattern = RoomPattern::parse(&c.pattern).ok()?;
                    let history = History {
                        class: Arc::from(c.name.as_str()),
                        mode: c.history,
                        max_messages: c.max_messages,
                        max_age_ms: c.max_age_ms,
                        max_bytes: c.max_bytes,
                        presence: c.presence.then_some(c.presence_list_max),
                    };
                    Some((pattern, history))
                })
                .collect(),
        )
    }

    /// Every class, in order.
    pub fn all(&self) -> Vec<History> {
        self.0.iter().map(|(_, history)| history.clone()).collect()
    }

    /// The history `room` keeps: its class's, or none.
    pub fn of(&self, room: &RoomName) -> History {
        self.0
            .iter()
            .find(|(pattern, _)| pattern.matches(room))
            .map_or_else(History::none, |(_, history)| history.clone())
    }

    /// Whether `room` keeps presence: the users its presence lists at most.
    pub fn presence_of(&self, room: &RoomName) -> Option<usize> {
        self.0
            .iter()
            .find(|(pattern, _)| pattern.matches(room))
            .and_then(|(_, history)| history.presence)
    }

    /// `state`, keeping in memory the messages `room`'s class keeps.
    pub fn attach(&self, room: &RoomName, state: OwnedRoom) -> OwnedRoom {
        let history = self.of(room);
        if history.keeps() {
            state.keeping(Window::new(&history))
        } else {
            state
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomsConfig;

    #[test]
    fn the_first_matching_class_wins_and_unmatched_rooms_keep_nothing() {
        let classes = Classes::new(&RoomsConfig::default().classes);
        let of = |name: &str| classes.of(&RoomName::parse_any(name, 128).unwrap());
        assert_eq!(&*of("$user.alice").class, "users");
        assert_eq!(of("$user.alice").mode, HistoryMode::Durable);
        assert_eq!(of("$broadcast").mode, HistoryMode::None);
        assert_eq!(&*of("chat.lobby").class, "rooms");
        let only_chat = Classes::new(&[RoomClass {
            name: "chat".into(),
            pattern: "chat.>".into(),
            history: HistoryMode::Memory,
            max_messages: 10,
            max_age_ms: 1_000,
            max_bytes: 1024,
            presence: true,
            presence_list_max: 5,
        }]);
        let room = |name: &str| RoomName::parse_any(name, 128).unwrap();
        assert_eq!(only_chat.of(&room("chat.a")).max_messages, 10);
        assert!(!only_chat.of(&room("news.a")).keeps());
        assert!(!only_chat.of(&room("$user.bob")).keeps());
        assert_eq!(only_chat.presence_of(&room("chat.a")), Some(5));
        assert_eq!(only_chat.presence_of(&room("news.a")), None);
        assert_eq!(classes.presence_of(&room("chat.a")), Some(1_000));
        assert_eq!(classes.presence_of(&room("$user.alice")), None);
    }
}
