//! Scheduler tests: tables of (nodes, VMs, constraints) with the expected decision, and
//! property tests over random clusters (no capacity overrun, anti-affinity never violated,
//! explanations agree with decisions, a batch equals the same VMs placed one by one).

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use raft::model::{NodeId, NodeState};
use raft::placement::{FilterKind, NodeCapacity, PlacementConstraints, Verdict};

use super::{Decision, NodeLoad, NodeView, Policy, Scheduler, Strategy as Weighing, VmDemand};

fn node(id: NodeId, vcpus: u32, memory_mib: u64) -> NodeView {
    NodeView {
        id,
        state: NodeState::Up,
        schedulable: true,
        labels: BTreeMap::new(),
        capacity: Some(NodeCapacity {
            vcpus,
            memory_mib,
            disk_gib: Some(100),
        }),
    }
}

fn vm(id: &str, vcpus: u32, memory_mib: u64) -> VmDemand {
    VmDemand {
        id: id.into(),
        tenant: "t1".into(),
        vcpus,
        memory_mib,
        disk_gib: 1,
        constraints: PlacementConstraints::default(),
        anti_affinity_group: None,
    }
}

fn policy(strategy: Weighing) -> Policy {
    Policy {
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        strategy,
        max_verdicts: 64,
    }
}

fn sched(nodes: Vec<NodeView>, p: Policy) -> Scheduler {
    Scheduler::new(nodes, &BTreeMap::new(), std::iter::empty(), p)
}

fn filter_of(d: &Decision, node: NodeId) -> Option<FilterKind> {
    d.explanation
        .verdicts
        .iter()
        .find(|v| v.node == node)
        .and_then(|v| match &v.verdict {
            Verdict::Filtered { filter, .. } => Some(*filter),
            Verdict::Scored { .. } => None,
        })
}

#[test]
fn each_filter_names_the_nodes_it_refuses() {
    let mut down = node(1, 8, 8192);
    down.state = NodeState::Down;
    let mut suspect = node(2, 8, 8192);
    suspect.state = NodeState::Suspect;
    let mut drained = node(3, 8, 8192);
    drained.schedulable = false;
    let mut unknown = node(4, 8, 8192);
    unknown.capacity = None;
    let small_cpu = node(5, 1, 8192);
    let small_mem = node(6, 8, 256);
    let mut small_disk = node(7, 8, 8192);
    small_disk.capacity = Some(NodeCapacity {
        vcpus: 8,
        memory_mib: 8192,
        disk_gib: Some(5),
    });
    let good = node(8, 8, 8192);
    let s = sched(
        vec![
            down, suspect, drained, unknown, small_cpu, small_mem, small_disk, good,
        ],
        policy(Weighing::Spread),
    );
    let mut v = vm("a", 2, 1024);
    v.disk_gib = 10;
    let d = s.decide(&v);
    assert_eq!(d.node, Some(8));
    let expect = [
        (1, FilterKind::NodeNotUp),
        (2, FilterKind::NodeNotUp),
        (3, FilterKind::Unschedulable),
        (4, FilterKind::CapacityUnknown),
        (5, FilterKind::Cpu),
        (6, FilterKind::Memory),
        (7, FilterKind::Disk),
    ];
    for (n, f) in expect {
        assert_eq!(filter_of(&d, n), Some(f), "node {n}");
    }
    assert_eq!(filter_of(&d, 8), None);
    assert_eq!(d.explanation.eligible, 1);
    assert_eq!(d.explanation.filtered.get("node_not_up"), Some(&2));
    assert_eq!(d.explanation.nodes_considered, 8);
    assert_eq!(d.explanation.truncated, 0);
}

#[test]
fn overcommit_ratios_scale_what_may_be_booked() {
    // 4 CPUs at 2.0 take 8 vCPUs; 1024 MiB at 1.5 take 1536 MiB.
    let p = Policy {
        cpu_overcommit: 2.0,
        memory_overcommit: 1.5,
        ..policy(Weighing::Pack)
    };
    let mut s = sched(vec![node(1, 4, 1024)], p);
    let placed: Vec<Option<NodeId>> = (0..5)
        .map(|i| s.place(&vm(&format!("v{i}"), 2, 128)).node)
        .collect();
    assert_eq!(placed, vec![Some(1), Some(1), Some(1), Some(1), None]);
    let d = s.decide(&vm("cpu", 1, 128));
    assert_eq!(filter_of(&d, 1), Some(FilterKind::Cpu));

    let mut s = sched(vec![node(1, 64, 1024)], p);
    assert_eq!(s.place(&vm("m1", 1, 1024)).node, Some(1));
    assert_eq!(s.place(&vm("m2", 1, 512)).node, Some(1));
    let d = s.decide(&vm("m3", 1, 1));
    assert_eq!(d.node, None);
    assert_eq!(filter_of(&d, 1), Some(FilterKind::Memory));
    match &d.explanation.verdicts[0].verdict {
        Verdict::Filtered { detail, .. } => assert_eq!(detail, "needs 1 MiB, 0 free"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn node_selector_and_required_node() {
    let mut ssd = node(2, 8, 8192);
    ssd.labels.insert("disk".into(), "ssd".into());
    ssd.labels.insert("zone".into(), "a".into());
    let s = sched(
        vec![node(1, 8, 8192), ssd, node(3, 8, 8192)],
        policy(Weighing::Spread),
    );
    let mut v = vm("a", 1, 128);
    v.constraints
        .node_selector
        .insert("disk".into(), "ssd".into());
    let d = s.decide(&v);
    assert_eq!(d.node, Some(2));
    assert_eq!(filter_of(&d, 1), Some(FilterKind::NodeSelector));
    match &d
        .explanation
        .verdicts
        .iter()
        .find(|x| x.node == 3)
        .unwrap()
        .verdict
    {
        Verdict::Filtered { detail, .. } => assert_eq!(detail, "lacks label disk=ssd"),
        other => panic!("{other:?}"),
    }

    let mut v = vm("b", 1, 128);
    v.constraints.node = Some(3);
    let d = s.decide(&v);
    assert_eq!(d.node, Some(3));
    assert_eq!(filter_of(&d, 1), Some(FilterKind::RequiredNode));
    assert_eq!(filter_of(&d, 2), Some(FilterKind::RequiredNode));

    // A required node that is full is "does not fit", never another node.
    let mut v = vm("c", 64, 128);
    v.constraints.node = Some(3);
    let d = s.decide(&v);
    assert_eq!(d.node, None);
    assert_eq!(filter_of(&d, 3), Some(FilterKind::Cpu));
}

#[test]
fn anti_affinity_is_per_tenant_and_never_shares_a_node() {
    let mut s = sched(
        (1..=3).map(|i| node(i, 8, 8192)).collect(),
        policy(Weighing::Pack),
    );
    let grouped = |id: &str, tenant: &str| {
        let mut v = vm(id, 1, 128);
        v.tenant = tenant.into();
        v.anti_affinity_group = Some("db".into());
        v
    };
    let nodes: Vec<Option<NodeId>> = ["a", "b", "c"]
        .iter()
        .map(|id| s.place(&grouped(id, "t1")).node)
        .collect();
    assert_eq!(
        nodes,
        vec![Some(1), Some(2), Some(3)],
        "pack still spreads a group"
    );
    let d = s.place(&grouped("d", "t1"));
    assert_eq!(d.node, None);
    assert_eq!(d.explanation.filtered.get("anti_affinity"), Some(&3));
    // The same group name in another tenant is another group.
    assert_eq!(s.place(&grouped("e", "t2")).node, Some(1));
}

#[test]
fn affinity_follows_the_first_member() {
    let mut s = sched(
        (1..=3).map(|i| node(i, 8, 8192)).collect(),
        policy(Weighing::Spread),
    );
    // Load node 1 so spread would avoid it.
    s.place(&vm("filler", 4, 4096));
    let mut first = vm("a", 1, 128);
    first.constraints.affinity_group = Some("web".into());
    let home = s.place(&first).node;
    assert_eq!(home, Some(2));
    for id in ["b", "c", "d"] {
        let mut v = vm(id, 1, 128);
        v.constraints.affinity_group = Some("web".into());
        let d = s.place(&v);
        assert_eq!(d.node, home);
        assert_eq!(filter_of(&d, 3), Some(FilterKind::Affinity));
    }
}

#[test]
fn spread_and_pack_weigh_nodes_oppositely() {
    let nodes = || (1..=3).map(|i| node(i, 8, 8192)).collect::<Vec<_>>();
    let vms: Vec<VmDemand> = (0..3).map(|i| vm(&format!("v{i}"), 1, 512)).collect();
    let spread: Vec<_> = sched(nodes(), policy(Weighing::Spread))
        .place_batch(&vms)
        .into_iter()
        .map(|d| d.node)
        .collect();
    assert_eq!(spread, vec![Some(1), Some(2), Some(3)]);
    let pack: Vec<_> = sched(nodes(), policy(Weighing::Pack))
        .place_batch(&vms)
        .into_iter()
        .map(|d| d.node)
        .collect();
    assert_eq!(pack, vec![Some(1), Some(1), Some(1)]);
}

#[test]
fn reported_load_breaks_a_tie_and_equal_nodes_go_to_the_lowest_id() {
    let nodes = vec![node(1, 8, 8192), node(2, 8, 8192)];
    let d = sched(nodes.clone(), policy(Weighing::Spread)).decide(&vm("a", 1, 128));
    assert_eq!(d.node, Some(1), "tie goes to the lowest id");
    let mut loads = BTreeMap::new();
    loads.insert(
        1,
        NodeLoad {
            vcpus_used: 7,
            memory_used_mib: 1000,
            running_vms: 3,
        },
    );
    let s = Scheduler::new(nodes, &loads, std::iter::empty(), policy(Weighing::Spread));
    assert_eq!(s.decide(&vm("a", 1, 128)).node, Some(2));
}

#[test]
fn already_placed_vms_count_against_their_node() {
    let placed = vm("old", 6, 1024);
    let s = Scheduler::new(
        vec![node(1, 8, 8192), node(2, 4, 8192)],
        &BTreeMap::new(),
        [(&placed, 1)],
        policy(Weighing::Spread),
    );
    let d = s.decide(&vm("a", 4, 128));
    assert_eq!(d.node, Some(2));
    assert_eq!(filter_of(&d, 1), Some(FilterKind::Cpu));
}

#[test]
fn explanations_for_a_thousand_nodes_stay_small_and_count_everything() {
    let nodes: Vec<NodeView> = (1..=1000)
        .map(|i| {
            let mut n = node(i, 16, 65536);
            if i % 3 == 0 {
                n.state = NodeState::Down;
            }
            if i % 5 == 0 {
                n.labels.insert("gpu".into(), "yes".into());
            }
            n
        })
        .collect();
    let s = sched(
        nodes,
        Policy {
            max_verdicts: 32,
            ..policy(Weighing::Spread)
        },
    );
    let mut v = vm("a", 1, 128);
    v.constraints
        .node_selector
        .insert("gpu".into(), "yes".into());
    let d = s.decide(&v);
    let e = &d.explanation;
    assert!(e.verdicts.len() <= 32, "{} verdicts", e.verdicts.len());
    assert_eq!(e.truncated as usize + e.verdicts.len(), 1000);
    let counted: u32 = e.filtered.values().sum::<u32>() + e.eligible;
    assert_eq!(counted, 1000);
    // 1..=1000: 333 multiples of 3 are down; of the rest, those not multiples of 5 lack the label.
    assert_eq!(e.filtered.get("node_not_up"), Some(&333));
    assert_eq!(e.eligible, 200 - 66);
    assert_eq!(
        e.verdicts[0].node,
        d.node.unwrap(),
        "the chosen node comes first"
    );
    // Every filter that refused some node has at least one example.
    for f in e.filtered.keys() {
        assert!(e.verdicts.iter().any(|v| matches!(&v.verdict,
            Verdict::Filtered { filter, .. } if filter.as_str() == f)));
    }
    let encoded = raft::codec::encode(e).unwrap();
    assert!(encoded.len() < 4096, "{} bytes", encoded.len());
}

// ---- property tests ----

fn seeded(cases: u32) -> Config {
    let seed = std::env::var("SCHEDULER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("scheduler property seed: {seed} (rerun with SCHEDULER_SEED={seed})");
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

fn arb_node(id: NodeId) -> impl Strategy<Value = NodeView> {
    (
        prop_oneof![8 => Just(NodeState::Up), 1 => Just(NodeState::Suspect), 1 => Just(NodeState::Down)],
        prop::bool::weighted(0.9),
        1u32..16,
        prop::sample::select(vec![512u64, 1024, 4096, 8192]),
        prop::option::weighted(0.8, 5u64..50),
        prop::bool::ANY,
        prop::bool::weighted(0.95),
    )
        .prop_map(move |(state, schedulable, vcpus, memory_mib, disk, ssd, known)| {
            let mut labels = BTreeMap::new();
            if ssd {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            NodeView {
                id,
                state,
                schedulable,
                labels,
                capacity: known.then_some(NodeCapacity {
                    vcpus,
                    memory_mib,
                    disk_gib: disk,
                }),
            }
        })
}

fn arb_nodes() -> impl Strategy<Value = Vec<NodeView>> {
    (1usize..10).prop_flat_map(|n| (1..=n as u64).map(arb_node).collect::<Vec<_>>())
}

fn arb_vm(i: usize, nodes: u64) -> impl Strategy<Value = VmDemand> {
    (
        1u32..6,
        prop::sample::select(vec![64u64, 128, 256, 512, 1024]),
        0u64..8,
        prop::option::weighted(0.1, 1..=nodes),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.4, 0u8..3),
        prop::option::weighted(0.2, 0u8..2),
        0u8..2,
    )
        .prop_map(
            move |(vcpus, memory_mib, disk_gib, required, ssd, anti, aff, tenant)| {
                let mut constraints = PlacementConstraints {
                    node: required,
                    ..Default::default()
                };
                if ssd {
                    constraints
                        .node_selector
                        .insert("disk".into(), "ssd".into());
                }
                constraints.affinity_group = aff.map(|g| format!("aff{g}"));
                VmDemand {
                    id: format!("vm{i:04}"),
                    tenant: format!("t{tenant}"),
                    vcpus,
                    memory_mib,
                    disk_gib,
                    constraints,
                    anti_affinity_group: anti.map(|g| format!("anti{g}")),
                }
            },
        )
}

fn arb_case() -> impl Strategy<Value = (Vec<NodeView>, Vec<VmDemand>, Policy)> {
    arb_nodes().prop_flat_map(|nodes| {
        let n = nodes.len() as u64;
        let vms = (0usize..40)
            .prop_flat_map(move |count| (0..count).map(|i| arb_vm(i, n)).collect::<Vec<_>>());
        let policy = (
            prop::sample::select(vec![1.0f64, 1.5, 4.0]),
            prop::sample::select(vec![1.0f64, 1.25]),
            prop_oneof![Just(Weighing::Spread), Just(Weighing::Pack)],
        )
            .prop_map(|(c, m, strategy)| Policy {
                cpu_overcommit: c,
                memory_overcommit: m,
                strategy,
                max_verdicts: 64,
            });
        (Just(nodes), vms, policy)
    })
}

proptest! {
    #![proptest_config(seeded(300))]

    #[test]
    fn placements_respect_capacity_groups_and_filters((nodes, vms, policy) in arb_case()) {
        let mut s = sched(nodes.clone(), policy);
        let decisions = s.place_batch(&vms);
        let by_id: BTreeMap<NodeId, &NodeView> = nodes.iter().map(|n| (n.id, n)).collect();
        let mut used: BTreeMap<NodeId, (u64, u64, u64)> = BTreeMap::new();
        let mut anti: BTreeMap<(String, String), Vec<NodeId>> = BTreeMap::new();
        let mut aff: BTreeMap<(String, String), Vec<NodeId>> = BTreeMap::new();
        for (vm, d) in vms.iter().zip(&decisions) {
            let Some(n) = d.node else { continue };
            let node = by_id[&n];
            prop_assert_eq!(node.state, NodeState::Up);
            prop_assert!(node.schedulable);
            prop_assert!(vm.constraints.node.is_none_or(|r| r == n));
            for (k, v) in &vm.constraints.node_selector {
                prop_assert_eq!(node.labels.get(k), Some(v));
            }
            let u = used.entry(n).or_default();
            u.0 += u64::from(vm.vcpus);
            u.1 += vm.memory_mib;
            u.2 += vm.disk_gib;
            if let Some(g) = &vm.anti_affinity_group {
                anti.entry((vm.tenant.clone(), g.clone())).or_default().push(n);
            }
            if let Some(g) = &vm.constraints.affinity_group {
                aff.entry((vm.tenant.clone(), g.clone())).or_default().push(n);
            }
        }
        for (n, (cpu, mem, disk)) in &used {
            let cap = by_id[n].capacity.expect("placed only on nodes with a capacity");
            prop_assert!(*cpu <= (f64::from(cap.vcpus) * policy.cpu_overcommit).floor() as u64,
                "node {} booked {} vCPUs of {}", n, cpu, cap.vcpus);
            prop_assert!(*mem <= (cap.memory_mib as f64 * policy.memory_overcommit).floor() as u64);
            if let Some(d) = cap.disk_gib {
                prop_assert!(*disk <= d);
            }
        }
        for (g, placed) in &anti {
            let mut sorted = placed.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), placed.len(), "anti-affinity group {:?} shares a node", g);
        }
        for (g, placed) in &aff {
            prop_assert!(placed.iter().all(|n| *n == placed[0]), "affinity group {:?} split", g);
        }
    }

    #[test]
    fn explanations_agree_with_decisions((nodes, vms, policy) in arb_case()) {
        let mut s = sched(nodes.clone(), policy);
        for vm in &vms {
            let d = s.place(vm);
            let e = &d.explanation;
            prop_assert_eq!(e.chosen, d.node);
            prop_assert_eq!(e.nodes_considered as usize, nodes.len());
            prop_assert_eq!(e.verdicts.len(), nodes.len(), "small clusters are explained in full");
            prop_assert_eq!(e.filtered.values().sum::<u32>() + e.eligible, e.nodes_considered);
            let scored: Vec<(u32, NodeId)> = e.verdicts.iter().filter_map(|v| match v.verdict {
                Verdict::Scored { score } => Some((score, v.node)),
                Verdict::Filtered { .. } => None,
            }).collect();
            prop_assert_eq!(scored.len() as u32, e.eligible);
            match d.node {
                None => prop_assert!(scored.is_empty()),
                Some(n) => {
                    let best = scored.iter().map(|(s, _)| *s).max();
                    let winner = scored.iter().filter(|(s, _)| Some(*s) == best).map(|(_, id)| *id).min();
                    prop_assert_eq!(winner, Some(n), "the chosen node has the best score, lowest id on ties");
                }
            }
        }
    }

    #[test]
    fn a_batch_equals_the_same_vms_placed_one_by_one((nodes, vms, policy) in arb_case()) {
        let batch = sched(nodes.clone(), policy).place_batch(&vms);
        // One by one: a fresh scheduler each time, built from the placements so far, as the
        // controller would after each commit.
        let mut placed: Vec<(VmDemand, NodeId)> = Vec::new();
        for (vm, from_batch) in vms.iter().zip(&batch) {
            let s = Scheduler::new(
                nodes.clone(),
                &BTreeMap::new(),
                placed.iter().map(|(v, n)| (v, *n)),
                policy,
            );
            let d = s.decide(vm);
            prop_assert_eq!(&d, from_batch);
            if let Some(n) = d.node {
                placed.push((vm.clone(), n));
            }
        }
    }
}
