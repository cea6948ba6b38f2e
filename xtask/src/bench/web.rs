//! `cargo xtask bench web`: how long every main page of the dashboard takes the server to answer,
//! on a 3-node cluster holding 1,000 VMs, measured from a follower; and how many bytes of script
//! and style a page loads. Results replace the "Dashboard" section of `docs/benchmarks.md`.
//!
//! The dashboard is a single page over the REST API: a page is the shell (HTML, script, style)
//! plus the API requests its view makes, one after the other, as `web/assets/app.js` does. So a
//! page's time here is the sum of the full-response times of those requests, sent in order on
//! one keep-alive connection, repeated; p50 and p99 are over the repetitions. Browser rendering
//! is not included (it is the client's time, not the server's). The nodes run on libvirt's
//! in-process test driver: the dashboard is measured, not QEMU.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Client;
use serde_json::{json, Value};

use super::novacron::{self, Novacron};
use super::BenchCluster;

/// The heading of the section this benchmark owns in `docs/benchmarks.md`.
pub(crate) const SECTION: &str = "## Dashboard";
/// The budget of acceptance 2: every page under this, at p99.
const BUDGET_MS: f64 = 100.0;
/// VM creations in flight while filling the cluster.
const FILL_CONCURRENCY: usize = 16;

#[derive(Args)]
pub(crate) struct WebArgs {
    /// VMs to create before measuring.
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    /// Loads of each page (after two warm-up loads).
    #[arg(long, default_value_t = 200)]
    repeats: usize,
    /// Use this novacron binary instead of building one with `cargo build --release -p node`.
    #[arg(long)]
    novacron_bin: Option<PathBuf>,
    /// Where to write the report (default: docs/benchmarks.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One request of a page: a path (with query) on the node's origin, and whether it needs the
/// session's token.
struct Req {
    path: String,
    auth: bool,
}

/// A main page and the requests it makes, in the order the dashboard makes them.
struct Page {
    name: &'static str,
    route: &'static str,
    requests: Vec<Req>,
}

fn api(path: &str) -> Req {
    Req {
        path: format!("/api/v1{path}"),
        auth: true,
    }
}

/// The main pages, mirroring the view functions of `web/assets/app.js` (`viewVms` asks for the
/// tenants, then one page of 25 VMs; a name search asks for 500 and filters them; ...).
fn pages(shell: &[String], vm_id: &str, cursor: &str, follower_name: &str) -> Vec<Page> {
    let static_reqs = || {
        shell
            .iter()
            .map(|p| Req {
                path: p.clone(),
                auth: false,
            })
            .collect::<Vec<_>>()
    };
    vec![
        Page {
            name: "Login (shell, script, style)",
            route: "#/login",
            requests: static_reqs(),
        },
        Page {
            name: "Cluster",
            route: "#/cluster",
            requests: vec![api("/cluster")],
        },
        Page {
            name: "VMs, first page",
            route: "#/vms",
            requests: vec![api("/tenants?limit=500"), api("/vms?limit=25")],
        },
        Page {
            name: "VMs, filtered by state and node",
            route: "#/vms?state=running&node=…",
            requests: vec![
                api("/tenants?limit=500"),
                api(&format!("/vms?limit=25&state=running&node={follower_name}")),
            ],
        },
        Page {
            name: "VMs, name search",
            route: "#/vms?q=vm-05",
            requests: vec![api("/tenants?limit=500"), api("/vms?limit=25&q=vm-05")],
        },
        Page {
            name: "VMs, 20th page (cursor)",
            route: "#/vms?cursor=…",
            requests: vec![
                api("/tenants?limit=500"),
                api(&format!("/vms?limit=25&cursor={cursor}")),
            ],
        },
        Page {
            name: "VM detail",
            route: "#/vms/{id}",
            requests: vec![api(&format!("/vms/{vm_id}"))],
        },
        Page {
            name: "Nodes",
            route: "#/nodes",
            requests: vec![api("/nodes")],
        },
        Page {
            name: "Tenants",
            route: "#/tenants",
            requests: vec![api("/tenants?limit=500")],
        },
        Page {
            name: "Users",
            route: "#/users",
            requests: vec![api("/tenants?limit=500"), api("/users?limit=500")],
        },
        Page {
            name: "Audit log",
            route: "#/audit",
            requests: vec![api("/audit?limit=100")],
        },
    ]
}

/// What was measured for one page.
struct PageResult {
    name: &'static str,
    route: &'static str,
    requests: usize,
    /// Bytes of all responses of one load.
    bytes: usize,
    /// Page times in milliseconds, sorted.
    times: Vec<f64>,
    /// The slowest request of the page by p50, and that p50.
    slowest: (String, f64),
}

/// Script and style a page loads: the shell and the files it names.
struct Weight {
    html: usize,
    script: usize,
    style: usize,
    files: Vec<(String, usize)>,
}

pub(crate) fn run(args: &WebArgs) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("docs").join("benchmarks.md"));
    // Build first, before any server runs, so the compiler does not compete with the measurement.
    let binary = match &args.novacron_bin {
        Some(path) if path.exists() => path.clone(),
        Some(path) => bail!("{} does not exist", path.display()),
        None => novacron::build()?,
    };
    let mut version = novacron::version(&binary);
    // A debug binary is much slower than the release one; the report must say which was timed.
    if binary.components().any(|c| c.as_os_str() == "debug") {
        version.push_str(", a debug (unoptimised) build");
    } else if binary.components().any(|c| c.as_os_str() == "release") {
        version.push_str(", a release build");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let tmp = tempfile::Builder::new()
        .prefix("novacron-bench-web-")
        .tempdir()
        .context("creating the data directory")?;
    let outcome = runtime.block_on(async {
        let mut cluster = Novacron::start_with_env(
            &binary,
            tmp.path(),
            &[("NOVACRON_LIBVIRT_URI", "test:///default")],
        )
        .await?;
        measure(&mut cluster, args).await
    });
    let (results, weight, setup) = match outcome {
        Ok(r) => r,
        Err(e) => {
            let kept = tmp.keep();
            eprintln!("data and logs kept in {}", kept.display());
            return Err(e);
        }
    };
    let section = render(&results, &weight, &setup, args, &version);
    let existing = std::fs::read_to_string(&out).unwrap_or_default();
    let updated = replace_section(&existing, SECTION, &section);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, updated).with_context(|| format!("writing {}", out.display()))?;
    println!("{section}");
    println!("written to {}", out.display());
    let over: Vec<&str> = results
        .iter()
        .filter(|r| quantile(&r.times, 0.99) > BUDGET_MS)
        .map(|r| r.name)
        .collect();
    if !over.is_empty() {
        println!("over the {BUDGET_MS} ms budget at p99: {}", over.join(", "));
    }
    Ok(())
}

/// How the cluster was filled, for the report.
struct Setup {
    /// How many VMs were in each state when the timing began, e.g. "750 running, 250 stopped".
    states: String,
    /// The machine's 1-minute load average when the timing began and when it ended.
    load: (String, String),
    follower: String,
    vms: usize,
    tenants: usize,
    users: usize,
    fill_secs: f64,
}

async fn measure(
    cluster: &mut Novacron,
    args: &WebArgs,
) -> Result<(Vec<PageResult>, Weight, Setup)> {
    let urls = cluster.urls();
    let leader = cluster.leader().await?;
    let follower_idx = (leader + 1) % urls.len();
    let follower = urls[follower_idx].clone();
    let follower_name = format!("n{follower_idx}");
    let token = cluster.token().to_owned();
    // One connection: a browser reuses its keep-alive connection to the node for every request.
    let client = super::load::http_client(1)?;

    println!("filling the cluster through the leader: {} VMs", args.vms);
    let started = Instant::now();
    let (tenants, users) = fill(&client, &urls[leader], &token, args.vms).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    println!("filled in {fill_secs:.1} s; waiting for the agents to settle");
    settle(&client, &urls[leader], &token).await?;
    let states = vm_states(&client, &follower, &token).await?;
    println!("VM states: {states}");

    let weight = page_weight(&client, &follower).await?;
    let shell: Vec<String> = std::iter::once("/".to_owned())
        .chain(weight.files.iter().map(|(p, _)| p.clone()))
        .collect();
    let (vm_id, cursor) = middle_vm(&client, &follower, &token).await?;
    let load_before = loadavg();

    let mut results = Vec::new();
    for page in pages(&shell, &vm_id, &cursor, &follower_name) {
        let r = time_page(&client, &follower, &token, &page, args.repeats).await?;
        println!(
            "{:<34} p50 {:>7.2} ms  p99 {:>7.2} ms  ({} requests, {} bytes)",
            r.name,
            quantile(&r.times, 0.5),
            quantile(&r.times, 0.99),
            r.requests,
            r.bytes
        );
        results.push(r);
    }
    let setup = Setup {
        states,
        load: (load_before, loadavg()),
        follower: follower_name,
        vms: args.vms,
        tenants,
        users,
        fill_secs,
    };
    Ok((results, weight, setup))
}

/// Creates tenants, users and `vms` VMs spread over the tenants, `FILL_CONCURRENCY` at a time.
/// Returns the number of tenants and users created.
async fn fill(client: &Client, url: &str, token: &str, vms: usize) -> Result<(usize, usize)> {
    const TENANTS: usize = 10;
    const USERS_PER_TENANT: usize = 3;
    let mut tenant_ids = Vec::new();
    for t in 0..TENANTS {
        let body: Value = send_ok(
            client
                .post(format!("{url}/api/v1/tenants"))
                .bearer_auth(token)
                .json(&json!({"name": format!("tenant-{t:02}")})),
        )
        .await?;
        let id = body["id"]
            .as_str()
            .context("a created tenant has no id")?
            .to_owned();
        for u in 0..USERS_PER_TENANT {
            send_ok(
                client
                    .post(format!("{url}/api/v1/users"))
                    .bearer_auth(token)
                    .json(&json!({"username": format!("user-{t:02}-{u}"),
                                  "password": "bench-password", "tenant": id, "role": "operator"})),
            )
            .await?;
        }
        tenant_ids.push(id);
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..vms {
        if set.len() >= FILL_CONCURRENCY {
            if let Some(r) = set.join_next().await {
                r.context("a VM creation task panicked")??;
            }
        }
        let (client, url, token) = (client.clone(), url.to_owned(), token.to_owned());
        let tenant = tenant_ids[i % TENANTS].clone();
        set.spawn(async move {
            // Every fourth VM is left stopped, so the state filter has something to select.
            let body = json!({
                "name": format!("vm-{i:04}"), "vcpus": 1, "memory_mib": 64, "tenant": tenant,
                "labels": {"env": if i % 2 == 0 { "prod" } else { "dev" }, "team": format!("t{}", i % 7)},
                "start": i % 4 != 0,
            });
            send_ok(
                client
                    .post(format!("{url}/api/v1/vms"))
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("bench-web-vm-{i}"))
                    .json(&body),
            )
            .await
            .map(|_| ())
        });
        if (i + 1) % 100 == 0 {
            println!("  {} VMs requested", i + 1);
        }
    }
    while let Some(r) = set.join_next().await {
        r.context("a VM creation task panicked")??;
    }
    Ok((TENANTS, TENANTS * USERS_PER_TENANT))
}

/// Waits until the leader's commit index has not moved for 3 s (the agents have reported every
/// VM they started), so the timing does not measure the tail of the fill. Gives up after 180 s
/// and measures anyway: a cluster that never settles is what a user would meet too.
async fn settle(client: &Client, url: &str, token: &str) -> Result<()> {
    const QUIET: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last: Option<(u64, Instant)> = None;
    while Instant::now() < deadline {
        let c = send_ok(
            client
                .get(format!("{url}/api/v1/cluster"))
                .bearer_auth(token),
        )
        .await?;
        let commit = c["commit_index"].as_u64().unwrap_or(0);
        match last {
            Some((prev, since)) if prev == commit => {
                if since.elapsed() >= QUIET {
                    return Ok(());
                }
            }
            _ => last = Some((commit, Instant::now())),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("the commit index was still moving after 180 s; measuring anyway");
    Ok(())
}

/// Counts the VMs in each state, walking the whole list.
async fn vm_states(client: &Client, url: &str, token: &str) -> Result<String> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("{url}/api/v1/vms?limit=500&cursor={c}"),
            None => format!("{url}/api/v1/vms?limit=500"),
        };
        let page = send_ok(client.get(path).bearer_auth(token)).await?;
        for vm in page["items"].as_array().into_iter().flatten() {
            *counts
                .entry(vm["state"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    Ok(counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Sends `req` and returns its JSON body, failing with the body on a non-success status.
async fn send_ok(req: reqwest::RequestBuilder) -> Result<Value> {
    let resp = req.send().await.context("sending a setup request")?;
    let status = resp.status();
    let text = resp.text().await.context("reading a setup answer")?;
    if !status.is_success() {
        bail!("setup request failed: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The id of a VM from the middle of the list (neither the first key nor the last), and the
/// cursor of the 20th page of 25 (or of the last page when there are fewer).
async fn middle_vm(client: &Client, url: &str, token: &str) -> Result<(String, String)> {
    let page = send_ok(
        client
            .get(format!("{url}/api/v1/vms?limit=500"))
            .bearer_auth(token),
    )
    .await?;
    let items = page["items"].as_array().context("no VMs listed")?;
    let id = |i: usize| {
        items
            .get(i)
            .and_then(|v| v["id"].as_str())
            .map(str::to_owned)
    };
    let vm = id(items.len() / 2).context("no VM to open")?;
    let cursor = id((19 * 25 - 1).min(items.len().saturating_sub(1))).context("no VM listed")?;
    Ok((vm, cursor))
}

/// The first field of `/proc/loadavg` (the 1-minute load average), or "unknown".
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Fetches the shell and every script and style sheet it names, as a browser does.
async fn page_weight(client: &Client, url: &str) -> Result<Weight> {
    let html = client
        .get(format!("{url}/"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut w = Weight {
        html: html.len(),
        script: 0,
        style: 0,
        files: Vec::new(),
    };
    for path in asset_urls(&html) {
        let bytes = client
            .get(format!("{url}{path}"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?
            .len();
        let bare = path.split('?').next().unwrap_or(&path);
        if bare.ends_with(".js") {
            w.script += bytes;
        } else if bare.ends_with(".css") {
            w.style += bytes;
        } else {
            continue;
        }
        w.files.push((path, bytes));
    }
    if w.script == 0 || w.style == 0 {
        bail!("the shell at {url}/ names no script or no style sheet");
    }
    Ok(w)
}

/// The `src="..."` and `href="..."` values of the shell that point into `/assets/`.
fn asset_urls(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            if let Some(end) = rest.find('"') {
                let value = &rest[..end];
                if value.starts_with("/assets/") && !out.iter().any(|v| v == value) {
                    out.push(value.to_owned());
                }
                rest = &rest[end..];
            }
        }
    }
    out
}

/// Loads `page` `repeats` times (after two warm-up loads) and records each load's total time.
async fn time_page(
    client: &Client,
    url: &str,
    token: &str,
    page: &Page,
    repeats: usize,
) -> Result<PageResult> {
    let mut times = Vec::with_capacity(repeats);
    let mut per_req: Vec<Vec<f64>> = vec![Vec::with_capacity(repeats); page.requests.len()];
    let mut bytes = 0;
    for round in 0..repeats + 2 {
        let mut total = 0.0;
        let mut round_bytes = 0;
        for (i, r) in page.requests.iter().enumerate() {
            let mut req = client.get(format!("{url}{}", r.path));
            if r.auth {
                req = req.bearer_auth(token);
            }
            let t0 = Instant::now();
            let resp = req
                .send()
                .await
                .with_context(|| format!("GET {}", r.path))?;
            let status = resp.status();
            let body = resp.bytes().await?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if !status.is_success() {
                bail!(
                    "GET {} answered {status}: {}",
                    r.path,
                    String::from_utf8_lossy(&body)
                );
            }
            total += ms;
            round_bytes += body.len();
            if round >= 2 {
                per_req[i].push(ms);
            }
        }
        if round >= 2 {
            times.push(total);
            bytes = round_bytes;
        }
    }
    times.sort_by(f64::total_cmp);
    let slowest = page
        .requests
        .iter()
        .zip(per_req.iter_mut())
        .map(|(r, t)| {
            t.sort_by(f64::total_cmp);
            (r.path.clone(), quantile(t, 0.5))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    Ok(PageResult {
        name: page.name,
        route: page.route,
        requests: page.requests.len(),
        bytes,
        times,
        slowest,
    })
}

/// Nearest-rank quantile of sorted values (0 when empty).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn render(
    results: &[PageResult],
    weight: &Weight,
    setup: &Setup,
    args: &WebArgs,
    version: &str,
) -> String {
    let mut md = String::new();
    let date = crate::process::output_of(
        std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
    .unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(md, "{SECTION}\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench web --vms {} --repeats {}` on {date}, {version}. \
         Three `novacron serve` processes on loopback (libvirt's test driver), filled through \
         the leader with {} VMs (three in four asked to start), {} tenants and {} users in \
         {:.1} s; once the leader's commit index had been still for 3 s (VMs then: {}), every \
         page is loaded {} times from the follower {}.\n",
        setup.vms,
        args.repeats,
        setup.vms,
        setup.tenants,
        setup.users,
        setup.fill_secs,
        setup.states,
        args.repeats,
        setup.follower
    );
    let _ = writeln!(
        md,
        "A page's time is the sum of the full-response times of the requests its view makes, in \
         the order the dashboard makes them, on one keep-alive connection (reads are \
         linearizable, so a follower asks the leader for a read index each time). Rendering in \
         the browser is not included. Budget: {BUDGET_MS:.0} ms per page. The machine's \
         1-minute load average was {} when the timing began and {} when it ended ({} CPUs, \
         shared with other work).\n",
        setup.load.0,
        setup.load.1,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        md,
        "| page | route | requests | p50 (ms) | p99 (ms) | max (ms) | bytes | slowest request (p50 ms) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---|");
    for r in results {
        let max = r.times.last().copied().unwrap_or(0.0);
        let mark = if quantile(&r.times, 0.99) > BUDGET_MS {
            " **over budget**"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "| {}{mark} | `{}` | {} | {:.2} | {:.2} | {:.2} | {} | `{}` ({:.2}) |",
            r.name,
            r.route,
            r.requests,
            quantile(&r.times, 0.5),
            quantile(&r.times, 0.99),
            max,
            r.bytes,
            r.slowest.0,
            r.slowest.1
        );
    }
    let _ = writeln!(
        md,
        "\nWhat keeps pages flat as VMs grow: the VM list reads `limit + 1` rows when unfiltered \
         and stops scanning as soon as a filtered page is full (name search included, `?q=`), a \
         deeper page starts at its cursor, and a VM is one key. The nodes page reads every VM to \
         sum each node's usage, so it grows linearly with the number of VMs.\n"
    );
    let _ = writeln!(md, "\n### Script and style every page loads\n");
    let _ = writeln!(
        md,
        "The dashboard is one page: every view loads the same shell and files, once (they are \
         cached as immutable afterwards), uncompressed:\n"
    );
    let _ = writeln!(md, "| file | bytes |");
    let _ = writeln!(md, "|---|---:|");
    let _ = writeln!(md, "| `/` (HTML shell) | {} |", weight.html);
    for (path, bytes) in &weight.files {
        let bare = path.split('?').next().unwrap_or(path);
        let _ = writeln!(md, "| `{bare}` | {bytes} |");
    }
    let _ = writeln!(
        md,
        "| **script + style** | **{}** ({} script, {} style) |",
        weight.script + weight.style,
        weight.script,
        weight.style
    );
    md
}

/// `doc` with the section that starts at the line `heading` replaced by `section` (up to the
/// next heading of the same level), or with `section` appended when it has none.
pub(crate) fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    let section = section.trim_end();
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        let mut out = doc.trim_end().to_owned();
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(section);
        out.push('\n');
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## ") || l.starts_with("# "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(section);
    out.push('\n');
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

/// The section `heading` of `doc` (up to the next heading of its level, or the marker of
/// another benchmark's section), if it has one; what `bench raft` keeps when it rewrites the
/// rest of the document.
pub(crate) fn section_of(doc: &str, heading: &str) -> Option<String> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == heading)?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## ") || l.starts_with("# ") || l.starts_with("<!-- "))
        .map_or(lines.len(), |i| start + 1 + i);
    Some(lines[start..end].join("\n").trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_section() {
        let doc = "# Bench\n\n## A\n\na\n\n## Dashboard\n\nold\n\n### sub\n\nx\n\n## B\n\nb\n";
        let out = replace_section(doc, SECTION, "## Dashboard\n\nnew\n");
        assert_eq!(
            out,
            "# Bench\n\n## A\n\na\n\n## Dashboard\n\nnew\n\n## B\n\nb\n"
        );
        assert_eq!(
            section_of(&out, SECTION).as_deref(),
            Some("## Dashboard\n\nnew")
        );
    }

    #[test]
    fn stops_at_the_marker_of_another_section() {
        let doc = "## Dashboard\n\nx\n\n<!-- vm-lifecycle:begin -->\n## VM lifecycle\n";
        assert_eq!(
            section_of(doc, SECTION).as_deref(),
            Some("## Dashboard\n\nx")
        );
    }

    #[test]
    fn appends_when_absent() {
        let out = replace_section("# Bench\n\ntext\n", SECTION, "## Dashboard\n\nnew");
        assert_eq!(out, "# Bench\n\ntext\n\n## Dashboard\n\nnew\n");
        assert_eq!(section_of("# Bench\n", SECTION), None);
    }

    #[test]
    fn finds_the_assets_the_shell_names() {
        let html = r##"<link rel="icon" href="/assets/favicon.svg?v=1"><link rel="stylesheet" href="/assets/app.css?v=2"><script src="/assets/app.js?v=3" defer></script><a href="#/x">"##;
        assert_eq!(
            asset_urls(html),
            vec![
                "/assets/app.js?v=3",
                "/assets/favicon.svg?v=1",
                "/assets/app.css?v=2"
            ]
        );
    }

    #[test]
    fn quantile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
