//! Live block copies (QEMU drive-mirror) of a running domain's disk: the
//! copy a snapshot of an attached disk is made with, and ending a copy whose
//! owner was killed.

use std::ffi::CString;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::sys;

use super::xml::copy_destination_xml;
use super::POLL_INTERVAL;
use crate::error::{CpiError, Result};
use crate::host::DiskDevice;
use crate::libvirt::{lv_error, Libvirt};
use crate::names::{marker_name, SNAPSHOT_PREFIX};

/// A copy in sync this long has nobody to end it (see end_abandoned_copy).
const ABANDONED_COPY_AFTER: Duration = Duration::from_secs(3);

impl Libvirt {
    /// Ends a block copy of disk `target` that nobody watches any more: the
    /// live copy of a snapshot_disk that was killed (only the process that
    /// starts a copy ends it, and until then every snapshot and detach of the
    /// disk fails with "already in active block job"). A live snapshot_disk
    /// ends its copy within one poll of it being in sync; one that stays in
    /// sync for `ABANDONED_COPY_AFTER` is abandoned, and is cancelled here
    /// (the guest stays on its disk), and its destination is deleted when it
    /// is a snapshot volume of `pool` without a marker (a snapshot that never
    /// completed). Returns what was removed. A copy still in progress is an
    /// error the caller may retry.
    pub fn end_abandoned_copy(
        &self,
        pool: &StoragePool,
        domain: &Domain,
        name: &str,
        target: &str,
    ) -> Result<Option<String>> {
        let mirror = |this: &Self| -> Result<Option<DiskDevice>> {
            Ok(this.domain_disks(domain, name)?.and_then(|d| {
                d.live
                    .into_iter()
                    .find(|d| d.target == target && d.mirror_ready.is_some())
            }))
        };
        if mirror(self)?.is_none() {
            return Ok(None);
        }
        let deadline = Instant::now() + ABANDONED_COPY_AFTER;
        loop {
            std::thread::sleep(POLL_INTERVAL);
            let Some(dev) = mirror(self)? else {
                return Ok(None); // its owner ended it
            };
            if dev.mirror_ready != Some(true) {
                return Err(CpiError::cloud(format!(
                    "disk {target} of domain {name} is being copied (a snapshot_disk in progress, or one killed mid-copy whose copy this CPI ends once it completes); retry"
                ))
                .retryable(true));
            }
            if Instant::now() >= deadline {
                let c_target = CString::new(target).map_err(|e| CpiError::cloud(e.to_string()))?;
                // SAFETY: valid domain pointer and C string for the call.
                let rc =
                    unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), c_target.as_ptr(), 0) };
                if rc < 0 && mirror(self)?.is_some() {
                    return Err(lv_error(
                        format!("ending the abandoned copy of disk {target} of domain {name}"),
                        virt::error::Error::last_error(),
                    ));
                }
                return self.remove_unfinished_snapshot(pool, dev.mirror_path.as_deref());
            }
        }
    }

    fn remove_unfinished_snapshot(
        &self,
        pool: &StoragePool,
        path: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(vol_name) = path.and_then(|p| p.rsplit('/').next()) else {
            return Ok(None);
        };
        if !vol_name.starts_with(SNAPSHOT_PREFIX)
            || self.find_volume(pool, &marker_name(vol_name))?.is_some()
        {
            return Ok(None);
        }
        match self.find_volume(pool, vol_name)? {
            Some(vol) if Some(self.volume_path(&vol, vol_name)?.as_str()) == path => {
                self.delete_volume(pool, vol_name)?;
                Ok(Some(vol_name.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Copies a disk of a running domain into the existing, empty qcow2 volume
    /// at `dest_path` with a block copy (QEMU drive-mirror), then cancels the
    /// job once the copy is in sync: the destination then holds the disk as it
    /// was at that instant (crash-consistent, like pulling the plug), while the
    /// guest keeps running on the original. Gives up when the copy makes no
    /// progress for `stall_timeout`.
    pub fn live_block_copy(
        &self,
        domain: &Domain,
        name: &str,
        target: &str,
        dest_path: &str,
        stall_timeout: Duration,
    ) -> Result<()> {
        let doing = || format!("live copy of disk {target} of domain {name}");
        let dest_xml = copy_destination_xml(dest_path);
        let c_target = CString::new(target).map_err(|e| CpiError::cloud(e.to_string()))?;
        let c_xml = CString::new(dest_xml).map_err(|e| CpiError::cloud(e.to_string()))?;
        let flags = sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        // SAFETY: the domain pointer is valid for the life of `domain`; the
        // strings live until the call returns; no typed parameters are passed.
        let rc = unsafe {
            sys::virDomainBlockCopy(
                domain.as_ptr(),
                c_target.as_ptr(),
                c_xml.as_ptr(),
                std::ptr::null_mut(),
                0,
                flags,
            )
        };
        if rc < 0 {
            return Err(lv_error(doing(), virt::error::Error::last_error()));
        }
        let result = self.wait_mirror_ready(domain, name, target, &c_target, stall_timeout);
        // Cancelling (no pivot) leaves the guest on its original disk; after
        // "ready" QEMU finishes the copy as of this instant.
        // SAFETY: as above.
        let rc = unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), c_target.as_ptr(), 0) };
        let abort_error = (rc < 0).then(virt::error::Error::last_error);
        result?;
        if let Some(e) = abort_error {
            return Err(lv_error(format!("{}: ending the copy job", doing()), e));
        }
        // The job must be gone, or the copy is not known to be complete.
        let disks = self.domain_disks(domain, name)?.unwrap_or_default();
        if disks
            .live
            .iter()
            .any(|d| d.target == target && d.mirror_ready.is_some())
        {
            return Err(CpiError::cloud(format!(
                "{}: the copy job did not end",
                doing()
            )));
        }
        Ok(())
    }

    fn wait_mirror_ready(
        &self,
        domain: &Domain,
        name: &str,
        target: &str,
        c_target: &CString,
        stall_timeout: Duration,
    ) -> Result<()> {
        let mut last_progress = Instant::now();
        let mut last_cur = 0;
        loop {
            let mut info = sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // SAFETY: valid domain and string; `info` is a plain C struct we own.
            let rc = unsafe {
                sys::virDomainGetBlockJobInfo(domain.as_ptr(), c_target.as_ptr(), &mut info, 0)
            };
            if rc < 0 {
                return Err(lv_error(
                    format!("watching the live copy of disk {target} of domain {name}"),
                    virt::error::Error::last_error(),
                ));
            }
            if rc == 0 {
                return Err(CpiError::cloud(format!(
                    "the live copy of disk {target} of domain {name} ended before it was complete"
                )));
            }
            let ready = self
                .domain_disks(domain, name)?
                .unwrap_or_default()
                .live
                .iter()
                .any(|d| d.target == target && d.mirror_ready == Some(true));
            if ready {
                return Ok(());
            }
            if info.cur != last_cur {
                last_cur = info.cur;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= stall_timeout {
                return Err(CpiError::cloud(format!(
                    "the live copy of disk {target} of domain {name} made no progress for {} s \
                     ({} of {} bytes)",
                    stall_timeout.as_secs(),
                    info.cur,
                    info.end
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
