//! Persistent-disk methods (cpi-contract.md 2.4, 4.5, 6): create_disk,
//! delete_disk, has_disk, attach_disk, detach_disk, get_disks, resize_disk,
//! update_disk, set_disk_metadata.
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

use std::time::Duration;

use serde_json::{json, Value};
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::disk_record::{
    checked_format, find_disk, holder_is_recorded, recorded_format, recorded_options, Disk,
};
use super::holder;
use super::snapshot;
use super::sweep::{self, Leftovers};
use super::Call;
use crate::error::{CpiError, ErrorKind, Result};
use crate::libvirt::disk::{disk_device_xml, next_free_target, DiskRef, Holder};
use crate::libvirt::volume::{DiskFormat, MIB};
use crate::libvirt::Libvirt;
use crate::method::Object;
use crate::names::{self, marker_name, tags_name};
use crate::records::{DiskRecord, TagsRecord};
use crate::vm_spec::{DiskBus, DiskOptions};

/// How long detach_disk waits for the guest to release a hot-plugged disk.
/// The director retries a failed detach, and the request stays pending meanwhile.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

/// cloud_properties keys create_disk understands (bus, cache, io and
/// discard: `DiskOptions`, recorded with the disk for attach_disk).
const KNOWN_CLOUD_PROPERTIES: &[&str] =
    &["format", "source_snapshot", "bus", "cache", "io", "discard"];

fn attached_elsewhere(disk_cid: &str, holder: &Holder, doing: &str) -> CpiError {
    CpiError::cloud(format!(
        "disk {disk_cid} is attached to VM {}: {doing}",
        holder.domain
    ))
}

pub fn create_disk(
    call: &mut Call,
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
        call.log.warning(format!(
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
        call.log
            .debug(format!("locality hint {vm} (all disks share one pool)"));
    }

    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let capacity = size_mib.checked_mul(MIB).ok_or_else(|| {
        CpiError::new(
            ErrorKind::NoDiskSpace,
            format!("a {size_mib} MiB disk is too large"),
        )
    })?;
    let available = call.libvirt()?.pool_available(&pool)?;
    if capacity > available {
        return Err(CpiError::new(
            ErrorKind::NoDiskSpace,
            format!(
                "cannot create a {size_mib} MiB disk: storage pool {} has {} MiB free",
                cfg.pool.name,
                available / MIB
            ),
        ));
    }

    let disk_cid = names::new_disk_cid();
    let vol = match source_snapshot {
        None => call
            .libvirt()?
            .create_volume(&pool, &disk_cid, capacity, format)?,
        Some(snap_cid) => {
            let snap = snapshot::find_snapshot(call, &pool, snap_cid)?.ok_or_else(|| {
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
            let lv = call.libvirt()?;
            let vol = lv.clone_volume(&pool, &disk_cid, &snap.vol, snap_cid, capacity, format)?;
            // A copy may come out the snapshot's size, whatever was asked.
            let grown = lv.volume_facts(&vol, &disk_cid).and_then(|f| {
                if f.capacity < capacity {
                    lv.resize_volume(&vol, &disk_cid, capacity)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = grown {
                let _ = lv.delete_volume(&pool, &disk_cid);
                return Err(e);
            }
            vol
        }
    };
    drop(vol);
    // Before the record: a kill during the sweep leaves an unrecorded disk
    // (swept in turn), never a complete one the director does not know.
    sweep_unrecorded_disks(call, &pool, &disk_cid);
    let record = DiskRecord::new(format.as_str(), size_mib, source_snapshot, &options);
    let lv = call.libvirt()?;
    lv.mark_complete(&pool, &disk_cid, &record)
        .map_err(|e| e.context(format!("recording disk {disk_cid}")))?;
    call.log.summary(format!(
        "created {size_mib} MiB {} {} disk {disk_cid}{}",
        format.as_str(),
        options.bus.as_str(),
        source_snapshot
            .map(|s| format!(" from snapshot {s}"))
            .unwrap_or_default()
    ));
    Ok(Value::String(disk_cid))
}

/// A disk volume without a valid record, without director metadata, in no
/// domain and untouched this long is what a create_disk killed between the
/// volume and its record left: the director never learned its CID.
const UNRECORDED_MAX_AGE_SECS: f64 = 30.0 * 60.0;

/// Best effort, never fails the call: removes disks that killed create_disk
/// calls left, judged by the host's clock as read from `own` (just made).
/// A `.tags` or `.holder` sidecar means the director knew the disk
/// (set_disk_metadata and attach_disk follow create_disk): such a disk is
/// never swept, whatever its record.
fn sweep_unrecorded_disks(call: &mut Call, pool: &StoragePool, own: &str) {
    let pool_name = call.config.pool.name.clone();
    let candidate = |name: &str, all: &[String]| {
        names::is_disk_cid(name)
            && !all.contains(&tags_name(name))
            && !all.contains(&names::holder_name(name))
    };
    let in_use = |lv: &Libvirt, name: &str| -> Result<bool> {
        let Some(vol) = lv.find_volume(pool, name)? else {
            return Ok(false);
        };
        let path = lv.volume_facts(&vol, name)?.path;
        let r = DiskRef {
            cid: name,
            path: Some(&path),
            pool: &pool_name,
        };
        Ok(!lv.disk_holders(&r)?.is_empty())
    };
    sweep::sweep(
        call,
        pool,
        own,
        &Leftovers {
            prefix: names::DISK_PREFIX,
            max_age_secs: UNRECORDED_MAX_AGE_SECS,
            candidate: &candidate,
            in_use: &in_use,
            what: "disks that killed create_disk calls left unrecorded",
        },
    );
}

pub fn has_disk(call: &mut Call, disk_cid: &str) -> Result<Value> {
    if !names::is_disk_cid(disk_cid) {
        return Ok(Value::Bool(false));
    }
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let found = call.libvirt()?.find_volume(&pool, disk_cid)?.is_some();
    Ok(Value::Bool(found))
}

pub fn delete_disk(call: &mut Call, disk_cid: &str) -> Result<Value> {
    if !names::is_disk_cid(disk_cid) {
        call.log
            .info(format!("{disk_cid} is not a disk CID: nothing to delete"));
        return Ok(Value::Null);
    }
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    match find_disk(call, &pool, disk_cid)? {
        Some(disk) => {
            let tracked = holder_is_recorded(call, &pool, disk_cid);
            holder::with_lock(call, &pool, disk_cid, |call| {
                let holders = holder::holders(call, &pool, &disk.dref(&cfg.pool.name), tracked)?;
                if let Some(h) = holders.first() {
                    return Err(attached_elsewhere(
                        disk_cid,
                        h,
                        "refusing to delete it (detach it first)",
                    ));
                }
                call.libvirt()?.delete_volume(&pool, disk_cid)?;
                call.log.summary(format!("deleted disk {disk_cid}"));
                Ok(())
            })?;
        }
        None => call
            .log
            .info(format!("disk {disk_cid} does not exist: nothing to delete")),
    }
    // Sidecars go last, and also when the disk itself was already gone (a
    // previous attempt may have stopped half-way, between deleting the disk
    // and releasing its lock: with the disk gone no call takes that lock
    // again, so it goes here).
    let lv = call.libvirt()?;
    lv.delete_volume(&pool, &tags_name(disk_cid))?;
    lv.delete_volume(&pool, &names::holder_name(disk_cid))?;
    lv.delete_volume(&pool, &marker_name(disk_cid))?;
    lv.delete_volume(&pool, &names::lock_name(disk_cid))?;
    Ok(Value::Null)
}

pub fn attach_disk(call: &mut Call, vm_cid: &str, disk_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let domain = call
        .libvirt()?
        .find_domain(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    let disk =
        find_disk(call, &pool, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
    let format = recorded_format(call, &pool, &disk)?;
    let (options, tracked) = recorded_options(call, &pool, disk_cid)?;
    let target = holder::with_lock(call, &pool, disk_cid, |call| {
        attach_locked(call, vm_cid, &domain, &disk, format, &options, tracked)
    })?;
    if call.request.wants_v1_shapes() {
        return Ok(Value::Null);
    }
    Ok(json!({ "path": hint_path(&options, &target, disk_cid) }))
}

/// attach_disk under the disk's lock; returns the device's target.
fn attach_locked(
    call: &mut Call,
    vm_cid: &str,
    domain: &Domain,
    disk: &Disk,
    format: DiskFormat,
    options: &DiskOptions,
    tracked: bool,
) -> Result<String> {
    let cfg = call.config;
    let disk_cid = disk.cid.as_str();
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let r = disk.dref(&cfg.pool.name);
    let holders = holder::holders(call, &pool, &r, tracked)?;
    if let Some(other) = holders.iter().find(|h| h.domain != vm_cid) {
        return Err(attached_elsewhere(
            disk_cid,
            other,
            &format!("cannot attach it to VM {vm_cid} too"),
        ));
    }
    let disks = match holders.into_iter().find(|h| h.domain == vm_cid) {
        Some(h) => h.disks,
        None => call
            .libvirt()?
            .domain_disks(domain, vm_cid)?
            .ok_or_else(|| CpiError::vm_not_found(vm_cid))?,
    };
    // Already attached (fully or half: a previous attempt may have stopped
    // between the live and the persistent step): keep its target.
    let target = match disks.live_ref(&r).or(disks.config_ref(&r)) {
        Some(d) => d.target.clone(),
        None => next_free_target(&disks.used_targets(), options.bus),
    };
    if tracked {
        // Before the device: the record names every VM that may hold the disk.
        holder::record_holder(call, &pool, disk_cid, vm_cid)?;
    }
    let need_live = disks.running && disks.live_ref(&r).is_none();
    let need_config = disks.config_ref(&r).is_none();
    if !(need_live || need_config) {
        call.log.summary(format!(
            "disk {disk_cid} is already attached to {vm_cid} as {target}"
        ));
        return Ok(target);
    }
    let xml = disk_device_xml(&disk.facts.path, format, &target, disk_cid, options);
    let lv = call.libvirt()?;
    match lv.attach_disk_device(domain, vm_cid, &xml, need_live, need_config) {
        Ok(()) => {}
        // The domain may have stopped since we looked: then its persistent
        // definition is all there is to change.
        Err(e) if need_live && need_config && !domain.is_active().unwrap_or(true) => {
            call.log
                .info(format!("{vm_cid} is no longer running ({e})"));
            call.libvirt()?
                .attach_disk_device(domain, vm_cid, &xml, false, true)?;
        }
        Err(e) => return Err(e),
    }
    if !tracked {
        // A disk of an older CPI has no holder record, and an older CPI
        // attaching it at the same moment takes no lock: both see it free,
        // and the later one to look again backs out.
        let holders = call.libvirt()?.disk_holders(&r)?;
        if let Some(other) = holders.iter().find(|h| h.domain != vm_cid) {
            let msg = attached_elsewhere(
                disk_cid,
                other,
                &format!(
                    "it was attached there while being attached to VM {vm_cid}, which was undone"
                ),
            );
            undo_attach(call, vm_cid, disk_cid, &pool, need_live)?;
            return Err(msg);
        }
    }
    call.log.summary(format!(
        "attached disk {disk_cid} to {vm_cid} as {target} ({})",
        if disks.running {
            "hot-plugged"
        } else {
            "VM not running: persistent definition only"
        }
    ));
    Ok(target)
}

/// The `path` of the disk hint. The agent looks for a persistent disk by
/// its CID first (`/dev/disk/by-id/*<CID>`, bosh-agent
/// infrastructure/devicepathresolver/id_device_path_resolver.go), which
/// finds both `virtio-<CID>` and the SCSI link; `path` is the fallback
/// (mapped_device_path_resolver.go), which maps `/dev/sdX` to `/dev/vdX`
/// first: so a SCSI disk's hint is its by-id link, never `/dev/sdX`.
fn hint_path(options: &DiskOptions, target: &str, disk_cid: &str) -> String {
    match options.bus {
        DiskBus::Virtio => format!("/dev/{target}"),
        DiskBus::Scsi => crate::settings::scsi_by_id(disk_cid),
    }
}

/// Backs out an attach that lost a race (see attach_disk).
fn undo_attach(
    call: &mut Call,
    vm_cid: &str,
    disk_cid: &str,
    pool: &StoragePool,
    was_live: bool,
) -> Result<()> {
    let cfg = call.config;
    let Some(domain) = call.libvirt()?.find_domain(vm_cid)? else {
        return Ok(());
    };
    let Some(disk) = find_disk(call, pool, disk_cid)? else {
        return Ok(());
    };
    let r = disk.dref(&cfg.pool.name);
    let lv = call.libvirt()?;
    let Some(disks) = lv.domain_disks(&domain, vm_cid)? else {
        return Ok(());
    };
    if was_live {
        if let Some(dev) = disks.live_ref(&r) {
            lv.detach_disk_live(&domain, vm_cid, dev, &r, DETACH_TIMEOUT)?;
        }
    }
    if let Some(dev) = disks.config_ref(&r) {
        lv.detach_disk_config(&domain, vm_cid, dev)?;
    }
    Ok(())
}

pub fn detach_disk(call: &mut Call, vm_cid: &str, disk_cid: &str) -> Result<Value> {
    let not_attached = || {
        CpiError::new(
            ErrorKind::DiskNotAttached,
            format!("{disk_cid} is not attached to {vm_cid}"),
        )
    };
    if !names::is_vm_cid(vm_cid) || !names::is_disk_cid(disk_cid) {
        return Err(not_attached());
    }
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let Some(domain) = call.libvirt()?.find_domain(vm_cid)? else {
        return Err(not_attached());
    };
    // The volume may be gone while a domain still refers to it: then the
    // serial is all there is to recognise it by.
    let disk = find_disk(call, &pool, disk_cid)?;
    let r = match &disk {
        Some(d) => d.dref(&cfg.pool.name),
        None => DiskRef {
            cid: disk_cid,
            path: None,
            pool: &cfg.pool.name,
        },
    };
    if disk.is_none() {
        return detach_locked(call, vm_cid, &domain, &r, &pool);
    }
    holder::with_lock(call, &pool, disk_cid, |call| {
        match detach_locked(call, vm_cid, &domain, &r, &pool) {
            Ok(_) => holder::release_holder(call, &pool, disk_cid, vm_cid),
            // A detach killed between the device and the record leaves the
            // record naming this VM: the retry lands here and removes it.
            Err(e) if e.kind == ErrorKind::DiskNotAttached => {
                holder::release_holder(call, &pool, disk_cid, vm_cid)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    })?;
    Ok(Value::Null)
}

/// detach_disk under the disk's lock (when the disk still exists).
fn detach_locked(
    call: &mut Call,
    vm_cid: &str,
    domain: &Domain,
    r: &DiskRef,
    pool: &StoragePool,
) -> Result<Value> {
    let disk_cid = r.cid;
    let not_attached = || {
        CpiError::new(
            ErrorKind::DiskNotAttached,
            format!("{disk_cid} is not attached to {vm_cid}"),
        )
    };
    let lv = call.libvirt()?;
    let Some(disks) = lv.domain_disks(domain, vm_cid)? else {
        return Err(not_attached());
    };
    let live = disks.live_ref(r).cloned();
    let config = disks.config_ref(r).cloned();
    if live.is_none() && config.is_none() {
        return Err(not_attached());
    }
    if let Some(dev) = &live {
        if dev.mirror_ready.is_some() {
            if let Some(gone) = lv.end_abandoned_copy(pool, domain, vm_cid, &dev.target)? {
                call.log.warn(format!(
                    "ended the abandoned live copy of {disk_cid} (a killed snapshot_disk) and deleted {gone}"
                ));
            }
        }
        let lv = call.libvirt()?;
        lv.detach_disk_live(domain, vm_cid, dev, r, DETACH_TIMEOUT)?;
    }
    let lv = call.libvirt()?;
    if let Some(dev) = &config {
        lv.detach_disk_config(domain, vm_cid, dev)?;
    }
    let target = live.or(config).map(|d| d.target).unwrap_or_default();
    call.log
        .summary(format!("detached disk {disk_cid} ({target}) from {vm_cid}"));
    Ok(Value::Null)
}

pub fn get_disks(call: &mut Call, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let lv = call.libvirt()?;
    let domain = lv
        .find_domain(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    let disks = lv
        .domain_disks(&domain, vm_cid)?
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

pub fn resize_disk(call: &mut Call, disk_cid: &str, new_size_mib: u64) -> Result<Value> {
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    let disk =
        find_disk(call, &pool, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
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
        call.log.summary(format!(
            "disk {disk_cid} already has {new_size_mib} MiB: nothing to do"
        ));
        return Ok(Value::Null);
    }
    // The director detaches before resizing; growing under a running guest
    // would need a block resize and the guest to notice.
    let tracked = holder_is_recorded(call, &pool, disk_cid);
    let holders = holder::holders(call, &pool, &disk.dref(&cfg.pool.name), tracked)?;
    if let Some(h) = holders.first() {
        return Err(attached_elsewhere(
            disk_cid,
            h,
            "refusing to resize it while attached (detach it first)",
        ));
    }
    checked_format(call, &pool, &disk)?;
    let lv = call.libvirt()?;
    // The same rule as create_disk: the growth must fit in the pool's free
    // space, even though the volume stays thin.
    let available = lv.pool_available(&pool)?;
    if wanted - current > available {
        return Err(CpiError::new(
            ErrorKind::NoDiskSpace,
            format!(
                "cannot grow disk {disk_cid} to {new_size_mib} MiB: storage pool {} has {} MiB free",
                cfg.pool.name,
                available / MIB
            ),
        ));
    }
    lv.resize_volume(&disk.vol, disk_cid, wanted)?;
    call.log.summary(format!(
        "grew disk {disk_cid} from {} to {new_size_mib} MiB",
        current.div_ceil(MIB)
    ));
    Ok(Value::Null)
}

/// The director then falls back to creating a new disk and copying the data,
/// which is always right; an in-place change of format or pool is not.
pub fn update_disk(call: &mut Call, disk_cid: &str) -> Result<Value> {
    call.log.info(format!(
        "update_disk {disk_cid}: not supported, the director copies to a new disk instead"
    ));
    Err(CpiError::not_supported("update_disk is not supported"))
}

pub fn set_disk_metadata(call: &mut Call, disk_cid: &str, metadata: &Object) -> Result<Value> {
    let cfg = call.config;
    let pool = call.libvirt()?.pool(&cfg.pool)?;
    if find_disk(call, &pool, disk_cid)?.is_none() {
        return Err(CpiError::disk_not_found(disk_cid));
    }
    let doc = TagsRecord {
        metadata: metadata.clone(),
        updated_at: crate::log::timestamp(),
    };
    call.libvirt()?
        .write_json_volume(&pool, &tags_name(disk_cid), &doc)
        .map_err(|e| e.context(format!("storing metadata of disk {disk_cid}")))?;
    call.log.summary(format!(
        "stored {} metadata keys of disk {disk_cid} in volume {}",
        metadata.len(),
        tags_name(disk_cid)
    ));
    Ok(Value::Null)
}
