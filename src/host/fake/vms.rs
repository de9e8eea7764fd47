//! `VmHost` for `FakeHost`: VMs, networks and DHCP reservations in memory,
//! behaving like libvirt where the VM handlers care: a VM name is defined
//! once per UUID, starting needs the VM's volumes, destroying or undefining
//! what is gone is done, a reservation is refused when an entry with the
//! same MAC, name or IP exists, releasing what is not there is `false`.
//! Calls are logged and failures injected through `FakeHost::enter`, like
//! the disk side's; a VM defined here is also one `DiskHost` sees.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{vanished, FakeHost, POOL};
use crate::config::NetworkConfig;
use crate::error::{CpiError, Result};
use crate::host::{
    matches_host, DhcpHost, DiskFormat, DomainDisks, DomainFacts, DomainSpec, NetworkInfo,
    RebootOutcome, Released, ReservationFilter, VmHost, VmMetadata,
};
use crate::names;
use crate::vm_spec::{CpuMode, DiskOptions, Firmware, NicSource};

/// One defined VM.
#[derive(Debug, Clone)]
pub struct FakeVm {
    pub spec: DomainSpec,
    pub running: bool,
    /// Started paused and not resumed yet (its guest does not run).
    pub paused: bool,
    pub metadata: VmMetadata,
    pub title: Option<String>,
}

/// The VM side of the fake's state.
#[derive(Default)]
pub(super) struct Machines {
    vms: BTreeMap<String, FakeVm>,
    /// Networks, with whether they run.
    networks: BTreeMap<String, (NetworkInfo, bool)>,
    /// The host's interfaces (bridges, devices).
    interfaces: BTreeSet<String>,
    /// Somebody else reserves the MAC of the next reservation first.
    mac_taken_next: bool,
}

impl FakeHost {
    /// A running NAT network as the CPI defines it: host `.1`, DHCP on the
    /// upper half (`cidr` like `10.0.16.0/24`).
    pub fn put_network(&self, name: &str, cidr: &str) {
        let info = nat_network(name, cidr);
        self.s
            .borrow_mut()
            .machines
            .networks
            .insert(name.to_string(), (info, true));
    }

    /// The MAC of the next reservation is taken by somebody else just before
    /// (MACs are random: only a race or bad luck makes this happen).
    pub fn take_next_mac(&self) {
        self.s.borrow_mut().machines.mac_taken_next = true;
    }

    /// A reservation made by somebody else (or an earlier call).
    pub fn put_reservation(&self, network: &str, host: DhcpHost) {
        let mut s = self.s.borrow_mut();
        if let Some((info, _)) = s.machines.networks.get_mut(network) {
            info.hosts.push(host);
        }
    }

    pub fn reservations(&self, network: &str) -> Vec<DhcpHost> {
        self.s
            .borrow()
            .machines
            .networks
            .get(network)
            .map(|(i, _)| i.hosts.clone())
            .unwrap_or_default()
    }

    pub fn put_interface(&self, name: &str) {
        self.s
            .borrow_mut()
            .machines
            .interfaces
            .insert(name.to_string());
    }

    /// A completely imported stemcell: its image and its marker.
    pub fn put_stemcell(&self, cid: &str, capacity: u64, record: &serde_json::Value) {
        self.put_volume(cid, capacity, "qcow2", b"");
        self.put_json(&names::marker_name(cid), record);
    }

    /// A VM started paused, as a create_vm killed while it made its
    /// reservations left it.
    pub fn put_paused_domain(&self, vm_cid: &str, metadata: VmMetadata) {
        self.put_domain(vm_cid, true, metadata);
        self.set_paused(vm_cid, true);
    }

    /// A VM as an earlier create_vm left it, with the metadata given.
    pub fn put_domain(&self, vm_cid: &str, running: bool, metadata: VmMetadata) {
        let spec = minimal_spec(vm_cid, metadata.clone());
        let mut s = self.s.borrow_mut();
        s.machines.vms.insert(
            vm_cid.to_string(),
            FakeVm {
                spec,
                running,
                paused: false,
                metadata,
                title: None,
            },
        );
        s.vms.insert(
            vm_cid.to_string(),
            DomainDisks {
                running,
                ..Default::default()
            },
        );
    }

    pub fn domain(&self, vm_cid: &str) -> Option<FakeVm> {
        self.s.borrow().machines.vms.get(vm_cid).cloned()
    }

    pub fn domain_names(&self) -> Vec<String> {
        self.s.borrow().machines.vms.keys().cloned().collect()
    }

    fn with_vm<T>(&self, vm_cid: &str, f: impl FnOnce(&mut FakeVm) -> T) -> Result<T> {
        let mut s = self.s.borrow_mut();
        let vm = s
            .machines
            .vms
            .get_mut(vm_cid)
            .ok_or_else(|| vanished(vm_cid))?;
        Ok(f(vm))
    }

    fn set_paused(&self, vm_cid: &str, paused: bool) {
        if let Some(vm) = self.s.borrow_mut().machines.vms.get_mut(vm_cid) {
            vm.paused = paused;
        }
    }

    fn set_running(&self, vm_cid: &str, running: bool) {
        let mut s = self.s.borrow_mut();
        if let Some(vm) = s.machines.vms.get_mut(vm_cid) {
            vm.running = running;
            vm.paused &= running;
        }
        if let Some(d) = s.vms.get_mut(vm_cid) {
            d.running = running;
            if !running {
                d.live.clear();
            }
        }
    }

    fn release_in(&self, select: ReservationFilter) -> Released {
        let mut out = Released::default();
        let mut s = self.s.borrow_mut();
        for (net, (info, _)) in s.machines.networks.iter_mut() {
            info.hosts.retain(|h| {
                let gone = select(net, h);
                if gone {
                    out.removed
                        .push(format!("removed DHCP host {} from {net}", h.to_xml()));
                }
                !gone
            });
        }
        out
    }
}

fn nat_network(name: &str, cidr: &str) -> NetworkInfo {
    let subnet = crate::net::parse_subnet(cidr).expect("a CIDR");
    NetworkInfo {
        name: name.to_string(),
        subnet: Some(subnet),
        host_ip: crate::net::nth_address(&subnet, 1),
        dhcp: true,
        dhcp_ranges: crate::net::dhcp_range(&subnet).into_iter().collect(),
        hosts: Vec::new(),
        ipv6: None,
    }
}

fn minimal_spec(vm_cid: &str, metadata: VmMetadata) -> DomainSpec {
    DomainSpec {
        name: vm_cid.to_string(),
        uuid: vm_cid.trim_start_matches("vm-").to_string(),
        domain_type: "qemu".into(),
        machine: "q35".into(),
        memory_mib: 1024,
        cpus: 1,
        cpu_mode: CpuMode::Default,
        cpu_topology: None,
        memory_balloon: false,
        firmware: Firmware::Bios,
        graphics: None,
        root_disk: format!("/{POOL}/{}", names::root_volume(vm_cid)),
        ephemeral_disk: None,
        disk: DiskOptions::default(),
        config_drive: format!("/{POOL}/{}", names::config_drive_volume(vm_cid)),
        nics: Vec::new(),
        console_log: String::new(),
        metadata,
    }
}

impl VmHost for FakeHost {
    fn stemcell_exists(&self, cid: &str) -> Result<bool> {
        self.enter("stemcell_exists", cid)?;
        Ok(
            names::is_stemcell_cid(cid)
                && self.exists(&names::marker_name(cid))
                && self.exists(cid),
        )
    }

    fn pool_directory(&self) -> Result<String> {
        self.enter("pool_directory", "")?;
        Ok(format!("/{POOL}"))
    }

    fn create_overlay(
        &self,
        name: &str,
        backing_path: &str,
        _backing_format: DiskFormat,
        capacity: u64,
    ) -> Result<()> {
        self.enter("create_overlay", name)?;
        let backed = self
            .s
            .borrow()
            .volumes
            .values()
            .any(|v| v.facts.path == backing_path);
        if !backed {
            return Err(CpiError::cloud(format!(
                "creating root overlay {name} on {backing_path}: no such file"
            )));
        }
        self.create(name, capacity, "qcow2", &[])?;
        if let Some(v) = self.s.borrow_mut().volumes.get_mut(name) {
            v.facts.backing_path = Some(backing_path.to_string());
        }
        Ok(())
    }

    fn define_vm(&self, spec: &DomainSpec) -> Result<()> {
        self.enter("define_vm", &spec.name)?;
        let mut s = self.s.borrow_mut();
        let (running, paused) = match s.machines.vms.get(&spec.name) {
            Some(old) if old.spec.uuid != spec.uuid => {
                return Err(CpiError::cloud(format!(
                    "defining domain {}: domain '{}' already exists with uuid {}",
                    spec.name, spec.name, old.spec.uuid
                )))
            }
            Some(old) => (old.running, old.paused),
            None => (false, false),
        };
        s.machines.vms.insert(
            spec.name.clone(),
            FakeVm {
                spec: spec.clone(),
                running,
                paused,
                metadata: spec.metadata.clone(),
                title: None,
            },
        );
        s.vms.entry(spec.name.clone()).or_default();
        Ok(())
    }

    fn start_vm(&self, vm_cid: &str) -> Result<()> {
        self.enter("start_vm", vm_cid)?;
        let spec = self.with_vm(vm_cid, |vm| vm.spec.clone())?;
        let files = [
            Some(&spec.root_disk),
            spec.ephemeral_disk.as_ref(),
            Some(&spec.config_drive),
        ];
        for path in files.into_iter().flatten() {
            let there = self
                .s
                .borrow()
                .volumes
                .values()
                .any(|v| &v.facts.path == path);
            if !there {
                return Err(CpiError::cloud(format!(
                    "starting domain {vm_cid}: Cannot access storage file '{path}': No such file or directory"
                )));
            }
        }
        self.set_running(vm_cid, true);
        Ok(())
    }

    /// The start, then `meanwhile`: the order the real host guarantees.
    fn start_paused_vm_with(
        &self,
        vm_cid: &str,
        meanwhile: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        self.start_vm(vm_cid)?;
        self.set_paused(vm_cid, true);
        meanwhile()
    }

    fn resume_vm(&self, vm_cid: &str) -> Result<()> {
        self.enter("resume_vm", vm_cid)?;
        self.set_paused(vm_cid, false);
        Ok(())
    }

    fn destroy_vm(&self, vm_cid: &str) -> Result<()> {
        self.enter("destroy_vm", vm_cid)?;
        self.set_running(vm_cid, false);
        Ok(())
    }

    fn undefine_vm(&self, vm_cid: &str) -> Result<()> {
        self.enter("undefine_vm", vm_cid)?;
        let mut s = self.s.borrow_mut();
        s.machines.vms.remove(vm_cid);
        s.vms.remove(vm_cid);
        Ok(())
    }

    fn vm_facts(&self, vm_cid: &str) -> Result<Option<DomainFacts>> {
        self.enter("vm_facts", vm_cid)?;
        Ok(self.domain(vm_cid).map(|vm| DomainFacts {
            interfaces: vm
                .spec
                .nics
                .iter()
                .filter_map(|(mac, source)| match source {
                    NicSource::Network(Some(net)) => Some((mac.clone(), net.clone())),
                    _ => None,
                })
                .collect(),
            metadata: Some(vm.metadata),
            title: vm.title,
        }))
    }

    fn set_vm_metadata(&self, vm_cid: &str, md: &VmMetadata) -> Result<()> {
        self.enter("set_vm_metadata", vm_cid)?;
        self.with_vm(vm_cid, |vm| vm.metadata = md.clone())
    }

    fn set_vm_title(&self, vm_cid: &str, title: &str) -> Result<()> {
        self.enter("set_vm_title", vm_cid)?;
        self.with_vm(vm_cid, |vm| vm.title = Some(title.to_string()))
    }

    fn reboot_vm(&self, vm_cid: &str, _grace: Duration) -> Result<Option<RebootOutcome>> {
        self.enter("reboot_vm", vm_cid)?;
        let Some(vm) = self.domain(vm_cid) else {
            return Ok(None);
        };
        if vm.running {
            return Ok(Some(RebootOutcome::Graceful));
        }
        self.set_running(vm_cid, true);
        Ok(Some(RebootOutcome::Started))
    }

    fn vm_names(&self) -> Result<Vec<String>> {
        self.enter("vm_names", "")?;
        Ok(self.s.borrow().vms.keys().cloned().collect())
    }

    fn stopped_vm_names(&self) -> Result<Vec<String>> {
        self.enter("stopped_vm_names", "")?;
        let s = self.s.borrow();
        let paused = |n: &str| s.machines.vms.get(n).is_some_and(|vm| vm.paused);
        Ok(s.vms
            .iter()
            .filter(|(n, d)| !d.running || paused(n))
            .map(|(n, _)| n.clone())
            .collect())
    }

    fn ensure_network(&self, cfg: &NetworkConfig) -> Result<()> {
        self.enter("ensure_network", &cfg.name)?;
        let mut s = self.s.borrow_mut();
        match (s.machines.networks.get_mut(&cfg.name), &cfg.subnet) {
            (Some((_, active)), Some(_)) => *active = true,
            (Some((_, true)), None) => {}
            (Some(_), None) => {
                return Err(CpiError::cloud(format!(
                    "libvirt network '{}' exists but is not active",
                    cfg.name
                )))
            }
            (None, Some(subnet)) => {
                let info = nat_network(&cfg.name, subnet);
                s.machines.networks.insert(cfg.name.clone(), (info, true));
            }
            (None, None) => {
                return Err(CpiError::cloud(format!(
                "libvirt network '{}' does not exist (set network.subnet to let the CPI create it)",
                cfg.name
            )))
            }
        }
        Ok(())
    }

    fn network_in_use(&self, name: &str) -> Result<bool> {
        self.enter("network_in_use", name)?;
        match self.s.borrow().machines.networks.get(name) {
            None => Ok(false),
            Some((_, true)) => Ok(true),
            Some((_, false)) => Err(CpiError::cloud(format!(
                "libvirt network '{name}' exists but is not active"
            ))),
        }
    }

    fn network(&self, name: &str) -> Result<Option<NetworkInfo>> {
        self.enter("network", name)?;
        Ok(self
            .s
            .borrow()
            .machines
            .networks
            .get(name)
            .map(|(i, _)| i.clone()))
    }

    fn host_interface_exists(&self, name: &str) -> Result<Option<bool>> {
        self.enter("host_interface_exists", name)?;
        Ok(Some(self.s.borrow().machines.interfaces.contains(name)))
    }

    fn reserve(&self, network: &str, host: &DhcpHost) -> Result<()> {
        self.enter("reserve", network)?;
        let mut s = self.s.borrow_mut();
        let taken = std::mem::take(&mut s.machines.mac_taken_next);
        let (info, _) = s
            .machines
            .networks
            .get_mut(network)
            .ok_or_else(|| CpiError::vanished(format_args!("libvirt network {network}")))?;
        if taken {
            info.hosts.push(DhcpHost {
                mac: host.mac.clone(),
                name: Some("somebody-else".into()),
                ip: None,
            });
        }
        let same = |a: &Option<String>, b: &Option<String>| {
            a.is_some()
                && a.as_deref().map(str::to_ascii_lowercase)
                    == b.as_deref().map(str::to_ascii_lowercase)
        };
        if info
            .hosts
            .iter()
            .any(|h| same(&h.mac, &host.mac) || same(&h.name, &host.name) || same(&h.ip, &host.ip))
        {
            return Err(CpiError::cloud(format!(
                "adding DHCP host {} to libvirt network {network}: there is an existing dhcp host entry in network '{network}' that matches",
                host.to_xml()
            )));
        }
        info.hosts.push(host.clone());
        Ok(())
    }

    fn release(&self, network: &str, host: &DhcpHost) -> Result<bool> {
        self.enter("release", network)?;
        let mut s = self.s.borrow_mut();
        let Some((info, _)) = s.machines.networks.get_mut(network) else {
            return Err(CpiError::vanished(format_args!(
                "libvirt network {network}"
            )));
        };
        let before = info.hosts.len();
        info.hosts.retain(|h| !matches_host(h, host));
        Ok(info.hosts.len() < before)
    }

    fn release_all(&self, select: ReservationFilter) -> Result<Released> {
        self.enter("release_all", "")?;
        Ok(self.release_in(select))
    }

    fn remove_vm_and_release(
        &self,
        vm_cid: &str,
        select: ReservationFilter,
    ) -> (Result<()>, Result<Released>) {
        let released = self
            .enter("release_all", "")
            .map(|()| self.release_in(select));
        let gone = self
            .destroy_vm(vm_cid)
            .and_then(|()| self.undefine_vm(vm_cid));
        (gone, released)
    }

    fn pause(&self, d: Duration) {
        self.s
            .borrow_mut()
            .calls
            .push(format!("pause {}", d.as_secs()));
        self.advance_clock(d.as_secs_f64());
    }
}
