//! `cargo xtask`: the one automation entry point (ci, bench, dev).
fn main() {}
