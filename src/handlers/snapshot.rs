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
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::disk_record::{checked_format, find_disk, holder_is_recorded, recorded_format};
use super::holder;
use super::sweep::{self, Leftovers};
use super::Call;
use crate::error::{CpiError, Result};
use crate::libvirt::volume::{DiskFormat, VolumeFacts};
use crate::method::Object;
use crate::names::{self, is_snapshot_cid, marker_name, new_snapshot_cid};
use crate::records::SnapshotRecord;

/// A live copy that makes no progress for this long is abandoned.
const LIVE_COPY_STALL_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Snapshot {
    pub vol: StorageVol,
    pub facts: VolumeFacts,
}

/// A complete snapshot (volume and marker), checked to be the plain qcow2
/// image the CPI made before anything reads it.
pub(super) fn find_snapshot(
    call: &mut Call,
    pool: &StoragePool,
    snapshot_cid: &str,
) -> Result<Option<Snapshot>> {
    if !is_snapshot_cid(snapshot_cid) {
        return Ok(None);
    }
    let lv = call.libvirt()?;
    if lv.find_volume(pool, &marker_name(snapshot_cid))?.is_none() {
        return Ok(None);
    }
    let Some(vol) = lv.find_volume(pool, snapshot_cid)? else {
        return Ok(None);
    };
    let facts = lv.volume_facts(&vol, snapshot_cid)?;
    if facts.format.as_deref() != Some("qcow2") || facts.backing_path.is_some() {
        return Err(CpiError::cloud(format!(
            "snapshot {snapshot_cid} is not the plain qcow2 image the CPI made (format {:?}, backing store {:?})",
            facts.format, facts.backing_path
        )));
    }
    Ok(Some(Snapshot { vol, facts }))
}

pub fn snapshot_disk(call: &mut Call, disk_cid: &str, metadata: &Object) -> Result<Value> {
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let disk =
        find_disk(call, &pool, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
    let r = disk.dref(&cfg.pool.name);
    let tracked = holder_is_recorded(call, &pool, disk_cid);
    let holders = holder::holders(call, &pool, &r, tracked)?;
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
            let format = recorded_format(call, &pool, &disk)?;
            let lv = call.libvirt()?;
            let domain = lv.find_domain(vm)?.ok_or_else(|| {
                CpiError::cloud(format!(
                    "VM {vm} vanished while snapshotting {disk_cid}; retry"
                ))
            })?;
            if *copying {
                if let Some(gone) = lv.end_abandoned_copy(&pool, &domain, vm, target)? {
                    call.log.warn(format!(
                        "ended the abandoned live copy of {disk_cid} (a killed snapshot_disk) and deleted {gone}"
                    ));
                }
            }
            let lv = call.libvirt()?;
            let dest = lv.create_volume(&pool, &snapshot_cid, capacity, DiskFormat::Qcow2)?;
            let copied = lv.volume_facts(&dest, &snapshot_cid).and_then(|f| {
                lv.live_block_copy(&domain, vm, target, &f.path, LIVE_COPY_STALL_TIMEOUT)
            });
            if let Err(e) = copied {
                let _ = lv.delete_volume(&pool, &snapshot_cid);
                return Err(e.context(format!("snapshotting disk {disk_cid}")));
            }
            (
                format,
                format!("crash-consistent: live copy while attached to running VM {vm}"),
            )
        }
        None => {
            let format = checked_format(call, &pool, &disk)?;
            call.libvirt()?.clone_volume(
                &pool,
                &snapshot_cid,
                &disk.vol,
                disk_cid,
                capacity,
                DiskFormat::Qcow2,
            )?;
            (
                format,
                "exact: copied while not in use by a running VM".to_string(),
            )
        }
    };

    sweep_unfinished_snapshots(call, &pool, disk_cid, &snapshot_cid);

    let record = SnapshotRecord {
        capacity_bytes: capacity,
        consistency: consistency.clone(),
        created_at: crate::log::timestamp(),
        disk_cid: disk_cid.to_string(),
        disk_format: disk_format.as_str().to_string(),
        metadata: metadata.clone(),
    };
    let lv = call.libvirt()?;
    lv.mark_complete(&pool, &snapshot_cid, &record)
        .map_err(|e| e.context(format!("recording snapshot {snapshot_cid}")))?;
    call.log.summary(format!(
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
fn sweep_unfinished_snapshots(call: &mut Call, pool: &StoragePool, disk_cid: &str, own: &str) {
    let what = format!("unfinished snapshots of {disk_cid} that killed snapshot_disk calls left");
    sweep::sweep(
        call,
        pool,
        own,
        &Leftovers {
            prefix: &names::snapshots_of(disk_cid),
            max_age_secs: UNFINISHED_MAX_AGE_SECS,
            candidate: &|name, _| is_snapshot_cid(name),
            in_use: &|_, _| Ok(false),
            what: &what,
        },
    );
}

pub fn delete_snapshot(call: &mut Call, snapshot_cid: &str) -> Result<Value> {
    if !is_snapshot_cid(snapshot_cid) {
        call.log.info(format!(
            "{snapshot_cid} is not a snapshot CID: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let lv = call.libvirt()?;
    // The marker first: a half-deleted snapshot is never taken for a usable one.
    let marker = lv.delete_volume(&pool, &marker_name(snapshot_cid))?;
    let volume = lv.delete_volume(&pool, snapshot_cid)?;
    if marker || volume {
        call.log.summary(format!("deleted snapshot {snapshot_cid}"));
    } else {
        call.log.info(format!(
            "snapshot {snapshot_cid} does not exist: nothing to delete"
        ));
    }
    Ok(Value::Null)
}
