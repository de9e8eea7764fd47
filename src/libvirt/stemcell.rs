//! Stemcell volumes in the dedicated pool (named by `crate::names`): the
//! image `sc-<uuid>` and its completion marker `sc-<uuid>.meta`, created only
//! after the image was uploaded and verified. A stemcell exists iff both
//! volumes do, so a crash mid-import can never leave something `create_vm`
//! would accept.
//!
//! Leftovers are image volumes without a marker, which the sweep of killed
//! imports (handlers/stemcell_sweep.rs) removes once their file is old;
//! `volumes_backed_by` tells it (and delete_stemcell) which images VMs still
//! boot from.

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::volume::parse_volume_xml;
use super::{is_not_found, lv_error, Libvirt};
use crate::error::{CpiError, Result};
use crate::names::{is_stemcell_cid, marker_name, volume_of_marker};

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
}
