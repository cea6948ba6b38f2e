//! The migration tunnel: libvirt on the source runs `novacron` through a symlink named
//! `novacron-tunnel-<target id>` as its `qemu+ext` transport; that process connects to the
//! local node's unix socket; the node opens a QUIC tunnel (mutual TLS) to the target node; the
//! target splices it into its local libvirt socket. No libvirt port is opened on the network.
//!
//! Both ends refuse anything that is not a migration the leader started: the source node only
//! tunnels to a node that is the target of a committed `Migrating` migration from itself, and
//! the target only splices for a committed `Migrating` migration from that source to itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::migration::MigrationPhase;
use raft::model::NodeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{SharedEnv, SOCKET, TUNNEL_PREFIX};

const MAX_LINE: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the local novacron node at {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tunnel I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
}

/// When this process was started as a tunnel command: the target node and the local socket
/// (next to the symlink), read from `argv[0]`.
pub fn tunnel_invocation(argv0: &str) -> Option<(NodeId, PathBuf)> {
    let path = Path::new(argv0);
    let peer = path
        .file_name()?
        .to_str()?
        .strip_prefix(TUNNEL_PREFIX)?
        .parse()
        .ok()?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    Some((peer, dir.join(SOCKET)))
}

/// The tunnel command: carries stdin/stdout (libvirt's RPC stream) to the local node, which
/// forwards it to node `peer`.
pub async fn run_command(peer: NodeId, socket: PathBuf) -> Result<(), TunnelError> {
    let mut conn = UnixStream::connect(&socket)
        .await
        .map_err(|source| TunnelError::Local {
            path: socket.clone(),
            source,
        })?;
    conn.write_all(format!("{peer}\n").as_bytes()).await?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    tokio::io::copy_bidirectional(&mut conn, &mut stdio).await?;
    Ok(())
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so nothing after the line is consumed: the rest belongs to libvirt.
    while line.len() < MAX_LINE {
        match r.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    None
}

/// Whether the replica holds (or, within a short catch-up, comes to hold) a migration in phase
/// `Migrating` from `source` to `target`.
async fn migrating(env: &SharedEnv, source: NodeId, target: NodeId) -> bool {
    super::caught_up(&env.reader, |ms| {
        ms.iter().any(|m| {
            m.phase == MigrationPhase::Migrating && m.source == source && m.target == Some(target)
        })
    })
    .await
}

/// Serves the local tunnel socket until `shutdown` fires.
pub async fn serve_local(env: SharedEnv, mut shutdown: watch::Receiver<bool>) {
    let dir = env.dir();
    let path = dir.join(SOCKET);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "no migration tunnel socket");
        return;
    }
    // A socket file left by a previous run of this node refuses connections; replace it.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot bind the migration tunnel socket");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let env = Arc::clone(&env);
                    tokio::spawn(async move {
                        if let Err(e) = forward(env, conn).await {
                            tracing::warn!(error = %e, "migration tunnel ended with an error");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "migration tunnel accept failed"),
            }
        }
    }
}

/// One tunnel from the local libvirtd to a target node.
async fn forward(env: SharedEnv, mut conn: UnixStream) -> Result<(), TunnelError> {
    let target: NodeId = read_line(&mut conn)
        .await
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| TunnelError::Refused("malformed tunnel request".into()))?;
    if !migrating(&env, env.me, target).await {
        return Err(TunnelError::Refused(format!(
            "no migration from this node to node {target} is in progress"
        )));
    }
    let addr = env.peer_addr(target).await.map_err(TunnelError::Refused)?;
    let (mut send, recv) =
        env.transport.open_tunnel(addr).await.map_err(|e| {
            TunnelError::Refused(format!("cannot open a tunnel to node {target}: {e}"))
        })?;
    send.write_all(format!("migrate {}\n", env.me).as_bytes())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!(target, "migration tunnel open");
    let mut quic = tokio::io::join(recv, send);
    let result = tokio::io::copy_bidirectional(&mut conn, &mut quic).await;
    tracing::info!(target, ?result, "migration tunnel closed");
    result.map(|_| ()).map_err(TunnelError::Io)
}

/// The target's half: splices a tunnel from `source` into the local libvirt socket.
pub async fn serve_target(
    env: SharedEnv,
    source: NodeId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    if !migrating(&env, source, env.me).await {
        tracing::warn!(source, "refusing a migration tunnel no migration asked for");
        return;
    }
    let mut libvirt = match UnixStream::connect(&env.libvirt_socket).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, socket = %env.libvirt_socket.display(), "cannot reach libvirt for an incoming migration");
            return;
        }
    };
    let mut quic = tokio::io::join(recv, send);
    let result = tokio::io::copy_bidirectional(&mut quic, &mut libvirt).await;
    tracing::info!(source, ?result, "incoming migration tunnel closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_and_socket_come_from_argv0() {
        assert_eq!(
            tunnel_invocation("/var/lib/nc/migration/novacron-tunnel-7"),
            Some((7, PathBuf::from("/var/lib/nc/migration/tunnel.sock")))
        );
        assert_eq!(tunnel_invocation("novacron-tunnel-7"), None);
        assert_eq!(tunnel_invocation("/usr/bin/novacron"), None);
        assert_eq!(tunnel_invocation("/x/novacron-tunnel-abc"), None);
    }
}
