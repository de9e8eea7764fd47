//! Disk snapshots: snapshot_disk and delete_snapshot.
//!
//! A snapshot is a full, independent point-in-time copy of a disk in a new
//! qcow2 volume `snap-<disk_cid>-<UTC time>-<6 hex>` (the CID), plus a sidecar
//! `<snapshot_cid>.meta` written once the copy is complete (a snapshot is
//! usable iff both exist). Being independent of the disk, a snapshot survives
//! delete_disk, and the disk can be resized or deleted freely.
//!
//! How the copy is made:
//! * disk not in use by a running VM: libvirt copies the volume
//!   (virStorageVolCreateXMLFrom, i.e. `qemu-img convert` to qcow2); nothing
//!   writes to the disk meanwhile, so the copy is exact.
//! * disk attached to a running VM: a live block copy (QEMU drive-mirror via
//!   virDomainBlockCopy into the new volume), cancelled once in sync. The copy
//!   is crash-consistent: the disk exactly as it was at one instant, as after a
//!   power cut (what the director's snapshots after stopping the jobs expect;
//!   data still in the guest's page cache is not in it).
//!
//! Restore: create_disk with cloud_properties `{"source_snapshot": "<snapshot CID>"}`
//! makes a new disk holding the snapshot's data (the director's disk_type can
//! carry it); the old disk is left alone.

use std::time::Duration;

use serde_json::Value;

use super::disk_record::{checked_format, find_disk, holder_is_recorded, recorded_format};
use super::holder;
use super::sweep::{self, Leftovers};
use crate::error::{CpiError, Result};
use crate::host::{DiskFormat, DiskHost, VolumeFacts};
use crate::log::Logger;
use crate::method::Object;
use crate::names::{self, is_snapshot_cid, marker_name, new_snapshot_cid};
use crate::records::SnapshotRecord;

/// A live copy that makes no progress for this long is abandoned.
const LIVE_COPY_STALL_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Snapshot {
    pub facts: VolumeFacts,
}

/// A complete snapshot (volume and marker), checked to be the plain qcow2
/// image the CPI made before anything reads it.
pub(super) fn find_snapshot(host: &dyn DiskHost, snapshot_cid: &str) -> Result<Option<Snapshot>> {
    if !is_snapshot_cid(snapshot_cid) {
        return Ok(None);
    }
    if host.volume(&marker_name(snapshot_cid))?.is_none() {
        return Ok(None);
    }
    let Some(facts) = host.volume(snapshot_cid)? else {
        return Ok(None);
    };
    if facts.format.as_deref() != Some("qcow2") || facts.backing_path.is_some() {
        return Err(CpiError::cloud(format!(
            "snapshot {snapshot_cid} is not the plain qcow2 image the CPI made (format {:?}, backing store {:?})",
            facts.format, facts.backing_path
        )));
    }
    Ok(Some(Snapshot { facts }))
}

pub fn snapshot_disk(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk_cid: &str,
    metadata: &Object,
) -> Result<Value> {
    let disk = find_disk(host, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
    let r = disk.dref(host.pool_name());
    let tracked = holder_is_recorded(host, disk_cid);
    let holders = holder::holders(host, &r, tracked)?;
    let live = holders.iter().find_map(|h| {
        h.disks
            .live_ref(&r)
            .filter(|_| h.disks.running)
            .map(|d| (h.domain.clone(), d.target.clone(), d.mirror_ready.is_some()))
    });
    let snapshot_cid = new_snapshot_cid(disk_cid);
    let capacity = disk.facts.capacity;

    let (disk_format, consistency) = match &live {
        Some((vm, target, copying)) => {
            // The VM reads the disk with the format in its definition, which
            // the CPI wrote from its record; the copy goes through the VM.
            let format = recorded_format(host, log, &disk)?;
            if *copying {
                if let Some(gone) = host.end_abandoned_copy(vm, target)? {
                    log.warn(format!(
                        "ended the abandoned live copy of {disk_cid} (a killed snapshot_disk) and deleted {gone}"
                    ));
                }
            }
            host.create_volume(&snapshot_cid, capacity, DiskFormat::Qcow2)?;
            let copied = host.live_copy(vm, target, &snapshot_cid, LIVE_COPY_STALL_TIMEOUT);
            if let Err(e) = copied {
                let _ = host.delete_volume(&snapshot_cid);
                return Err(e.context(format!("snapshotting disk {disk_cid}")));
            }
            (
                format,
                format!("crash-consistent: live copy while attached to running VM {vm}"),
            )
        }
        None => {
            let format = checked_format(host, log, &disk)?;
            host.copy_volume(&snapshot_cid, disk_cid, capacity, DiskFormat::Qcow2)?;
            (
                format,
                "exact: copied while not in use by a running VM".to_string(),
            )
        }
    };

    sweep_unfinished_snapshots(host, log, disk_cid, &snapshot_cid);

    let record = SnapshotRecord {
        capacity_bytes: capacity,
        consistency: consistency.clone(),
        created_at: crate::log::timestamp(),
        disk_cid: disk_cid.to_string(),
        disk_format: disk_format.as_str().to_string(),
        metadata: metadata.clone(),
    };
    host.mark_complete(&snapshot_cid, &record)
        .map_err(|e| e.context(format!("recording snapshot {snapshot_cid}")))?;
    log.summary(format!(
        "snapshot {snapshot_cid} of disk {disk_cid} ({consistency})"
    ));
    Ok(Value::String(snapshot_cid))
}

/// A snapshot volume without a marker, untouched this long, is what a
/// killed snapshot_disk left (a copy that libvirt finished or abandoned
/// after the CPI was gone): the director never learned its CID.
const UNFINISHED_MAX_AGE_SECS: f64 = 30.0 * 60.0;

/// Best effort, never fails the call: removes unfinished snapshots of
/// `disk_cid`, judged by the host's clock as read from `own` (just made).
fn sweep_unfinished_snapshots(host: &dyn DiskHost, log: &mut Logger, disk_cid: &str, own: &str) {
    let what = format!("unfinished snapshots of {disk_cid} that killed snapshot_disk calls left");
    sweep::sweep(
        host,
        log,
        own,
        &Leftovers {
            prefix: &names::snapshots_of(disk_cid),
            max_age_secs: UNFINISHED_MAX_AGE_SECS,
            candidate: &|name, _| is_snapshot_cid(name),
            in_use: &|_, _| Ok(false),
            what: &what,
            at_most_every_secs: None,
        },
    );
}

pub fn delete_snapshot(host: &dyn DiskHost, log: &mut Logger, snapshot_cid: &str) -> Result<Value> {
    if !is_snapshot_cid(snapshot_cid) {
        log.info(format!(
            "{snapshot_cid} is not a snapshot CID: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    // The marker first: a half-deleted snapshot is never taken for a usable one.
    let marker = host.delete_volume(&marker_name(snapshot_cid))?;
    let volume = host.delete_volume(snapshot_cid)?;
    if marker || volume {
        log.summary(format!("deleted snapshot {snapshot_cid}"));
    } else {
        log.info(format!(
            "snapshot {snapshot_cid} does not exist: nothing to delete"
        ));
    }
    Ok(Value::Null)
}
