//! attach_disk and detach_disk decisions, against `FakeHost`.

use serde_json::{json, Value};

use super::attach::{attach_disk, detach_disk};
use super::disk::create_disk;
use crate::error::{CpiError, ErrorKind};
use crate::host::fake::FakeHost;
use crate::log::Logger;
use crate::names::{self, holder_name, lock_name};

const VM: &str = "vm-0d8e4c4e-6f37-4d4b-9e51-4c1f1f2b9a10";
const OTHER_VM: &str = "vm-7b2f0a11-3c44-4e55-8a66-9d7700bb1122";

fn log() -> Logger {
    Logger::new(None, "test")
}

fn disk(host: &FakeHost, cp: Value) -> String {
    let cp = cp.as_object().cloned().unwrap_or_default();
    let v = create_disk(host, &mut log(), 1, &cp, None).expect("create_disk");
    v.as_str().unwrap().to_string()
}

fn attach(host: &FakeHost, vm: &str, d: &str) -> crate::error::Result<Value> {
    attach_disk(host, &mut log(), vm, d)
}

fn detach(host: &FakeHost, vm: &str, d: &str) -> crate::error::Result<Value> {
    detach_disk(host, &mut log(), vm, d)
}

fn serials(devices: &[crate::host::DiskDevice]) -> Vec<String> {
    devices.iter().filter_map(|d| d.serial.clone()).collect()
}

#[test]
fn attach_to_a_shut_off_vm_changes_its_definition_and_records_the_holder() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, false, vec![FakeHost::disk_device("", "vda")]);
    assert_eq!(attach(&host, VM, &d).unwrap(), json!({"path": "/dev/vdb"}));
    let vm = host.vm(VM).unwrap();
    assert_eq!(serials(&vm.config), vec!["".to_string(), d.clone()]);
    assert!(vm.live.is_empty());
    assert_eq!(host.json(&holder_name(&d)).unwrap(), json!({ "vm": VM }));
    assert!(!host.lock_exists(&lock_name(&d)));
    // The record names the VM before the device is there (a kill in between
    // leaves a record that only costs a lookup, never an unrecorded holder).
    let calls = host.calls();
    let recorded = calls
        .iter()
        .position(|c| *c == format!("write_json {}", holder_name(&d)));
    let attached = calls
        .iter()
        .position(|c| c.starts_with("attach_disk_device"));
    assert!(recorded.is_some() && recorded < attached, "{calls:?}");
}

#[test]
fn attach_to_a_running_vm_hot_plugs_and_keeps_it_in_the_definition() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    attach(&host, VM, &d).unwrap();
    let vm = host.vm(VM).unwrap();
    assert_eq!(
        (serials(&vm.live), serials(&vm.config)),
        (vec![d.clone()], vec![d.clone()])
    );
}

#[test]
fn attach_again_keeps_the_target_and_changes_nothing() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    let first = attach(&host, VM, &d).unwrap();
    let calls = host.calls().len();
    assert_eq!(attach(&host, VM, &d).unwrap(), first);
    assert!(!host.calls()[calls..]
        .iter()
        .any(|c| c.starts_with("attach_disk_device")));
}

#[test]
fn a_scsi_disks_hint_is_its_by_id_link() {
    let host = FakeHost::new();
    let d = disk(&host, json!({"bus": "scsi"}));
    host.put_vm(VM, false, vec![]);
    let hint = attach(&host, VM, &d).unwrap();
    assert_eq!(hint["path"], json!(crate::settings::scsi_by_id(&d)));
    assert_eq!(host.vm(VM).unwrap().config[0].target, "sda");
}

#[test]
fn attach_refuses_a_disk_held_by_another_vm_naming_it() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, false, vec![]);
    host.put_vm(OTHER_VM, true, vec![FakeHost::disk_device(&d, "vdb")]);
    host.put_json(&holder_name(&d), &json!({ "vm": OTHER_VM }));
    let e = attach(&host, VM, &d).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(e.message.contains(OTHER_VM), "{}", e.message);
    assert!(host.vm(VM).unwrap().config.is_empty());
    assert_eq!(
        host.json(&holder_name(&d)).unwrap(),
        json!({ "vm": OTHER_VM })
    );
}

#[test]
fn attach_types_what_is_missing() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    let e = attach(&host, "vm-x", &d).unwrap_err();
    assert_eq!(e.kind, ErrorKind::VmNotFound);
    assert!(
        host.calls().iter().all(|c| !c.contains("vm-x")),
        "no lookup of a non-CID"
    );
    assert_eq!(
        attach(&host, VM, &d).unwrap_err().kind,
        ErrorKind::VmNotFound
    );
    host.put_vm(VM, false, vec![]);
    let absent = names::new_disk_cid();
    assert_eq!(
        attach(&host, VM, &absent).unwrap_err().kind,
        ErrorKind::DiskNotFound
    );
}

#[test]
fn attach_refuses_a_disk_without_record_that_the_host_probes_as_qcow2() {
    let host = FakeHost::new();
    let d = names::new_disk_cid();
    host.put_volume(&d, 1 << 20, "qcow2", b"");
    host.put_vm(VM, false, vec![]);
    let e = attach(&host, VM, &d).unwrap_err();
    assert!(e.message.contains("refusing to guess"), "{}", e.message);
    assert!(host.vm(VM).unwrap().config.is_empty());
}

#[test]
fn attach_removes_what_a_killed_hot_plug_left_and_tries_again() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    host.fail_next(
        "attach_disk_device",
        CpiError::cloud("Duplicate ID 'drive-virtio-disk1'"),
    );
    host.put_orphans(VM, "node libvirt-5-storage");
    attach(&host, VM, &d).unwrap();
    assert!(host
        .calls()
        .contains(&format!("remove_orphan_block_nodes {VM}")));
    assert_eq!(serials(&host.vm(VM).unwrap().live), vec![d]);
}

#[test]
fn attach_whose_hot_plug_fails_without_leftovers_fails() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    host.fail_next("attach_disk_device", CpiError::cloud("no"));
    let e = attach(&host, VM, &d).unwrap_err();
    assert_eq!(e.message, "no");
    // A lost connection says nothing about QEMU: not even looked at.
    host.fail_next(
        "attach_disk_device",
        CpiError::cloud("Cannot recv data").retryable(true),
    );
    let calls = host.calls().len();
    assert!(attach(&host, VM, &d).unwrap_err().ok_to_retry);
    assert!(!host.calls()[calls..]
        .iter()
        .any(|c| c.starts_with("remove_orphan")));
}

#[test]
fn detach_removes_the_device_everywhere_and_the_holder_record() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    attach(&host, VM, &d).unwrap();
    assert_eq!(detach(&host, VM, &d).unwrap(), Value::Null);
    let vm = host.vm(VM).unwrap();
    assert!(vm.live.is_empty() && vm.config.is_empty());
    assert!(!host.exists(&holder_name(&d)) && !host.lock_exists(&lock_name(&d)));
}

#[test]
fn detach_of_what_is_not_attached_is_disk_not_attached() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    for (vm, disk) in [("vm-x", d.as_str()), (VM, "disk-x"), (VM, d.as_str())] {
        let e = detach(&host, vm, disk).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DiskNotAttached, "{vm} {disk}");
        assert_eq!(e.kind.bosh_type(), "Bosh::Clouds::DiskNotAttached");
    }
    host.put_vm(VM, false, vec![]);
    // A record a killed detach left naming this VM goes with the answer.
    host.put_json(&holder_name(&d), &json!({ "vm": VM }));
    assert_eq!(
        detach(&host, VM, &d).unwrap_err().kind,
        ErrorKind::DiskNotAttached
    );
    assert!(!host.exists(&holder_name(&d)));
}

#[test]
fn detach_keeps_a_holder_record_that_names_another_vm() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, false, vec![]);
    host.put_json(&holder_name(&d), &json!({ "vm": OTHER_VM }));
    assert_eq!(
        detach(&host, VM, &d).unwrap_err().kind,
        ErrorKind::DiskNotAttached
    );
    assert_eq!(
        host.json(&holder_name(&d)).unwrap(),
        json!({ "vm": OTHER_VM })
    );
}

#[test]
fn detach_of_a_deleted_disk_still_finds_it_by_serial() {
    let host = FakeHost::new();
    let d = names::new_disk_cid();
    host.put_vm(VM, false, vec![FakeHost::disk_device(&d, "vdb")]);
    detach(&host, VM, &d).unwrap();
    assert!(host.vm(VM).unwrap().config.is_empty());
}

#[test]
fn detach_removes_what_a_killed_hot_plug_left_in_qemu() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![]);
    host.put_orphans(VM, "device virtio-disk1");
    assert_eq!(detach(&host, VM, &d).unwrap(), Value::Null);
    // QEMU that cannot be asked (not retryable) leaves the answer DiskNotAttached.
    host.fail_next("remove_orphan_block_nodes", CpiError::cloud("no monitor"));
    assert_eq!(
        detach(&host, VM, &d).unwrap_err().kind,
        ErrorKind::DiskNotAttached
    );
    host.fail_next(
        "remove_orphan_block_nodes",
        CpiError::cloud("guest has not released it").retryable(true),
    );
    assert!(detach(&host, VM, &d).unwrap_err().ok_to_retry);
}

#[test]
fn detach_first_ends_a_copy_nobody_watches() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    let mut dev = FakeHost::disk_device(&d, "vdb");
    dev.mirror_ready = Some(true);
    host.put_vm(VM, true, vec![dev]);
    detach(&host, VM, &d).unwrap();
    let calls = host.calls();
    let ended = calls
        .iter()
        .position(|c| c.starts_with("end_abandoned_copy"));
    let unplugged = calls.iter().position(|c| c.starts_with("detach_disk_live"));
    assert!(ended.is_some() && ended < unplugged, "{calls:?}");
}

#[test]
fn attach_reads_the_disk_record_once() {
    let host = FakeHost::new();
    let d = disk(&host, json!({}));
    host.put_vm(VM, true, vec![FakeHost::disk_device("", "vda")]);
    let before = host.calls().len();
    attach(&host, VM, &d).unwrap();
    let calls = &host.calls()[before..];
    let count = |call: &str| calls.iter().filter(|c| *c == call).count();
    // Format, options and whether the holder is recorded all come from it;
    // every read of a record is a lookup, a size and a download on libvirt.
    assert_eq!(
        count(&format!("read_json {}", names::marker_name(&d))),
        1,
        "{calls:?}"
    );
}
