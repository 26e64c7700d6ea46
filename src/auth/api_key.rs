//! The HTTP API's keys (`Authorization: Bearer <key>`), compared in constant time.

use subtle::ConstantTimeEq as _;

/// The credential of an `Authorization: Bearer <credential>` header (the scheme is
/// case-insensitive, RFC 7235).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, credential) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
}

/// The keys the HTTP API accepts.
pub struct ApiKeys(Vec<String>);

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Self {
        Self(keys)
    }

    /// Whether `presented` is one of the keys. Every key is compared (no early exit), each in
    /// constant time, so the time taken says nothing about how close a guess was.
    pub fn accepts(&self, presented: &str) -> bool {
        let matched = self.0.iter().fold(0u8, |ok, key| {
            ok | u8::from(bool::from(key.as_bytes().ct_eq(presented.as_bytes())))
        });
        matched == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_whole_and_the_scheme_is_case_insensitive() {
        let keys = ApiKeys::new(vec![
            "k1-0123456789abcdef".into(),
            "k2-0123456789abcdef".into(),
        ]);
        assert!(keys.accepts("k2-0123456789abcdef"));
        assert!(!keys.accepts("k2-0123456789abcde"));
        assert!(!keys.accepts(""));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
