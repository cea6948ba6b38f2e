//! Versioned binary encoding of stored values: one format byte, then the rkyv archive.
//!
//! The format byte lets a newer binary read what an older one wrote: a reader that meets an
//! unknown version fails with [`CodecError::UnknownVersion`] rather than misreading bytes.

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The format of values written by this build.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("stored value is empty")]
    Empty,
    #[error("stored value has format version {0}, this build reads version {FORMAT_VERSION}")]
    UnknownVersion(u8),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("value cannot be encoded: {0}")]
    Encode(String),
}

/// Encodes `value` as `[FORMAT_VERSION] ++ rkyv(value)`.
pub fn encode<T>(value: &T) -> Result<Vec<u8>, CodecError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let bytes =
        rkyv::to_bytes::<rancor::Error>(value).map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&bytes);
    Ok(out)
}

/// Decodes what [`encode`] wrote, validating the archive before trusting it.
pub fn decode<T>(bytes: &[u8]) -> Result<T, CodecError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    // rkyv needs aligned input; values read from sled or the network are not.
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| CodecError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request};

    #[test]
    fn round_trip_and_version_check() {
        let req = Request::new(7, "u1", Command::Noop);
        let bytes = encode(&req).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: Request = decode(&bytes).unwrap();
        assert_eq!(back, req);

        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<Request>(&future),
            Err(CodecError::UnknownVersion(_))
        ));
        assert!(matches!(decode::<Request>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<Request>(&bytes[..bytes.len() / 2]),
            Err(CodecError::Corrupt(_))
        ));
    }
}
