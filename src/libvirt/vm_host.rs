//! `VmHost` over a libvirt connection: the same `LibvirtHost` (connection
//! and pool opened on first use) with domains and networks looked up by name
//! on each call. Thin: every method is one of `Libvirt`'s.

use std::time::Duration;

use virt::domain::Domain;
use virt::network::Network;

use super::host::LibvirtHost;
use super::Libvirt;
use crate::config::NetworkConfig;
use crate::error::{CpiError, Result};
use crate::host::{
    DhcpHost, DiskFormat, DiskHost, DomainFacts, DomainSpec, NetworkInfo, RebootOutcome, Released,
    ReservationFilter, VmHost, VmMetadata,
};

impl LibvirtHost<'_> {
    /// The domain, which the caller knows to exist (looked up afresh).
    fn domain_of(&self, vm_cid: &str) -> Result<Domain> {
        self.lookup_domain(vm_cid)?
            .ok_or_else(|| CpiError::vanished(format_args!("VM {vm_cid}")))
    }

    fn network_of(&self, name: &str) -> Result<Network> {
        self.libvirt()?
            .find_network(name)?
            .ok_or_else(|| CpiError::vanished(format_args!("libvirt network {name}")))
    }
}

impl VmHost for LibvirtHost<'_> {
    fn stemcell_exists(&self, cid: &str) -> Result<bool> {
        let (lv, pool) = self.parts()?;
        Ok(lv.find_stemcell(pool, cid)?.is_some())
    }

    fn pool_directory(&self) -> Result<String> {
        let (lv, pool) = self.parts()?;
        lv.pool_directory(pool, self.pool_name())
    }

    fn create_overlay(
        &self,
        name: &str,
        backing_path: &str,
        backing_format: DiskFormat,
        capacity: u64,
    ) -> Result<()> {
        let (lv, pool) = self.parts()?;
        lv.create_overlay(pool, name, backing_path, backing_format, capacity)
            .map(drop)
    }

    fn define_vm(&self, spec: &DomainSpec) -> Result<()> {
        self.libvirt()?.define_domain(spec).map(drop)
    }

    fn start_vm(&self, vm_cid: &str) -> Result<()> {
        let dom = self.domain_of(vm_cid)?;
        self.libvirt()?.start_domain(&dom, vm_cid)
    }

    /// The start runs on a thread of its own, over the same connection.
    /// Ports that cannot be counted (a libvirt older than 5.5 has no port
    /// API) are not waited for: `meanwhile` then runs at once, before the
    /// start has its ports, and the start waits for it.
    fn start_paused_vm_with(
        &self,
        vm_cid: &str,
        meanwhile: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let dom = self.domain_of(vm_cid)?;
        let lv = self.libvirt()?;
        let watch = lv.watch_ports(&dom, vm_cid).unwrap_or_default();
        std::thread::scope(|s| {
            let start = s.spawn(|| lv.start_domain_paused(&dom, vm_cid));
            lv.wait_for_ports(&watch, &|| start.is_finished());
            if start.is_finished() {
                // Over before its ports showed: failed, or quicker than a poll.
                joined(start, vm_cid)?;
                return meanwhile();
            }
            let done = meanwhile();
            joined(start, vm_cid).and(done)
        })
    }

    fn resume_vm(&self, vm_cid: &str) -> Result<()> {
        let dom = self.domain_of(vm_cid)?;
        self.libvirt()?.resume_domain(&dom, vm_cid)
    }

    fn destroy_vm(&self, vm_cid: &str) -> Result<()> {
        match self.lookup_domain(vm_cid)? {
            Some(dom) => self.libvirt()?.destroy_domain(&dom, vm_cid),
            None => Ok(()),
        }
    }

    fn undefine_vm(&self, vm_cid: &str) -> Result<()> {
        match self.lookup_domain(vm_cid)? {
            Some(dom) => self.libvirt()?.undefine_domain(&dom, vm_cid),
            None => Ok(()),
        }
    }

    fn vm_facts(&self, vm_cid: &str) -> Result<Option<DomainFacts>> {
        match self.lookup_domain(vm_cid)? {
            Some(dom) => self.libvirt()?.domain_facts(&dom, vm_cid).map(Some),
            None => Ok(None),
        }
    }

    fn set_vm_metadata(&self, vm_cid: &str, md: &VmMetadata) -> Result<()> {
        let dom = self.domain_of(vm_cid)?;
        self.libvirt()?.set_vm_metadata(&dom, vm_cid, md)
    }

    fn set_vm_title(&self, vm_cid: &str, title: &str) -> Result<()> {
        let dom = self.domain_of(vm_cid)?;
        self.libvirt()?.set_title(&dom, vm_cid, title)
    }

    fn reboot_vm(&self, vm_cid: &str, grace: Duration) -> Result<Option<RebootOutcome>> {
        match self.lookup_domain(vm_cid)? {
            Some(dom) => self.libvirt()?.reboot_domain(&dom, vm_cid, grace).map(Some),
            None => Ok(None),
        }
    }

    fn vm_names(&self) -> Result<Vec<String>> {
        self.libvirt()?.domain_names()
    }

    fn stopped_vm_names(&self) -> Result<Vec<String>> {
        Ok(self
            .libvirt()?
            .domains_not_running()?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    fn ensure_network(&self, cfg: &NetworkConfig) -> Result<()> {
        self.libvirt()?.ensure_config_network(cfg).map(drop)
    }

    fn network_in_use(&self, name: &str) -> Result<bool> {
        Ok(self.libvirt()?.existing_network(name)?.is_some())
    }

    fn network(&self, name: &str) -> Result<Option<NetworkInfo>> {
        let lv = self.libvirt()?;
        match lv.find_network(name)? {
            Some(net) => lv.network_info(&net, name).map(Some),
            None => Ok(None),
        }
    }

    fn host_interface_exists(&self, name: &str) -> Result<Option<bool>> {
        self.libvirt()?.host_interface_exists(name)
    }

    fn reserve(&self, network: &str, host: &DhcpHost) -> Result<()> {
        let net = self.network_of(network)?;
        self.libvirt()?.add_dhcp_host(&net, network, host)
    }

    fn release(&self, network: &str, host: &DhcpHost) -> Result<bool> {
        let net = self.network_of(network)?;
        self.libvirt()?.remove_dhcp_host(&net, network, host)
    }

    fn release_all(&self, select: ReservationFilter) -> Result<Released> {
        release_all(self.libvirt()?, select)
    }

    fn remove_vm_and_release(
        &self,
        vm_cid: &str,
        select: ReservationFilter,
    ) -> (Result<()>, Result<Released>) {
        let lv = match self.libvirt() {
            Ok(lv) => lv,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let dom = match self.lookup_domain(vm_cid) {
            Ok(Some(dom)) => dom,
            Ok(None) => return (Ok(()), release_all(lv, select)),
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        std::thread::scope(|s| {
            let released = s.spawn(|| release_all(lv, select));
            let gone = lv
                .destroy_domain(&dom, vm_cid)
                .and_then(|()| lv.undefine_domain(&dom, vm_cid));
            let released = released.join().unwrap_or_else(|_| {
                Err(CpiError::cloud(
                    "removing DHCP reservations: the thread panicked",
                ))
            });
            (gone, released)
        })
    }

    fn pause(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// What the thread that started domain `vm_cid` returned.
fn joined(start: std::thread::ScopedJoinHandle<'_, Result<()>>, vm_cid: &str) -> Result<()> {
    start.join().unwrap_or_else(|_| {
        Err(CpiError::cloud(format!(
            "starting domain {vm_cid}: the thread panicked"
        )))
    })
}

/// Removes the DHCP entries `select` picks from every libvirt network.
fn release_all(lv: &Libvirt, select: ReservationFilter) -> Result<Released> {
    let mut out = Released::default();
    for net_name in lv.network_names()? {
        let Some(net) = lv.find_network(&net_name)? else {
            continue;
        };
        let info = match lv.network_info(&net, &net_name) {
            Ok(info) => info,
            // Removed since it was listed (another client's network): nothing to sweep there.
            Err(_) if lv.find_network(&net_name)?.is_none() => continue,
            Err(e) => return Err(e),
        };
        for host in info.hosts.iter().filter(|h| select(&net_name, h)) {
            match lv.remove_dhcp_host(&net, &net_name, host) {
                Ok(_) => out.removed.push(format!(
                    "removed DHCP host {} from {net_name}",
                    host.to_xml()
                )),
                Err(e) => out.problems.push(e.message),
            }
        }
    }
    Ok(out)
}
