//! Persistent-disk methods (cpi-contract.md 2.4, 4.5, 6): create_disk,
//! delete_disk, has_disk, get_disks, resize_disk, update_disk,
//! set_disk_metadata, against the `DiskHost` seam (attach_disk and
//! detach_disk: `attach`).
//!
//! A disk is the pool volume named exactly by its CID (`disk-` + 15 hex, the
//! 20 bytes of a virtio serial a guest sees), with two sidecar volumes:
//! `<cid>.meta`, the CPI's own record written once by create_disk (above all
//! the disk's format: for a `dir` pool libvirt PROBES formats from the first
//! bytes of the file, which for a raw disk the guest writes), and `<cid>.tags`,
//! the director's metadata, replaced by each set_disk_metadata.
//! Where a disk is attached: the sidecar `<cid>.holder` names the VM to look
//! at, changed only under the disk's lock `<cid>.lock` (see `holder`); the
//! named VM's own XML (its `<serial>` or source path) has the last word.

use serde_json::{json, Value};

use super::disk_record::{checked_format, find_disk, holder_is_recorded};
use super::holder::{self, attached_elsewhere};
use super::snapshot;
use super::sweep::{self, Leftovers};
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::{DiskFormat, DiskHost, DiskRef, MIB};
use crate::log::Logger;
use crate::method::Object;
use crate::names::{self, marker_name, tags_name};
use crate::records::{DiskRecord, TagsRecord};
use crate::vm_spec::DiskOptions;

/// cloud_properties keys create_disk understands (bus, cache, io and
/// discard: `DiskOptions`, recorded with the disk for attach_disk).
const KNOWN_CLOUD_PROPERTIES: &[&str] =
    &["format", "source_snapshot", "bus", "cache", "io", "discard"];

pub fn create_disk(
    host: &dyn DiskHost,
    log: &mut Logger,
    size_mib: u64,
    cloud_properties: &Object,
    vm_locality: Option<&str>,
) -> Result<Value> {
    let unknown: Vec<&str> = cloud_properties
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN_CLOUD_PROPERTIES.contains(k))
        .collect();
    if !unknown.is_empty() {
        log.warning(format!(
            "ignoring unknown disk cloud_properties: {}",
            unknown.join(", ")
        ));
    }
    let format = match cloud_properties.get("format") {
        None | Some(Value::Null) => DiskFormat::Qcow2,
        Some(Value::String(s)) => DiskFormat::parse(s).ok_or_else(|| {
            CpiError::cloud(format!(
                "cloud_properties.format must be \"qcow2\" or \"raw\", got \"{s}\""
            ))
        })?,
        Some(other) => {
            return Err(CpiError::cloud(format!(
                "cloud_properties.format must be \"qcow2\" or \"raw\", got {other}"
            )))
        }
    };
    // Persistent disks default to cache 'none' (see disk_device_xml), so
    // `io: native` alone is valid here.
    let mut with_default_cache = cloud_properties.clone();
    if with_default_cache.get("cache").is_none_or(Value::is_null) {
        with_default_cache.insert("cache".into(), json!("none"));
    }
    let options = DiskOptions::parse(&with_default_cache, "").map_err(CpiError::cloud)?;
    let source_snapshot = match cloud_properties.get("source_snapshot") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(CpiError::cloud(format!(
                "cloud_properties.source_snapshot must be a snapshot CID, got {other}"
            )))
        }
    };
    if let Some(vm) = vm_locality {
        // One libvirt host, one pool: every disk is local to every VM.
        log.debug(format!("locality hint {vm} (all disks share one pool)"));
    }

    let capacity = size_mib.checked_mul(MIB).ok_or_else(|| {
        CpiError::new(
            ErrorKind::NoDiskSpace,
            format!("a {size_mib} MiB disk is too large"),
        )
    })?;
    if let Some(available) = free_if_short(host, capacity)? {
        return Err(CpiError::new(
            ErrorKind::NoDiskSpace,
            format!(
                "cannot create a {size_mib} MiB disk: storage pool {} has {} MiB free",
                host.pool_name(),
                available / MIB
            ),
        ));
    }

    let disk_cid = names::new_disk_cid();
    match source_snapshot {
        None => host.create_volume(&disk_cid, capacity, format)?,
        Some(snap_cid) => {
            let snap = snapshot::find_snapshot(host, snap_cid)?.ok_or_else(|| {
                CpiError::cloud(format!(
                    "cloud_properties.source_snapshot: snapshot {snap_cid} not found"
                ))
            })?;
            if snap.facts.capacity > capacity {
                return Err(CpiError::cloud(format!(
                    "snapshot {snap_cid} holds {} MiB, more than the {size_mib} MiB disk asked for",
                    snap.facts.capacity.div_ceil(MIB)
                )));
            }
            host.copy_volume(&disk_cid, snap_cid, capacity, format)?;
            // A copy may come out the snapshot's size, whatever was asked.
            let grown = host.volume(&disk_cid).and_then(|f| match f {
                Some(f) if f.capacity >= capacity => Ok(()),
                _ => host.resize_volume(&disk_cid, capacity),
            });
            if let Err(e) = grown {
                let _ = host.delete_volume(&disk_cid);
                return Err(e);
            }
        }
    }
    // Before the record: a kill during the sweep leaves an unrecorded disk
    // (swept in turn), never a complete one the director does not know.
    sweep_unrecorded_disks(host, log, &disk_cid);
    let record = DiskRecord::new(format.as_str(), size_mib, source_snapshot, &options);
    host.mark_complete(&disk_cid, &record)
        .map_err(|e| e.context(format!("recording disk {disk_cid}")))?;
    log.summary(format!(
        "created {size_mib} MiB {} {} disk {disk_cid}{}",
        format.as_str(),
        options.bus.as_str(),
        source_snapshot
            .map(|s| format!(" from snapshot {s}"))
            .unwrap_or_default()
    ));
    Ok(Value::String(disk_cid))
}

/// The pool's free bytes when it has fewer than `bytes` free, else `None`.
/// libvirt's last count is trusted when it says there is room (the disk is
/// thin and takes nothing yet, and a recount re-reads every volume of the
/// pool: a cost that grows with the pool); a "no" is recounted first, as
/// others may have freed space since.
fn free_if_short(host: &dyn DiskHost, bytes: u64) -> Result<Option<u64>> {
    if bytes <= host.available_bytes(false)? {
        return Ok(None);
    }
    let available = host.available_bytes(true)?;
    Ok((bytes > available).then_some(available))
}

/// A disk volume without a valid record, without director metadata, in no
/// domain and untouched this long is what a create_disk killed between the
/// volume and its record left: the director never learned its CID.
const UNRECORDED_MAX_AGE_SECS: f64 = 30.0 * 60.0;

/// create_disk sweeps at most this often (a listing of the whole pool).
const UNRECORDED_SWEEP_EVERY_SECS: f64 = 10.0 * 60.0;

/// Best effort, never fails the call: removes disks that killed create_disk
/// calls left, judged by the host's clock as read from `own` (just made).
/// A `.tags` or `.holder` sidecar means the director knew the disk
/// (set_disk_metadata and attach_disk follow create_disk): such a disk is
/// never swept, whatever its record.
fn sweep_unrecorded_disks(host: &dyn DiskHost, log: &mut Logger, own: &str) {
    let candidate = |name: &str, all: &[String]| {
        names::is_disk_cid(name)
            && !all.contains(&tags_name(name))
            && !all.contains(&names::holder_name(name))
    };
    let in_use = |host: &dyn DiskHost, name: &str| -> Result<bool> {
        let Some(facts) = host.volume(name)? else {
            return Ok(false);
        };
        let r = DiskRef {
            cid: name,
            path: Some(&facts.path),
            pool: host.pool_name(),
        };
        Ok(!host.disk_holders(&r)?.is_empty())
    };
    sweep::sweep(
        host,
        log,
        own,
        &Leftovers {
            prefix: names::DISK_PREFIX,
            max_age_secs: UNRECORDED_MAX_AGE_SECS,
            candidate: &candidate,
            in_use: &in_use,
            what: "disks that killed create_disk calls left unrecorded",
            at_most_every_secs: Some(UNRECORDED_SWEEP_EVERY_SECS),
        },
    );
}

pub fn has_disk(host: &dyn DiskHost, disk_cid: &str) -> Result<Value> {
    if !names::is_disk_cid(disk_cid) {
        return Ok(Value::Bool(false));
    }
    Ok(Value::Bool(host.volume_exists(disk_cid)?))
}

pub fn delete_disk(host: &dyn DiskHost, log: &mut Logger, disk_cid: &str) -> Result<Value> {
    if !names::is_disk_cid(disk_cid) {
        log.info(format!("{disk_cid} is not a disk CID: nothing to delete"));
        return Ok(Value::Null);
    }
    match find_disk(host, disk_cid)? {
        Some(disk) => {
            let tracked = holder_is_recorded(host, disk_cid);
            holder::with_lock(host, log, disk_cid, |log| {
                let holders = holder::holders(host, &disk.dref(host.pool_name()), tracked)?;
                if let Some(h) = holders.first() {
                    return Err(attached_elsewhere(
                        disk_cid,
                        h,
                        "refusing to delete it (detach it first)",
                    ));
                }
                host.delete_volume(disk_cid)?;
                log.summary(format!("deleted disk {disk_cid}"));
                Ok(())
            })?;
        }
        None => log.info(format!("disk {disk_cid} does not exist: nothing to delete")),
    }
    // Sidecars go last, and also when the disk itself was already gone (a
    // previous attempt may have stopped half-way, between deleting the disk
    // and releasing its lock: with the disk gone no call takes that lock
    // again, so it goes here).
    host.delete_volume(&tags_name(disk_cid))?;
    host.delete_volume(&names::holder_name(disk_cid))?;
    host.delete_volume(&marker_name(disk_cid))?;
    host.remove_lock(&names::lock_name(disk_cid))?;
    Ok(Value::Null)
}

pub fn get_disks(host: &dyn DiskHost, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let disks = host
        .vm_disks(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    // Only devices whose serial is a disk CID: never the root, ephemeral or
    // config drive, whatever their position.
    let mut cids: Vec<String> = Vec::new();
    for d in disks.live.iter().chain(&disks.config) {
        if let Some(s) = &d.serial {
            if names::is_disk_cid(s) && !cids.contains(s) {
                cids.push(s.clone());
            }
        }
    }
    Ok(json!(cids))
}

pub fn resize_disk(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk_cid: &str,
    new_size_mib: u64,
) -> Result<Value> {
    let disk = find_disk(host, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
    let current = disk.facts.capacity;
    let wanted = new_size_mib.checked_mul(MIB).ok_or_else(|| {
        CpiError::new(
            ErrorKind::NoDiskSpace,
            format!("{new_size_mib} MiB is too large"),
        )
    })?;
    if wanted < current {
        return Err(CpiError::not_supported(format!(
            "{disk_cid}: shrinking from {} to {new_size_mib} MiB is not supported",
            current.div_ceil(MIB)
        )));
    }
    if wanted == current {
        log.summary(format!(
            "disk {disk_cid} already has {new_size_mib} MiB: nothing to do"
        ));
        return Ok(Value::Null);
    }
    // The director detaches before resizing; growing under a running guest
    // would need a block resize and the guest to notice.
    let tracked = holder_is_recorded(host, disk_cid);
    let holders = holder::holders(host, &disk.dref(host.pool_name()), tracked)?;
    if let Some(h) = holders.first() {
        return Err(attached_elsewhere(
            disk_cid,
            h,
            "refusing to resize it while attached (detach it first)",
        ));
    }
    checked_format(host, log, &disk)?;
    // The same rule as create_disk: the growth must fit in the pool's free
    // space, even though the volume stays thin.
    if let Some(available) = free_if_short(host, wanted - current)? {
        return Err(CpiError::new(
            ErrorKind::NoDiskSpace,
            format!(
                "cannot grow disk {disk_cid} to {new_size_mib} MiB: storage pool {} has {} MiB free",
                host.pool_name(),
                available / MIB
            ),
        ));
    }
    host.resize_volume(disk_cid, wanted)?;
    log.summary(format!(
        "grew disk {disk_cid} from {} to {new_size_mib} MiB",
        current.div_ceil(MIB)
    ));
    Ok(Value::Null)
}

/// The director then falls back to creating a new disk and copying the data,
/// which is always right; an in-place change of format or pool is not.
pub fn update_disk(log: &mut Logger, disk_cid: &str) -> Result<Value> {
    log.info(format!(
        "update_disk {disk_cid}: not supported, the director copies to a new disk instead"
    ));
    Err(CpiError::not_supported("update_disk is not supported"))
}

pub fn set_disk_metadata(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk_cid: &str,
    metadata: &Object,
) -> Result<Value> {
    if find_disk(host, disk_cid)?.is_none() {
        return Err(CpiError::disk_not_found(disk_cid));
    }
    let doc = TagsRecord {
        metadata: metadata.clone(),
        updated_at: crate::log::timestamp(),
    };
    // Replaced, not rewritten in place: an upload into an existing volume
    // makes libvirt re-read the whole pool, a new record is staged (see
    // libvirt::staging). The tags are absent for a moment, which nothing
    // relies on: a disk with a valid record is never swept, and a call that
    // fails here is repeated by the director's next deploy.
    host.delete_volume(&tags_name(disk_cid))
        .and_then(|_| host.write_record(&tags_name(disk_cid), &doc))
        .map_err(|e| e.context(format!("storing metadata of disk {disk_cid}")))?;
    log.summary(format!(
        "stored {} metadata keys of disk {disk_cid} in volume {}",
        metadata.len(),
        tags_name(disk_cid)
    ));
    Ok(Value::Null)
}
