//! Links between NovaCron sites: the gRPC protocol sites speak (`proto/federation.proto`), its
//! mutual-TLS transport pinned to each linked site's CA, federation tokens, the client that
//! reaches any node of a peer site, and the catalog pull that keeps a peer's objects in our
//! replicated state. The node crate wires these to its Raft, replica and API router.
//!
//! What this crate never does: share a database between sites, or write an object whose home
//! is another site (a peer's objects arrive only through `Command::ApplyCatalog`).

pub mod backoff;
pub mod client;
pub mod server;
pub mod sync;
pub mod tls;
pub mod token;

/// The generated messages, client and server of `novacron.federation.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("novacron.federation.v1");
}

/// The largest request or reply body a forwarded REST call may carry.
pub const MAX_FORWARD_BODY: usize = 8 * 1024 * 1024;

/// Milliseconds since the Unix epoch (the proposer's clock, read before proposing).
pub fn now_ms() -> u64 {
    api::now_ms()
}
