//! The dedicated `dir` storage pool and lookups of the volumes in it.
//!
//! Many CPI processes may find the pool missing at the same moment: each one
//! tries to define and start it, and treats "someone else just did" as success.
//! Starting builds the directory when missing, so whoever starts the pool
//! first (not necessarily whoever defined it) makes it usable.

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::xmlwrite::El;
use super::{lv_error, not_found_as_none, Libvirt};
use crate::config::PoolConfig;
use crate::error::{CpiError, Result};

impl Libvirt {
    /// The configured pool, active; defined, built, started and autostarted
    /// first when it is missing and the config allows it.
    pub fn pool(&self, cfg: &PoolConfig) -> Result<StoragePool> {
        let name = &cfg.name;
        let pool = match self.find_pool(name)? {
            Some(pool) => pool,
            None if cfg.create => {
                let path = cfg.path.as_deref().unwrap_or_default();
                self.define_pool(name, path, "0711")?
            }
            None => {
                return Err(CpiError::cloud(format!(
                "storage pool '{name}' does not exist (set pool.create to let the CPI create it)"
            )))
            }
        };
        self.start_pool(&pool, name)?;
        Ok(pool)
    }

    /// Starts the pool unless it is active.
    pub(super) fn start_pool(&self, pool: &StoragePool, name: &str) -> Result<()> {
        if !pool
            .is_active()
            .map_err(|e| lv_error(format!("checking storage pool {name}"), e))?
        {
            // WITH_BUILD: the pool may have been defined by another CPI that
            // has not built its directory yet (building a dir pool is
            // idempotent; building an active pool is an error, so nobody
            // builds separately).
            if let Err(e) = pool.create(virt::sys::VIR_STORAGE_POOL_CREATE_WITH_BUILD) {
                // Another CPI may have started it between our check and now.
                if !pool.is_active().unwrap_or(false) {
                    return Err(lv_error(format!("starting storage pool {name}"), e));
                }
            }
        }
        Ok(())
    }

    pub fn find_pool(&self, name: &str) -> Result<Option<StoragePool>> {
        not_found_as_none(
            self.conn().lookup_storage_pool_by_name(name),
            format!("looking up storage pool {name}"),
        )
    }

    /// Defines a pool (see `pool_xml`), autostarted.
    pub(super) fn define_pool(&self, name: &str, path: &str, mode: &str) -> Result<StoragePool> {
        let xml = pool_xml(name, path, mode);
        let pool = match self.conn().define_storage_pool_xml(&xml, 0) {
            Ok(pool) => pool,
            // Lost a race with another CPI defining the same pool.
            Err(e) => match self.find_pool(name)? {
                Some(pool) => return Ok(pool),
                None => {
                    return Err(lv_error(
                        format!("defining storage pool {name} at {path}"),
                        e,
                    ))
                }
            },
        };
        // Built and started by `pool` (create with build), never here: a
        // concurrent CPI may already have started it, and building an active
        // pool fails.
        pool.set_autostart(true)
            .map_err(|e| lv_error(format!("setting autostart on storage pool {name}"), e))?;
        Ok(pool)
    }

    /// The pool's directory on the host: a `dir` pool keeps volume `name`
    /// at `<directory>/<name>`, so a volume's path is known before it exists.
    pub fn pool_directory(&self, pool: &StoragePool, name: &str) -> Result<String> {
        let xml = pool
            .xml_desc(0)
            .map_err(|e| lv_error(format!("reading storage pool {name}"), e))?;
        super::xmltree::Element::parse(&xml)
            .ok()
            .and_then(|root| root.text_at(&["target", "path"]).map(str::to_string))
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| CpiError::cloud(format!("storage pool {name} has no target path")))
    }

    pub fn find_volume(&self, pool: &StoragePool, name: &str) -> Result<Option<StorageVol>> {
        not_found_as_none(
            pool.lookup_storage_vol_by_name(name),
            format!("looking up volume {name}"),
        )
    }
}

/// A `dir` pool at `path`, its directory `mode`: 0711 for the CPI's pool
/// (the QEMU user must reach the images in it, but nobody needs to list it).
fn pool_xml(name: &str, path: &str, mode: &str) -> String {
    El::new("pool")
        .attr("type", "dir")
        .text_child("name", name)
        .child(
            El::new("target")
                .text_child("path", path)
                .child(El::new("permissions").text_child("mode", mode)),
        )
        .to_compact()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xmltree::Element;

    #[test]
    fn hostile_names_and_paths_stay_values() {
        for v in crate::libvirt::xmlwrite::HOSTILE {
            let root = Element::parse(&pool_xml(v, v, "0711")).unwrap();
            assert_eq!(root.child("name").unwrap().text, *v);
            assert_eq!(root.at(&["target", "path"]).unwrap().text, *v);
            assert_eq!(root.children.len(), 2);
            assert_eq!(
                root.at(&["target", "permissions", "mode"]).unwrap().text,
                "0711"
            );
        }
    }
}
