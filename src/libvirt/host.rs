//! The host seam over a libvirt connection and the configured pool, both
//! opened on first use (so a handler that decides without the host never
//! connects): `DiskHost` here, `StemcellHost` in stemcell_host.rs, `VmHost`
//! in vm_host.rs, all on the one `LibvirtHost` of a call.
//! Thin: every method is one of `Libvirt`'s, with the pool and a volume
//! handle looked up by name.

use std::cell::{OnceCell, RefCell};
use std::time::Duration;

use serde_json::Value;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::disk::disk_device_xml;
use super::Libvirt;
use crate::config::Config;
use crate::error::{CpiError, Result};
use crate::host::{
    DiskAttachment, DiskDevice, DiskFormat, DiskHost, DiskRef, DomainDisks, Holder, VolumeFacts,
};

/// Opens the connection of `cell` unless it is open.
pub fn connect<'c>(cell: &'c OnceCell<Libvirt>, uri: &str) -> Result<&'c Libvirt> {
    if let Some(lv) = cell.get() {
        return Ok(lv);
    }
    let lv = Libvirt::open(uri)?;
    Ok(cell.get_or_init(|| lv))
}

pub struct LibvirtHost<'a> {
    conn: &'a OnceCell<Libvirt>,
    config: &'a Config,
    pool: OnceCell<StoragePool>,
    /// Domains found during this call, by name: a VM is looked up once per
    /// call, however many of its operations follow.
    domains: RefCell<Vec<(String, Domain)>>,
}

impl<'a> LibvirtHost<'a> {
    pub fn new(conn: &'a OnceCell<Libvirt>, config: &'a Config) -> Self {
        LibvirtHost {
            conn,
            config,
            pool: OnceCell::new(),
            domains: RefCell::new(Vec::new()),
        }
    }

    /// The connection, opened on first use.
    pub(super) fn libvirt(&self) -> Result<&'a Libvirt> {
        connect(self.conn, &self.config.libvirt_uri())
    }

    /// The pool, opened (and created when the config allows) on first use.
    pub(super) fn pool(&self) -> Result<&StoragePool> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let pool = self.libvirt()?.pool(&self.config.pool)?;
        Ok(self.pool.get_or_init(|| pool))
    }

    pub(super) fn parts(&self) -> Result<(&'a Libvirt, &StoragePool)> {
        Ok((self.libvirt()?, self.pool()?))
    }

    /// Looks the domain up (always: whether it exists must be fresh) and
    /// keeps its handle for the operations of this call that follow.
    pub(super) fn lookup_domain(&self, vm_cid: &str) -> Result<Option<Domain>> {
        let found = self.libvirt()?.find_domain(vm_cid)?;
        let mut domains = self.domains.borrow_mut();
        domains.retain(|(n, _)| n != vm_cid);
        if let Some(d) = &found {
            domains.push((vm_cid.to_string(), d.clone()));
        }
        Ok(found)
    }

    /// The domain's handle: the one this call already has, else looked up.
    /// A handle of a domain undefined since is answered by libvirt as no
    /// domain (`domain_disks` then gives `None`).
    fn known_domain(&self, vm_cid: &str) -> Result<Option<Domain>> {
        if let Some((_, d)) = self.domains.borrow().iter().find(|(n, _)| n == vm_cid) {
            return Ok(Some(d.clone()));
        }
        self.lookup_domain(vm_cid)
    }

    fn domain(&self, vm_cid: &str) -> Result<Domain> {
        self.known_domain(vm_cid)?
            .ok_or_else(|| CpiError::vanished(format_args!("VM {vm_cid}")))
    }

    pub(super) fn existing(&self, name: &str, doing: &str) -> Result<StorageVol> {
        let (lv, pool) = self.parts()?;
        lv.find_volume(pool, name)?
            .ok_or_else(|| CpiError::cloud(format!("{doing} volume {name}: it does not exist")))
    }
}

impl DiskHost for LibvirtHost<'_> {
    fn pool_name(&self) -> &str {
        &self.config.pool.name
    }

    fn available_bytes(&self, recount: bool) -> Result<u64> {
        let (lv, pool) = self.parts()?;
        lv.pool_available(pool, recount)
    }

    fn volume_exists(&self, name: &str) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        Ok(lv.find_volume(pool, name)?.is_some())
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeFacts>> {
        let (lv, pool) = self.parts()?;
        lv.find_volume_facts(pool, name)
    }

    fn volume_names_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let (lv, pool) = self.parts()?;
        lv.volume_names_with_prefix(pool, prefix)
    }

    fn volume_untouched_for(&self, name: &str, max_age_secs: f64, host_now: f64) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        lv.volume_untouched_for(pool, name, max_age_secs, host_now)
    }

    fn claim_sweep(&self, prefix: &str, every_secs: f64, host_now: f64) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        lv.claim_sweep(pool, prefix, every_secs, host_now)
    }

    fn create_volume(&self, name: &str, capacity: u64, format: DiskFormat) -> Result<()> {
        let (lv, pool) = self.parts()?;
        lv.create_volume(pool, name, capacity, format).map(drop)
    }

    /// Staged (see `staging`): an upload into the pool would make libvirt
    /// re-read all of it.
    fn create_volume_with(&self, name: &str, data: &[u8]) -> Result<()> {
        let (lv, pool) = self.parts()?;
        lv.create_volume_staged(pool, name, data).map(drop)
    }

    fn create_lock(&self, name: &str, owner: &[u8]) -> Result<()> {
        let (lv, pool) = self.parts()?;
        lv.create_lock(pool, name, owner)
    }

    fn read_lock(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let (lv, pool) = self.parts()?;
        lv.read_lock(pool, name)
    }

    fn remove_lock(&self, name: &str) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        lv.remove_lock(pool, name)
    }

    fn copy_volume(&self, name: &str, from: &str, capacity: u64, format: DiskFormat) -> Result<()> {
        let source = self.existing(from, "copying")?;
        let (lv, pool) = self.parts()?;
        lv.clone_volume(pool, name, &source, from, capacity, format)
            .map(drop)
    }

    fn resize_volume(&self, name: &str, capacity: u64) -> Result<()> {
        let vol = self.existing(name, "growing")?;
        self.libvirt()?.resize_volume(&vol, name, capacity)
    }

    fn delete_volume(&self, name: &str) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        lv.delete_volume(pool, name)
    }

    fn read_volume(&self, name: &str, length: u64) -> Result<Vec<u8>> {
        let vol = self.existing(name, "reading")?;
        self.libvirt()?.read_volume(&vol, name, length)
    }

    fn read_json(&self, name: &str) -> Result<Option<Value>> {
        let (lv, pool) = self.parts()?;
        lv.read_json_volume(pool, name)
    }

    fn write_json(&self, name: &str, value: &Value) -> Result<()> {
        let (lv, pool) = self.parts()?;
        lv.write_json_volume(pool, name, value)
    }

    fn has_valid_marker(&self, volume: &str) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        lv.has_valid_marker(pool, volume)
    }

    fn vm_exists(&self, vm_cid: &str) -> Result<bool> {
        Ok(self.lookup_domain(vm_cid)?.is_some())
    }

    fn vm_disks(&self, vm_cid: &str) -> Result<Option<DomainDisks>> {
        match self.known_domain(vm_cid)? {
            Some(domain) => self.libvirt()?.domain_disks(&domain, vm_cid),
            None => Ok(None),
        }
    }

    fn disk_holders(&self, r: &DiskRef) -> Result<Vec<Holder>> {
        self.libvirt()?.disk_holders(r)
    }

    fn end_abandoned_copy(&self, vm_cid: &str, target: &str) -> Result<Option<String>> {
        let domain = self.domain(vm_cid)?;
        let (lv, pool) = self.parts()?;
        lv.end_abandoned_copy(pool, &domain, vm_cid, target)
    }

    fn live_copy(
        &self,
        vm_cid: &str,
        target: &str,
        dest: &str,
        stall_timeout: Duration,
    ) -> Result<()> {
        let domain = self.domain(vm_cid)?;
        let lv = self.libvirt()?;
        let path = lv.volume_path(&self.existing(dest, "copying into")?, dest)?;
        lv.live_block_copy(&domain, vm_cid, target, &path, stall_timeout)
    }

    fn attach_disk_device(
        &self,
        vm_cid: &str,
        d: &DiskAttachment,
        live: bool,
        config: bool,
    ) -> Result<()> {
        let xml = disk_device_xml(d.path, d.format, d.target, d.serial, d.options);
        let domain = self.domain(vm_cid)?;
        self.libvirt()?
            .attach_disk_device(&domain, vm_cid, &xml, live, config)
    }

    fn detach_disk_live(
        &self,
        vm_cid: &str,
        dev: &DiskDevice,
        r: &DiskRef,
        timeout: Duration,
    ) -> Result<()> {
        let domain = self.domain(vm_cid)?;
        self.libvirt()?
            .detach_disk_live(&domain, vm_cid, dev, r, timeout)
    }

    fn detach_disk_config(&self, vm_cid: &str, dev: &DiskDevice) -> Result<()> {
        let domain = self.domain(vm_cid)?;
        self.libvirt()?.detach_disk_config(&domain, vm_cid, dev)
    }

    fn remove_orphan_block_nodes(
        &self,
        vm_cid: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<String>> {
        let domain = self.domain(vm_cid)?;
        let orphans = self
            .libvirt()?
            .remove_orphan_block_nodes(&domain, vm_cid, path, timeout)?;
        Ok((!orphans.is_empty()).then(|| orphans.to_string()))
    }
}
