//! A persistent disk as the disk and snapshot methods find it: its volume in
//! the pool, and what its `.meta` record (written once by create_disk) says
//! about its format, its attach options and whether its holder is recorded.
//! Shared by `disk` and `snapshot`: `disk` uses `snapshot` (create_disk from a
//! snapshot), `snapshot` uses only this, so the two do not import each other.

use crate::error::{CpiError, Result};
use crate::host::{DiskFormat, DiskHost, DiskRef, VolumeFacts};
use crate::log::Logger;
use crate::names::{self, marker_name};
use crate::records::DiskRecord;
use crate::vm_spec::DiskOptions;

/// A disk volume as found in the pool.
pub(super) struct Disk {
    pub cid: String,
    pub facts: VolumeFacts,
}

impl Disk {
    pub fn dref<'a>(&'a self, pool_name: &'a str) -> DiskRef<'a> {
        DiskRef {
            cid: &self.cid,
            path: Some(&self.facts.path),
            pool: pool_name,
        }
    }
}

/// The disk volume of a CID; `None` for an absent disk or a string that is not
/// a disk CID at all (so hostile input never names some other volume).
pub(super) fn find_disk(host: &dyn DiskHost, disk_cid: &str) -> Result<Option<Disk>> {
    if !names::is_disk_cid(disk_cid) {
        return Ok(None);
    }
    Ok(host.volume(disk_cid)?.map(|facts| Disk {
        cid: disk_cid.to_string(),
        facts,
    }))
}

/// The disk's `.meta` record, written once by create_disk (`None`: a disk
/// without one). A call that needs several of its facts reads it once.
pub(super) fn disk_record(host: &dyn DiskHost, disk_cid: &str) -> Result<Option<DiskRecord>> {
    host.read_record(&marker_name(disk_cid))
}

/// The format the disk was created with, from its `.meta` record.
pub(super) fn recorded_format(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk: &Disk,
) -> Result<DiskFormat> {
    format_in(disk_record(host, &disk.cid)?.as_ref(), log, disk)
}

/// The format `record` (the disk's `.meta` record) gives. Without a record
/// only a volume that libvirt probes as raw is usable (as raw): a qcow2
/// header in a disk without a record may have been written by a guest into
/// a raw disk, and reading it as qcow2 could expose host files.
pub(super) fn format_in(
    record: Option<&DiskRecord>,
    log: &mut Logger,
    disk: &Disk,
) -> Result<DiskFormat> {
    let meta = marker_name(&disk.cid);
    match record {
        Some(record) => record
            .format
            .as_deref()
            .and_then(DiskFormat::parse)
            .ok_or_else(|| {
                CpiError::cloud(format!(
                    "{meta}: the disk's record has no valid \"format\" (qcow2 or raw): {}",
                    serde_json::to_string(&record).unwrap_or_default()
                ))
            }),
        None if disk.facts.format.as_deref() == Some("raw") => {
            log.warn(format!(
                "{}: no record {meta}; using the volume as raw, as libvirt probes it",
                disk.cid
            ));
            Ok(DiskFormat::Raw)
        }
        None => Err(CpiError::cloud(format!(
            "{}: the record {meta} of the disk's format is missing and libvirt probes the \
             volume as {}; refusing to guess (a raw disk's first bytes are written by its guest). \
             An operator who knows the format can recreate the record as a raw volume holding \
             {{\"format\":\"qcow2\"}} or {{\"format\":\"raw\"}}",
            disk.cid,
            disk.facts.format.as_deref().unwrap_or("unknown")
        ))),
    }
}

/// The recorded format, checked against libvirt's own view before an
/// operation where libvirt reads or rewrites the image itself (copy, resize):
/// libvirt then trusts its probe, so the two must agree.
pub(super) fn checked_format(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk: &Disk,
) -> Result<DiskFormat> {
    let format = recorded_format(host, log, disk)?;
    let probed = disk.facts.format.as_deref().unwrap_or("unknown");
    if probed != format.as_str() || disk.facts.backing_path.is_some() {
        return Err(CpiError::cloud(format!(
            "{}: the disk was created as {} but libvirt now probes it as {probed}{}; refusing to \
             let libvirt process it (a guest can write an image header into a raw disk)",
            disk.cid,
            format.as_str(),
            disk.facts
                .backing_path
                .as_deref()
                .map(|b| format!(" with backing store {b}"))
                .unwrap_or_default()
        )));
    }
    Ok(format)
}

/// The bus and cache/io/discard options create_disk recorded with the disk
/// in `record` (an older CPI's record has none: the defaults), and whether
/// its holder is recorded (see `holder`).
pub(super) fn options_in(
    record: Option<&DiskRecord>,
    disk_cid: &str,
) -> Result<(DiskOptions, bool)> {
    let meta = marker_name(disk_cid);
    match record {
        Some(r) => r
            .options()
            .map(|o| (o, r.holder_record))
            .map_err(|e| CpiError::cloud(format!("{meta}: {e}"))),
        None => Ok((DiskOptions::default(), false)),
    }
}

/// Whether the disk's holder is recorded, for calls that must not fail on an
/// unreadable `.meta` record (they then read every domain instead).
pub(super) fn holder_is_recorded(host: &dyn DiskHost, disk_cid: &str) -> bool {
    host.read_record::<DiskRecord>(&marker_name(disk_cid))
        .ok()
        .flatten()
        .is_some_and(|r| r.holder_record)
}
