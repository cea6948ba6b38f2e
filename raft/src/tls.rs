//! The cluster CA, node certificates and join tokens.
