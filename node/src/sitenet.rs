//! Sites in their own network namespaces on one machine, for federation tests and development:
//! each site is one network namespace with one address on a private /24 of ours, attached by a
//! veth pair to a bridge in the root namespace. Every process of a site (its `novacron` nodes,
//! a CLI, curl) runs inside the site's namespace and binds the site's address, so sites reach
//! each other over the bridge as separate machines would, and the process that started them
//! (the root namespace, through the bridge's own address) reaches every site.
//!
//! [`SiteNet::cut`] isolates one site: nftables rules inside that site's namespace drop every
//! packet that does not stay inside the site, except TCP connections opened from the root
//! namespace (the test client checking that the cut site keeps serving its own API). Packets are
//! dropped, not refused, so the other sites see what a dead WAN looks like: timeouts.
//! [`SiteNet::heal`] removes those rules. [`SiteNet::cut_link`] cuts only the link between two
//! sites (each drops the other's address; both keep their other links), [`SiteNet::heal_link`]
//! restores it; [`SiteNet::set_link_loss`] makes a link lose a share of its packets. There is
//! no added delay (that needs `tc netem` or an NFQUEUE delayer). Rules live in the sites'
//! namespaces, so they go with them.
//!
//! Names carry a run prefix: bridge `ncsb<idx>`, veths `ncsv<idx>x<k>`, namespaces
//! `ncs<idx>-<site>`, subnet `10.251.<idx>.0/24`, where `<idx>` is allocated under a lock file
//! and recorded with the owner's pid and start time. Dropping a [`SiteNet`] kills what still runs
//! in its namespaces and deletes them with the bridge; a later [`SiteNet::start`] removes the
//! leftovers of any owner that died without dropping (a crashed test process).
//!
//! [`SiteNet::start_with_libvirt`] also gives each site its own libvirtd (see `hosts`), for
//! tests that run real VMs at several sites.
//!
//! The range 10.251.0.0/16 is ours; `hosts` (separate libvirt hosts) uses 10.250.0.0/16.
//! Needs root, `ip` (iproute2), `nft` (nftables) and `nsenter` (util-linux).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use fs2::FileExt;

/// Where allocations are recorded; /run is a tmpfs, so a reboot forgets them with the namespaces.
const STATE_DIR: &str = "/run/novacron-sitenet";
/// How many site networks may exist at once (one /24 each under 10.251.0.0/16).
const MAX_NETS: u8 = 250;
/// Sites per network: addresses .1 to .200 of its /24 (.254 is the bridge).
pub const MAX_SITES: usize = 200;
/// The nftables table (inside a site namespace) that holds a cut.
const CUT_TABLE: &str = "novacron_cut";
/// The nftables table every site namespace has from the start: it turns connection tracking on
/// at once (so a connection opened before a cut keeps its true direction when the cut comes)
/// and holds the set of peer sites whose link to this one is cut.
const SITE_TABLE: &str = "novacron_site";
/// The set (in [`SITE_TABLE`]) of peer site addresses this site exchanges no packet with.
const LINKS_CUT: &str = "links_cut";
/// The chain (in [`SITE_TABLE`]) dropping a share of what this site sends to some peers. Loss
/// is applied where packets leave, so each direction of a link loses exactly the share set.
const LOSS_CHAIN: &str = "link_loss";

#[derive(Debug, thiserror::Error)]
pub enum SiteNetError {
    #[error("site namespaces need root")]
    NotRoot,
    #[error("{0} is not installed")]
    Missing(&'static str),
    #[error("invalid site name {0:?}: use 1-20 of a-z, 0-9 and '-'")]
    BadName(String),
    #[error("site {0:?} given twice")]
    Duplicate(String),
    #[error("no site named {0:?}")]
    NoSuchSite(String),
    #[error("a link joins two different sites, not {0:?} to itself")]
    SameSite(String),
    #[error("packet loss is a percentage, not {0}")]
    BadLoss(u8),
    #[error("at most {max} sites per network, {asked} asked")]
    TooManySites { max: usize, asked: usize },
    #[error("all {0} site networks are in use")]
    Exhausted(u8),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("a site's libvirtd")]
    Libvirt(#[from] crate::hosts::HostError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Whether this machine can build site networks: root, `ip`, `nft` and `nsenter`.
pub fn available() -> Result<(), SiteNetError> {
    // Namespaces, bridges and nftables need the effective uid 0.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(SiteNetError::NotRoot);
    }
    for (tool, name) in [
        ("ip", "ip (iproute2)"),
        ("nft", "nft (nftables)"),
        ("nsenter", "nsenter (util-linux)"),
    ] {
        if which(tool).is_none() {
            return Err(SiteNetError::Missing(name));
        }
    }
    Ok(())
}

/// The first `tool` on the usual system paths (tests may run with a reduced PATH).
fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

fn run(cmd: &mut Command) -> Result<String, SiteNetError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(SiteNetError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn ip(args: &[&str]) -> Result<String, SiteNetError> {
    run(Command::new("ip").args(args))
}

/// Runs an nftables script inside namespace `netns`.
fn nft_in(netns: &str, script: &str) -> Result<(), SiteNetError> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(SiteNetError::Command {
            command: format!("nft -f - in {netns}: {script}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// One site: a network namespace with one address on the shared bridge.
#[derive(Debug, Clone)]
pub struct SiteNs {
    /// The site's name as given to [`SiteNet::start`].
    pub name: String,
    /// The network namespace (`ip netns` name).
    pub netns: String,
    /// The site's address; every process of the site binds it.
    pub addr: Ipv4Addr,
    /// The bridge's address, which is where the root namespace's traffic comes from.
    pub gateway: Ipv4Addr,
    /// The site's own libvirtd, when started with [`SiteNet::start_with_libvirt`].
    pub libvirt: Option<SiteLibvirt>,
}

/// A site's own libvirtd (see `hosts::start_libvirtd`): inside the site's network namespace,
/// with a private mount and UTS namespace; processes of the site enter all three, so
/// `qemu:///system` inside the site is the site's libvirtd.
#[derive(Debug, Clone)]
pub struct SiteLibvirt {
    pub pid: u32,
    /// The directory holding its libvirt directories.
    pub root: PathBuf,
}

impl SiteLibvirt {
    /// A URI reaching this libvirtd from outside the site (virsh in tests).
    pub fn outside_uri(&self) -> String {
        crate::hosts::libvirt_outside_uri(&self.root)
    }
}

impl SiteNs {
    /// The namespace file, for `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// A command that runs `program` inside this site's network namespace (and, for a site
    /// with its own libvirt, its libvirtd's mount and UTS namespaces). nsenter execs the
    /// program itself (no `--pid`), so the child's pid is the program's and killing it works.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        match &self.libvirt {
            Some(l) => c.args(["-t", &l.pid.to_string(), "-m", "-n", "-u"]),
            None => c.arg(format!("--net={}", self.netns_path().display())),
        };
        c.arg("--").arg(program);
        c
    }

    /// The same as [`SiteNs::command`], for tokio.
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }
}

/// Several sites on one bridge; dropping it tears everything down.
#[derive(Debug)]
pub struct SiteNet {
    idx: u8,
    pub bridge: String,
    /// The bridge's own address: the root namespace's foot on the sites' network.
    pub gateway: Ipv4Addr,
    pub sites: Vec<SiteNs>,
    /// Packet loss per (site, peer site) in percent, as last set; the site's loss chain is
    /// rebuilt from it on every change.
    loss: Mutex<BTreeMap<(String, String), u8>>,
}

impl SiteNet {
    /// Creates one namespace per name (at most [`MAX_SITES`]), each with loopback up and its
    /// address on a fresh bridge. Leftovers of dead owners are removed first.
    pub fn start(names: &[&str]) -> Result<SiteNet, SiteNetError> {
        check_names(names)?;
        available()?;
        std::fs::create_dir_all(STATE_DIR)?;
        // Allocation and cleanup happen under one lock, and an owner's record is written before
        // anything of it exists, so a cleaner never mistakes a network being built for a leftover.
        let lock = File::create(Path::new(STATE_DIR).join("lock"))?;
        lock.lock_exclusive()?;
        remove_leftovers()?;
        let taken = taken_indices()?;
        let idx = (0..MAX_NETS)
            .find(|i| !taken.contains(i))
            .ok_or(SiteNetError::Exhausted(MAX_NETS))?;
        std::fs::write(record_path(idx), owner_stamp(std::process::id()))?;
        let mut net = SiteNet {
            idx,
            bridge: format!("ncsb{idx}"),
            gateway: Ipv4Addr::new(10, 251, idx, 254),
            sites: Vec::new(),
            loss: Mutex::new(BTreeMap::new()),
        };
        // On error `net` drops here and removes what was built, record included.
        net.build(names)?;
        drop(lock);
        Ok(net)
    }

    /// Like [`SiteNet::start`], and each site gets its own libvirtd (directories under
    /// `root/<site>`, host name `site-<site>`), so VMs of different sites live in different
    /// libvirt hosts. Needs what `hosts::available` lists too.
    pub fn start_with_libvirt(names: &[&str], root: &Path) -> Result<SiteNet, SiteNetError> {
        crate::hosts::available()?;
        let mut net = SiteNet::start(names)?;
        for site in &mut net.sites {
            let dir = root.join(&site.name);
            let pid =
                crate::hosts::start_libvirtd(&site.netns, &format!("site-{}", site.name), &dir)?;
            site.libvirt = Some(SiteLibvirt { pid, root: dir });
        }
        Ok(net)
    }

    fn build(&mut self, names: &[&str]) -> Result<(), SiteNetError> {
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.gateway),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        for (k, name) in names.iter().enumerate() {
            let k = u8::try_from(k).map_err(|_| SiteNetError::TooManySites {
                max: MAX_SITES,
                asked: names.len(),
            })?;
            let site = SiteNs {
                name: name.to_string(),
                netns: format!("ncs{}-{name}", self.idx),
                addr: Ipv4Addr::new(10, 251, self.idx, k + 1),
                gateway: self.gateway,
                libvirt: None,
            };
            ip(&["netns", "add", &site.netns])?;
            // Pushed at once so a failure below still deletes this namespace on drop.
            self.sites.push(site.clone());
            let veth = format!("ncsv{}x{k}", self.idx);
            ip(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &site.netns,
            ])?;
            ip(&["link", "set", &veth, "master", &self.bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            let ns = |args: &[&str]| run(Command::new("ip").args(["-n", &site.netns]).args(args));
            ns(&["addr", "add", &format!("{}/24", site.addr), "dev", "eth0"])?;
            ns(&["link", "set", "eth0", "up"])?;
            ns(&["link", "set", "lo", "up"])?;
            nft_in(
                &site.netns,
                &format!(
                    "table inet {SITE_TABLE} {{\n\
                       set {LINKS_CUT} {{ type ipv4_addr; }}\n\
                       chain input {{\n\
                         type filter hook input priority -10; policy accept;\n\
                         ct state invalid counter\n\
                         ip saddr @{LINKS_CUT} drop\n\
                       }}\n\
                       chain output {{\n\
                         type filter hook output priority -10; policy accept;\n\
                         ip daddr @{LINKS_CUT} drop\n\
                       }}\n\
                       chain {LOSS_CHAIN} {{\n\
                         type filter hook output priority -5; policy accept;\n\
                       }}\n\
                     }}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// This network's index: its subnet is `10.251.<index>.0/24`.
    pub fn index(&self) -> u8 {
        self.idx
    }

    /// The file recording this network's owner (`pid start-time`): a network whose owner is no
    /// longer alive is removed by the next [`SiteNet::start`] on this machine.
    pub fn owner_record(&self) -> PathBuf {
        record_path(self.idx)
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> Result<&SiteNs, SiteNetError> {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SiteNetError::NoSuchSite(name.to_string()))
    }

    /// Isolates site `name` from every other site and from the root namespace, both ways,
    /// except TCP connections opened from the root namespace (the test client reaching the
    /// site's API). Traffic inside the site (loopback) is untouched. Idempotent.
    pub fn cut(&self, name: &str) -> Result<(), SiteNetError> {
        let site = self.site(name)?;
        let gw = site.gateway;
        // Replacing the table in one script makes a repeated cut a no-op rather than an error.
        let script = format!(
            "table inet {CUT_TABLE} {{}}\n\
             delete table inet {CUT_TABLE}\n\
             table inet {CUT_TABLE} {{\n\
               chain input {{\n\
                 type filter hook input priority 0; policy accept;\n\
                 iif \"lo\" accept\n\
                 ip saddr {gw} meta l4proto tcp ct direction original accept\n\
                 drop\n\
               }}\n\
               chain output {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 oif \"lo\" accept\n\
                 ip daddr {gw} meta l4proto tcp ct direction reply accept\n\
                 drop\n\
               }}\n\
             }}\n"
        );
        nft_in(&site.netns, &script)
    }

    /// Undoes [`SiteNet::cut`] for site `name`. Idempotent.
    pub fn heal(&self, name: &str) -> Result<(), SiteNetError> {
        let site = self.site(name)?;
        nft_in(
            &site.netns,
            &format!("table inet {CUT_TABLE} {{}}\ndelete table inet {CUT_TABLE}\n"),
        )
    }

    fn link(&self, a: &str, b: &str) -> Result<(&SiteNs, &SiteNs), SiteNetError> {
        if a == b {
            // Blocking a site's own address would cut it from itself (loopback traffic).
            return Err(SiteNetError::SameSite(a.to_string()));
        }
        Ok((self.site(a)?, self.site(b)?))
    }

    /// Cuts the link between sites `a` and `b` only: they exchange no packet, both ways, while
    /// each keeps its other links and the root namespace. Idempotent.
    pub fn cut_link(&self, a: &str, b: &str) -> Result<(), SiteNetError> {
        let (sa, sb) = self.link(a, b)?;
        for (site, peer) in [(sa, sb), (sb, sa)] {
            nft_in(
                &site.netns,
                &format!(
                    "add element inet {SITE_TABLE} {LINKS_CUT} {{ {} }}\n",
                    peer.addr
                ),
            )?;
        }
        Ok(())
    }

    /// Undoes [`SiteNet::cut_link`]. Idempotent.
    pub fn heal_link(&self, a: &str, b: &str) -> Result<(), SiteNetError> {
        let (sa, sb) = self.link(a, b)?;
        for (site, peer) in [(sa, sb), (sb, sa)] {
            // Adding first makes the delete valid when the link was not cut.
            nft_in(
                &site.netns,
                &format!(
                    "add element inet {SITE_TABLE} {LINKS_CUT} {{ {addr} }}\n\
                     delete element inet {SITE_TABLE} {LINKS_CUT} {{ {addr} }}\n",
                    addr = peer.addr
                ),
            )?;
        }
        Ok(())
    }

    /// Makes the link between sites `a` and `b` lose `percent` of its packets in each
    /// direction, at random (nftables `numgen random`); 0 restores it. A lossy WAN for tests of
    /// retries and backoff: TCP still gets through, slower.
    pub fn set_link_loss(&self, a: &str, b: &str, percent: u8) -> Result<(), SiteNetError> {
        if percent > 100 {
            return Err(SiteNetError::BadLoss(percent));
        }
        let (sa, sb) = self.link(a, b)?;
        let mut loss = self.loss.lock().unwrap_or_else(|p| p.into_inner());
        for (site, peer) in [(sa, sb), (sb, sa)] {
            let key = (site.name.clone(), peer.name.clone());
            if percent == 0 {
                loss.remove(&key);
            } else {
                loss.insert(key, percent);
            }
            let mut script = format!("flush chain inet {SITE_TABLE} {LOSS_CHAIN}\n");
            for ((from, to), pct) in loss.iter() {
                if *from != site.name {
                    continue;
                }
                let to = self.site(to)?;
                script.push_str(&format!(
                    "add rule inet {SITE_TABLE} {LOSS_CHAIN} ip daddr {} \
                     numgen random mod 100 < {pct} counter drop\n",
                    to.addr
                ));
            }
            nft_in(&site.netns, &script)?;
        }
        Ok(())
    }

    /// Packets dropped so far by the loss rules of site `name` (all its lossy links).
    pub fn lost_packets(&self, name: &str) -> Result<u64, SiteNetError> {
        let site = self.site(name)?;
        let chain = run(Command::new("ip").args([
            "netns",
            "exec",
            &site.netns,
            "nft",
            "list",
            "chain",
            "inet",
            SITE_TABLE,
            LOSS_CHAIN,
        ]))?;
        // Each rule prints `counter packets N bytes M`.
        Ok(chain
            .lines()
            .filter_map(|l| {
                let rest = l.split("counter packets ").nth(1)?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum())
    }

    /// Whether site `name` is cut now (its cut table exists).
    pub fn is_cut(&self, name: &str) -> Result<bool, SiteNetError> {
        let site = self.site(name)?;
        let tables =
            run(Command::new("ip").args(["netns", "exec", &site.netns, "nft", "list", "tables"]))?;
        Ok(tables
            .lines()
            .any(|l| l.trim() == format!("table inet {CUT_TABLE}")))
    }
}

impl Drop for SiteNet {
    fn drop(&mut self) {
        // Domains are destroyed through libvirt first; whatever is left (a QEMU that did not
        // stop) is killed with the namespace.
        for l in self.sites.iter().filter_map(|s| s.libvirt.as_ref()) {
            crate::hosts::stop_libvirtd(&l.root, l.pid);
        }
        teardown(self.idx);
    }
}

/// Site names become parts of namespace names: short, lower-case, distinct.
fn check_names(names: &[&str]) -> Result<(), SiteNetError> {
    if names.len() > MAX_SITES {
        return Err(SiteNetError::TooManySites {
            max: MAX_SITES,
            asked: names.len(),
        });
    }
    let mut seen = BTreeSet::new();
    for n in names {
        let ok = !n.is_empty()
            && n.len() <= 20
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(SiteNetError::BadName(n.to_string()));
        }
        if !seen.insert(*n) {
            return Err(SiteNetError::Duplicate(n.to_string()));
        }
    }
    Ok(())
}

fn record_path(idx: u8) -> PathBuf {
    Path::new(STATE_DIR).join(format!("net{idx}"))
}

/// `pid start-time`: the start time tells a live owner from a later process with a reused pid.
fn owner_stamp(pid: u32) -> String {
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// Field 22 of `/proc/PID/stat` (after the command name, which may contain spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(stamp: &str) -> bool {
    let mut parts = stamp.split_whitespace();
    let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
    let started = parts.next().and_then(|s| s.parse::<u64>().ok());
    match (pid, started) {
        (Some(pid), Some(started)) => start_time(pid) == Some(started),
        _ => false,
    }
}

/// Our namespaces (`ncs<idx>-<site>`) present now, with their index.
fn our_namespaces() -> Result<Vec<(u8, String)>, SiteNetError> {
    let list = ip(&["netns", "list"])?;
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let (idx, _) = name.strip_prefix("ncs")?.split_once('-')?;
            Some((idx.parse().ok()?, name.to_string()))
        })
        .collect())
}

/// Our bridges (`ncsb<idx>`) present now.
fn our_bridges() -> Result<Vec<u8>, SiteNetError> {
    let list = ip(&["-o", "link", "show", "type", "bridge"])?;
    Ok(list
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .filter_map(|name| name.trim().strip_prefix("ncsb")?.parse().ok())
        .collect())
}

/// Indices in use: recorded, with a bridge or namespace still present, or whose /24 some
/// interface of the root namespace already has an address in (a network that is not ours).
fn taken_indices() -> Result<BTreeSet<u8>, SiteNetError> {
    let mut taken: BTreeSet<u8> = our_bridges()?.into_iter().collect();
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    taken.extend(addrs.split_whitespace().filter_map(|w| {
        let (addr, _) = w.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let [a, b, c, _] = addr.octets();
        ((a, b) == (10, 251)).then_some(c)
    }));
    taken.extend(our_namespaces()?.into_iter().map(|(i, _)| i));
    for e in std::fs::read_dir(STATE_DIR)?.flatten() {
        if let Some(i) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("net"))
            .and_then(|n| n.parse().ok())
        {
            taken.insert(i);
        }
    }
    Ok(taken)
}

/// Removes every network whose owner is dead, and pieces of ours that no record owns (the
/// caller holds the lock, and owners record before building, so nothing here is being built).
fn remove_leftovers() -> Result<(), SiteNetError> {
    let mut dead = BTreeSet::new();
    let mut alive = BTreeSet::new();
    for e in std::fs::read_dir(STATE_DIR)?.flatten() {
        let Some(idx) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("net"))
            .and_then(|n| n.parse::<u8>().ok())
        else {
            continue;
        };
        let stamp = std::fs::read_to_string(e.path()).unwrap_or_default();
        if owner_alive(&stamp) {
            alive.insert(idx);
        } else {
            dead.insert(idx);
        }
    }
    dead.extend(our_bridges()?.into_iter().filter(|i| !alive.contains(i)));
    dead.extend(
        our_namespaces()?
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| !alive.contains(i)),
    );
    for idx in dead {
        tracing::info!(idx, "removing a site network left by a dead owner");
        teardown(idx);
    }
    Ok(())
}

/// Best-effort removal of everything of network `idx`: processes still inside its namespaces
/// (a node outlives a crashed test), the namespaces, the veths, the bridge and the record.
fn teardown(idx: u8) {
    for (i, ns) in our_namespaces().unwrap_or_default() {
        if i != idx {
            continue;
        }
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for pid in pids.split_whitespace() {
                let _ = run(Command::new("kill").args(["-KILL", pid]));
            }
        }
        let _ = ip(&["netns", "del", &ns]);
    }
    // The veth ends in the root namespace go with their peers once the namespaces are gone;
    // deleting them here covers a namespace that some process still holds open.
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        let prefix = format!("ncsv{idx}x");
        for l in links.lines() {
            if let Some(name) = l.split(':').nth(1).map(str::trim) {
                let name = name.split('@').next().unwrap_or(name);
                if name.starts_with(&prefix) {
                    let _ = ip(&["link", "del", name]);
                }
            }
        }
    }
    let _ = ip(&["link", "del", &format!("ncsb{idx}")]);
    let _ = std::fs::remove_file(record_path(idx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_are_short_lower_case_and_distinct() {
        assert!(check_names(&["a", "b", "edge-1"]).is_ok());
        for bad in ["", "A", "a b", "a/b", "a_b", "abcdefghijklmnopqrstu"] {
            assert!(
                matches!(check_names(&[bad]), Err(SiteNetError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check_names(&["a", "a"]),
            Err(SiteNetError::Duplicate(_))
        ));
        let many: Vec<String> = (0..=MAX_SITES).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            check_names(&many),
            Err(SiteNetError::TooManySites { .. })
        ));
    }

    #[test]
    fn a_stamp_of_a_dead_or_reused_pid_is_not_alive() {
        let me = std::process::id();
        assert!(owner_alive(&owner_stamp(me)));
        // Same pid, another start time: the pid was reused by a later process.
        let started = start_time(me).unwrap();
        assert!(!owner_alive(&format!("{me} {}", started + 1)));
        assert!(!owner_alive("garbage"));
        assert!(!owner_alive(""));
    }
}
