//! Network faults between nodes that share loopback: partitions and random packet loss on the
//! nodes' UDP (QUIC) peer ports, with nftables.
//!
//! Every node speaks QUIC through one endpoint bound to its peer port, so each packet between two
//! nodes carries one of their peer ports as source or destination. Dropping `udp sport P` and
//! `udp dport P` in the output hook therefore cuts the node on port P off from every other node,
//! while its REST API (TCP) still answers clients: the partitioned node must refuse or stall
//! writes rather than acknowledge them. Loss uses `numgen random mod 100 < N`.
//!
//! Each [`Firewall`] owns one table with a per-process name, so concurrent runs on one machine do
//! not remove each other's rules; the table is deleted on [`Firewall::remove`] and on drop.
//! Needs root (CAP_NET_ADMIN) and the `nft` command.

use std::process::{Command, Stdio};

/// Errors changing the firewall.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run nft (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("nft {args} failed: {stderr}")]
    Refused { args: String, stderr: String },
}

/// One nftables table holding this run's fault rules.
pub struct Firewall {
    table: String,
    installed: bool,
}

fn nft(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NetError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Refused {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// An nftables anonymous set of ports: `{ 1, 2 }`.
fn port_set(ports: &[u16]) -> String {
    format!(
        "{{ {} }}",
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Whether `nft` runs and may change rules here (root with nftables installed).
pub fn available() -> bool {
    Command::new("nft")
        .args(["list", "tables"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Firewall {
    /// Creates the table `novacron_chaos_<pid>` with an output chain that accepts by default.
    pub fn install() -> Result<Firewall, NetError> {
        let table = format!("novacron_chaos_{}", std::process::id());
        // A leftover from a crashed earlier run with the same pid would make `add chain` keep
        // its old rules; start from nothing.
        let _ = nft(&["delete", "table", "inet", &table]);
        nft(&["add", "table", "inet", &table])?;
        let mut fw = Firewall {
            table,
            installed: true,
        };
        // Loopback packets traverse output then input; dropping at output is enough and leaves
        // other traffic of the machine alone (the rules match only our ports).
        let chain = "{ type filter hook output priority 0 ; policy accept ; }";
        if let Err(e) = nft(&["add", "chain", "inet", &fw.table, "out", chain]) {
            fw.remove();
            return Err(e);
        }
        Ok(fw)
    }

    /// The table's name, for logs.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn rule(&self, rule: &[&str]) -> Result<(), NetError> {
        let mut args = vec!["add", "rule", "inet", self.table.as_str(), "out"];
        args.extend_from_slice(rule);
        nft(&args)
    }

    /// Drops all peer traffic from and to `port` (a node's QUIC port).
    pub fn isolate(&self, port: u16) -> Result<(), NetError> {
        let port = port.to_string();
        self.rule(&["udp", "sport", &port, "drop"])?;
        self.rule(&["udp", "dport", &port, "drop"])
    }

    /// Drops every packet `port` sends to another node; what it receives still arrives.
    pub fn one_way(&self, port: u16) -> Result<(), NetError> {
        self.rule(&["udp", "sport", &port.to_string(), "drop"])
    }

    /// Drops all traffic between the nodes on ports `a` and those on ports `b`, both ways.
    pub fn cut_between(&self, a: &[u16], b: &[u16]) -> Result<(), NetError> {
        let (a, b) = (port_set(a), port_set(b));
        self.rule(&["udp", "sport", &a, "udp", "dport", &b, "drop"])?;
        self.rule(&["udp", "sport", &b, "udp", "dport", &a, "drop"])
    }

    /// Leaves each node (in the order of `ports`) connected to its two neighbours only.
    pub fn ring(&self, ports: &[u16]) -> Result<(), NetError> {
        let n = ports.len();
        for (i, from) in ports.iter().enumerate() {
            let far: Vec<u16> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| {
                    let d = (i + n - j) % n;
                    d != 0 && d != 1 && d != n - 1
                })
                .map(|(_, p)| *p)
                .collect();
            if !far.is_empty() {
                self.rule(&[
                    "udp",
                    "sport",
                    &from.to_string(),
                    "udp",
                    "dport",
                    &port_set(&far),
                    "drop",
                ])?;
            }
        }
        Ok(())
    }

    /// Drops `percent` % of the packets sent to any of `ports`, at random.
    pub fn loss(&self, ports: &[u16], percent: u8) -> Result<(), NetError> {
        let set = port_set(ports);
        let percent = percent.min(100).to_string();
        self.rule(&[
            "udp", "dport", &set, "numgen", "random", "mod", "100", "<", &percent, "drop",
        ])
    }

    /// Removes every rule (partitions and loss alike); the table stays for later faults.
    pub fn heal(&self) -> Result<(), NetError> {
        nft(&["flush", "chain", "inet", &self.table, "out"])
    }

    /// Deletes the table; idempotent.
    pub fn remove(&mut self) {
        if self.installed {
            // Nothing useful can be done if this fails while tearing down; the next install
            // with the same name deletes the table first.
            let _ = nft(&["delete", "table", "inet", &self.table]);
            self.installed = false;
        }
    }
}

impl Drop for Firewall {
    /// A run that fails midway must not leave the machine partitioned.
    fn drop(&mut self) {
        self.remove();
    }
}
