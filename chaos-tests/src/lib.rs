//! Fault injection and consistency checkers for NovaCron clusters.
//!
//! The pieces of a chaos run, each usable on its own:
//! - [`history`]: what clients invoked and observed, as JSONL, on one clock with the faults;
//! - [`checker`]: one module per invariant (linearizability, lost writes, quotas, a single
//!   running copy of each VM, convergence), each returning a typed report;
//! - [`generate`]: seeded random histories that are valid by construction, to test the checkers;
//! - [`report`]: the readable text and JSON summary of a run, written under `target/chaos/`;
//! - [`nemesis`]: faults on real processes (kill, restart, pause) and a seeded fault schedule;
//! - [`netfault`]: partitions and packet loss between nodes on loopback, with nftables;
//! - [`cluster`]: real `novacron` processes on loopback and a REST client;
//! - [`workload`]: the concurrent REST clients that record the history;
//! - [`run`]: the fast tier end to end (cluster, workload, nemesis, checkers, report).

pub mod checker;
pub mod cluster;
pub mod generate;
pub mod history;
pub mod long;
pub mod nemesis;
pub mod netfault;
pub mod report;
pub mod run;
pub mod sim;
pub mod workload;
