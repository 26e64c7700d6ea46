//! Time. Two clocks, kept apart on purpose:
//!
//! - [`wall_ms`]: Unix milliseconds, only for timestamps that go on the wire (a message's
//!   `server_time_ms`, a token's `exp` compared with the issuer's clock, an epoch's high bits).
//!   It jumps when an operator or NTP steps the clock.
//! - [`mono_ms`]: milliseconds on the process's monotonic clock (`CLOCK_MONOTONIC`), for every
//!   deadline, TTL and lease. It never jumps, and it keeps counting while the process is stopped
//!   (SIGSTOP, a paused VM), so a stalled node sees on waking how long it was away.
//!
//! The pure parts (membership, ownership, dedupe) take the time as an argument.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Unix milliseconds of the node's wall clock: only for timestamps on the wire.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on the monotonic clock since the process's first call; never goes back.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
