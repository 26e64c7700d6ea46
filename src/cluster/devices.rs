//! Offline delivery: how far each device of a user has read the user's room `$user.<id>`.
//!
//! A client that names its device (`Connect.device_id`) reports the position it has read to
//! (`seen`); the node keeps the furthest one per device, at most [`MAX_DEVICES_PER_USER`] devices
//! per user (the one seen least recently is forgotten first), and the device's next session
//! rejoins the user room from there, so what was sent while it was away is replayed to it once.
//! A mesh keeps them in a JetStream KV bucket (one key per user); standalone, in memory.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Devices remembered per user.
pub const MAX_DEVICES_PER_USER: usize = 16;

/// One user's devices.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Devices {
    pub devices: Vec<Device>,
}

/// Where one device has read to, and when it said so (Unix ms).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
    pub at_ms: u64,
}

impl Devices {
    pub fn position(&self, device: &str) -> Option<(u64, u64)> {
        self.devices
            .iter()
            .find(|d| d.id == device)
            .map(|d| (d.epoch, d.seq))
    }

    /// `device` has read to `position` at `now_ms`: the furthest position is kept. Whether
    /// anything changed.
    pub fn seen(&mut self, device: &str, position: (u64, u64), now_ms: u64) -> bool {
        if let Some(known) = self.devices.iter_mut().find(|d| d.id == device) {
            if (known.epoch, known.seq) >= position {
                return false;
            }
            (known.epoch, known.seq, known.at_ms) = (position.0, position.1, now_ms);
            return true;
        }
        if self.devices.len() >= MAX_DEVICES_PER_USER
            && let Some(oldest) = self
                .devices
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| d.at_ms)
                .map(|(i, _)| i)
        {
            self.devices.swap_remove(oldest);
        }
        self.devices.push(Device {
            id: device.to_string(),
            epoch: position.0,
            seq: position.1,
            at_ms: now_ms,
        });
        true
    }

    fn last_seen(&self) -> u64 {
        self.devices.iter().map(|d| d.at_ms).max().unwrap_or(0)
    }
}

/// Users remembered by a standalone node at most; past it, the half seen least recently goes.
const LOCAL_MAX_USERS: usize = 100_000;

/// A standalone node's devices (in memory, like its history).
#[derive(Debug, Default)]
pub struct LocalDevices {
    users: Mutex<HashMap<String, Devices>>,
}

impl LocalDevices {
    pub fn position(&self, user: &str, device: &str) -> Option<(u64, u64)> {
        self.lock().get(user)?.position(device)
    }

    pub fn seen(&self, user: &str, device: &str, position: (u64, u64), now_ms: u64) {
        let mut users = self.lock();
        if !users.contains_key(user) && users.len() >= LOCAL_MAX_USERS {
            let mut ages: Vec<u64> = users.values().map(Devices::last_seen).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            users.retain(|_, d| d.last_seen() > cut);
        }
        users
            .entry(user.to_string())
            .or_default()
            .seen(device, position, now_ms);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Devices>> {
        self.users.lock().expect("devices lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_furthest_position_is_kept_per_device() {
        let mut d = Devices::default();
        assert!(d.seen("phone", (1, 5), 10));
        assert!(
            !d.seen("phone", (1, 3), 11),
            "an older report changes nothing"
        );
        assert!(d.seen("phone", (2, 1), 12), "a later epoch is further");
        assert!(d.seen("laptop", (1, 1), 13));
        assert_eq!(d.position("phone"), Some((2, 1)));
        assert_eq!(d.position("laptop"), Some((1, 1)));
        assert_eq!(d.position("tablet"), None);
    }

    #[test]
    fn a_user_keeps_a_bounded_number_of_devices_forgetting_the_least_recent() {
        let mut d = Devices::default();
        for i in 0..MAX_DEVICES_PER_USER as u64 {
            d.seen(&format!("d{i}"), (1, i), 100 + i);
        }
        d.seen("d0", (1, 99), 1_000);
        d.seen("new", (1, 1), 1_001);
        assert_eq!(d.devices.len(), MAX_DEVICES_PER_USER);
        assert_eq!(d.position("d1"), None, "seen least recently");
        assert!(d.position("d0").is_some() && d.position("new").is_some());
    }
}
