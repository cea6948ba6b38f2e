//! Links between NovaCron sites and the federated catalog.

pub mod transfer;
