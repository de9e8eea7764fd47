//! Where a persistent disk is attached, found without reading every domain
//! on the host (that read grew each disk call with the host: ci/bench-scale).
//!
//! A disk this CPI made since holder records exist (its `.meta` record says
//! `"holder_record": true`) has a sidecar `<cid>.holder`, `{"vm": "<vm cid>"}`,
//! from the moment an attach begins until its detach has ended: written
//! before the device is added, removed after it is gone. The VM it names is
//! then checked in that VM's own definition, so a record left by a killed
//! call or a deleted VM only costs that one lookup. A record that cannot be
//! read (a write killed half-way) falls back to reading every domain, as do
//! disks made before (they have no such record).
//!
//! Every change of the record happens under the disk's lock `<cid>.lock`
//! (`DiskHost::create_lock`): a volume only one caller can create (libvirt
//! refuses a second volume of the same name), holding its creator
//! (`creator::Creator`), so the lock of a killed call is recognised and
//! removed by the next one.

use std::time::{Duration, Instant};

use crate::creator::{Creator, Liveness};
use crate::error::{CpiError, Result};
use crate::host::{DiskHost, DiskRef, Holder};
use crate::log::Logger;
use crate::names::{holder_name, lock_name};
use crate::records::HolderRecord;

/// How long a call waits for another call on the same disk to finish.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// A lock is written within milliseconds of its creation; one still without
/// a readable creator after this long was made by a call killed in between.
const UNWRITTEN_LOCK_STALE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// Runs `f` holding the disk's lock; the lock is released whatever `f` returns.
pub(super) fn with_lock<T>(
    host: &dyn DiskHost,
    log: &mut Logger,
    disk_cid: &str,
    f: impl FnOnce(&mut Logger) -> Result<T>,
) -> Result<T> {
    acquire(host, log, disk_cid)?;
    let out = f(log);
    let released = host.remove_lock(&lock_name(disk_cid));
    if let Err(e) = released {
        log.warn(format!(
            "releasing the lock of disk {disk_cid}: {} (the next call on the disk removes it)",
            e.message
        ));
    }
    out
}

fn acquire(host: &dyn DiskHost, log: &mut Logger, disk_cid: &str) -> Result<()> {
    let name = lock_name(disk_cid);
    let me = Creator::this_process()
        .ok_or_else(|| CpiError::cloud("cannot identify this process (no /proc?)"))?
        .to_string();
    let started = Instant::now();
    let mut unreadable_since: Option<Instant> = None;
    loop {
        let refused = match host.create_lock(&name, me.as_bytes()) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(owner) = host.read_lock(&name)? else {
            // No lock there: it was released meanwhile, or the creation failed for itself.
            if started.elapsed() > LOCK_WAIT {
                return Err(refused.context(format!("locking disk {disk_cid}")));
            }
            continue;
        };
        let holder = Creator::from_lock(&owner);
        let stale = match &holder {
            Some(c) => c.liveness() == Liveness::Dead,
            None => {
                unreadable_since.get_or_insert_with(Instant::now).elapsed() > UNWRITTEN_LOCK_STALE
            }
        };
        if stale {
            log.warn(format!(
                "removing lock {name} of a call that ended without releasing it ({})",
                holder.map_or("never written".to_string(), |c| format!(
                    "process {} on boot {}",
                    c.pid, c.boot_id
                ))
            ));
            host.remove_lock(&name)?;
            unreadable_since = None;
            continue;
        }
        if started.elapsed() > LOCK_WAIT {
            return Err(CpiError::cloud(format!(
                "disk {disk_cid} is busy: another CPI call has held its lock {name} for over {} s ({})",
                LOCK_WAIT.as_secs(),
                holder.map_or("not yet written".to_string(), |c| format!("process {} on boot {}", c.pid, c.boot_id))
            ))
            .retryable(true));
        }
        std::thread::sleep(POLL);
    }
}

/// The error of a disk call that finds the disk attached to VM `holder`.
pub(super) fn attached_elsewhere(disk_cid: &str, holder: &Holder, doing: &str) -> CpiError {
    CpiError::cloud(format!(
        "disk {disk_cid} is attached to VM {}: {doing}",
        holder.domain
    ))
}

/// What the holder record says.
enum Recorded {
    Nobody,
    Vm(String),
    Unreadable,
}

fn recorded(host: &dyn DiskHost, disk_cid: &str) -> Recorded {
    match host.read_record::<HolderRecord>(&holder_name(disk_cid)) {
        Ok(None) | Ok(Some(HolderRecord { vm: None })) => Recorded::Nobody,
        Ok(Some(HolderRecord { vm: Some(vm) })) => Recorded::Vm(vm),
        Err(_) => Recorded::Unreadable,
    }
}

/// The domains that hold the disk (live or persistent definition). With a
/// holder record that is at most the VM it names; otherwise every domain is read.
pub(super) fn holders(host: &dyn DiskHost, r: &DiskRef, tracked: bool) -> Result<Vec<Holder>> {
    let vm = match tracked.then(|| recorded(host, r.cid)) {
        Some(Recorded::Nobody) => return Ok(Vec::new()),
        Some(Recorded::Vm(vm)) => vm,
        Some(Recorded::Unreadable) | None => return host.disk_holders(r),
    };
    Ok(match host.vm_disks(&vm)? {
        Some(disks) if disks.holds(r) => vec![Holder { domain: vm, disks }],
        _ => Vec::new(),
    })
}

/// Records `vm` as the disk's holder (before attaching it there).
pub(super) fn record_holder(host: &dyn DiskHost, disk_cid: &str, vm: &str) -> Result<()> {
    host.write_record(
        &holder_name(disk_cid),
        &HolderRecord {
            vm: Some(vm.to_string()),
        },
    )
    .map_err(|e| {
        e.context(format!(
            "recording that disk {disk_cid} is attached to {vm}"
        ))
    })
}

/// Removes the holder record once the disk is detached from `vm`, unless it
/// names another VM (which then still holds the disk, or is checked as stale).
pub(super) fn release_holder(host: &dyn DiskHost, disk_cid: &str, vm: &str) -> Result<()> {
    if let Recorded::Vm(other) = recorded(host, disk_cid) {
        if other != vm {
            return Ok(());
        }
    }
    host.delete_volume(&holder_name(disk_cid)).map(|_| ())
}
