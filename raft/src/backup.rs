//! The backup file: a consistent copy of the replicated state with a checksum.
//!
//! Layout: [`MAGIC`], then the sha256 of the body (32 bytes), then the body, a
//! [`BackupBody`] in the versioned codec. The checksum covers every byte after it, so a
//! truncated or altered file is refused before anything is decoded.

use sha2::{Digest, Sha256};

use crate::codec::{self, CodecError};
use crate::store::RawRows;

/// The first bytes of every backup file; the trailing digit is the layout's version.
pub const MAGIC: &[u8] = b"NOVACRON-BACKUP-1\n";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a NovaCron backup (bad magic)")]
    BadMagic,
    #[error("the backup is truncated")]
    Truncated,
    #[error("the backup's checksum does not match its content: expected {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("the backup's content cannot be decoded")]
    Codec(#[from] CodecError),
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BackupBody {
    /// The cluster the backup was taken from.
    pub cluster_id: String,
    /// When it was taken (milliseconds since the epoch), by the serving node's clock.
    pub taken_at: u64,
    /// The applied log index the copy reflects.
    pub last_applied_index: u64,
    /// Every replicated key and stored value, in key order.
    pub pairs: RawRows,
}

/// Serialises a backup; returns the file bytes and the hex sha256 of the body.
pub fn encode(body: &BackupBody) -> Result<(Vec<u8>, String), BackupError> {
    let bytes = codec::encode(body)?;
    let sum = Sha256::digest(&bytes);
    let mut out = Vec::with_capacity(MAGIC.len() + 32 + bytes.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sum);
    out.extend_from_slice(&bytes);
    Ok((out, hex::encode(sum)))
}

/// The hex sha256 recorded in a backup file (after checking the magic).
pub fn recorded_checksum(file: &[u8]) -> Result<String, BackupError> {
    let rest = file.strip_prefix(MAGIC).ok_or(BackupError::BadMagic)?;
    let sum = rest.get(..32).ok_or(BackupError::Truncated)?;
    Ok(hex::encode(sum))
}

/// Checks and decodes a backup file.
pub fn decode(file: &[u8]) -> Result<BackupBody, BackupError> {
    let expected = recorded_checksum(file)?;
    let body = &file[MAGIC.len() + 32..];
    let actual = hex::encode(Sha256::digest(body));
    if actual != expected {
        return Err(BackupError::Checksum { expected, actual });
    }
    Ok(codec::decode(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_corruption() {
        let body = BackupBody {
            cluster_id: "c1".into(),
            taken_at: 7,
            last_applied_index: 42,
            pairs: vec![
                (b"t/a".to_vec(), b"x".to_vec()),
                (b"u/b".to_vec(), b"y".to_vec()),
            ],
        };
        let (mut file, sum) = encode(&body).unwrap();
        assert_eq!(recorded_checksum(&file).unwrap(), sum);
        assert_eq!(decode(&file).unwrap(), body);
        let last = file.len() - 1;
        file[last] ^= 1;
        assert!(matches!(decode(&file), Err(BackupError::Checksum { .. })));
        assert!(matches!(decode(b"nope"), Err(BackupError::BadMagic)));
        assert!(matches!(decode(MAGIC), Err(BackupError::Truncated)));
    }
}
