//! Router tests without sockets: the API over an in-memory control plane.

mod fake;
mod tenants;
mod users;
mod vms;
