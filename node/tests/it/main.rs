//! Integration tests of the `novacron` binary: real processes, real QUIC, real sled.

mod harness;

mod cluster;
mod join;
mod layering;
mod membership;
mod snapshot;
