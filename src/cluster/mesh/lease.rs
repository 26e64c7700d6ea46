//! The node's ownership lease. An owner may sequence and acknowledge only while its lease is
//! valid: until `lease_ms` after the start of its last heartbeat that the NATS server confirmed,
//! on its own monotonic clock. The other nodes drop a node `node_ttl_ms` after the last heartbeat
//! they received from it, and a heartbeat is received no earlier than it was sent, so they take its
//! rooms over only after its lease has ended, with `node_ttl_ms - lease_ms` to spare (the
//! argument and its assumptions: docs/CLUSTER.md, "Leases").
//!
//! A lease that ends without renewal (the process was stopped, its NATS server did not answer)
//! is a **lapse**: it counts into the node's generation, so every room state held under the old
//! lease is stale and is never used again, and the node re-learns the mesh before it starts rooms.
//! Time is passed in (monotonic milliseconds), so the rules are tested without a clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The lease, read on every sequencing (lock-free while it holds) and renewed by the lease loop.
#[derive(Debug, Default)]
pub struct Lease {
    /// Monotonic ms until which the lease holds; 0: not held (never renewed, or lapsed).
    valid_until: AtomicU64,
    /// Lapses so far.
    lapses: AtomicU64,
    /// Monotonic ms of the last lapse (0: none): the node settles again from there.
    lapsed_at: AtomicU64,
    /// Lapses and renewals, taken one at a time: a renewal never revives a lease whose lapse is
    /// not yet fully recorded.
    changing: Mutex<()>,
}

impl Lease {
    /// Whether the lease holds at `now`. The first caller to find it expired records the lapse.
    pub fn is_valid(&self, now: u64) -> bool {
        if now < self.valid_until.load(Ordering::Acquire) {
            return true;
        }
        let _changing = self.changing.lock().expect("lease lock poisoned");
        self.check(now)
    }

    /// [`Self::is_valid`] under the lock.
    fn check(&self, now: u64) -> bool {
        let until = self.valid_until.load(Ordering::Acquire);
        if now < until {
            return true;
        }
        if until != 0 {
            self.lapsed_at.store(now.max(1), Ordering::Release);
            self.lapses.fetch_add(1, Ordering::AcqRel);
            self.valid_until.store(0, Ordering::Release);
        }
        false
    }

    /// A heartbeat sent at `started` (taken before it was published) was confirmed by the NATS
    /// server at `now`: the lease holds until `started + lease_ms`. A renewal confirmed only
    /// after the lease it would extend had already ended does not revive that lease: the lapse
    /// is recorded first, and the next renewal starts a new lease (a new generation).
    pub fn renewed(&self, started: u64, now: u64, lease_ms: u64) {
        let _changing = self.changing.lock().expect("lease lock poisoned");
        self.check(now);
        let until = started.saturating_add(lease_ms);
        if until > now {
            self.valid_until.fetch_max(until, Ordering::AcqRel);
        }
    }

    /// Lapses so far; part of the node's generation.
    pub fn lapses(&self) -> u64 {
        self.lapses.load(Ordering::Acquire)
    }

    /// Monotonic ms of the last lapse (0: none).
    pub fn lapsed_at(&self) -> u64 {
        self.lapsed_at.load(Ordering::Acquire)
    }

    /// Milliseconds the lease still holds at `now` (0 when it does not).
    pub fn remaining(&self, now: u64) -> u64 {
        self.valid_until.load(Ordering::Acquire).saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_from_the_start_of_a_confirmed_heartbeat() {
        let lease = Lease::default();
        assert!(!lease.is_valid(0), "not held before the first renewal");
        lease.renewed(100, 110, 1_000);
        assert!(lease.is_valid(1_099));
        assert_eq!(lease.remaining(600), 500);
        assert!(
            !lease.is_valid(1_100),
            "measured from the start, not the confirmation"
        );
        assert_eq!(lease.lapses(), 1);
    }

    #[test]
    fn renewals_extend_it_and_a_late_confirmation_never_shortens_it() {
        let lease = Lease::default();
        lease.renewed(0, 10, 1_000);
        lease.renewed(500, 520, 1_000);
        assert!(lease.is_valid(1_400));
        // A confirmation of an older heartbeat arriving late changes nothing.
        lease.renewed(200, 1_450, 1_000);
        assert!(lease.is_valid(1_450));
        assert_eq!(lease.lapses(), 0);
    }

    #[test]
    fn a_stall_past_the_lease_is_a_lapse_even_if_a_renewal_completes_after_it() {
        // Heartbeat sent at 1_000, the process stopped for 5 s, the confirmation read at 6_000.
        let lease = Lease::default();
        lease.renewed(0, 10, 1_000);
        lease.renewed(900, 6_000, 1_000);
        assert!(!lease.is_valid(6_000));
        assert_eq!(lease.lapses(), 1, "the old lease lapsed");
        assert_eq!(
            lease.lapsed_at(),
            6_000,
            "the node settles again from there"
        );
        // The next heartbeat after waking starts a new lease (a new generation).
        lease.renewed(6_010, 6_020, 1_000);
        assert!(lease.is_valid(6_500));
        assert_eq!(lease.lapses(), 1);
    }

    #[test]
    fn a_lapse_is_counted_once_whoever_notices_it() {
        let lease = Lease::default();
        lease.renewed(0, 1, 100);
        assert!(!lease.is_valid(200));
        assert!(!lease.is_valid(300));
        lease.renewed(150, 400, 100);
        assert_eq!(lease.lapses(), 1);
    }
}
