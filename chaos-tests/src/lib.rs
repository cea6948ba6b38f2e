//! Fault injection and consistency checkers for NovaCron clusters.
