//! delete_vm, has_vm, reboot_vm and set_vm_metadata decisions against
//! `FakeHost`: what goes and what stays, idempotence, not-found typing.

use std::time::Duration;

use serde_json::{json, Value};

use super::delete::delete_vm;
use super::ops::{has_vm, reboot_vm, set_vm_metadata};
use super::test_support::*;
use crate::error::{CpiError, ErrorKind};
use crate::host::fake::FakeHost;
use crate::host::{NicRecord, VmMetadata};
use crate::names;

/// A VM as create_vm makes it (manual IP 10.0.16.10, ephemeral disk), the
/// call log cleared of its making.
fn made_vm(host: &FakeHost) -> String {
    let out = create_with(
        host,
        manual("10.0.16.10"),
        json!({"ephemeral_disk": 64}),
        Some(3),
    )
    .expect("create_vm");
    out[0].as_str().unwrap().to_string()
}

fn volumes_of(host: &FakeHost, vm: &str) -> Vec<String> {
    let prefix = names::volumes_of_vm(vm);
    host.names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

// ---- delete_vm --------------------------------------------------------------------

#[test]
fn delete_vm_removes_the_domain_every_volume_and_the_reservation() {
    let host = fake();
    let vm = made_vm(&host);
    assert_eq!(volumes_of(&host, &vm).len(), 3);
    let mut l = log();
    assert_eq!(delete_vm(&host, &mut l, &vm).unwrap(), Value::Null);
    assert!(host.domain(&vm).is_none());
    assert_eq!(volumes_of(&host, &vm), Vec::<String>::new());
    assert_eq!(host.reservations(NET), vec![]);
    assert_eq!(l.take_summary().trim_end(), format!("deleted {vm}"));
}

#[test]
fn delete_vm_is_idempotent() {
    let host = fake();
    let vm = made_vm(&host);
    delete_vm(&host, &mut log(), &vm).unwrap();
    let mut l = log();
    assert_eq!(delete_vm(&host, &mut l, &vm).unwrap(), Value::Null);
    assert_eq!(
        l.take_summary().trim_end(),
        format!("{vm} was already gone; leftovers swept")
    );
}

#[test]
fn delete_vm_removes_a_reservation_recorded_under_another_name() {
    let host = fake();
    // An older CPI's entry: named otherwise, but recorded in the VM's metadata.
    let old = entry("02:00:00:00:00:07", "host-7", "10.0.16.7");
    host.put_reservation(NET, old.clone());
    host.put_domain(
        VM,
        true,
        VmMetadata {
            networks: vec![NicRecord {
                network: "private".into(),
                kind: "manual".into(),
                libvirt_network: Some(NET.into()),
                mac: old.mac.clone(),
                ip: old.ip.clone(),
                dhcp_host: old.name.clone(),
            }],
            ..Default::default()
        },
    );
    let other = entry("02:00:00:00:00:08", OTHER_VM, "10.0.16.8");
    host.put_reservation(NET, other.clone());
    delete_vm(&host, &mut log(), VM).unwrap();
    assert_eq!(host.reservations(NET), vec![other]);
}

#[test]
fn delete_vm_of_an_unknown_vm_sweeps_its_leftovers_and_succeeds() {
    let host = fake();
    host.put_volume(&names::root_volume(VM), 1, "qcow2", b"");
    host.put_reservation(NET, entry("02:00:00:00:00:01", VM, "10.0.16.10"));
    host.put_reservation(
        NET,
        entry("02:00:00:00:00:02", &format!("{VM}-1"), "10.0.16.11"),
    );
    delete_vm(&host, &mut log(), VM).unwrap();
    assert_eq!(volumes_of(&host, VM), Vec::<String>::new());
    assert_eq!(host.reservations(NET), vec![]);

    let unknown = names::new_vm_cid();
    assert_eq!(delete_vm(&host, &mut log(), &unknown).unwrap(), Value::Null);
}

#[test]
fn delete_vm_of_a_non_cid_touches_nothing() {
    let host = fake();
    host.put_volume("vm-1-root", 1, "raw", b"");
    for s in ["", "vm-1", "../x", "disk-0123456789abcde"] {
        assert_eq!(delete_vm(&host, &mut log(), s).unwrap(), Value::Null, "{s}");
    }
    assert!(host.calls().is_empty(), "{:?}", host.calls());
    assert!(host.exists("vm-1-root"));
}

#[test]
fn delete_vm_never_deletes_a_persistent_disk_a_stemcell_or_another_vms_volume() {
    let host = fake();
    let vm = made_vm(&host);
    let disk = names::new_disk_cid();
    host.put_volume(&disk, 1, "raw", b"");
    host.put_volume(&names::root_volume(OTHER_VM), 1, "qcow2", b"");
    delete_vm(&host, &mut log(), &vm).unwrap();
    for kept in [disk, names::root_volume(OTHER_VM), SC.to_string()] {
        assert!(host.exists(&kept), "{kept}");
    }
}

#[test]
fn delete_vm_fails_when_a_volume_stays() {
    let host = fake();
    let vm = made_vm(&host);
    let root = names::root_volume(&vm);
    host.fail_next_on("delete_volume", &root, CpiError::cloud("deleting: busy"));
    let e = delete_vm(&host, &mut log(), &vm).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(
        e.message.contains("busy") && e.message.contains(&format!("volumes still there: {root}")),
        "{}",
        e.message
    );
    // The retry BOSH makes finishes the job.
    delete_vm(&host, &mut log(), &vm).unwrap();
    assert_eq!(volumes_of(&host, &vm), Vec::<String>::new());
}

#[test]
fn delete_vm_fails_when_the_domain_cannot_be_removed() {
    let host = fake();
    let vm = made_vm(&host);
    host.fail_next("undefine_vm", CpiError::cloud("undefining: busy"));
    let e = delete_vm(&host, &mut log(), &vm).unwrap_err();
    assert!(e.message.contains("undefining: busy"), "{}", e.message);
    assert!(host.domain(&vm).is_some());
}

#[test]
fn delete_vm_fails_when_the_reservations_cannot_be_looked_at() {
    let host = fake();
    let vm = made_vm(&host);
    host.fail_next("release_all", CpiError::cloud("listing networks: busy"));
    let e = delete_vm(&host, &mut log(), &vm).unwrap_err();
    assert!(
        e.message.contains("listing networks: busy"),
        "{}",
        e.message
    );
}

// ---- has_vm, reboot_vm, set_vm_metadata ----------------------------------------

#[test]
fn has_vm_says_whether_the_domain_is_defined() {
    let host = fake();
    let vm = made_vm(&host);
    assert_eq!(has_vm(&host, &vm).unwrap(), json!(true));
    host.put_domain(OTHER_VM, false, VmMetadata::default());
    assert_eq!(has_vm(&host, OTHER_VM).unwrap(), json!(true), "stopped");
    assert_eq!(has_vm(&host, &names::new_vm_cid()).unwrap(), json!(false));
}

#[test]
fn has_vm_of_a_non_cid_is_false_without_a_lookup_and_a_host_failure_is_an_error() {
    let host = fake();
    host.put_domain("web", true, VmMetadata::default());
    assert_eq!(has_vm(&host, "web").unwrap(), json!(false));
    assert!(host.calls().is_empty());
    host.fail_next("vm_exists", CpiError::cloud("connection reset"));
    let e = has_vm(&host, VM).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CloudError);
}

#[test]
fn reboot_and_metadata_of_an_unknown_vm_are_vm_not_found() {
    let host = fake();
    let grace = Duration::from_secs(1);
    let md = obj(json!({"name": "web/0"}));
    for vm in ["not-a-cid", VM] {
        let e = reboot_vm(&host, &mut log(), vm, grace).unwrap_err();
        assert_eq!(e.kind, ErrorKind::VmNotFound, "{vm}");
        let e = set_vm_metadata(&host, &mut log(), vm, &md).unwrap_err();
        assert_eq!(e.kind, ErrorKind::VmNotFound, "{vm}");
    }
    assert!(
        !host.calls().iter().any(|c| c.ends_with("not-a-cid")),
        "{:?}",
        host.calls()
    );
}

#[test]
fn reboot_of_a_stopped_vm_starts_it() {
    let host = fake();
    host.put_domain(VM, false, VmMetadata::default());
    let mut l = log();
    reboot_vm(&host, &mut l, VM, Duration::from_secs(1)).unwrap();
    assert!(host.domain(VM).unwrap().running);
    assert_eq!(
        l.take_summary().trim_end(),
        format!("{VM} was shut off: started")
    );
}

#[test]
fn set_vm_metadata_replaces_the_tags_keeps_the_rest_and_sets_a_title() {
    let host = fake();
    let vm = made_vm(&host);
    let before = host.domain(&vm).unwrap().metadata;
    set_vm_metadata(&host, &mut log(), &vm, &obj(json!({"old": "x"}))).unwrap();
    set_vm_metadata(
        &host,
        &mut log(),
        &vm,
        &obj(json!({"job": "web", "index": 0, "deployment": "d"})),
    )
    .unwrap();
    let d = host.domain(&vm).unwrap();
    assert_eq!(
        d.metadata.tags,
        vec![
            ("deployment".to_string(), "d".to_string()),
            ("index".to_string(), "0".to_string()),
            ("job".to_string(), "web".to_string())
        ]
    );
    assert_eq!(d.metadata.networks, before.networks);
    assert_eq!(d.metadata.agent_id, "agent-1");
    assert_eq!(d.title.as_deref(), Some("web/0"));
}
