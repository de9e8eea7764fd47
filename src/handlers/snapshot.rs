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

use serde_json::{json, Value};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::disk::{checked_format, find_disk, holder_is_recorded, recorded_format};
use super::holder;
use super::Call;
use crate::cid;
use crate::error::{CpiError, Result};
use crate::libvirt::volume::{marker_name, DiskFormat, VolumeFacts};
use crate::method::Object;

/// A live copy that makes no progress for this long is abandoned.
const LIVE_COPY_STALL_TIMEOUT: Duration = Duration::from_secs(60);

const PREFIX: &str = "snap-";

/// `snap-<disk cid>-<YYYYMMDDTHHMMSS>-<6 hex>`: sorts by disk, then by time.
fn new_snapshot_cid(disk_cid: &str) -> String {
    let stamp: String = crate::log::timestamp()
        .chars()
        .take_while(|c| *c != '.')
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{PREFIX}{disk_cid}-{stamp}-{}", &hex[..6])
}

pub fn is_snapshot_cid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix(PREFIX) else {
        return false;
    };
    let parts: Vec<&str> = rest.rsplitn(3, '-').collect();
    let [hex, stamp, disk] = parts[..] else {
        return false;
    };
    cid::is_disk_cid(disk)
        && stamp.len() == 15
        && stamp.bytes().enumerate().all(|(i, b)| {
            if i == 8 {
                b == b'T'
            } else {
                b.is_ascii_digit()
            }
        })
        && hex.len() == 6
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

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

    let record = json!({
        "disk_cid": disk_cid,
        "disk_format": disk_format.as_str(),
        "capacity_bytes": capacity,
        "created_at": crate::log::timestamp(),
        "consistency": consistency,
        "metadata": metadata,
    });
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
    let swept = (|| -> Result<Vec<String>> {
        let lv = call.libvirt()?;
        let Some(now) = lv
            .find_volume(pool, own)?
            .map(|v| lv.volume_facts(&v, own))
            .transpose()?
            .and_then(|f| f.mtime)
        else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        let names = lv.volume_names_with_prefix(pool, &format!("{PREFIX}{disk_cid}-"))?;
        for name in &names {
            // A marker that is not a document (its write was killed) is no
            // marker; the volume goes first, so a half-removed snapshot never
            // looks complete.
            if name == own
                || !is_snapshot_cid(name)
                || !lv.volume_untouched_for(pool, name, UNFINISHED_MAX_AGE_SECS, now)?
                || lv.has_valid_marker(pool, name)?
            {
                continue;
            }
            if lv.delete_volume(pool, name)? {
                removed.push(name.clone());
            }
            if lv.delete_volume(pool, &marker_name(name))? {
                removed.push(marker_name(name));
            }
        }
        Ok(removed)
    })();
    match swept {
        Ok(removed) if !removed.is_empty() => call.log.info(format!(
            "removed snapshots that killed snapshot_disk calls left unfinished: {}",
            removed.join(", ")
        )),
        Ok(_) => {}
        Err(e) => call.log.warn(format!(
            "not sweeping unfinished snapshots of {disk_cid}: {}",
            e.message
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_cids_round_trip_and_reject_others() {
        let disk = cid::new_disk_cid();
        let s = new_snapshot_cid(&disk);
        assert!(is_snapshot_cid(&s), "{s}");
        assert!(s.starts_with(&format!("snap-{disk}-")));
        assert_eq!(s.len(), 5 + 20 + 1 + 15 + 1 + 6);
        for bad in [
            "snap-",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdeg",
            "snap-disk-0f3a9c21b7e54d8-20260822X101900-abcdef",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdef.meta",
            "snap-../etc-20260822T101900-abcdef",
            "disk-0f3a9c21b7e54d8",
        ] {
            assert!(!is_snapshot_cid(bad), "{bad}");
        }
        assert!(is_snapshot_cid(
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdef"
        ));
    }
}
