//! Sites in their own network namespaces (the ground the federation tests stand on): three
//! independent clusters start inside their namespaces, reach each other over the bridge, and a
//! cut site is isolated from the others both ways while it and they keep serving their own
//! writes; healing brings reachability back. Also: a crashed run's namespaces, bridge and
//! processes are removed by the next start. Needs root, `ip`, `nft`, `nsenter` and curl; prints
//! SKIP without them.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::harness::sites::TestSites;
use crate::harness::{eventually, fast_tuning};

/// How long a call across a cut gets before it counts as unanswered; an answer inside one site
/// namespace or across the bridge takes milliseconds.
const NO_ANSWER: Duration = Duration::from_secs(3);
/// How long a call that should get through may take on a loaded machine (starting the CLI is
/// part of it); longer than any reply across the bridge, so a slow machine is not a cut.
const ANSWER: Duration = Duration::from_secs(30);

fn prerequisites(test: &str) -> bool {
    if let Err(e) = TestSites::available() {
        println!("SKIP {test}: site namespaces unavailable: {e}");
        return false;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        println!("SKIP {test}: curl is not installed");
        return false;
    }
    true
}

/// `ip netns pids`: the processes inside a namespace.
fn pids_in(netns: &str) -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn netns_names() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The interface index of link `name` in the root namespace, if it exists. A link deleted and
/// created again under the same name gets a new index.
fn ifindex(name: &str) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
}

/// `cluster status` of site `to` by the CLI run inside site `from`: the leader's name, or
/// `None` when nothing answered in time.
async fn status_from(
    sites: &TestSites,
    from: &str,
    to: &str,
    within: Duration,
) -> Result<Option<String>> {
    let out = sites
        .cli_in(
            from,
            &sites.node_url(to, 0),
            sites.site(to).token.as_deref(),
            &["cluster", "status", "-o", "json"],
            within,
        )
        .await?;
    let Some(out) = out else { return Ok(None) };
    if !out.status.success() {
        // A connection that failed rather than hung (refused, reset) also means unreachable.
        println!(
            "CLI in {from} -> {to} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["leader_name"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_run_in_namespaces_and_a_cut_site_keeps_serving() -> Result<()> {
    let test = "sites_run_in_namespaces_and_a_cut_site_keeps_serving";
    if !prerequisites(test) {
        return Ok(());
    }
    let sites = TestSites::start(
        &[("a", 3), ("b", 3), ("edge", 1)],
        fast_tuning(60_000, 10_000, 1_000),
    )
    .await?;
    assert_eq!(sites.names(), ["a", "b", "edge"]);

    // Each site is its own cluster, inside its own namespace, on its own address.
    let mut cluster_ids = BTreeSet::new();
    for (name, n) in [("a", 3), ("b", 3), ("edge", 1)] {
        let c = sites.site(name);
        let ns = sites.ns(name);
        c.wait_voters(n).await?;
        let status = c.status(0).await?;
        assert_eq!(
            status["members"].as_array().map(Vec::len),
            Some(n),
            "{status}"
        );
        cluster_ids.insert(status["cluster_id"].to_string());
        for i in 0..n {
            let url = sites.node_url(name, i);
            assert!(
                url.starts_with(&format!("http://{}:", ns.addr)),
                "{name} node {i} binds {url}, not the site's address {}",
                ns.addr
            );
            let quic = c.peer_addr(i)?;
            assert!(quic.starts_with(&format!("{}:", ns.addr)), "{quic}");
        }
        // The node processes are inside the site's namespace, and only they.
        assert_eq!(pids_in(&ns.netns).len(), n, "processes in {}", ns.netns);
    }
    assert_eq!(cluster_ids.len(), 3, "three independent clusters");

    // From inside one site the others answer, through the novacron CLI's own client.
    for (from, to) in [("a", "b"), ("b", "edge"), ("edge", "a")] {
        let leader = status_from(&sites, from, to, ANSWER).await?;
        ensure!(leader.is_some(), "{from} cannot reach {to}");
    }

    // A listener of the root namespace on the bridge, to see what a cut does to the edge's
    // own connections towards it.
    let root = tokio::net::TcpListener::bind((sites.net.gateway, 0)).await?;
    let root_url = format!("http://{}/", root.local_addr()?);
    let responder = tokio::spawn(async move {
        while let Ok((mut s, _)) = root.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    });
    let to_root = sites
        .http_from("edge", "GET", &root_url, None, None, ANSWER)
        .await?;
    assert_eq!(to_root.map(|(s, _)| s), Ok(200));

    sites.cut("edge")?;
    // Cutting twice is harmless (a nemesis may repeat itself).
    sites.cut("edge")?;
    assert!(sites.net.is_cut("edge")?);
    assert!(!sites.net.is_cut("a")?);

    // Nothing crosses the cut, either way, nor reaches the root namespace from the edge.
    assert_eq!(
        status_from(&sites, "a", "edge", NO_ANSWER).await?,
        None,
        "a reached edge"
    );
    assert_eq!(
        status_from(&sites, "edge", "a", NO_ANSWER).await?,
        None,
        "edge reached a"
    );
    assert!(!sites.reachable("b", "edge", NO_ANSWER).await?);
    assert!(!sites.reachable("edge", "b", NO_ANSWER).await?);
    let to_root = sites
        .http_from("edge", "GET", &root_url, None, None, NO_ANSWER)
        .await?;
    assert!(
        to_root.is_err(),
        "edge reached the root namespace: {to_root:?}"
    );
    // The other sites still reach each other: the cut is the edge's alone.
    assert!(sites.reachable("a", "b", ANSWER).await?);
    assert!(status_from(&sites, "b", "a", ANSWER).await?.is_some());

    // Every site keeps serving its own writes, the cut one included (from the test process).
    for (site, tenant) in [
        ("edge", "edge-while-cut"),
        ("a", "a-while-cut"),
        ("b", "b-while-cut"),
    ] {
        let c = sites.site(site);
        c.create_tenant_eventually(0, tenant).await?;
        let last = c.nodes.len() - 1;
        c.wait_has_tenants(last, &[tenant.to_string()]).await?;
        let names = c.tenant_names(0, "linearizable").await?;
        assert!(names.contains(&tenant.to_string()), "{site}: {names:?}");
    }
    // The edge's write stayed at the edge (sites are independent clusters, no federation yet).
    let a_names = sites.site("a").tenant_names(0, "stale").await?;
    assert!(
        !a_names.contains(&"edge-while-cut".to_string()),
        "{a_names:?}"
    );

    sites.heal("edge")?;
    assert!(!sites.net.is_cut("edge")?);
    eventually("a to reach edge again", Duration::from_secs(30), || async {
        status_from(&sites, "a", "edge", ANSWER)
            .await
            .ok()
            .flatten()
    })
    .await?;
    eventually("edge to reach a again", Duration::from_secs(30), || async {
        status_from(&sites, "edge", "a", ANSWER)
            .await
            .ok()
            .flatten()
    })
    .await?;
    assert!(sites.reachable("b", "edge", ANSWER).await?);
    let to_root = sites
        .http_from("edge", "GET", &root_url, None, None, ANSWER)
        .await?;
    assert_eq!(to_root.map(|(s, _)| s), Ok(200));
    responder.abort();

    // Cutting a site of three nodes leaves the traffic between its own nodes alone: a write
    // through a follower is forwarded to the leader and replicated to every node.
    sites.cut("a")?;
    assert!(!sites.reachable("b", "a", NO_ANSWER).await?);
    let a = sites.site("a");
    let leader = a.wait_leader(0, None).await?;
    let follower = (leader + 1) % 3;
    a.create_tenant_eventually(follower, "a-cut-forwarded")
        .await?;
    for i in 0..3 {
        a.wait_has_tenants(i, &["a-cut-forwarded".to_string()])
            .await?;
    }
    sites.heal("a")?;

    // A restarted node comes back inside its site's namespace, on the same address.
    let mut sites = sites;
    let b = sites.site_mut("b");
    b.stop(2)?;
    b.restart(2).await?;
    b.wait_ready(2).await?;
    assert_eq!(pids_in(&sites.ns("b").netns).len(), 3);
    assert!(sites.reachable("a", "b", ANSWER).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_one_link_leaves_the_other_links_up() -> Result<()> {
    let test = "cutting_one_link_leaves_the_other_links_up";
    if !prerequisites(test) {
        return Ok(());
    }
    // Per-node `serve` arguments reach each node (here a path stored in node.json, unused by
    // the test driver; federation tests give `--site` this way).
    let sites = TestSites::start_with(
        &[("a", 1), ("b", 2), ("c", 1)],
        fast_tuning(60_000, 10_000, 1_000),
        Vec::new(),
        |site, i| vec!["--guest-kernel".into(), format!("/nonexistent/{site}-{i}")],
    )
    .await?;
    for (site, n) in [("a", 1), ("b", 2), ("c", 1)] {
        for i in 0..n {
            let dir = &sites.site(site).nodes[i].dir;
            let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("node.json"))?)?;
            assert_eq!(
                v["guest_kernel"],
                format!("/nonexistent/{site}-{i}"),
                "{site} {i}"
            );
        }
    }
    assert!(
        sites.cut_link("a", "a").is_err(),
        "a site cannot cut itself"
    );
    sites.cut_link("a", "b")?;
    sites.cut_link("b", "a")?;
    assert!(!sites.reachable("a", "b", NO_ANSWER).await?);
    assert!(!sites.reachable("b", "a", NO_ANSWER).await?);
    for (from, to) in [("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")] {
        assert!(sites.reachable(from, to, ANSWER).await?, "{from} -> {to}");
    }
    // Both ends of the cut link still serve the test process.
    sites.site("a").create_tenant(0, "a-link-cut").await?;
    sites.site("b").create_tenant(0, "b-link-cut").await?;

    sites.heal_link("b", "a")?;
    sites.heal_link("a", "b")?;
    assert!(sites.reachable("a", "b", ANSWER).await?);
    assert!(sites.reachable("b", "a", ANSWER).await?);

    // A lossy link drops some packets each way and still carries requests (TCP retransmits).
    assert!(sites.set_link_loss("a", "c", 101).is_err());
    sites.set_link_loss("a", "c", 20)?;
    let mut answered = 0;
    for _ in 0..5 {
        for (from, to) in [("a", "c"), ("c", "a")] {
            if sites.reachable(from, to, Duration::from_secs(10)).await? {
                answered += 1;
            }
        }
    }
    let (lost_a, lost_c) = (sites.net.lost_packets("a")?, sites.net.lost_packets("c")?);
    println!("20% loss: {answered} of 10 requests answered; dropped {lost_a} at a, {lost_c} at c");
    assert!(answered > 0);
    assert!(lost_a > 0 && lost_c > 0, "{lost_a} {lost_c}");
    // Only the lossy link: b's links lose nothing.
    assert_eq!(sites.net.lost_packets("b")?, 0);
    sites.set_link_loss("c", "a", 0)?;
    assert_eq!(sites.net.lost_packets("a")?, 0, "loss rules left at a");
    assert_eq!(sites.net.lost_packets("c")?, 0, "loss rules left at c");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crashed_run_are_removed_by_the_next_start() -> Result<()> {
    let test = "leftovers_of_a_crashed_run_are_removed_by_the_next_start";
    if !prerequisites(test) {
        return Ok(());
    }
    // Names of this process only: a parallel run may reuse the index as soon as it is freed.
    let pid = std::process::id();
    let (x, y) = (format!("x{pid}"), format!("y{pid}"));
    let crashed = node::sitenet::SiteNet::start(&[&x, &y])?;
    let idx = crashed.index();
    let bridge = crashed.bridge.clone();
    let veth = format!("ncsv{idx}x1");
    let links = [
        (bridge.clone(), ifindex(&bridge).unwrap()),
        (veth.clone(), ifindex(&veth).unwrap()),
    ];
    let netns: Vec<String> = crashed.sites.iter().map(|s| s.netns.clone()).collect();
    // A node that outlived its test: a process left inside the namespace.
    let mut sleeper = crashed.sites[0].command("sleep").arg("600").spawn()?;
    let sleeper_pid = sleeper.id().to_string();
    eventually(
        "the orphan to be in the namespace",
        Duration::from_secs(10),
        || {
            let in_ns = pids_in(&netns[0]).contains(&sleeper_pid);
            async move { in_ns.then_some(()) }
        },
    )
    .await?;
    // The owner "crashes": its record now names a process that no longer exists, and nothing
    // of it runs its Drop.
    let mut gone = Command::new("true").spawn()?;
    let dead_pid = gone.id();
    gone.wait()?;
    std::fs::write(crashed.owner_record(), format!("{dead_pid} 0"))?;
    std::mem::forget(crashed);

    let next = node::sitenet::SiteNet::start(&["z"])?;
    for ns in &netns {
        assert!(!netns_names().contains(ns), "{ns} survived");
    }
    // The freed index may be taken again at once (by this start or a parallel run), so a link
    // of the same name counts as removed when it is a new one.
    for (name, index) in &links {
        assert_ne!(ifindex(name), Some(*index), "{name} survived");
    }
    // The orphan was killed (reaped here, since this process is its parent).
    let status = sleeper.wait()?;
    assert!(!status.success(), "{status}");
    drop(next);
    Ok(())
}

/// `virsh` against a site's own libvirtd, from outside the site.
fn site_virsh(sites: &TestSites, site: &str, args: &[&str]) -> (bool, String) {
    let uri = sites.ns(site).libvirt.as_ref().unwrap().outside_uri();
    let out = Command::new("virsh")
        .args(["-q", "-c", &uri])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn mount_ns(pid: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap()
}

/// Sites with a libvirtd each: separate libvirt hosts that the sites' nodes use. With the test
/// guest (CI sets NOVACRON_GUEST_KERNEL and NOVACRON_GUEST_INITRD), a real VM created at one
/// site runs in that site's libvirt and nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sites_have_their_own_libvirt() -> Result<()> {
    let test = "real_sites_have_their_own_libvirt";
    if !prerequisites(test) {
        return Ok(());
    }
    if let Err(e) = node::hosts::available() {
        println!("SKIP {test}: separate libvirt hosts unavailable: {e}");
        return Ok(());
    }
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let guest = get("NOVACRON_GUEST_KERNEL").zip(get("NOVACRON_GUEST_INITRD"));
    let mut env = Vec::new();
    if let Some((kernel, initrd)) = &guest {
        env.push(("NOVACRON_GUEST_KERNEL".to_string(), kernel.clone()));
        env.push(("NOVACRON_GUEST_INITRD".to_string(), initrd.clone()));
        // KVM may exist without working for Linux guests (nested); TCG always boots.
        env.push(("NOVACRON_DOMAIN_TYPE".to_string(), "qemu".to_string()));
    } else {
        println!("{test}: no test guest; checking the libvirt hosts without a VM");
    }
    let sites = TestSites::start_with_libvirt(
        &[("a", 1), ("b", 1)],
        fast_tuning(60_000, 10_000, 1_000),
        env,
        |_, _| Vec::new(),
    )
    .await?;

    for site in ["a", "b"] {
        let ns = sites.ns(site);
        let libvirtd = ns.libvirt.as_ref().unwrap().pid.to_string();
        // Each libvirtd is its own host.
        let (ok, hostname) = site_virsh(&sites, site, &["hostname"]);
        assert!(ok, "virsh hostname at {site}");
        assert_eq!(hostname, format!("site-{site}"));
        // The site's node sees the libvirtd's private mounts: its qemu:///system is that one.
        let node_pids: Vec<String> = pids_in(&ns.netns)
            .into_iter()
            .filter(|p| *p != libvirtd)
            .collect();
        assert_eq!(node_pids.len(), 1, "{site}: {node_pids:?}");
        assert_eq!(mount_ns(&node_pids[0]), mount_ns(&libvirtd), "{site}");
        assert_ne!(mount_ns(&node_pids[0]), mount_ns("self"), "{site}");
    }

    if guest.is_some() {
        let a = sites.site("a");
        let (s, v) = a
            .request(
                0,
                reqwest::Method::POST,
                "/api/v1/vms",
                Some(serde_json::json!({
                    "name": "tiny", "vcpus": 1, "memory_mib": 128, "image": "tiny"
                })),
            )
            .await?;
        ensure!(s == 202, "create at a: HTTP {s} {v}");
        let id = v["vm"]["id"].as_str().unwrap().to_string();
        crate::vms::wait_state(a, 0, &id, "running").await?;
        let domain = format!("nc-{id}");
        assert_eq!(
            site_virsh(&sites, "a", &["domstate", &domain]),
            (true, "running".to_string())
        );
        assert!(
            !site_virsh(&sites, "b", &["domstate", &domain]).0,
            "{domain} at b"
        );
    }
    Ok(())
}
