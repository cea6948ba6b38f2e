//! The `novacron` binary.
fn main() {}
