//! Framing on a QUIC stream: the stream-kind byte, then length-prefixed (u32 big-endian) prost
//! messages, bounded in size so a peer cannot make us allocate without limit.

use prost::Message;

use super::NetError;

/// The first byte the opener writes on a bidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// One request message, one response message.
    Rpc = 1,
    /// A raw byte tunnel handed to the extension handler (migration streams).
    Tunnel = 2,
}

impl TryFrom<u8> for StreamKind {
    type Error = NetError;

    fn try_from(b: u8) -> Result<Self, NetError> {
        match b {
            1 => Ok(StreamKind::Rpc),
            2 => Ok(StreamKind::Tunnel),
            other => Err(NetError::UnknownStreamKind(other)),
        }
    }
}

/// Writes `kind` (when given) and one length-prefixed message.
pub async fn write_message<M: Message>(
    send: &mut quinn::SendStream,
    kind: Option<StreamKind>,
    msg: &M,
    limit: usize,
) -> Result<(), NetError> {
    let len = msg.encoded_len();
    if len > limit {
        return Err(NetError::TooLarge(len));
    }
    let len32 = u32::try_from(len).map_err(|_| NetError::TooLarge(len))?;
    let mut buf = Vec::with_capacity(len + 5);
    if let Some(kind) = kind {
        buf.push(kind as u8);
    }
    buf.extend_from_slice(&len32.to_be_bytes());
    msg.encode(&mut buf).map_err(|_| NetError::TooLarge(len))?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Reads one length-prefixed message, refusing lengths above `limit` before allocating.
pub async fn read_message<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<M, NetError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(NetError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice()).map_err(super::proto::ProtoError::from)?)
}

/// Reads the stream-kind byte the opener wrote first.
pub async fn read_kind(recv: &mut quinn::RecvStream) -> Result<StreamKind, NetError> {
    let mut b = [0u8; 1];
    recv.read_exact(&mut b).await?;
    StreamKind::try_from(b[0])
}
