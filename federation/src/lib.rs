//! Links between NovaCron sites and the federated catalog.

pub mod site_move;
pub mod transfer;
