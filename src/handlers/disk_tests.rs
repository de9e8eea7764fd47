//! The disk and snapshot handlers' decisions, against `FakeHost`: hermetic,
//! milliseconds. What libvirt itself does is proven by tests/disk.rs.

use serde_json::{json, Value};

use super::disk::{
    create_disk, delete_disk, get_disks, has_disk, resize_disk, set_disk_metadata, update_disk,
};
use super::snapshot::{delete_snapshot, snapshot_disk};
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::fake::{FakeHost, POOL};
use crate::host::{DiskHost, MIB};
use crate::log::Logger;
use crate::method::{Method, Object};
use crate::names::{self, holder_name, lock_name, marker_name, tags_name};

const VM: &str = "vm-0d8e4c4e-6f37-4d4b-9e51-4c1f1f2b9a10";
const OTHER_VM: &str = "vm-7b2f0a11-3c44-4e55-8a66-9d7700bb1122";

fn log() -> Logger {
    Logger::new(None, "test")
}

fn obj(v: Value) -> Object {
    v.as_object().cloned().unwrap_or_default()
}

fn create(host: &FakeHost, size_mib: u64, cp: Value) -> Result<String> {
    create_disk(host, &mut log(), size_mib, &obj(cp), None).map(|v| v.as_str().unwrap().into())
}

/// A disk as create_disk makes it (volume and record), and the call log cleared of it.
fn made_disk(host: &FakeHost, size_mib: u64) -> String {
    create(host, size_mib, json!({})).expect("create_disk")
}

fn err(r: Result<Value>) -> CpiError {
    r.expect_err("an error")
}

fn sidecars(cid: &str) -> [String; 3] {
    [marker_name(cid), tags_name(cid), holder_name(cid)]
}

// ---- has_disk -----------------------------------------------------------------

#[test]
fn has_disk_of_a_non_cid_is_false_without_touching_the_host() {
    let host = FakeHost::new();
    host.put_volume("../etc/passwd", 1, "raw", b"");
    for s in [
        "",
        "../etc/passwd",
        "disk-0123456789ABCDE",
        "vm-1",
        "disk-1.meta",
    ] {
        assert_eq!(has_disk(&host, s).unwrap(), json!(false), "{s}");
    }
    assert!(host.calls().is_empty(), "{:?}", host.calls());
}

#[test]
fn has_disk_says_whether_the_volume_exists() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    assert_eq!(has_disk(&host, &cid).unwrap(), json!(true));
    assert_eq!(
        has_disk(&host, &names::new_disk_cid()).unwrap(),
        json!(false)
    );
}

#[test]
fn has_disk_reports_a_host_failure_instead_of_false() {
    let host = FakeHost::new();
    let lost = CpiError::cloud("Cannot recv data").retryable(true);
    host.fail_next("volume_exists", lost.clone());
    assert_eq!(err(has_disk(&host, &names::new_disk_cid())), lost);
}

// ---- create_disk ----------------------------------------------------------------

#[test]
fn create_disk_makes_the_volume_and_its_record() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 64);
    assert!(names::is_disk_cid(&cid));
    assert_eq!(host.names(), vec![cid.clone(), marker_name(&cid)]);
    let facts = host.facts(&cid).unwrap();
    assert_eq!(
        (facts.capacity, facts.format.as_deref()),
        (64 * MIB, Some("qcow2"))
    );
    let record = host.json(&marker_name(&cid)).unwrap();
    assert_eq!(record["format"], "qcow2");
    assert_eq!(record["size_mib"], 64);
    assert_eq!(record["holder_record"], true);
    assert_eq!(
        record["cache"], "none",
        "persistent disks default to cache none"
    );
    let raw = create(&host, 1, json!({"format": "raw", "bus": "scsi"})).unwrap();
    let record = host.json(&marker_name(&raw)).unwrap();
    assert_eq!(
        (record["format"].clone(), record["bus"].clone()),
        (json!("raw"), json!("scsi"))
    );
    assert_eq!(host.facts(&raw).unwrap().format.as_deref(), Some("raw"));
}

#[test]
fn create_disk_without_room_is_no_disk_space_and_leaves_nothing() {
    let host = FakeHost::new();
    host.set_available(10 * MIB);
    let e = create(&host, 11, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace);
    assert!(!e.ok_to_retry);
    assert!(e.message.contains("has 10 MiB free"), "{}", e.message);
    assert!(e.message.contains(POOL), "{}", e.message);
    assert!(host.names().is_empty());
    assert!(!host.calls().iter().any(|c| c.starts_with("create")));
    // Exactly the free space fits.
    made_disk(&host, 10);
}

/// libvirt's last count of free space decides a "yes" (a recount re-reads
/// every volume of the pool); a "no" is recounted before it refuses.
#[test]
fn create_disk_recounts_free_space_only_to_refuse() {
    let recounts = |host: &FakeHost| {
        host.calls()
            .iter()
            .filter(|c| c.starts_with("available_bytes") && c.contains("recount"))
            .count()
    };
    let host = FakeHost::new();
    host.set_available(10 * MIB);
    host.set_counted(20 * MIB);
    made_disk(&host, 15);
    assert_eq!(recounts(&host), 0, "{:?}", host.calls());

    let host = FakeHost::new();
    host.set_counted(5 * MIB);
    made_disk(&host, 15);
    assert_eq!(recounts(&host), 1, "space freed since the last count");

    // Exactly the recounted free space fits.
    let host = FakeHost::new();
    host.set_available(15 * MIB);
    host.set_counted(5 * MIB);
    made_disk(&host, 15);

    let host = FakeHost::new();
    host.set_available(10 * MIB);
    host.set_counted(5 * MIB);
    let e = create(&host, 11, json!({})).unwrap_err();
    assert!(
        e.message.contains("has 10 MiB free"),
        "the recounted figure: {}",
        e.message
    );
    assert_eq!(recounts(&host), 1);
}

#[test]
fn create_disk_of_an_absurd_size_is_no_disk_space_before_the_host() {
    let host = FakeHost::new();
    let e = create(&host, u64::MAX / 2, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace);
    assert!(host.calls().is_empty());
}

#[test]
fn create_disk_refuses_bad_cloud_properties_before_the_host() {
    let host = FakeHost::new();
    for cp in [
        json!({"format": "vmdk"}),
        json!({"format": 1}),
        json!({"source_snapshot": 5}),
        json!({"bus": "ide"}),
    ] {
        let e = create(&host, 1, cp.clone()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::CloudError, "{cp}");
    }
    assert!(host.calls().is_empty());
    // Unknown keys are only warned about.
    made_disk(&host, 1);
    create(&host, 1, json!({"color": "blue"})).unwrap();
}

#[test]
fn create_disk_whose_record_fails_deletes_the_volume() {
    let host = FakeHost::new();
    host.fail_next(
        "write_json",
        CpiError::new(ErrorKind::NoDiskSpace, "pool full"),
    );
    let e = create(&host, 1, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace, "the type survives");
    assert!(
        e.message.starts_with("recording disk disk-"),
        "{}",
        e.message
    );
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn create_disk_passes_a_retryable_host_failure_on() {
    let host = FakeHost::new();
    host.fail_next(
        "create_volume",
        CpiError::cloud("Cannot recv data").retryable(true),
    );
    let e = create(&host, 1, json!({})).unwrap_err();
    assert!(e.ok_to_retry);
    assert!(host.names().is_empty());
}

fn made_snapshot(host: &FakeHost, disk: &str, capacity: u64) -> String {
    let snap = names::new_snapshot_cid(disk);
    host.put_volume(&snap, capacity, "qcow2", b"");
    host.put_json(&marker_name(&snap), &json!({"disk_cid": disk}));
    snap
}

#[test]
fn create_disk_from_a_snapshot_grows_the_copy_to_the_size_asked() {
    let host = FakeHost::new();
    let snap = made_snapshot(&host, &names::new_disk_cid(), 2 * MIB);
    let cid = create(&host, 5, json!({"source_snapshot": snap})).unwrap();
    assert_eq!(host.facts(&cid).unwrap().capacity, 5 * MIB);
    assert_eq!(
        host.json(&marker_name(&cid)).unwrap()["source_snapshot"],
        json!(snap)
    );
    assert!(host.exists(&snap), "the snapshot stays");
}

#[test]
fn create_disk_from_a_missing_or_larger_snapshot_fails_and_leaves_nothing() {
    let host = FakeHost::new();
    let disk = names::new_disk_cid();
    let missing = names::new_snapshot_cid(&disk);
    let e = create(&host, 5, json!({ "source_snapshot": missing })).unwrap_err();
    assert!(e.message.contains("not found"), "{}", e.message);
    // A snapshot volume without its marker is no snapshot.
    host.put_volume(&missing, MIB, "qcow2", b"");
    assert!(create(&host, 5, json!({ "source_snapshot": missing })).is_err());
    let big = made_snapshot(&host, &disk, 8 * MIB);
    let e = create(&host, 5, json!({ "source_snapshot": big })).unwrap_err();
    assert!(e.message.contains("more than the 5 MiB"), "{}", e.message);
    assert!(!host.names().iter().any(|n| names::is_disk_cid(n)));
}

#[test]
fn create_disk_from_a_snapshot_deletes_a_copy_it_cannot_grow() {
    let host = FakeHost::new();
    let snap = made_snapshot(&host, &names::new_disk_cid(), MIB);
    host.fail_next("resize_volume", CpiError::cloud("no"));
    assert!(create(&host, 5, json!({ "source_snapshot": snap })).is_err());
    assert!(!host.names().iter().any(|n| names::is_disk_cid(n)));
}

#[test]
fn create_disk_refuses_a_snapshot_that_is_not_a_plain_qcow2() {
    let host = FakeHost::new();
    let snap = made_snapshot(&host, &names::new_disk_cid(), MIB);
    host.set_probed_format(&snap, "raw");
    let e = create(&host, 5, json!({ "source_snapshot": snap })).unwrap_err();
    assert!(e.message.contains("not the plain qcow2"), "{}", e.message);
}

/// The sweep lists the whole pool: create_disk runs it at most once per
/// UNRECORDED_SWEEP_EVERY_SECS, whichever process claims it first.
#[test]
fn create_disk_sweeps_at_most_every_ten_minutes() {
    let host = FakeHost::new();
    let listings = |host: &FakeHost| {
        host.calls()
            .iter()
            .filter(|c| c.starts_with("volume_names_with_prefix"))
            .count()
    };
    made_disk(&host, 1);
    assert_eq!(listings(&host), 1);
    host.advance_clock(9.0 * 60.0);
    made_disk(&host, 1);
    assert_eq!(listings(&host), 1, "swept again within ten minutes");
    host.advance_clock(2.0 * 60.0);
    made_disk(&host, 1);
    assert_eq!(listings(&host), 2);
}

#[test]
fn create_disk_sweeps_only_old_unknown_unrecorded_disks() {
    let host = FakeHost::new();
    let old = |name: &str| host.set_mtime(name, 0.0);
    let orphan = names::new_disk_cid(); // old, no record: swept
    host.put_volume(&orphan, MIB, "qcow2", b"");
    old(&orphan);
    let tagged = names::new_disk_cid(); // the director knew it
    host.put_volume(&tagged, MIB, "qcow2", b"");
    host.put_json(&tags_name(&tagged), &json!({"metadata": {}}));
    old(&tagged);
    let recorded = names::new_disk_cid(); // complete
    host.put_volume(&recorded, MIB, "qcow2", b"");
    host.put_json(&marker_name(&recorded), &json!({"format": "qcow2"}));
    old(&recorded);
    let attached = names::new_disk_cid(); // in a VM
    host.put_volume(&attached, MIB, "qcow2", b"");
    old(&attached);
    host.put_vm(VM, false, vec![FakeHost::disk_device(&attached, "vdb")]);
    host.advance_clock(3600.0);
    let fresh = names::new_disk_cid(); // maybe being made right now
    host.put_volume(&fresh, MIB, "qcow2", b"");
    host.advance_clock(60.0);

    let cid = made_disk(&host, 1);
    assert!(!host.exists(&orphan));
    for kept in [&tagged, &recorded, &fresh, &attached, &cid] {
        assert!(host.exists(kept), "{kept}");
    }
}

#[test]
fn create_disk_survives_a_failing_sweep() {
    let host = FakeHost::new();
    host.fail_next(
        "volume_names_with_prefix",
        CpiError::cloud("listing failed"),
    );
    let cid = made_disk(&host, 1);
    assert!(host.exists(&marker_name(&cid)));
}

// ---- delete_disk ----------------------------------------------------------------

#[test]
fn delete_disk_of_a_non_cid_does_nothing_and_never_asks_the_host() {
    let host = FakeHost::new();
    assert_eq!(delete_disk(&host, &mut log(), "../x").unwrap(), Value::Null);
    assert!(host.calls().is_empty());
}

#[test]
fn delete_disk_removes_the_disk_its_sidecars_and_its_lock() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    set_disk_metadata(&host, &mut log(), &cid, &obj(json!({"a": "b"}))).unwrap();
    assert_eq!(delete_disk(&host, &mut log(), &cid).unwrap(), Value::Null);
    assert!(host.names().is_empty(), "{:?}", host.names());
    assert!(!host.lock_exists(&lock_name(&cid)));
}

#[test]
fn delete_disk_of_an_absent_disk_succeeds_and_still_removes_sidecars() {
    let host = FakeHost::new();
    let cid = names::new_disk_cid();
    for s in sidecars(&cid) {
        host.put_json(&s, &json!({}));
    }
    host.put_lock(&lock_name(&cid), b"");
    delete_disk(&host, &mut log(), &cid).unwrap();
    assert!(host.names().is_empty(), "{:?}", host.names());
    assert!(!host.lock_exists(&lock_name(&cid)));
    // and again, with nothing there at all
    delete_disk(&host, &mut log(), &cid).unwrap();
}

#[test]
fn delete_disk_refuses_while_attached_naming_the_vm() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    host.put_json(&holder_name(&cid), &json!({ "vm": VM }));
    host.put_vm(VM, true, vec![FakeHost::disk_device(&cid, "vdb")]);
    let e = err(delete_disk(&host, &mut log(), &cid));
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(!e.ok_to_retry);
    assert!(e.message.contains(VM), "{}", e.message);
    assert!(e.message.contains("detach it first"), "{}", e.message);
    assert!(host.exists(&cid) && host.exists(&marker_name(&cid)));
    assert!(!host.lock_exists(&lock_name(&cid)), "the lock is released");
    // Its holder record is trusted: no scan of every VM.
    assert!(!host.calls().iter().any(|c| c.starts_with("disk_holders")));
}

#[test]
fn delete_disk_of_an_older_disk_scans_every_vm() {
    let host = FakeHost::new();
    let cid = names::new_disk_cid(); // no record: made before holder records
    host.put_volume(&cid, MIB, "raw", b"");
    host.put_vm(OTHER_VM, false, vec![FakeHost::disk_device(&cid, "vdc")]);
    let e = err(delete_disk(&host, &mut log(), &cid));
    assert!(e.message.contains(OTHER_VM), "{}", e.message);
    assert!(host.exists(&cid));
}

#[test]
fn delete_disk_with_an_unreadable_holder_record_scans_every_vm() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    // A holder record whose write was killed half-way.
    host.put_volume(&holder_name(&cid), 4096, "raw", b"{\"vm\": \"vm-");
    host.put_vm(OTHER_VM, true, vec![FakeHost::disk_device(&cid, "vdb")]);
    let e = err(delete_disk(&host, &mut log(), &cid));
    assert!(e.message.contains(OTHER_VM), "{}", e.message);
    assert!(host.calls().iter().any(|c| c.starts_with("disk_holders")));
    assert!(host.exists(&cid));
}

#[test]
fn delete_disk_ignores_a_stale_holder_record() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    // The record names a VM that no longer holds the disk (a killed detach).
    host.put_json(&holder_name(&cid), &json!({ "vm": VM }));
    host.put_vm(VM, true, vec![]);
    delete_disk(&host, &mut log(), &cid).unwrap();
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn delete_disk_removes_the_lock_a_dead_call_left() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    // Made on another boot long ago: its call is dead.
    let dead = "another-boot:1:1:0";
    assert_eq!(
        crate::creator::Creator::parse(dead).map(|c| c.liveness()),
        Some(crate::creator::Liveness::Dead)
    );
    host.put_lock(&lock_name(&cid), dead.as_bytes());
    delete_disk(&host, &mut log(), &cid).unwrap();
    assert!(host.names().is_empty(), "{:?}", host.names());
    assert!(!host.lock_exists(&lock_name(&cid)));
}

// ---- resize_disk ----------------------------------------------------------------

#[test]
fn resize_disk_shrink_is_not_supported_and_same_size_is_a_no_op() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 10);
    let e = err(resize_disk(&host, &mut log(), &cid, 9));
    assert_eq!(e.kind, ErrorKind::NotSupported);
    assert_eq!(e.kind.bosh_type(), "Bosh::Clouds::NotSupported");
    assert_eq!(
        resize_disk(&host, &mut log(), &cid, 10).unwrap(),
        Value::Null
    );
    assert!(!host.calls().iter().any(|c| c.starts_with("resize_volume")));
    assert_eq!(host.facts(&cid).unwrap().capacity, 10 * MIB);
}

#[test]
fn resize_disk_grows_within_the_free_space_only() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 10);
    host.set_available(5 * MIB);
    let e = err(resize_disk(&host, &mut log(), &cid, 16));
    assert_eq!(e.kind, ErrorKind::NoDiskSpace);
    assert_eq!(host.facts(&cid).unwrap().capacity, 10 * MIB);
    resize_disk(&host, &mut log(), &cid, 15).unwrap();
    assert_eq!(host.facts(&cid).unwrap().capacity, 15 * MIB);
}

#[test]
fn resize_disk_of_an_absent_disk_is_disk_not_found() {
    let host = FakeHost::new();
    for cid in [names::new_disk_cid(), "not-a-disk".to_string()] {
        let e = err(resize_disk(&host, &mut log(), &cid, 1));
        assert_eq!(e.kind, ErrorKind::DiskNotFound, "{cid}");
        assert_eq!(e.kind.bosh_type(), "Bosh::Clouds::DiskNotFound");
    }
}

#[test]
fn resize_disk_refuses_while_attached() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    host.put_json(&holder_name(&cid), &json!({ "vm": VM }));
    host.put_vm(VM, false, vec![FakeHost::disk_device(&cid, "vdb")]);
    let e = err(resize_disk(&host, &mut log(), &cid, 2));
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(e.message.contains(VM), "{}", e.message);
    assert_eq!(host.facts(&cid).unwrap().capacity, MIB);
}

#[test]
fn resize_disk_refuses_a_disk_the_host_now_probes_otherwise() {
    let host = FakeHost::new();
    let cid = create(&host, 1, json!({"format": "raw"})).unwrap();
    // The guest wrote a qcow2 header into its raw disk.
    host.set_probed_format(&cid, "qcow2");
    let e = err(resize_disk(&host, &mut log(), &cid, 2));
    assert!(e.message.contains("created as raw"), "{}", e.message);
    assert_eq!(host.facts(&cid).unwrap().capacity, MIB);
}

#[test]
fn update_disk_is_not_supported() {
    let e = err(update_disk(&mut log(), "disk-0f3a9c21b7e54d8"));
    assert_eq!(e.kind, ErrorKind::NotSupported);
}

// ---- set_disk_metadata ---------------------------------------------------------------

#[test]
fn set_disk_metadata_replaces_the_tags_record() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    set_disk_metadata(&host, &mut log(), &cid, &obj(json!({"a": "1", "b": "2"}))).unwrap();
    set_disk_metadata(&host, &mut log(), &cid, &obj(json!({"c": "3"}))).unwrap();
    assert_eq!(
        host.json(&tags_name(&cid)).unwrap()["metadata"],
        json!({"c": "3"})
    );
    // Written anew, never into the old volume (an upload into an existing
    // volume makes libvirt re-read the whole pool).
    let calls = host.calls();
    let tags = tags_name(&cid);
    let last_write = calls
        .iter()
        .rposition(|c| *c == format!("write_json {tags}"));
    let last_delete = calls
        .iter()
        .rposition(|c| *c == format!("delete_volume {tags}"));
    assert!(
        last_delete < last_write && last_delete.is_some(),
        "{calls:?}"
    );
}

#[test]
fn set_disk_metadata_of_an_absent_disk_is_disk_not_found_and_writes_nothing() {
    let host = FakeHost::new();
    let cid = names::new_disk_cid();
    let e = err(set_disk_metadata(&host, &mut log(), &cid, &Object::new()));
    assert_eq!(e.kind, ErrorKind::DiskNotFound);
    assert!(host.names().is_empty());
}

#[test]
fn set_disk_metadata_keeps_the_type_of_a_failed_write() {
    let host = FakeHost::new();
    let cid = made_disk(&host, 1);
    host.fail_next_on(
        "write_json",
        &tags_name(&cid),
        CpiError::new(ErrorKind::NoDiskSpace, "full"),
    );
    let e = err(set_disk_metadata(&host, &mut log(), &cid, &Object::new()));
    assert_eq!(e.kind, ErrorKind::NoDiskSpace);
    assert!(
        e.message.starts_with("storing metadata of disk"),
        "{}",
        e.message
    );
}

#[test]
fn set_disk_metadata_with_a_nul_is_refused_before_any_handler() {
    let args = [json!("disk-0f3a9c21b7e54d8"), json!({"k": "a\u{0}b"})];
    let e = Method::parse("set_disk_metadata", &args).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CpiError);
    assert!(e.message.contains("U+0000"), "{}", e.message);
}

// ---- get_disks ----------------------------------------------------------------

#[test]
fn get_disks_lists_persistent_disks_only_once_each() {
    let host = FakeHost::new();
    let (a, b) = (names::new_disk_cid(), names::new_disk_cid());
    let mut root = FakeHost::disk_device("", "vda");
    root.serial = None;
    let mut ephemeral = FakeHost::disk_device("", "vdb");
    ephemeral.serial = Some("ephemeral".into());
    host.put_vm(
        VM,
        true,
        vec![
            root,
            ephemeral,
            FakeHost::disk_device(&a, "vdc"),
            FakeHost::disk_device(&b, "vdd"),
        ],
    );
    assert_eq!(get_disks(&host, VM).unwrap(), json!([a, b]));
}

#[test]
fn get_disks_of_an_unknown_vm_is_vm_not_found() {
    let host = FakeHost::new();
    let e = err(get_disks(&host, "vm-../x"));
    assert_eq!(e.kind, ErrorKind::VmNotFound);
    assert!(host.calls().is_empty());
    let e = err(get_disks(&host, VM));
    assert_eq!(e.kind.bosh_type(), "Bosh::Clouds::VMNotFound");
}

// ---- snapshot_disk ----------------------------------------------------------------

fn snapshot(host: &FakeHost, disk: &str) -> Result<String> {
    snapshot_disk(host, &mut log(), disk, &obj(json!({"why": "test"})))
        .map(|v| v.as_str().unwrap().to_string())
}

#[test]
fn snapshot_disk_of_a_detached_disk_is_an_exact_copy_with_a_record() {
    let host = FakeHost::new();
    let disk = create(&host, 3, json!({"format": "raw"})).unwrap();
    let snap = snapshot(&host, &disk).unwrap();
    assert!(names::is_snapshot_cid(&snap) && snap.starts_with(&names::snapshots_of(&disk)));
    let facts = host.facts(&snap).unwrap();
    assert_eq!(
        (facts.format.as_deref(), facts.capacity),
        (Some("qcow2"), 3 * MIB)
    );
    let record = host.json(&marker_name(&snap)).unwrap();
    assert_eq!(record["disk_cid"], json!(disk));
    assert_eq!(record["disk_format"], "raw");
    assert_eq!(record["metadata"], json!({"why": "test"}));
    assert!(record["consistency"].as_str().unwrap().starts_with("exact"));
    assert!(!host.calls().iter().any(|c| c.starts_with("live_copy")));
}

#[test]
fn snapshot_disk_of_an_absent_disk_is_disk_not_found() {
    let host = FakeHost::new();
    let e = snapshot(&host, &names::new_disk_cid()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::DiskNotFound);
    assert!(host.names().is_empty());
}

#[test]
fn snapshot_disk_refuses_to_let_the_host_read_a_relabelled_raw_disk() {
    let host = FakeHost::new();
    let disk = create(&host, 1, json!({"format": "raw"})).unwrap();
    host.set_probed_format(&disk, "qcow2");
    let e = snapshot(&host, &disk).unwrap_err();
    assert!(e.message.contains("created as raw"), "{}", e.message);
    assert!(!host.names().iter().any(|n| names::is_snapshot_cid(n)));
}

#[test]
fn snapshot_disk_of_a_disk_in_a_running_vm_copies_through_the_vm() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 2);
    host.put_json(&holder_name(&disk), &json!({ "vm": VM }));
    host.put_vm(VM, true, vec![FakeHost::disk_device(&disk, "vdb")]);
    let snap = snapshot(&host, &disk).unwrap();
    assert!(host.calls().contains(&format!("live_copy {VM}")));
    let record = host.json(&marker_name(&snap)).unwrap();
    let consistency = record["consistency"].as_str().unwrap();
    assert!(consistency.starts_with("crash-consistent") && consistency.contains(VM));
    // In a VM that is shut off, the copy is exact.
    host.put_vm(VM, false, vec![FakeHost::disk_device(&disk, "vdb")]);
    let snap = snapshot(&host, &disk).unwrap();
    let record = host.json(&marker_name(&snap)).unwrap();
    assert!(record["consistency"].as_str().unwrap().starts_with("exact"));
}

#[test]
fn snapshot_disk_whose_live_copy_fails_leaves_no_snapshot() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 2);
    host.put_json(&holder_name(&disk), &json!({ "vm": VM }));
    host.put_vm(VM, true, vec![FakeHost::disk_device(&disk, "vdb")]);
    host.fail_next("live_copy", CpiError::cloud("made no progress for 60 s"));
    let e = snapshot(&host, &disk).unwrap_err();
    assert!(
        e.message.starts_with(&format!("snapshotting disk {disk}")),
        "{}",
        e.message
    );
    assert!(
        !host.names().iter().any(|n| n.starts_with("snap-")),
        "{:?}",
        host.names()
    );
}

#[test]
fn snapshot_disk_whose_record_fails_leaves_no_snapshot() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 1);
    host.fail_next("write_json", CpiError::new(ErrorKind::NoDiskSpace, "full"));
    let e = snapshot(&host, &disk).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace);
    assert!(
        !host.names().iter().any(|n| n.starts_with("snap-")),
        "{:?}",
        host.names()
    );
    assert!(host.exists(&disk));
}

#[test]
fn snapshot_disk_first_ends_the_copy_a_killed_snapshot_left() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 1);
    let left = names::new_snapshot_cid(&disk);
    host.put_volume(&left, MIB, "qcow2", b"");
    host.put_json(&holder_name(&disk), &json!({ "vm": VM }));
    let mut dev = FakeHost::disk_device(&disk, "vdb");
    dev.mirror_ready = Some(true);
    dev.mirror_path = Some(format!("/{POOL}/{left}"));
    host.put_vm(VM, true, vec![dev]);
    let snap = snapshot(&host, &disk).unwrap();
    assert!(!host.exists(&left), "the unfinished copy is deleted");
    assert!(host.exists(&snap) && host.exists(&marker_name(&snap)));
    let calls = host.calls();
    let ended = calls
        .iter()
        .position(|c| c.starts_with("end_abandoned_copy"));
    let copied = calls.iter().position(|c| c.starts_with("live_copy"));
    assert!(ended.is_some() && ended < copied, "{calls:?}");
}

#[test]
fn snapshot_disk_sweeps_old_unfinished_snapshots_of_the_same_disk_only() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 1);
    let other = made_disk(&host, 1);
    let unfinished = names::new_snapshot_cid(&disk);
    let others = names::new_snapshot_cid(&other);
    let complete = made_snapshot(&host, &disk, MIB);
    for s in [&unfinished, &others] {
        host.put_volume(s, MIB, "qcow2", b"");
    }
    for s in [&unfinished, &others, &complete] {
        host.set_mtime(s, 0.0);
    }
    host.advance_clock(3600.0);
    snapshot(&host, &disk).unwrap();
    assert!(!host.exists(&unfinished));
    assert!(host.exists(&others) && host.exists(&complete));
}

// ---- delete_snapshot ----------------------------------------------------------------

#[test]
fn delete_snapshot_removes_the_marker_first() {
    let host = FakeHost::new();
    let snap = made_snapshot(&host, &names::new_disk_cid(), MIB);
    delete_snapshot(&host, &mut log(), &snap).unwrap();
    assert!(host.names().is_empty());
    let deletes: Vec<String> = host
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("delete_volume"))
        .collect();
    assert_eq!(
        deletes,
        [
            format!("delete_volume {}", marker_name(&snap)),
            format!("delete_volume {snap}")
        ]
    );
}

#[test]
fn delete_snapshot_of_an_absent_or_non_snapshot_succeeds() {
    let host = FakeHost::new();
    let disk = made_disk(&host, 1);
    // A disk CID is no snapshot CID: its volume is never touched.
    delete_snapshot(&host, &mut log(), &disk).unwrap();
    assert!(host.calls().iter().all(|c| !c.contains("delete_volume")));
    assert!(host.exists(&disk));
    delete_snapshot(&host, &mut log(), &names::new_snapshot_cid(&disk)).unwrap();
}

#[test]
fn delete_snapshot_after_a_half_delete_removes_the_rest() {
    let host = FakeHost::new();
    let snap = made_snapshot(&host, &names::new_disk_cid(), MIB);
    host.fail_next_on(
        "delete_volume",
        &snap,
        CpiError::cloud("lost").retryable(true),
    );
    let e = err(delete_snapshot(&host, &mut log(), &snap));
    assert!(e.ok_to_retry);
    assert_eq!(host.names(), vec![snap.clone()], "the marker went first");
    delete_snapshot(&host, &mut log(), &snap).unwrap();
    assert!(host.names().is_empty());
}

// ---- the typed records helpers -------------------------------------------------

#[test]
fn an_unreadable_record_is_an_error_and_an_absent_one_none() {
    let host = FakeHost::new();
    let h: &dyn DiskHost = &host;
    host.put_volume("torn.meta", 4096, "raw", b"{\"form");
    assert!(h
        .read_record::<crate::records::DiskRecord>("torn.meta")
        .is_err());
    assert_eq!(h.read_record::<Value>("absent.meta").unwrap(), None);
    assert!(!h.has_valid_marker("torn").unwrap());
    host.put_volume("zeros.meta", 4096, "raw", &[0; 16]);
    assert!(!h.has_valid_marker("zeros").unwrap());
}
