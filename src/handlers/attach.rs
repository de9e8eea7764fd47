//! attach_disk and detach_disk (cpi-contract.md 2.4): a persistent disk's
//! device in a VM, hot-plugged while the VM runs, always in its persistent
//! definition; where it is attached is recorded under the disk's lock (see
//! `holder`). Both return the v2 result; `dispatch` shapes it for v1 callers.

use std::time::Duration;

use serde_json::{json, Value};

use super::disk_record::{disk_record, find_disk, format_in, options_in, Disk};
use super::holder::{self, attached_elsewhere};
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::{next_free_target, DiskAttachment, DiskFormat, DiskHost, DiskRef};
use crate::log::Logger;
use crate::names;
use crate::vm_spec::{DiskBus, DiskOptions};

/// How long detach_disk waits for the guest to release a hot-plugged disk.
/// The director retries a failed detach, and the request stays pending meanwhile.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

/// The v2 result: the disk hint `{"path": ...}` (v1 callers get null).
pub fn attach_disk(
    host: &dyn DiskHost,
    log: &mut Logger,
    vm_cid: &str,
    disk_cid: &str,
) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) || !host.vm_exists(vm_cid)? {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let disk = find_disk(host, disk_cid)?.ok_or_else(|| CpiError::disk_not_found(disk_cid))?;
    let record = disk_record(host, disk_cid)?;
    let format = format_in(record.as_ref(), log, &disk)?;
    let (options, tracked) = options_in(record.as_ref(), disk_cid)?;
    let target = holder::with_lock(host, log, disk_cid, |log| {
        attach_locked(host, log, vm_cid, &disk, format, &options, tracked)
    })?;
    Ok(json!({ "path": hint_path(&options, &target, disk_cid) }))
}

/// attach_disk under the disk's lock; returns the device's target.
fn attach_locked(
    host: &dyn DiskHost,
    log: &mut Logger,
    vm_cid: &str,
    disk: &Disk,
    format: DiskFormat,
    options: &DiskOptions,
    tracked: bool,
) -> Result<String> {
    let disk_cid = disk.cid.as_str();
    let r = disk.dref(host.pool_name());
    let holders = holder::holders(host, &r, tracked)?;
    if let Some(other) = holders.iter().find(|h| h.domain != vm_cid) {
        return Err(attached_elsewhere(
            disk_cid,
            other,
            &format!("cannot attach it to VM {vm_cid} too"),
        ));
    }
    let disks = match holders.into_iter().find(|h| h.domain == vm_cid) {
        Some(h) => h.disks,
        None => host
            .vm_disks(vm_cid)?
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
        holder::record_holder(host, disk_cid, vm_cid)?;
    }
    let need_live = disks.running && disks.live_ref(&r).is_none();
    let need_config = disks.config_ref(&r).is_none();
    if !(need_live || need_config) {
        log.summary(format!(
            "disk {disk_cid} is already attached to {vm_cid} as {target}"
        ));
        return Ok(target);
    }
    let device = DiskAttachment {
        path: &disk.facts.path,
        format,
        target: &target,
        serial: disk_cid,
        options,
    };
    match host.attach_disk_device(vm_cid, &device, need_live, need_config) {
        Ok(()) => {}
        // The domain may have stopped since we looked: then its persistent
        // definition is all there is to change.
        Err(e) if need_live && need_config && stopped(host, vm_cid) => {
            log.info(format!("{vm_cid} is no longer running ({e})"));
            host.attach_disk_device(vm_cid, &device, false, true)?;
        }
        // A libvirtd that died in the middle of an earlier hot-plug of this
        // disk leaves QEMU holding its block nodes (and maybe the guest
        // device) unknown to libvirt: every hot-plug of it fails until
        // they are gone (see libvirt/orphan_nodes.rs). A lost connection
        // (retryable) says nothing about QEMU: the next call looks.
        Err(e) if need_live && !e.ok_to_retry => {
            let orphans = host
                .remove_orphan_block_nodes(vm_cid, &disk.facts.path, DETACH_TIMEOUT)
                .map_err(|c| {
                    c.context(format!(
                        "{}; then, removing what an earlier hot-plug left",
                        e.message
                    ))
                })?;
            let Some(orphans) = orphans else {
                return Err(e);
            };
            log.warn(format!(
                "hot-plugging {disk_cid} into {vm_cid} failed ({}): removed what an earlier \
                 hot-plug that libvirtd did not live to record left in QEMU ({orphans}); attaching again",
                e.message
            ));
            host.attach_disk_device(vm_cid, &device, need_live, need_config)?;
        }
        Err(e) => return Err(e),
    }
    if !tracked {
        // A disk of an older CPI has no holder record, and an older CPI
        // attaching it at the same moment takes no lock: both see it free,
        // and the later one to look again backs out.
        let holders = host.disk_holders(&r)?;
        if let Some(other) = holders.iter().find(|h| h.domain != vm_cid) {
            let msg = attached_elsewhere(
                disk_cid,
                other,
                &format!(
                    "it was attached there while being attached to VM {vm_cid}, which was undone"
                ),
            );
            undo_attach(host, vm_cid, disk_cid, need_live)?;
            return Err(msg);
        }
    }
    log.summary(format!(
        "attached disk {disk_cid} to {vm_cid} as {target} ({})",
        if disks.running {
            "hot-plugged"
        } else {
            "VM not running: persistent definition only"
        }
    ));
    Ok(target)
}

/// Whether the VM is known to be shut off now (not when it cannot be told).
fn stopped(host: &dyn DiskHost, vm_cid: &str) -> bool {
    host.vm_disks(vm_cid)
        .ok()
        .flatten()
        .is_some_and(|d| !d.running)
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
fn undo_attach(host: &dyn DiskHost, vm_cid: &str, disk_cid: &str, was_live: bool) -> Result<()> {
    let Some(disk) = find_disk(host, disk_cid)? else {
        return Ok(());
    };
    let r = disk.dref(host.pool_name());
    let Some(disks) = host.vm_disks(vm_cid)? else {
        return Ok(());
    };
    if was_live {
        if let Some(dev) = disks.live_ref(&r) {
            host.detach_disk_live(vm_cid, dev, &r, DETACH_TIMEOUT)?;
        }
    }
    if let Some(dev) = disks.config_ref(&r) {
        host.detach_disk_config(vm_cid, dev)?;
    }
    Ok(())
}

pub fn detach_disk(
    host: &dyn DiskHost,
    log: &mut Logger,
    vm_cid: &str,
    disk_cid: &str,
) -> Result<Value> {
    let not_attached = || {
        CpiError::new(
            ErrorKind::DiskNotAttached,
            format!("{disk_cid} is not attached to {vm_cid}"),
        )
    };
    if !names::is_vm_cid(vm_cid) || !names::is_disk_cid(disk_cid) {
        return Err(not_attached());
    }
    if !host.vm_exists(vm_cid)? {
        return Err(not_attached());
    }
    // The volume may be gone while a domain still refers to it: then the
    // serial is all there is to recognise it by.
    let disk = find_disk(host, disk_cid)?;
    let r = match &disk {
        Some(d) => d.dref(host.pool_name()),
        None => DiskRef {
            cid: disk_cid,
            path: None,
            pool: host.pool_name(),
        },
    };
    if disk.is_none() {
        return detach_locked(host, log, vm_cid, &r);
    }
    holder::with_lock(host, log, disk_cid, |log| {
        match detach_locked(host, log, vm_cid, &r) {
            Ok(_) => holder::release_holder(host, disk_cid, vm_cid),
            // A detach killed between the device and the record leaves the
            // record naming this VM: the retry lands here and removes it.
            Err(e) if e.kind == ErrorKind::DiskNotAttached => {
                holder::release_holder(host, disk_cid, vm_cid)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    })?;
    Ok(Value::Null)
}

/// detach_disk under the disk's lock (when the disk still exists).
fn detach_locked(
    host: &dyn DiskHost,
    log: &mut Logger,
    vm_cid: &str,
    r: &DiskRef,
) -> Result<Value> {
    let disk_cid = r.cid;
    let not_attached = || {
        CpiError::new(
            ErrorKind::DiskNotAttached,
            format!("{disk_cid} is not attached to {vm_cid}"),
        )
    };
    let Some(disks) = host.vm_disks(vm_cid)? else {
        return Err(not_attached());
    };
    let live = disks.live_ref(r).cloned();
    let config = disks.config_ref(r).cloned();
    if live.is_none() && config.is_none() {
        // libvirt does not know it here, but QEMU may still hold it: a
        // hot-plug that libvirtd did not live to record (see
        // libvirt/orphan_nodes.rs). The director's detach before it
        // attaches the disk elsewhere (create-swap-delete) removes that too;
        // otherwise QEMU's image lock refuses the other VM.
        // Only a device the guest has yet to release fails the call; QEMU
        // that cannot be asked leaves the answer DiskNotAttached.
        if let (true, Some(path)) = (disks.running, r.path) {
            let orphans = match host.remove_orphan_block_nodes(vm_cid, path, DETACH_TIMEOUT) {
                Ok(o) => o,
                Err(e) if e.ok_to_retry => return Err(e),
                Err(e) => {
                    log.warn(format!(
                        "looking in QEMU for what a hot-plug of {disk_cid} may have left: {}",
                        e.message
                    ));
                    None
                }
            };
            if let Some(orphans) = orphans {
                log.summary(format!(
                    "detached disk {disk_cid} from {vm_cid}: removed what a hot-plug that \
                     libvirtd did not live to record left in QEMU ({orphans})"
                ));
                return Ok(Value::Null);
            }
        }
        return Err(not_attached());
    }
    if let Some(dev) = &live {
        if dev.mirror_ready.is_some() {
            if let Some(gone) = host.end_abandoned_copy(vm_cid, &dev.target)? {
                log.warn(format!(
                    "ended the abandoned live copy of {disk_cid} (a killed snapshot_disk) and deleted {gone}"
                ));
            }
        }
        host.detach_disk_live(vm_cid, dev, r, DETACH_TIMEOUT)?;
    }
    if let Some(dev) = &config {
        host.detach_disk_config(vm_cid, dev)?;
    }
    let target = live.or(config).map(|d| d.target).unwrap_or_default();
    log.summary(format!("detached disk {disk_cid} ({target}) from {vm_cid}"));
    Ok(Value::Null)
}
