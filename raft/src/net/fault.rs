//! Test-only fault injection for the transport: a partition file.
//!
//! When `TransportConfig::partition_file` is set (the node sets it only from the environment
//! variable `NOVACRON_TEST_PARTITION_FILE`, never from its stored settings), the file lists peer
//! addresses (`HOST:PORT`, one per line, `#` comments allowed). Every RPC and tunnel to a
//! listed peer fails before anything is sent, and every stream a listed peer opens to us is
//! reset unread, so both directions of the link are cut by editing the file of ONE node. An
//! absent or empty file blocks nothing. The file is re-read at most every
//! [`REFRESH`], so a test partitions and heals a running process by rewriting it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How stale the cached list may be.
pub const REFRESH: Duration = Duration::from_millis(50);

/// The parsed partition file, cached.
#[derive(Debug)]
pub struct PartitionFile {
    path: PathBuf,
    cache: Mutex<(Option<Instant>, HashSet<SocketAddr>)>,
}

impl PartitionFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new((None, HashSet::new())),
        }
    }

    /// Whether traffic with `peer` is cut now.
    pub fn blocks(&self, peer: SocketAddr) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache.0.is_some_and(|t| t.elapsed() < REFRESH);
        if !fresh {
            // A missing or unreadable file means "no partition": the hook must never cut a
            // link by accident.
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            cache.1 = parse(&text);
            cache.0 = Some(Instant::now());
        }
        cache.1.contains(&peer)
    }
}

fn parse(text: &str) -> HashSet<SocketAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_ignores_the_rest() {
        let set = parse("127.0.0.1:7000\n# comment\n  127.0.0.1:7001  # n2\nnot an address\n\n");
        let want: HashSet<SocketAddr> = ["127.0.0.1:7000", "127.0.0.1:7001"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(set, want);
    }

    #[test]
    fn a_missing_file_blocks_nothing_and_edits_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partition");
        let f = PartitionFile::new(path.clone());
        let peer: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert!(!f.blocks(peer));
        std::fs::write(&path, "127.0.0.1:7000\n").unwrap();
        // The cache expires within REFRESH; wait for the condition, not a fixed time.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f.blocks(peer) {
            assert!(Instant::now() < deadline, "edit never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
