//! The hypervisor seam for VMs, in CPI vocabulary: a VM's definition and
//! metadata (found by CID, never by handle), the stemcell image its root
//! overlay is built on, the networks its NICs join and the DHCP reservations
//! that hold its IPs. Volumes, sidecar records and which VMs hold a file come
//! from `DiskHost`, which `VmHost` extends.
//!
//! `crate::libvirt::vm_host` implements it over a libvirt connection;
//! handler tests run against `fake::FakeHost`. Nothing here names a `virt`
//! type, and this module imports nothing from `crate::libvirt` (which
//! re-exports the types defined here at their old paths and keeps the XML
//! that reads and writes them).
//!
//! "Not found" is a value here (`Option`, `false`), never an error.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::{DiskFormat, DiskHost};
use crate::config::NetworkConfig;
use crate::error::Result;
use crate::net::Ipv4Net;
use crate::vm_spec::{CpuMode, CpuTopology, DiskOptions, Firmware, Graphics, NicSource};

/// One NIC (or, for `vip`, just the network) as recorded in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRecord {
    /// The BOSH network name.
    pub network: String,
    /// `manual`, `dynamic` or `vip`.
    pub kind: String,
    /// The libvirt network of the NIC (none for vip).
    pub libvirt_network: Option<String>,
    pub mac: Option<String>,
    pub ip: Option<String>,
    /// Name of the DHCP host entry reserving `ip` for `mac`, when one was made.
    pub dhcp_host: Option<String>,
}

/// The CPI's `<bosh:vm>` metadata element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmMetadata {
    pub agent_id: String,
    pub stemcell: String,
    pub created_at: String,
    pub networks: Vec<NicRecord>,
    /// BOSH's set_vm_metadata pairs, values as strings (non-strings as JSON).
    pub tags: Vec<(String, String)>,
    /// The create_vm process still making this VM (`Creator`'s text form);
    /// cleared once the VM runs.
    pub creating: Option<String>,
}

/// What the CPI puts into a new domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    pub name: String,
    pub uuid: String,
    pub domain_type: String,
    pub machine: String,
    pub memory_mib: u64,
    pub cpus: u64,
    pub cpu_mode: CpuMode,
    pub cpu_topology: Option<CpuTopology>,
    pub memory_balloon: bool,
    pub firmware: Firmware,
    /// A console for people, with its password (listening on 127.0.0.1 only).
    pub graphics: Option<(Graphics, String)>,
    pub root_disk: String,
    pub ephemeral_disk: Option<String>,
    /// Bus, cache, io and discard of the root and ephemeral disks.
    pub disk: DiskOptions,
    pub config_drive: String,
    /// (MAC, what it is plugged into) per NIC, in order; a `Network` source
    /// always names its libvirt network here.
    pub nics: Vec<(String, NicSource)>,
    pub console_log: String,
    pub metadata: VmMetadata,
}

/// What the CPI reads back from a VM's persistent definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainFacts {
    /// (MAC, libvirt network) of each `type='network'` interface.
    pub interfaces: Vec<(String, String)>,
    pub metadata: Option<VmMetadata>,
    pub title: Option<String>,
}

/// How a reboot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootOutcome {
    /// The guest rebooted after the ACPI request.
    Graceful,
    /// The guest ignored the request until the grace period ended: reset.
    HardReset,
    /// The domain was (or went) shut off: started.
    Started,
}

/// What the CPI needs to know about a network's IPv4 side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    /// Subnet of the first IPv4 `<ip>` element, if any.
    pub subnet: Option<Ipv4Net>,
    /// The host's address on that subnet (the VMs' gateway).
    pub host_ip: Option<Ipv4Addr>,
    /// Whether that `<ip>` has a `<dhcp>` element (reservations are possible).
    pub dhcp: bool,
    pub dhcp_ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub hosts: Vec<DhcpHost>,
    /// The host's address and prefix on the first IPv6 `<ip>`, if any.
    pub ipv6: Option<(Ipv6Addr, u8)>,
}

/// One `<host>` entry of a network's DHCP section, as libvirt stores it: a
/// reservation of an IP for a MAC, named after the VM it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: Option<String>,
    pub name: Option<String>,
    pub ip: Option<String>,
}

/// libvirt's DELETE matching: every field the pattern gives must be equal.
pub fn matches_host(entry: &DhcpHost, pattern: &DhcpHost) -> bool {
    let eq = |a: &Option<String>, b: &Option<String>, ci: bool| match (a, b) {
        (_, None) => true,
        (Some(a), Some(b)) if ci => a.eq_ignore_ascii_case(b),
        (Some(a), Some(b)) => a == b,
        (None, Some(_)) => false,
    };
    eq(&entry.mac, &pattern.mac, true)
        && eq(&entry.name, &pattern.name, false)
        && eq(&entry.ip, &pattern.ip, false)
}

/// A random unicast (bit 0 of the first octet clear), locally administered
/// (bit 1 set) MAC: 46 random bits, so MACs picked at the same moment by
/// concurrent create_vms (whose uniqueness checks see only a snapshot) do
/// not collide in practice, unlike QEMU's 52:54:00 block with its 24 bits.
pub fn random_mac() -> String {
    // Bytes 0..6 of a v4 UUID are all random (version and variant live in 6 and 8).
    let b = *uuid::Uuid::new_v4().as_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (b[0] & 0xfc) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

/// Which reservations a sweep removes: given the network's name and an
/// entry, true to remove it. `Sync`: delete_vm runs the sweep on a thread.
pub type ReservationFilter<'a> = &'a (dyn Fn(&str, &DhcpHost) -> bool + Sync);

/// What a sweep of reservations did: lines for the log, and what could not
/// be removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Released {
    pub removed: Vec<String>,
    pub problems: Vec<String>,
}

/// What the VM handlers need of the host, beyond `DiskHost`. VMs are named
/// by their CID, networks by their libvirt name.
pub trait VmHost: DiskHost {
    /// Whether stemcell `cid` was imported completely (image and marker
    /// present); false for a CID that is not a stemcell's.
    fn stemcell_exists(&self, cid: &str) -> Result<bool>;
    /// The pool's directory on the host: volume `name` is at
    /// `<directory>/<name>`, so its path is known before it exists.
    fn pool_directory(&self) -> Result<String>;
    /// A new thin qcow2 volume `name` over the image at `backing_path`,
    /// whose format is given (so the image is never probed).
    fn create_overlay(
        &self,
        name: &str,
        backing_path: &str,
        backing_format: DiskFormat,
        capacity: u64,
    ) -> Result<()>;

    /// Defines VM `spec.name`, not started, or replaces its definition.
    fn define_vm(&self, spec: &DomainSpec) -> Result<()>;
    fn start_vm(&self, vm_cid: &str) -> Result<()>;
    /// Starts VM `vm_cid` paused (its guest does not run until `resume_vm`)
    /// and runs `meanwhile` beside the rest of the start, once libvirt has
    /// given the VM's NICs their ports on libvirt networks. A live update of
    /// a libvirt network (a DHCP reservation, ~0.5 s) holds the network, and
    /// a starting VM needs the network to get its ports: an update begun
    /// first delays the whole start; begun after the ports, it runs beside
    /// QEMU's launch. The start's error comes first (`meanwhile` is skipped
    /// when the start failed before it could run).
    fn start_paused_vm_with(
        &self,
        vm_cid: &str,
        meanwhile: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()>;
    /// Lets a paused VM's guest run.
    fn resume_vm(&self, vm_cid: &str) -> Result<()>;
    /// Hard power-off; Ok when the VM is (now) not running or gone.
    fn destroy_vm(&self, vm_cid: &str) -> Result<()>;
    /// Removes the definition and what the host keeps with it; Ok when gone.
    fn undefine_vm(&self, vm_cid: &str) -> Result<()>;
    /// The VM's persistent definition as the CPI reads it; `None` when there
    /// is no such VM.
    fn vm_facts(&self, vm_cid: &str) -> Result<Option<DomainFacts>>;
    /// Replaces the CPI's metadata of the VM, live and persistent.
    fn set_vm_metadata(&self, vm_cid: &str, md: &VmMetadata) -> Result<()>;
    fn set_vm_title(&self, vm_cid: &str, title: &str) -> Result<()>;
    /// Asks the guest to reboot, resets it after `grace`, starts it when
    /// shut off; `None` when there is no such VM.
    fn reboot_vm(&self, vm_cid: &str, grace: Duration) -> Result<Option<RebootOutcome>>;
    /// The names of all VMs (domains of any name, ours or not), in one listing.
    fn vm_names(&self) -> Result<Vec<String>>;
    /// The names of the VMs whose guest does not run: defined but not
    /// running, or paused.
    fn stopped_vm_names(&self) -> Result<Vec<String>>;

    /// The config's network, defined and started when missing and the
    /// config gives its subnet; running.
    fn ensure_network(&self, cfg: &NetworkConfig) -> Result<()>;
    /// Whether network `name` exists; an error when it exists but does not run.
    fn network_in_use(&self, name: &str) -> Result<bool>;
    /// The network's facts, freshly read; `None` when there is no such network.
    fn network(&self, name: &str) -> Result<Option<NetworkInfo>>;
    /// Whether the host has a network interface (a bridge, a device) of that
    /// name; `None` when the host cannot tell.
    fn host_interface_exists(&self, name: &str) -> Result<Option<bool>>;
    /// Adds a reservation; refused when one with the same MAC, name or IP
    /// exists (whoever made it): the atomic IP allocation.
    fn reserve(&self, network: &str, host: &DhcpHost) -> Result<()>;
    /// Removes the reservation matching `host` (see `matches_host`); false
    /// when there is none.
    fn release(&self, network: &str, host: &DhcpHost) -> Result<bool>;
    /// Removes the reservations `select` picks, on every network.
    fn release_all(&self, select: ReservationFilter) -> Result<Released>;
    /// Destroys and undefines VM `vm_cid` while `release_all(select)` runs
    /// (a reservation's removal is a live network update, ~0.5 s, most of it
    /// the host's: done beside the VM's removal, not after it).
    fn remove_vm_and_release(
        &self,
        vm_cid: &str,
        select: ReservationFilter,
    ) -> (Result<()>, Result<Released>);

    /// Lets `d` pass before the caller looks again (a sleep; the fake only
    /// moves its clock).
    fn pause(&self, d: Duration);
}
