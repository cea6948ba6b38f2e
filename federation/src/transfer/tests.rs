//! The transfer protocol end to end over an in-process sink: whole transfers, a cut link that
//! resumes, corruption caught before commit, chunks at wrong offsets, a link down for good,
//! and the bandwidth cap measured on a paused clock.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::{Rng, SeedableRng};

use super::*;

const KIB: usize = 1024;

/// A file of `size` random bytes (the seed is printed so a failure can be replayed).
fn random_file(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, TransferSpec) {
    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    let path = dir.join("disk.img");
    std::fs::write(&path, &data).unwrap();
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&data));
    let spec = TransferSpec {
        id: "move-1".into(),
        size: size as u64,
        sha256: sha,
    };
    (path, spec)
}

fn receiver(dir: &std::path::Path) -> Arc<Receiver> {
    let dest = dir.join("vms");
    Arc::new(Receiver::new(
        dir.join("staging"),
        Arc::new(move |spec: &TransferSpec| Ok(dest.join(&spec.id).join("root.img"))),
    ))
}

fn options(chunk: usize) -> SendOptions {
    SendOptions {
        chunk_size: chunk,
        rate: None,
        burst: chunk as u64,
    }
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        link_timeout: Duration::from_secs(30),
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(10),
        checksum_retries: 1,
    }
}

/// A link that breaks after `budget` bytes of one push, and can be held down.
struct FlakyLink {
    inner: Arc<Receiver>,
    budget: AtomicU64,
    cuts: AtomicUsize,
    down: AtomicBool,
    /// Flip one bit of the chunk at this index of the next push (then clear it).
    corrupt_chunk: AtomicUsize,
}

impl FlakyLink {
    fn new(inner: Arc<Receiver>) -> FlakyLink {
        FlakyLink {
            inner,
            budget: AtomicU64::new(u64::MAX),
            cuts: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            corrupt_chunk: AtomicUsize::new(usize::MAX),
        }
    }

    fn check(&self) -> Result<(), TransferError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransferError::Link("unreachable".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl DiskSink for FlakyLink {
    async fn offer(&self, spec: &TransferSpec) -> Result<u64, TransferError> {
        self.check()?;
        self.inner.offer(spec).await
    }

    async fn push(&self, chunks: ChunkStream) -> Result<u64, TransferError> {
        self.check()?;
        let budget = self.budget.swap(u64::MAX, Ordering::SeqCst);
        let corrupt = self.corrupt_chunk.swap(usize::MAX, Ordering::SeqCst);
        // (inner stream, bytes passed, chunk index, cut already)
        let wrapped = futures::stream::unfold(
            (chunks, 0u64, 0usize, false),
            move |(mut inner, passed, i, cut)| async move {
                if cut {
                    return None;
                }
                let item = match inner.next().await? {
                    Err(e) => Err(e),
                    Ok(c) if passed + c.data.len() as u64 > budget => {
                        // The link breaks here: this chunk and the rest never arrive.
                        return Some((
                            Err(TransferError::Link("cut".into())),
                            (inner, passed, i, true),
                        ));
                    }
                    Ok(mut c) => {
                        if i == corrupt {
                            let mut data = c.data.to_vec();
                            data[0] ^= 1;
                            c.data = data.into();
                        }
                        Ok(c)
                    }
                };
                let len = item.as_ref().map_or(0, |c| c.data.len() as u64);
                Some((item, (inner, passed + len, i + 1, false)))
            },
        );
        let result = self.inner.push(Box::pin(wrapped)).await;
        if matches!(result, Err(TransferError::Link(_))) {
            self.cuts.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn commit(&self, spec: &TransferSpec) -> Result<(), TransferError> {
        self.check()?;
        self.inner.commit(spec).await
    }
}

#[tokio::test]
async fn a_whole_transfer_arrives_identical_and_leaves_no_staging() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 300 * KIB + 17);
    let rx = receiver(dir.path());
    let report = send(
        &path,
        &spec,
        rx.as_ref(),
        &options(64 * KIB),
        &quick_retry(),
    )
    .await
    .unwrap();
    assert_eq!(report.attempts, 1);
    assert_eq!(report.bytes_sent, spec.size);
    let dest = dir.path().join("vms/move-1/root.img");
    assert_eq!(
        sha256_file(&dest).await.unwrap(),
        (spec.size, spec.sha256.clone())
    );
    let staged: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "staging left behind: {staged:?}");
    // A retried commit (its answer lost) finds the file in place.
    rx.commit(&spec).await.unwrap();
}

#[tokio::test]
async fn a_cut_link_resumes_where_the_receiver_stands_and_the_checksum_matches() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 1024 * KIB);
    let link = FlakyLink::new(receiver(dir.path()));
    // The link breaks after 5 chunks of 64 KiB.
    link.budget.store(5 * 64 * KIB as u64, Ordering::SeqCst);
    let report = send(&path, &spec, &link, &options(64 * KIB), &quick_retry())
        .await
        .unwrap();
    assert_eq!(link.cuts.load(Ordering::SeqCst), 1);
    assert_eq!(report.attempts, 2);
    assert_eq!(
        report.resumed_at,
        vec![5 * 64 * KIB as u64],
        "the second attempt resumed at what the receiver held"
    );
    // Only the chunk in flight at the cut is sent twice.
    assert!(
        report.bytes_sent <= spec.size + 64 * KIB as u64,
        "{} bytes sent for {}",
        report.bytes_sent,
        spec.size
    );
    let dest = dir.path().join("vms/move-1/root.img");
    assert_eq!(
        sha256_file(&dest).await.unwrap(),
        (spec.size, spec.sha256.clone())
    );
}

#[tokio::test]
async fn the_staged_offset_survives_a_restart_of_the_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 256 * KIB);
    let link = FlakyLink::new(receiver(dir.path()));
    link.budget.store(128 * KIB as u64, Ordering::SeqCst);
    let no_retry = RetryPolicy {
        link_timeout: Duration::ZERO,
        ..quick_retry()
    };
    let err = send(&path, &spec, &link, &options(32 * KIB), &no_retry)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::LinkTimeout { .. }), "{err}");
    // A new receiver over the same directory (the node restarted) knows where it stands.
    let fresh = receiver(dir.path());
    assert_eq!(fresh.offer(&spec).await.unwrap(), 128 * KIB as u64);
    send(
        &path,
        &spec,
        fresh.as_ref(),
        &options(32 * KIB),
        &quick_retry(),
    )
    .await
    .unwrap();
    let dest = dir.path().join("vms/move-1/root.img");
    assert_eq!(sha256_file(&dest).await.unwrap().1, spec.sha256);
}

#[tokio::test]
async fn corruption_is_caught_before_commit_and_the_copy_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 200 * KIB);
    let rx = receiver(dir.path());
    let link = FlakyLink::new(rx.clone());
    link.corrupt_chunk.store(2, Ordering::SeqCst);
    let no_second_chance = RetryPolicy {
        checksum_retries: 0,
        ..quick_retry()
    };
    let err = send(&path, &spec, &link, &options(64 * KIB), &no_second_chance)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChecksumMismatch { ref expected, .. } if *expected == spec.sha256),
        "{err}"
    );
    let dest = dir.path().join("vms/move-1/root.img");
    assert!(!dest.exists(), "a corrupt copy was put in place");
    assert_eq!(
        rx.offer(&spec).await.unwrap(),
        0,
        "the staged copy was discarded"
    );
    // With a second chance the transfer starts over and arrives intact.
    link.corrupt_chunk.store(1, Ordering::SeqCst);
    let report = send(&path, &spec, &link, &options(64 * KIB), &quick_retry())
        .await
        .unwrap();
    assert_eq!(report.attempts, 2);
    assert_eq!(sha256_file(&dest).await.unwrap().1, spec.sha256);
}

#[tokio::test]
async fn a_chunk_must_start_where_the_staged_copy_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (_, spec) = random_file(dir.path(), 100);
    let rx = receiver(dir.path());
    assert_eq!(rx.offer(&spec).await.unwrap(), 0);
    let chunk = |offset: u64, len: usize| {
        Ok(Chunk {
            id: spec.id.clone(),
            offset,
            data: vec![7u8; len].into(),
        })
    };
    assert_eq!(
        rx.push(Box::pin(futures::stream::iter([chunk(0, 40)])))
            .await
            .unwrap(),
        40
    );
    // A stale stream repeating bytes already held is refused, and so is a gap.
    for offset in [0, 39, 41] {
        let err = rx
            .push(Box::pin(futures::stream::iter([chunk(offset, 10)])))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::OffsetMismatch { expected: 40, got } if got == offset),
            "{err}"
        );
    }
    // Nor may a chunk run past the announced size.
    let err = rx
        .push(Box::pin(futures::stream::iter([chunk(40, 61)])))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::SizeMismatch { .. }), "{err}");
    // An unknown transfer takes no bytes.
    let err = rx
        .push(Box::pin(futures::stream::iter([Ok(Chunk {
            id: "other".into(),
            offset: 0,
            data: vec![1].into(),
        })])))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Unknown(_)), "{err}");
    // Offered again with other contents, the transfer starts over.
    let other = TransferSpec {
        sha256: "0".repeat(64),
        ..spec.clone()
    };
    assert_eq!(rx.offer(&other).await.unwrap(), 0);
    assert!(TransferSpec {
        id: "../x".into(),
        ..spec.clone()
    }
    .validate()
    .is_err());
}

#[tokio::test(start_paused = true)]
async fn a_link_down_past_the_timeout_gives_up_and_one_back_in_time_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 64 * KIB);
    let link = Arc::new(FlakyLink::new(receiver(dir.path())));
    link.down.store(true, Ordering::SeqCst);
    let policy = RetryPolicy {
        link_timeout: Duration::from_secs(10),
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        checksum_retries: 0,
    };
    let start = tokio::time::Instant::now();
    let err = send(&path, &spec, link.as_ref(), &options(16 * KIB), &policy)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::LinkTimeout { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_secs(10));
    assert!(start.elapsed() < Duration::from_secs(12));
    // The link comes back within the timeout: the same call succeeds.
    let healer = {
        let link = link.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            link.down.store(false, Ordering::SeqCst);
        })
    };
    let report = send(&path, &spec, link.as_ref(), &options(16 * KIB), &policy)
        .await
        .unwrap();
    healer.await.unwrap();
    assert!(report.attempts > 1);
    let dest = dir.path().join("vms/move-1/root.img");
    assert_eq!(sha256_file(&dest).await.unwrap().1, spec.sha256);
}

#[tokio::test(start_paused = true)]
async fn the_bandwidth_limit_holds_over_a_whole_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let (path, spec) = random_file(dir.path(), 2048 * KIB);
    let rx = receiver(dir.path());
    let limited = SendOptions {
        chunk_size: 64 * KIB,
        rate: Some(1024 * KIB as u64),
        burst: 64 * KIB as u64,
    };
    let start = tokio::time::Instant::now();
    send(&path, &spec, rx.as_ref(), &limited, &quick_retry())
        .await
        .unwrap();
    // 2 MiB at 1 MiB/s, the first chunk from the burst: 1.9375 s of (paused) time, plus
    // nothing else: file I/O takes no paused time.
    let elapsed = start.elapsed().as_secs_f64();
    let rate = spec.size as f64 / elapsed;
    println!("{} bytes in {elapsed:.4} s: {rate:.0} B/s", spec.size);
    assert!(elapsed >= 1.9375, "{elapsed}");
    assert!(elapsed < 1.95, "{elapsed}");
}
