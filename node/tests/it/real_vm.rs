//! Real VMs: a node drives the system libvirtd and boots the tiny guest under QEMU through the
//! REST API; the console is read through the API. Runs when CI provides libvirt and the guest
//! (`cargo xtask ci` sets NOVACRON_LIBVIRT_URI, NOVACRON_GUEST_KERNEL, NOVACRON_GUEST_INITRD);
//! elsewhere each test prints SKIP and returns.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{eventually, fast_tuning, TestCluster};
use crate::vms::{wait_op, wait_state};

pub(crate) struct RealEnv {
    pub uri: String,
    pub kernel: String,
    pub initrd: String,
    pub marker: String,
}

pub(crate) fn real_env(test: &str) -> Option<RealEnv> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("NOVACRON_LIBVIRT_URI"),
        get("NOVACRON_GUEST_KERNEL"),
        get("NOVACRON_GUEST_INITRD"),
    ) {
        (Some(uri), Some(kernel), Some(initrd)) if !uri.starts_with("test:") => Some(RealEnv {
            uri,
            kernel,
            initrd,
            marker: get("NOVACRON_GUEST_MARKER").unwrap_or_else(|| "TINYVM BOOTED".into()),
        }),
        _ => {
            println!(
                "SKIP {test}: needs NOVACRON_LIBVIRT_URI (a real libvirtd) and the test guest"
            );
            None
        }
    }
}

/// One system libvirtd is shared by every real test, across test processes.
pub(crate) fn daemon_turn() -> std::fs::File {
    let path = std::env::temp_dir().join("novacron-libvirtd.lock");
    let f = std::fs::File::create(path).unwrap();
    f.lock().unwrap();
    f
}

async fn real_cluster(env: &RealEnv) -> anyhow::Result<TestCluster> {
    TestCluster::start_with(
        1,
        fast_tuning(60_000, 10_000, 1_000),
        vec![
            ("NOVACRON_LIBVIRT_URI".into(), env.uri.clone()),
            ("NOVACRON_GUEST_KERNEL".into(), env.kernel.clone()),
            ("NOVACRON_GUEST_INITRD".into(), env.initrd.clone()),
            // KVM may exist without working for Linux guests (nested); TCG always boots.
            ("NOVACRON_DOMAIN_TYPE".into(), "qemu".into()),
        ],
    )
    .await
}

fn virsh(env: &RealEnv, args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-q", "-c", &env.uri])
        .args(args)
        .output()
        .expect("virsh runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

async fn create_tiny(c: &TestCluster) -> anyhow::Result<String> {
    let (s, v) = c
        .request(
            0,
            reqwest::Method::POST,
            "/api/v1/vms",
            Some(json!({"name": "tiny", "vcpus": 1, "memory_mib": 128, "image": "tiny"})),
        )
        .await?;
    anyhow::ensure!(s == 202, "create: HTTP {s} {v}");
    let id = v["vm"]["id"].as_str().unwrap().to_string();
    let op = wait_op(c, 0, v["operation"]["id"].as_str().unwrap()).await?;
    anyhow::ensure!(op["state"] == "succeeded", "create failed: {op}");
    wait_state(c, 0, &id, "running").await?;
    Ok(id)
}

/// Reads the console through the API until `marker` appears.
pub(crate) async fn console_shows(
    c: &TestCluster,
    id: &str,
    marker: &str,
) -> anyhow::Result<String> {
    let resp = c
        .http
        .get(format!("{}/api/v1/vms/{id}/console", c.nodes[0].url()))
        .bearer_auth(c.token.as_deref().unwrap())
        .timeout(Duration::from_secs(120))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "console: HTTP {}",
        resp.status()
    );
    let mut resp = resp;
    let mut seen = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(chunk) = resp.chunk().await? {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(marker) {
                return Ok::<_, anyhow::Error>(());
            }
        }
        anyhow::bail!("console closed before {marker:?}")
    })
    .await;
    match read {
        Ok(r) => r.map(|()| seen),
        Err(_) => anyhow::bail!("no {marker:?} on the console within 120 s; saw: {seen}"),
    }
}

async fn delete_and_check_nothing_left(
    c: &TestCluster,
    env: &RealEnv,
    id: &str,
) -> anyhow::Result<()> {
    let (s, del) = c
        .request(
            0,
            reqwest::Method::DELETE,
            &format!("/api/v1/vms/{id}"),
            None,
        )
        .await?;
    anyhow::ensure!(s == 202, "delete: HTTP {s} {del}");
    let op = wait_op(c, 0, del["operation"]["id"].as_str().unwrap()).await?;
    anyhow::ensure!(op["state"] == "succeeded", "delete failed: {op}");
    let domain = format!("nc-{id}");
    let (exists, _) = virsh(env, &["dominfo", &domain]);
    anyhow::ensure!(!exists, "domain {domain} was left behind");
    let leftovers: Vec<_> = walk(&c.nodes[0].dir)
        .into_iter()
        .filter(|p| p.contains(id))
        .collect();
    anyhow::ensure!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_tiny_guest_through_the_api() -> anyhow::Result<()> {
    let Some(env) = real_env("boots_the_tiny_guest_through_the_api") else {
        return Ok(());
    };
    let _turn = daemon_turn();
    let c = real_cluster(&env).await?;
    let id = create_tiny(&c).await?;
    let seen = console_shows(&c, &id, &env.marker).await?;
    assert!(seen.contains(&env.marker));

    // Destroyed behind the agent's back while it should run: the agent starts it again.
    let domain = format!("nc-{id}");
    let (ok, _) = virsh(&env, &["destroy", &domain]);
    assert!(ok, "virsh destroy");
    eventually(
        "the agent to restart the guest",
        Duration::from_secs(60),
        || async {
            let (_, state) = virsh(&env, &["domstate", &domain]);
            (state == "running").then_some(())
        },
    )
    .await?;

    // Stop through the API, then delete: nothing is left.
    let (s, stop) = c
        .request(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{id}/stop"),
            None,
        )
        .await?;
    assert_eq!(s, 202, "{stop}");
    assert_eq!(
        wait_op(&c, 0, stop["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );
    let (_, state) = virsh(&env, &["domstate", &domain]);
    assert_eq!(state, "shut off");
    delete_and_check_nothing_left(&c, &env, &id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_recovers_from_a_libvirtd_restart() -> anyhow::Result<()> {
    let Some(env) = real_env("the_agent_recovers_from_a_libvirtd_restart") else {
        return Ok(());
    };
    let Ok(restart) = std::env::var("NOVACRON_LIBVIRTD_RESTART_CMD") else {
        println!("SKIP the_agent_recovers_from_a_libvirtd_restart: NOVACRON_LIBVIRTD_RESTART_CMD is not set");
        return Ok(());
    };
    let _turn = daemon_turn();
    let c = real_cluster(&env).await?;
    let id = create_tiny(&c).await?;
    let status = Command::new("sh").args(["-c", &restart]).status()?;
    assert!(status.success(), "restarting libvirtd failed");
    // The agent notices nothing changed for the guest, and keeps acting: a stop works.
    let (s, stop) = c
        .request(
            0,
            reqwest::Method::POST,
            &format!("/api/v1/vms/{id}/stop"),
            None,
        )
        .await?;
    assert_eq!(s, 202, "{stop}");
    assert_eq!(
        wait_op(&c, 0, stop["operation"]["id"].as_str().unwrap()).await?["state"],
        "succeeded"
    );
    delete_and_check_nothing_left(&c, &env, &id).await
}
