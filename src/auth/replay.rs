//! Anti-replay: each token id (`jti`) is accepted once within its token's lifetime.

use std::collections::HashMap;
use std::sync::Mutex;

use super::AuthError;

/// Token ids seen, each kept until its token expires. Entries are also ordered by expiry, so
/// each claim drops exactly the expired ones (amortised O(log n), never a full scan).
pub(super) struct ReplayGuard {
    inner: Mutex<Seen>,
    max: usize,
}

#[derive(Default)]
struct Seen {
    by_id: HashMap<String, u64>,
    by_expiry: std::collections::BTreeSet<(u64, String)>,
}

impl ReplayGuard {
    pub(super) fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Seen::default()),
            max,
        }
    }

    /// Accepts `jti` once until `expires` (Unix seconds).
    pub(super) fn claim(&self, jti: &str, expires: u64, now: u64) -> Result<(), AuthError> {
        let mut seen = self.inner.lock().expect("replay lock poisoned");
        while let Some((exp, _)) = seen.by_expiry.first() {
            if *exp >= now {
                break;
            }
            let (_, id) = seen.by_expiry.pop_first().expect("first exists");
            seen.by_id.remove(&id);
        }
        if seen.by_id.contains_key(jti) {
            return Err(AuthError::Replayed);
        }
        if seen.by_id.len() >= self.max {
            return Err(AuthError::Busy);
        }
        seen.by_id.insert(jti.to_string(), expires);
        seen.by_expiry.insert((expires, jti.to_string()));
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.inner.lock().expect("replay lock poisoned").by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_within_its_lifetime() {
        let guard = ReplayGuard::new(2);
        guard.claim("a", 100, 10).unwrap();
        assert!(matches!(
            guard.claim("a", 100, 50),
            Err(AuthError::Replayed)
        ));
        guard.claim("b", 150, 10).unwrap();
        assert!(matches!(guard.claim("c", 100, 10), Err(AuthError::Busy)));
        // "a" expires first and makes room; "b" is still remembered.
        guard.claim("c", 300, 120).unwrap();
        assert!(matches!(
            guard.claim("b", 300, 120),
            Err(AuthError::Replayed)
        ));
        assert_eq!(guard.len(), 2);
        // Once everything has expired, "a" may be seen again.
        guard.claim("a", 400, 350).unwrap();
        assert_eq!(guard.len(), 1);
    }
}
