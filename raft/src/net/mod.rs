//! The QUIC transport for Raft RPCs.
