//! A wall clock the test can move, for one node process: libfaketime (the Debian package
//! `libfaketime`, which scripts/test.sh installs) preloaded into the process, reading its offset
//! from a file the test rewrites. Only the wall clock moves (`CLOCK_REALTIME`: `SystemTime`,
//! log timestamps, a message's `server_time_ms`); `DONT_FAKE_MONOTONIC=1` keeps the monotonic
//! clock real, as on a machine whose NTP steps the time.
//!
//! `FAKETIME_NO_CACHE=1` makes libfaketime read the file on every wall-clock call (≈ 7 µs each
//! here, harmless at test rates), so a new offset applies at once. The file is replaced by a
//! rename, so a reader never sees it half written.

use std::fs;
use std::path::{Path, PathBuf};

use super::nats::TempDir;

/// Where Debian's libfaketime puts the preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The library, or a panic that says how to get it.
pub fn libfaketime() -> &'static Path {
    let path = Path::new(LIBFAKETIME);
    assert!(
        path.is_file(),
        "{LIBFAKETIME} is missing: `apt-get install -y --no-install-recommends libfaketime` \
         (scripts/test.sh does it)"
    );
    path
}

/// One process's movable wall clock: the offset file and the environment that applies it.
pub struct FakeClock {
    dir: TempDir,
    file: PathBuf,
}

impl FakeClock {
    /// A clock at offset `+0` (the real time).
    pub fn new() -> FakeClock {
        libfaketime();
        let dir = TempDir::new("faketime");
        let file = dir.path().join("offset");
        let clock = FakeClock { dir, file };
        clock.set("+0");
        clock
    }

    /// The environment variables that put a process on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", LIBFAKETIME.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("DONT_FAKE_MONOTONIC", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Sets the offset from the real time, in libfaketime's relative syntax: `+0`, `+10s`,
    /// `-10s`. Every process on this clock sees it from its next wall-clock read.
    pub fn set(&self, offset: &str) {
        let staged = self.dir.path().join("offset.new");
        fs::write(&staged, format!("{offset}\n")).expect("write the faketime offset");
        fs::rename(&staged, &self.file).expect("replace the faketime offset file");
    }
}

/// Unix milliseconds of the test's own (real) wall clock.
pub fn real_wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
