//! One copy between two pools at a time, per staging pool.
//!
//! libvirtd deadlocks when two copies from one pool into another
//! (virStorageVolCreateXMLFrom across pools: the staging pool's writes into
//! the CPI's pool) start and end at the same moment: storage_driver.c's
//! storageVolCreateXMLFrom takes the source pool, then the destination, when
//! it starts, and the destination, then the source, once the copy is built.
//! Seen on the test bed with 16 concurrent create_vm calls (libvirtd 11.3;
//! gdb: two threads in storageVolCreateXMLFrom, each holding the pool the
//! other waits for, and every later call on either pool stuck behind them
//! for good). So every such copy holds `copying.lock`, a volume of the
//! staging pool that only one caller can create (libvirt refuses a second
//! volume of a name), holding its creator (`creator::Creator`): a copy takes
//! milliseconds, and the lock of a killed call is removed by the next one
//! (at once when its process is gone, after `UNWRITTEN_STALE` when it was
//! killed before it wrote the lock).

use std::time::{Duration, Instant};

use virt::storage_pool::StoragePool;

use super::Libvirt;
use crate::creator::{Creator, Liveness};
use crate::error::{CpiError, Result};
use crate::host::DiskFormat;

const LOCK: &str = "copying.lock";
/// A lock is written within milliseconds of its creation.
const UNWRITTEN_STALE: Duration = Duration::from_secs(10);
/// How long a copy waits for the lock (copies take milliseconds).
const WAIT: Duration = Duration::from_secs(60);
/// How often a waiting copy looks at who holds the lock.
const LOOK: Duration = Duration::from_millis(200);

impl Libvirt {
    /// Runs `copy` holding the staging pool's copy lock.
    pub(super) fn copying_exclusively<T>(
        &self,
        staging: &StoragePool,
        copy: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let me = Creator::this_process()
            .ok_or_else(|| CpiError::cloud("cannot identify this process (no /proc?)"))?
            .to_string();
        let started = Instant::now();
        let mut looked = started;
        let mut unreadable_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(1);
        loop {
            let refused = match self.create_volume(staging, LOCK, me.len() as u64, DiskFormat::Raw)
            {
                Ok(lock) => {
                    let out = self
                        .upload_bytes(&lock, LOCK, me.as_bytes())
                        .and_then(|()| copy());
                    let _ = lock.delete(0);
                    return out;
                }
                Err(e) => e,
            };
            if looked.elapsed() >= LOOK {
                looked = Instant::now();
                match self.copy_lock_holder(staging) {
                    Some(Some(holder)) if holder.liveness() == Liveness::Dead => {
                        self.remove_copy_lock(staging);
                    }
                    Some(None) => {
                        let since = *unreadable_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > UNWRITTEN_STALE {
                            self.remove_copy_lock(staging);
                            unreadable_since = None;
                        }
                    }
                    _ => {}
                }
            }
            if started.elapsed() > WAIT {
                return Err(CpiError::cloud(format!(
                    "{}: another CPI call has been copying into the pool for over {} s",
                    refused.message,
                    WAIT.as_secs()
                ))
                .retryable(true));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Who holds the copy lock: `None` when there is no lock (or it cannot
    /// be looked at), `Some(None)` when it holds no creator (not yet written,
    /// or never: its call was killed in between).
    fn copy_lock_holder(&self, staging: &StoragePool) -> Option<Option<Creator>> {
        let bytes = self.read_lock_in(staging, LOCK).ok()??;
        Some(Creator::from_lock(&bytes))
    }

    /// Best effort: the next look finds it again when this fails.
    fn remove_copy_lock(&self, staging: &StoragePool) {
        let _ = self.delete_volume(staging, LOCK);
    }
}
