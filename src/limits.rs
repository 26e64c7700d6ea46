//! Rate and size budgets: per client address at accept, per session on every inbound frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;
use crate::ids::IpBlock;

/// Breaches are counted per window of this length.
const BREACH_WINDOW: Duration = Duration::from_secs(10);

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("max(1) is non-zero")
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// More new connections per second than `connections_per_ip_per_second` allows.
    Rate,
    /// More open connections than `max_connections_per_ip`.
    TooMany,
}

impl IpRefusal {
    pub fn label(self) -> &'static str {
        match self {
            IpRefusal::Rate => "ip_rate",
            IpRefusal::TooMany => "ip_max_connections",
        }
    }
}

/// The per-address gate in front of the accept loops.
pub struct IpGate {
    rate: DefaultKeyedRateLimiter<IpAddr>,
    open: Mutex<HashMap<IpAddr, u32>>,
    max_open: u32,
    /// `limits.trusted_proxies`: load balancers whose `X-Forwarded-For` names the client.
    trusted: Vec<IpBlock>,
}

/// One open connection's place at its address; released on drop.
pub struct IpSlot {
    gate: Arc<IpGate>,
    ip: IpAddr,
}

impl IpGate {
    pub fn new(config: &LimitsConfig) -> Arc<Self> {
        let quota = Quota::per_second(nz(config.connections_per_ip_per_second))
            .allow_burst(nz(config.connection_burst_per_ip));
        Arc::new(Self {
            rate: RateLimiter::keyed(quota),
            open: Mutex::new(HashMap::new()),
            max_open: config.max_connections_per_ip,
            // Validated with the configuration.
            trusted: config
                .trusted_proxies
                .iter()
                .filter_map(|b| IpBlock::parse(b).ok())
                .collect(),
        })
    }

    /// Whether `ip` is a trusted proxy: its connections are limited by the client address it
    /// forwards, not by its own.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|b| b.contains(ip))
    }

    /// The client behind a connection from `peer`: `peer` itself unless it is a trusted proxy;
    /// then the rightmost address of `forwarded_for` (`X-Forwarded-For`, every header line
    /// joined by commas) that is not a trusted proxy, or the last one parsed before an entry
    /// that is not an address.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let mut client = peer;
        if !self.trusts(peer) {
            return client;
        }
        for entry in forwarded_for.unwrap_or("").rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        let ip = client_key(ip);
        if self.rate.check_key(&ip).is_err() {
            return Err(IpRefusal::Rate);
        }
        let mut open = self.open.lock().expect("ip gate lock poisoned");
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_open {
            return Err(IpRefusal::TooMany);
        }
        *count += 1;
        Ok(IpSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// Forgets rate state of quiet addresses; called periodically so the map stays bounded.
    pub fn sweep(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().expect("ip gate lock poisoned");
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The address limits are keyed by: IPv4 as is (IPv4-mapped IPv6 folded to IPv4), IPv6 by its
/// /64, because one host usually holds a whole /64 and could otherwise rotate through it.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// What the session does with an inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// Over budget: drop the frame, answer RATE_LIMITED.
    Refuse,
    /// Over budget for too long: close the session (4007).
    Close,
}

/// One session's inbound budget: frames per second and bytes per second (token buckets).
pub struct SessionBudget {
    frames: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    max_breaches: u32,
    breaches: u32,
    window_start: Instant,
}

impl SessionBudget {
    pub fn new(config: &LimitsConfig) -> Self {
        let frames = Quota::per_second(nz(config.session_frames_per_second))
            .allow_burst(nz(config.session_frame_burst));
        let bytes = Quota::per_second(nz(config.session_bytes_per_second))
            .allow_burst(nz(config.session_byte_burst));
        Self {
            frames: RateLimiter::direct(frames),
            bytes: RateLimiter::direct(bytes),
            max_breaches: config.max_rate_breaches,
            breaches: 0,
            window_start: Instant::now(),
        }
    }

    /// Charges one frame of `len` bytes.
    pub fn admit(&mut self, len: usize) -> Admit {
        let bytes_ok = matches!(
            self.bytes
                .check_n(nz(u32::try_from(len).unwrap_or(u32::MAX))),
            Ok(Ok(()))
        );
        if self.frames.check().is_ok() && bytes_ok {
            return Admit::Accept;
        }
        let now = Instant::now();
        if now.duration_since(self.window_start) > BREACH_WINDOW {
            self.window_start = now;
            self.breaches = 0;
        }
        self.breaches += 1;
        if self.breaches > self.max_breaches {
            Admit::Close
        } else {
            Admit::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ip_gate_counts_open_connections_per_address() {
        let config = LimitsConfig {
            max_connections_per_ip: 2,
            ..LimitsConfig::default()
        };
        let gate = IpGate::new(&config);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(IpRefusal::TooMany));
        assert!(gate.admit(b).is_ok());
        drop(first);
        assert!(gate.admit(a).is_ok());
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client_and_only_the_untrusted_hop_counts() {
        let config = LimitsConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "127.0.0.1".into()],
            ..LimitsConfig::default()
        };
        let gate = IpGate::new(&config);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let client = |peer: &str, xff: Option<&str>| gate.client_address(ip(peer), xff);
        // A client that is no proxy cannot name another address.
        assert_eq!(
            client("198.51.100.1", Some("203.0.113.7")),
            ip("198.51.100.1")
        );
        // Through the proxy: the rightmost hop that is not a trusted proxy; what the client
        // wrote itself (to the left of it) is not believed.
        assert_eq!(client("127.0.0.1", Some("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(
            client("127.0.0.1", Some("6.6.6.6, 203.0.113.7, 10.1.2.3")),
            ip("203.0.113.7")
        );
        // No header, or garbage in it: the last address known.
        assert_eq!(client("127.0.0.1", None), ip("127.0.0.1"));
        assert_eq!(
            client("127.0.0.1", Some("10.9.9.9, not-an-ip")),
            ip("127.0.0.1")
        );
        assert!(gate.trusts(ip("10.3.3.3")) && !gate.trusts(ip("11.0.0.1")));
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_session_over_budget_is_refused_then_closed() {
        let config = LimitsConfig {
            session_frames_per_second: 1,
            session_frame_burst: 2,
            max_rate_breaches: 2,
            ..LimitsConfig::default()
        };
        let mut budget = SessionBudget::new(&config);
        assert_eq!(budget.admit(10), Admit::Accept);
        assert_eq!(budget.admit(10), Admit::Accept);
        assert_eq!(budget.admit(10), Admit::Refuse);
        assert_eq!(budget.admit(10), Admit::Refuse);
        assert_eq!(budget.admit(10), Admit::Close);
    }

    #[test]
    fn bytes_are_budgeted_too() {
        let config = LimitsConfig {
            session_bytes_per_second: 100,
            session_byte_burst: 100,
            ..LimitsConfig::default()
        };
        let mut budget = SessionBudget::new(&config);
        assert_eq!(budget.admit(100), Admit::Accept);
        assert_eq!(budget.admit(1), Admit::Refuse);
    }
}
