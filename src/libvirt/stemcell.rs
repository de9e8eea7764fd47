//! Stemcell volumes in the dedicated pool (named by `crate::names`): the
//! image `sc-<uuid>` and its completion marker `sc-<uuid>.meta`, created only
//! after the image was uploaded and verified. A stemcell exists iff both
//! volumes do, so a crash mid-import can never leave something `create_vm`
//! would accept.
//!
//! Leftovers are image volumes without a marker. The one being imported by a
//! live process is written to all the time, so its modification time stays
//! fresh; `sweep_partial_stemcells` only removes those whose file has not
//! changed for `PARTIAL_MAX_AGE_SECS`, judged against a timestamp taken on the
//! libvirt host itself (no clock skew between CPI and host).

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::volume::parse_volume_xml;
use super::{is_not_found, lv_error, Libvirt};
use crate::error::{CpiError, Result};
use crate::names::{is_stemcell_cid, marker_name, volume_of_marker};

/// A marker-less stemcell volume untouched this long is a leftover of a
/// killed import (a live upload writes continuously; keepalive ends a dead
/// connection within a minute).
pub const PARTIAL_MAX_AGE_SECS: f64 = 30.0 * 60.0;

impl Libvirt {
    /// The stemcell's image volume, only when the import completed (marker
    /// present). `None` for anything else, including a CID that is not ours.
    pub fn find_stemcell(&self, pool: &StoragePool, cid: &str) -> Result<Option<StorageVol>> {
        if !is_stemcell_cid(cid) {
            return Ok(None);
        }
        if self.find_volume(pool, &marker_name(cid))?.is_none() {
            return Ok(None);
        }
        self.find_volume(pool, cid)
    }

    /// Names of the volumes in the pool whose backing store is `path`.
    pub fn volumes_backed_by(&self, pool: &StoragePool, path: &str) -> Result<Vec<String>> {
        let mut users = Vec::new();
        for name in self.volume_names(pool)? {
            if is_stemcell_cid(&name) || volume_of_marker(&name).is_some() {
                continue;
            }
            let Some(vol) = self.find_volume(pool, &name)? else {
                continue;
            };
            let xml = match vol.xml_desc(0) {
                Ok(x) => x,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(lv_error(format!("reading the XML of volume {name}"), e)),
            };
            let facts = parse_volume_xml(&xml)
                .map_err(|e| CpiError::cloud(format!("parsing the XML of volume {name}: {e}")))?;
            if facts.backing_path.as_deref() == Some(path) {
                users.push(name);
            }
        }
        Ok(users)
    }

    /// Whether any volume in the pool is an overlay on volume `name`. An
    /// image that backs a VM's root disk is never swept, marker or not: a
    /// delete_stemcell killed between removing the marker and finding a new
    /// user leaves exactly that, and the VM must keep booting.
    fn backs_any_volume(&self, pool: &StoragePool, name: &str) -> Result<bool> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(false);
        };
        let path = self.volume_path(&vol, name)?;
        Ok(!self.volumes_backed_by(pool, &path)?.is_empty())
    }

    /// Removes stemcell leftovers: image volumes without a valid marker whose file
    /// has not changed for `max_age` seconds before `host_now` (a time read on
    /// the libvirt host) and that no overlay uses, and markers whose image is
    /// gone. Never `keep`.
    /// Returns what it removed.
    pub fn sweep_partial_stemcells(
        &self,
        pool: &StoragePool,
        host_now: f64,
        max_age: f64,
        keep: &str,
    ) -> Result<Vec<String>> {
        let names = self.volume_names(pool)?;
        let has = |n: &str| names.iter().any(|x| x == n);
        let mut removed = Vec::new();
        for name in &names {
            if name == keep {
                continue;
            }
            if is_stemcell_cid(name) {
                // A marker that is not a document (its write was killed) is
                // no marker: read only for old images, the rare candidates.
                let marked = has(&marker_name(name));
                if self.volume_untouched_for(pool, name, max_age, host_now)?
                    && !(marked && self.has_valid_marker(pool, name)?)
                    && !self.backs_any_volume(pool, name)?
                    && self.delete_volume(pool, name)?
                {
                    removed.push(name.clone());
                    if marked && self.delete_volume(pool, &marker_name(name))? {
                        removed.push(marker_name(name));
                    }
                }
            } else if let Some(base) = volume_of_marker(name) {
                // A marker is written after its image and deleted before it:
                // one without an image is garbage whatever its age.
                if is_stemcell_cid(base) && base != keep && !has(base) {
                    // Re-check: the listing may predate the image's creation.
                    if self.find_volume(pool, base)?.is_none() && self.delete_volume(pool, name)? {
                        removed.push(name.clone());
                    }
                }
            }
        }
        Ok(removed)
    }
}
