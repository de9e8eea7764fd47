//! New volumes with content (records, markers, locks, config drives)
//! written without making libvirt re-read the pool.
//!
//! When an upload into a pool ends, libvirtd re-reads the WHOLE pool in a
//! thread (src/storage/storage_driver.c: virStorageVolFDStreamCloseCb starts
//! virStorageVolPoolRefreshThread, which clears and re-probes every volume)
//! and holds the pool meanwhile: every lookup in it waits. With 3,000
//! volumes that was ~60-100 ms after each record written, so every call that
//! writes one grew with the pool. So a new small volume is uploaded into a
//! staging pool of its own, `<pool>-staging` at `<pool directory>/.staging`
//! (0700: records may name VMs), which holds only writes in flight, and libvirt
//! then copies it into the pool (virStorageVolCreateXMLFrom: a new volume
//! with its content in one step, refused like any creation when the name is
//! taken, and refreshing only that volume). What counts is still what reads
//! back from the pool afterwards (`write_volume`).
//!
//! libvirt probes the staged file's format before it copies it: JSON and a
//! lock's text are raw and copied by libvirt itself; a config drive (ISO
//! 9660) is probed as `iso`, which libvirt copies with `qemu-img convert -f
//! raw -O raw` (seen with strace; byte-identical): one qemu-img run, a cost
//! that does not grow with the pool.
//!
//! Copies between the two pools are made one at a time (copy_lock.rs: two
//! at once can deadlock libvirtd).
//!
//! A disk's lock lives in the staging pool too, written there directly
//! (`create_lock`): it exists only while a call runs, like a staged write.
//!
//! A staged volume is named after its writer (`Creator`): the first staging
//! of a process removes what dead writers left there.

use std::sync::atomic::{AtomicU32, Ordering};

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{lv_error, Libvirt};
use crate::creator::{Creator, Liveness};
use crate::error::{CpiError, Result};
use crate::host::DiskFormat;

const STAGED_PREFIX: &str = "staged-";
/// Markers of the last sweeps (`claim_sweep`), kept in the staging pool.
const SWEPT_PREFIX: &str = "swept-";

impl Libvirt {
    /// A new raw volume `name` in `pool` holding exactly `data`, staged as
    /// the module says; nothing is left on failure.
    pub fn create_volume_staged(
        &self,
        pool: &StoragePool,
        name: &str,
        data: &[u8],
    ) -> Result<StorageVol> {
        let staging = self.staging_pool(pool)?;
        let staged_name = staged_name()?;
        let staged =
            self.create_volume(staging, &staged_name, data.len() as u64, DiskFormat::Raw)?;
        let made = self
            .upload_bytes(&staged, &staged_name, data)
            .and_then(|()| {
                self.copying_exclusively(staging, || {
                    self.clone_volume(
                        pool,
                        name,
                        &staged,
                        &staged_name,
                        data.len() as u64,
                        DiskFormat::Raw,
                    )
                })
            });
        let _ = staged.delete(0);
        let vol = made?;
        if let Err(e) = self.verify_written(pool, &vol, name, data) {
            let _ = vol.delete(0);
            return Err(e);
        }
        Ok(vol)
    }

    /// Lock `name` (see `DiskHost::create_lock`): a volume of the staging
    /// pool, created (refused when the name is taken) and written there
    /// directly. A lock lives only while a call runs, so it is never staged
    /// and copied like a record: the upload makes libvirt re-read only the
    /// staging pool, which holds nothing but writes and locks in flight.
    pub fn create_lock(&self, pool: &StoragePool, name: &str, owner: &[u8]) -> Result<()> {
        let staging = self.staging_pool(pool)?;
        let vol = self.create_volume(staging, name, owner.len() as u64, DiskFormat::Raw)?;
        if let Err(e) = self.write_volume(staging, &vol, name, owner) {
            let _ = vol.delete(0);
            return Err(e);
        }
        Ok(())
    }

    /// What lock `name` holds (4 KiB at most); `None` when there is none,
    /// also when it is removed between its lookup and the read.
    pub fn read_lock(&self, pool: &StoragePool, name: &str) -> Result<Option<Vec<u8>>> {
        self.read_lock_in(self.staging_pool(pool)?, name)
    }

    /// `read_lock`, given the staging pool.
    pub(super) fn read_lock_in(
        &self,
        staging: &StoragePool,
        name: &str,
    ) -> Result<Option<Vec<u8>>> {
        let Some(vol) = self.find_volume(staging, name)? else {
            return Ok(None);
        };
        let read = self
            .volume_facts(&vol, name)
            .and_then(|f| self.read_volume(&vol, name, f.capacity.min(4096)));
        match read {
            Ok(bytes) => Ok(Some(bytes)),
            Err(_) if self.find_volume(staging, name)?.is_none() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove_lock(&self, pool: &StoragePool, name: &str) -> Result<bool> {
        let staging = self.staging_pool(pool)?;
        self.delete_volume(staging, name)
    }

    /// Whether a sweep of `pool`'s volumes named `prefix*` is due (see
    /// `DiskHost::claim_sweep`): the marker `swept-<prefix>` in the staging
    /// pool is missing or was made more than `every` seconds before
    /// `host_now`. A due sweep is claimed by making the marker anew: of
    /// calls racing for it, the one whose creation succeeds sweeps (rarely
    /// two, when one deletes the marker another just made: sweeps repeat
    /// harmlessly).
    pub fn claim_sweep(
        &self,
        pool: &StoragePool,
        prefix: &str,
        every: f64,
        host_now: f64,
    ) -> Result<bool> {
        let staging = self.staging_pool(pool)?;
        let name = format!("{SWEPT_PREFIX}{prefix}");
        if let Some(vol) = self.find_volume(staging, &name)? {
            let made = self.volume_facts(&vol, &name).ok().and_then(|f| f.mtime);
            if made.is_some_and(|m| host_now - m <= every) {
                return Ok(false);
            }
            let _ = vol.delete(0);
        }
        Ok(self
            .create_volume(staging, &name, 1, DiskFormat::Raw)
            .is_ok())
    }

    /// The staging pool of `pool`, defined and started when missing (and
    /// then swept of what dead writers left); opened once per process.
    fn staging_pool(&self, pool: &StoragePool) -> Result<&StoragePool> {
        let main = pool
            .name()
            .map_err(|e| lv_error("reading the storage pool's name", e))?;
        if let Some((of, staging)) = self.staging.get() {
            if *of == main {
                return Ok(staging);
            }
        }
        let name = staging_pool_name(&main);
        let staging = match self.find_pool(&name)? {
            Some(staging) => staging,
            None => {
                let path = format!("{}/.staging", self.pool_directory(pool, &main)?);
                self.define_pool(&name, &path, "0700")?
            }
        };
        self.start_pool(&staging, &name)?;
        self.remove_dead_writers_leftovers(&staging);
        if self.staging.set((main, staging)).is_err() {
            return Err(CpiError::cloud("opening a second staging pool in one call"));
        }
        Ok(&self.staging.get().expect("just set").1)
    }

    /// Best effort: staged volumes whose writer is dead.
    fn remove_dead_writers_leftovers(&self, staging: &StoragePool) {
        let Ok(vols) = staging.list_all_volumes(0) else {
            return;
        };
        for vol in vols {
            let dead = vol
                .name()
                .ok()
                .and_then(|n| staged_writer(&n))
                .is_some_and(|c| c.liveness() == Liveness::Dead);
            if dead {
                let _ = vol.delete(0);
            }
        }
    }
}

fn staging_pool_name(pool: &str) -> String {
    format!("{pool}-staging")
}

/// `staged-<writer>~<n>`: unique per process and writer.
fn staged_name() -> Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let me = Creator::this_process()
        .ok_or_else(|| CpiError::cloud("cannot identify this process (no /proc?)"))?;
    Ok(format!(
        "{STAGED_PREFIX}{me}~{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn staged_writer(name: &str) -> Option<Creator> {
    let rest = name.strip_prefix(STAGED_PREFIX)?;
    Creator::parse(rest.rsplit_once('~')?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_name_names_its_writer() {
        let name = staged_name().unwrap();
        let writer = staged_writer(&name).unwrap();
        assert_eq!(writer.liveness(), Liveness::Alive);
        assert_eq!(writer.pid, std::process::id());
        assert_ne!(staged_name().unwrap(), name);
        assert_eq!(staged_writer("disk-0123456789abcde.meta"), None);
        assert_eq!(staged_writer("staged-nonsense~1"), None);
    }
}
