//! The NovaCron dashboard, embedded in the binary.
