//! The stemcell handlers' decisions, against `FakeHost`: hermetic,
//! milliseconds. What libvirt itself does is proven by tests/stemcell.rs
//! (and the stemcells VMs boot from by tests/reliability.rs).

use std::path::PathBuf;

use serde_json::{json, Value};

use super::stemcell::{create_stemcell, SPACE_MARGIN};
use super::stemcell_delete::delete_stemcell;
use super::stemcell_sweep::{sweep_partial_imports, PARTIAL_MAX_AGE_SECS};
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::fake::FakeHost;
use crate::host::DiskHost;
use crate::log::Logger;
use crate::method::Object;
use crate::names::{marker_name, new_stemcell_cid, new_vm_cid, root_volume};

fn log() -> Logger {
    Logger::new(None, "test")
}

fn obj(v: Value) -> Object {
    v.as_object().cloned().unwrap_or_default()
}

/// A bare raw image file (what create_stemcell accepts besides a tarball),
/// removed when dropped.
struct Image {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Image {
    /// Data, a run of zeros long enough to be sent as a hole, data.
    fn raw() -> Image {
        let mut bytes = vec![b'x'; 192 << 10];
        bytes.extend(vec![0u8; 256 << 10]);
        bytes.extend(vec![b'y'; 64 << 10]);
        Image::of(bytes)
    }

    fn of(bytes: Vec<u8>) -> Image {
        let path = std::env::temp_dir().join(format!("stemcell-test-{}.img", new_stemcell_cid()));
        std::fs::write(&path, &bytes).expect("writing the test image");
        Image { path, bytes }
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The bytes that are not zeros: what a sparse upload takes from the pool.
    fn data_bytes(&self) -> u64 {
        self.bytes.iter().filter(|b| **b != 0).count() as u64
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn create(host: &FakeHost, image: &Image, cp: Value) -> Result<String> {
    create_stemcell(host, &mut log(), image.path.to_str().unwrap(), &obj(cp))
        .map(|v| v.as_str().expect("a CID").to_string())
}

fn delete(host: &FakeHost, cid: &str) -> Result<Value> {
    delete_stemcell(host, &mut log(), cid)
}

/// A stemcell as an earlier create_stemcell left it: image and marker.
fn put_stemcell(host: &FakeHost) -> String {
    let cid = new_stemcell_cid();
    host.put_volume(&cid, 1 << 30, "qcow2", b"QFI\xfb");
    host.put_json(
        &marker_name(&cid),
        &json!({"format": "qcow2", "stemcell_cid": cid}),
    );
    cid
}

/// A VM's root disk on stemcell `cid`.
fn boot_from(host: &FakeHost, cid: &str) -> String {
    let vm = new_vm_cid();
    host.put_overlay(&root_volume(&vm), cid);
    vm
}

fn stemcell_volumes(host: &FakeHost) -> Vec<String> {
    host.names()
        .into_iter()
        .filter(|n| n.starts_with("sc-"))
        .collect()
}

fn no_space(message: &str) -> CpiError {
    CpiError::new(ErrorKind::NoDiskSpace, message)
}

// ---- create_stemcell ------------------------------------------------------------

#[test]
fn create_uploads_the_image_then_writes_its_marker() {
    let host = FakeHost::new();
    let image = Image::raw();
    let cid = create(&host, &image, json!({"name": "bosh-stemcell"})).unwrap();
    assert_eq!(host.data(&cid).unwrap(), image.bytes);
    let facts = host.facts(&cid).unwrap();
    assert_eq!(facts.format.as_deref(), Some("raw"));
    assert_eq!(
        (facts.capacity, facts.physical),
        (image.size(), image.size())
    );
    let marker = host.json(&marker_name(&cid)).unwrap();
    assert_eq!(marker["format"], "raw");
    assert_eq!(marker["image_size"], image.size());
    assert_eq!(marker["stemcell_cid"], cid.as_str());
    assert_eq!(marker["cloud_properties"]["name"], "bosh-stemcell");
    let calls = host.calls();
    let at = |op: &str| calls.iter().position(|c| c.starts_with(op)).unwrap();
    assert!(at("available_bytes") < at("create_volume "), "{calls:?}");
    assert!(at("finish_upload") < at("create_volume_with"), "{calls:?}");
}

#[test]
fn a_raw_image_is_uploaded_sparse() {
    let host = FakeHost::new();
    let image = Image::raw();
    let free = 100 << 30;
    create(&host, &image, json!({})).unwrap();
    let used = free - host.available_bytes(true).unwrap();
    assert_eq!(used, image.data_bytes(), "the zeros went as a hole");
}

#[test]
fn a_hostile_or_broken_image_is_refused_before_anything_is_made() {
    let host = FakeHost::new();
    let image = Image::of(vec![b'x'; 1000]);
    let e = create(&host, &image, json!({})).unwrap_err();
    assert!(e.message.contains("512-byte sectors"), "{}", e.message);
    assert!(host.calls().is_empty(), "{:?}", host.calls());
}

#[test]
fn a_declared_format_the_image_does_not_have_is_refused() {
    let host = FakeHost::new();
    let image = Image::raw();
    let e = create(&host, &image, json!({"disk_format": "qcow2"})).unwrap_err();
    assert!(
        e.message.contains("declares disk_format 'qcow2'"),
        "{}",
        e.message
    );
    assert!(host.names().is_empty());
}

#[test]
fn a_full_pool_is_no_disk_space_before_any_volume_is_made() {
    let host = FakeHost::new();
    let image = Image::raw();
    host.set_available(image.size() + SPACE_MARGIN - 1);
    let e = create(&host, &image, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace, "{}", e.message);
    assert!(!e.ok_to_retry);
    assert!(host.names().is_empty());
    assert!(!host.calls().iter().any(|c| c.starts_with("create_volume")));
    // With the margin to spare it fits.
    host.set_available(image.size() + SPACE_MARGIN);
    create(&host, &image, json!({})).unwrap();
}

#[test]
fn an_upload_failing_mid_stream_is_undone() {
    let host = FakeHost::new();
    let image = Image::raw();
    host.fail_upload_after(100 << 10, CpiError::cloud("the stream broke"));
    let e = create(&host, &image, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(!e.ok_to_retry);
    assert!(
        e.message
            .starts_with("uploading stemcell image to volume sc-")
            && e.message.ends_with("the stream broke"),
        "{}",
        e.message
    );
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn a_pool_filling_up_during_the_upload_is_no_disk_space_and_undone() {
    let host = FakeHost::new();
    let image = Image::raw();
    host.fail_upload_after(300 << 10, no_space("No space left on device"));
    let e = create(&host, &image, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace, "{}", e.message);
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn an_upload_the_host_does_not_confirm_is_undone() {
    let host = FakeHost::new();
    let image = Image::raw();
    host.fail_next("finish_upload", CpiError::cloud("stream finish failed"));
    let e = create(&host, &image, json!({})).unwrap_err();
    assert!(e.message.ends_with("stream finish failed"), "{}", e.message);
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn an_import_the_host_cannot_verify_is_undone_and_gets_no_marker() {
    let host = FakeHost::new();
    let image = Image::raw();
    // The first read of the new volume is the sweep's clock, the second the check.
    host.fail_next("volume", CpiError::cloud("no clock"));
    host.fail_next("volume", CpiError::cloud("volume XML unreadable"));
    let e = create(&host, &image, json!({})).unwrap_err();
    assert!(
        e.message.starts_with("verifying volume sc-")
            && e.message.ends_with("volume XML unreadable"),
        "{}",
        e.message
    );
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn a_marker_that_does_not_read_back_undoes_the_import_as_no_disk_space() {
    let host = FakeHost::new();
    let image = Image::raw();
    // What the host's write-and-read-back reports on a full pool.
    host.fail_next(
        "create_volume_with",
        no_space("the volume does not read back what was written"),
    );
    let e = create(&host, &image, json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoDiskSpace, "{}", e.message);
    assert!(!e.ok_to_retry);
    assert!(host.names().is_empty(), "{:?}", host.names());
}

#[test]
fn a_failed_undo_is_told_and_leaves_no_marker() {
    let host = FakeHost::new();
    let image = Image::raw();
    host.fail_upload_after(1, CpiError::cloud("the stream broke"));
    host.fail_next("delete_volume", CpiError::cloud("libvirtd went away"));
    let e = create(&host, &image, json!({})).unwrap_err();
    assert!(e.message.contains("the stream broke"), "{}", e.message);
    assert!(
        e.message.contains("removing the partial volume failed too"),
        "{}",
        e.message
    );
    let left = stemcell_volumes(&host);
    assert!(
        left.iter().all(|n| !n.ends_with(".meta")),
        "a marker would make the partial image a stemcell: {left:?}"
    );
}

// ---- delete_stemcell ------------------------------------------------------------

#[test]
fn delete_removes_the_marker_then_the_image() {
    let host = FakeHost::new();
    let cid = put_stemcell(&host);
    assert_eq!(delete(&host, &cid).unwrap(), Value::Null);
    assert!(host.names().is_empty());
    let calls = host.calls();
    let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(
        at(&format!("delete_volume {}", marker_name(&cid))) < at(&format!("delete_volume {cid}")),
        "{calls:?}"
    );
}

#[test]
fn delete_of_a_stemcell_a_vm_boots_from_is_refused_and_keeps_it_whole() {
    let host = FakeHost::new();
    let cid = put_stemcell(&host);
    let marker = host.json(&marker_name(&cid)).unwrap();
    let vm = boot_from(&host, &cid);
    let e = delete(&host, &cid).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CloudError);
    assert!(!e.ok_to_retry);
    assert!(
        e.message
            .contains(&format!("it backs the root disk of {vm}")),
        "{}",
        e.message
    );
    assert!(host.exists(&cid));
    assert_eq!(host.json(&marker_name(&cid)), Some(marker));
    assert!(
        !host.calls().iter().any(|c| c.starts_with("delete_volume")),
        "the marker was never touched: {:?}",
        host.calls()
    );
}

#[test]
fn delete_puts_the_marker_back_when_a_vm_was_made_on_the_stemcell_meanwhile() {
    let host = FakeHost::new();
    let cid = put_stemcell(&host);
    let marker = host.json(&marker_name(&cid)).unwrap();
    let vm = new_vm_cid();
    host.overlay_after_next_scan(&root_volume(&vm), &cid);
    let e = delete(&host, &cid).unwrap_err();
    assert!(e.message.contains(&vm), "{}", e.message);
    assert!(host.exists(&cid));
    assert_eq!(host.json(&marker_name(&cid)), Some(marker));
}

#[test]
fn delete_is_idempotent() {
    let host = FakeHost::new();
    let cid = put_stemcell(&host);
    delete(&host, &cid).unwrap();
    assert_eq!(delete(&host, &cid).unwrap(), Value::Null);
    assert_eq!(delete(&host, &new_stemcell_cid()).unwrap(), Value::Null);
}

#[test]
fn delete_of_a_name_that_is_no_stemcell_cid_touches_nothing() {
    let host = FakeHost::new();
    host.put_volume("sc-not-a-uuid", 1, "raw", b"");
    for cid in [
        "",
        "sc-not-a-uuid",
        "vm-1",
        "../sc-x",
        "disk-0123456789abcde",
    ] {
        assert_eq!(delete(&host, cid).unwrap(), Value::Null, "{cid}");
    }
    assert!(host.calls().is_empty(), "{:?}", host.calls());
    assert!(host.exists("sc-not-a-uuid"));
}

#[test]
fn delete_of_a_marker_without_its_image_removes_the_marker() {
    let host = FakeHost::new();
    let cid = new_stemcell_cid();
    host.put_json(&marker_name(&cid), &json!({"format": "raw"}));
    delete(&host, &cid).unwrap();
    assert!(host.names().is_empty());
}

#[test]
fn delete_that_cannot_tell_the_users_deletes_nothing() {
    let host = FakeHost::new();
    let cid = put_stemcell(&host);
    host.fail_next("volumes_backed_by", CpiError::cloud("listing failed"));
    let e = delete(&host, &cid).unwrap_err();
    assert!(e.message.contains("listing failed"));
    assert!(host.exists(&cid) && host.exists(&marker_name(&cid)));
}

// ---- the sweep of killed imports --------------------------------------------------

/// Sweeps as an import whose volume was created now does.
fn sweep_now(host: &FakeHost) -> String {
    let own = new_stemcell_cid();
    host.put_volume(&own, 1 << 20, "raw", b"");
    sweep_partial_imports(host, &mut log(), &own);
    own
}

const OLD: f64 = PARTIAL_MAX_AGE_SECS + 60.0;

#[test]
fn the_sweep_removes_old_partial_imports_only() {
    let host = FakeHost::new();
    let old_partial = new_stemcell_cid();
    host.put_volume(&old_partial, 1 << 30, "raw", b"");
    let complete = put_stemcell(&host);
    host.advance_clock(OLD);
    let young_partial = new_stemcell_cid();
    host.put_volume(&young_partial, 1 << 30, "raw", b"");
    host.advance_clock(PARTIAL_MAX_AGE_SECS - 60.0);
    let own = sweep_now(&host);
    assert!(!host.exists(&old_partial));
    assert!(host.exists(&young_partial), "a live import is writing it");
    assert!(host.exists(&complete) && host.exists(&marker_name(&complete)));
    assert!(host.exists(&own));
}

#[test]
fn a_marker_of_zeros_does_not_make_a_stemcell_complete() {
    let host = FakeHost::new();
    let cid = new_stemcell_cid();
    host.put_volume(&cid, 1 << 30, "raw", b"");
    // What a marker write killed (or confirmed on a full pool) leaves.
    host.put_volume(&marker_name(&cid), 4096, "raw", &[0u8; 4096]);
    host.advance_clock(OLD);
    sweep_now(&host);
    assert!(!host.exists(&cid));
    assert!(!host.exists(&marker_name(&cid)));
}

#[test]
fn the_sweep_keeps_an_image_a_vm_boots_from_even_without_its_marker() {
    let host = FakeHost::new();
    let cid = new_stemcell_cid();
    host.put_volume(&cid, 1 << 30, "qcow2", b"");
    boot_from(&host, &cid);
    host.advance_clock(OLD);
    sweep_now(&host);
    assert!(host.exists(&cid));
}

#[test]
fn the_sweep_removes_markers_without_an_image_whatever_their_age() {
    let host = FakeHost::new();
    let orphan = new_stemcell_cid();
    host.put_json(&marker_name(&orphan), &json!({"format": "raw"}));
    // The import's own marker is never the sweep's, even when its image is
    // not (yet, or no longer) listed.
    let own = new_stemcell_cid();
    host.put_json(&marker_name(&own), &json!({}));
    sweep_partial_imports(&host, &mut log(), &own);
    assert!(!host.exists(&marker_name(&orphan)));
    assert!(host.exists(&marker_name(&own)));
}

#[test]
fn the_sweep_leaves_what_is_not_a_stemcell_import() {
    let host = FakeHost::new();
    let vm = new_vm_cid();
    let others = [
        "sc-not-a-uuid".to_string(),
        "sc-not-a-uuid.meta".to_string(),
        root_volume(&vm),
        "disk-0123456789abcde".to_string(),
        "someone-elses.qcow2".to_string(),
    ];
    for n in &others {
        host.put_volume(n, 1, "raw", b"");
    }
    host.advance_clock(OLD);
    sweep_now(&host);
    for n in &others {
        assert!(host.exists(n), "{n}");
    }
}

#[test]
fn an_import_sweeps_and_a_failing_sweep_does_not_fail_it() {
    let host = FakeHost::new();
    let image = Image::raw();
    let partial = new_stemcell_cid();
    host.put_volume(&partial, 1 << 30, "raw", b"");
    host.advance_clock(OLD);
    create(&host, &image, json!({})).unwrap();
    assert!(!host.exists(&partial), "the import swept it");

    let partial = new_stemcell_cid();
    host.put_volume(&partial, 1 << 30, "raw", b"");
    host.advance_clock(OLD);
    host.fail_next(
        "volume_names_with_prefix",
        CpiError::cloud("listing failed"),
    );
    host.fail_next(
        "volume_names_with_prefix",
        CpiError::cloud("listing failed"),
    );
    let cid = create(&host, &image, json!({})).unwrap();
    assert!(host.exists(&partial), "not swept this time");
    assert!(host.exists(&marker_name(&cid)));
}
