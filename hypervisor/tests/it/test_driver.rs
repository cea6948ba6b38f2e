//! The libvirt driver against libvirt's in-process test driver (`test:///default`): a real
//! libvirt connection over a fake hypervisor. Every connection in this process shares one
//! default test host, so each test uses its own VM ids and only looks at its own domains.

use std::sync::Arc;
use std::time::Duration;

use hypervisor::{
    domain_name, DomainState, DomainType, Hypervisor, HypervisorError, LibvirtConfig,
    LibvirtHypervisor, ShutdownOutcome,
};

use crate::tiny_spec;

const URI: &str = "test:///default";

async fn hv() -> LibvirtHypervisor {
    LibvirtHypervisor::connect(URI).await.unwrap()
}

#[tokio::test]
async fn full_life_cycle() {
    let hv = hv().await;
    let spec = tiny_spec("life", 1);
    let name = spec.domain_name();
    assert_eq!(hv.state(&name).await.unwrap(), None);

    hv.define(&spec).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Shutoff));

    hv.start(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Running));
    // Starting an active domain is a no-op, so a retried reconcile step is harmless.
    hv.start(&name).await.unwrap();

    hv.pause(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Paused));
    hv.resume(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Running));

    hv.reboot(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Running));

    let outcome = hv.shutdown(&name, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::Graceful);
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Shutoff));
    let outcome = hv.shutdown(&name, Duration::from_secs(10)).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::AlreadyOff);

    hv.start(&name).await.unwrap();
    hv.destroy(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), Some(DomainState::Shutoff));
    hv.destroy(&name).await.unwrap();

    hv.undefine(&name).await.unwrap();
    assert_eq!(hv.state(&name).await.unwrap(), None);
}

#[tokio::test]
async fn list_reports_our_domains_with_their_epoch() {
    let hv = hv().await;
    let a = tiny_spec("list-a", 5);
    let b = tiny_spec("list-b", 6);
    hv.define(&a).await.unwrap();
    hv.define(&b).await.unwrap();
    hv.start(&b.domain_name()).await.unwrap();

    let all = hv.list().await.unwrap();
    let find = |n: &str| all.iter().find(|d| d.name == n).cloned();
    let la = find(&a.domain_name()).expect("list-a listed");
    let lb = find(&b.domain_name()).expect("list-b listed");
    assert_eq!(la.epoch, Some(5));
    assert_eq!(
        la.owner.as_deref(),
        Some("cluster-a/1"),
        "the owner is read back"
    );
    assert_eq!(la.state, DomainState::Shutoff);
    assert_eq!(la.uuid, a.uuid.to_string());
    assert_eq!(lb.epoch, Some(6));
    assert_eq!(lb.state, DomainState::Running);
    // The test host's own domain was not defined by us: no epoch, and not one of our names.
    let foreign = find("test").expect("the test driver's default domain");
    assert_eq!(foreign.epoch, None);
    assert_eq!(hypervisor::vm_id_of("test"), None);

    hv.destroy(&b.domain_name()).await.unwrap();
    for s in [&a, &b] {
        hv.undefine(&s.domain_name()).await.unwrap();
    }
}

#[tokio::test]
async fn redefining_updates_the_epoch_read_back() {
    let hv = hv().await;
    let mut spec = tiny_spec("epoch", 1);
    let name = spec.domain_name();
    hv.define(&spec).await.unwrap();
    spec.epoch = 2;
    hv.define(&spec).await.unwrap();
    let info = hv
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap();
    assert_eq!(info.epoch, Some(2));
    hv.undefine(&name).await.unwrap();
}

#[tokio::test]
async fn missing_domains_are_not_found() {
    let hv = hv().await;
    let name = domain_name("does-not-exist");
    assert_eq!(hv.state(&name).await.unwrap(), None);
    for result in [
        hv.start(&name).await,
        hv.destroy(&name).await,
        hv.reboot(&name).await,
        hv.pause(&name).await,
        hv.resume(&name).await,
        hv.undefine(&name).await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, HypervisorError::NotFound { .. }),
            "expected NotFound, got {err:?}"
        );
    }
    let err = hv.stats(&name).await.unwrap_err();
    assert!(matches!(err, HypervisorError::NotFound { .. }), "{err:?}");
    let err = hv
        .shutdown(&name, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn another_uuid_under_the_same_name_is_refused() {
    let hv = hv().await;
    let spec = tiny_spec("clash", 1);
    hv.define(&spec).await.unwrap();
    let mut other = spec.clone();
    other.uuid = uuid::Uuid::new_v4();
    let err = hv.define(&other).await.unwrap_err();
    assert!(
        matches!(err, HypervisorError::AlreadyExists { .. }),
        "expected AlreadyExists, got {err:?}"
    );
    // The same UUID under another name is a clash too.
    let mut renamed = spec.clone();
    renamed.vm_id = "clash-renamed".into();
    let err = hv.define(&renamed).await.unwrap_err();
    assert!(
        matches!(err, HypervisorError::AlreadyExists { .. }),
        "expected AlreadyExists, got {err:?}"
    );
    hv.undefine(&spec.domain_name()).await.unwrap();
}

#[tokio::test]
async fn invalid_specs_are_refused_before_libvirt() {
    let hv = hv().await;
    let mut spec = tiny_spec("bad", 1);
    spec.vcpus = 0;
    assert!(matches!(
        hv.define(&spec).await.unwrap_err(),
        HypervisorError::Invalid { .. }
    ));
    let mut spec = tiny_spec("bad/../x", 1);
    spec.vcpus = 1;
    assert!(matches!(
        hv.define(&spec).await.unwrap_err(),
        HypervisorError::Invalid { .. }
    ));
    let mut spec = tiny_spec("bad-mac", 1);
    spec.nics[0].mac = "not-a-mac".into();
    assert!(matches!(
        hv.define(&spec).await.unwrap_err(),
        HypervisorError::Invalid { .. }
    ));
}

#[tokio::test]
async fn stats_of_a_running_domain() {
    let hv = hv().await;
    let spec = tiny_spec("stats", 1);
    let name = spec.domain_name();
    hv.define(&spec).await.unwrap();
    let off = hv.stats(&name).await.unwrap();
    assert_eq!(off.memory_bytes, 128 * 1024 * 1024);
    assert_eq!(off.disk_read_bytes, 0);

    hv.start(&name).await.unwrap();
    let on = hv.stats(&name).await.unwrap();
    assert_eq!(on.vcpus, 2);
    assert_eq!(on.max_memory_bytes, 128 * 1024 * 1024);
    // The test driver invents counters; what matters is that every device was asked.
    assert!(on.disk_read_bytes > 0 && on.disk_write_bytes > 0, "{on:?}");
    assert!(on.net_rx_bytes > 0 && on.net_tx_bytes > 0, "{on:?}");
    hv.destroy(&name).await.unwrap();
    hv.undefine(&name).await.unwrap();
}

#[tokio::test]
async fn capabilities_detect_or_obey_the_override() {
    // The test driver offers no kvm domain capabilities, so detection must fall back to TCG.
    let hv = hv().await;
    let caps = hv.capabilities().await.unwrap();
    assert_eq!(caps.domain_type, DomainType::Qemu, "{caps:?}");
    assert!(caps.cpus > 0 && caps.memory_mib > 0, "{caps:?}");

    let mut config = LibvirtConfig::new(URI);
    config.kvm_device = "/nonexistent/kvm".into();
    let caps = LibvirtHypervisor::connect_with(config)
        .await
        .unwrap()
        .capabilities()
        .await
        .unwrap();
    assert_eq!(caps.domain_type, DomainType::Qemu);
    assert!(caps.reason.contains("/nonexistent/kvm"), "{}", caps.reason);

    let mut config = LibvirtConfig::new(URI);
    config.force_domain_type = Some(DomainType::Kvm);
    let caps = LibvirtHypervisor::connect_with(config)
        .await
        .unwrap()
        .capabilities()
        .await
        .unwrap();
    assert_eq!(caps.domain_type, DomainType::Kvm);
    assert!(caps.reason.contains("forced"), "{}", caps.reason);
}

#[tokio::test]
async fn a_bad_uri_is_unavailable_at_connect() {
    let err = LibvirtHypervisor::connect("bogus+nothing:///nowhere")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test]
async fn the_test_driver_has_no_console_and_says_so() {
    let hv = hv().await;
    let spec = tiny_spec("console", 1);
    let name = spec.domain_name();
    hv.define(&spec).await.unwrap();
    hv.start(&name).await.unwrap();
    let err = hv
        .console(&name)
        .await
        .err()
        .expect("no console on the test driver");
    assert!(matches!(err, HypervisorError::Operation { .. }), "{err:?}");
    hv.destroy(&name).await.unwrap();
    hv.undefine(&name).await.unwrap();
}

/// The node holds the driver as `Arc<dyn Hypervisor>` and calls it from many tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_use_through_a_trait_object() {
    let hv: Arc<dyn Hypervisor> = Arc::new(hv().await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let hv = Arc::clone(&hv);
        tasks.push(tokio::spawn(async move {
            let spec = tiny_spec(&format!("conc-{i}"), i);
            let name = spec.domain_name();
            hv.define(&spec).await?;
            hv.start(&name).await?;
            let state = hv.state(&name).await?;
            hv.destroy(&name).await?;
            hv.undefine(&name).await?;
            Ok::<_, HypervisorError>(state)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Some(DomainState::Running));
    }
}
