//! The dependency graph between our crates is a decision: this test fails on any new edge.

use std::collections::BTreeMap;

const ALLOWED: &[(&str, &[&str])] = &[
    ("raft", &[]),
    ("hypervisor", &[]),
    ("web", &[]),
    ("api", &["raft"]),
    ("federation", &["api", "raft"]),
    ("chaos-tests", &["raft"]),
    ("xtask", &[]),
    ("node", &["api", "federation", "hypervisor", "raft", "web"]),
];

const OURS: &[&str] = &[
    "raft",
    "hypervisor",
    "web",
    "api",
    "federation",
    "chaos-tests",
    "xtask",
    "node",
];

#[test]
fn crate_dependencies_follow_the_layering() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    for krate in OURS {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        let mut in_deps = false;
        let mut found = Vec::new();
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_deps = line == "[dependencies]";
                continue;
            }
            if in_deps {
                let name = line.split(['.', '=', ' ']).next().unwrap_or_default();
                if OURS.contains(&name) {
                    found.push(name.to_string());
                }
            }
        }
        let ok = allowed[krate];
        for dep in &found {
            assert!(
                ok.contains(&dep.as_str()),
                "{krate} depends on {dep}: not in the allowed layering (see ARCHITECTURE.md)"
            );
        }
    }
}
