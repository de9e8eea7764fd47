//! What `cpi check` learns of the hypervisor host, as plain facts:
//! `crate::libvirt::inspect` reads them, `crate::check::host` judges them
//! (and its tests make them up). Read-only: nothing here says how to change
//! the host.

use std::net::Ipv4Addr;

use crate::net::Ipv4Net;

/// The connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    pub message: String,
    /// What usually causes that failure on the URI's transport.
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's name as libvirtd reports it.
    pub hostname: Option<String>,
    /// libvirt's and QEMU's versions, packed as libvirt packs them
    /// (major * 1,000,000 + minor * 1,000 + micro); `None` when not reported.
    pub versions: Option<(u32, u32)>,
    /// Whether the configured domain type runs the configured machine: the
    /// machine type it resolves to (`None` if not said), or libvirt's refusal.
    pub domain_type: Result<Option<String>, String>,
    /// With domain type qemu: whether kvm could run the machine too.
    pub kvm_available: bool,
    /// The configured pool; `None` when it does not exist.
    pub pool: Result<Option<PoolFacts>, String>,
    /// The configured network; `None` when it does not exist.
    pub network: Result<Option<NetworkFacts>, String>,
    /// When the network does not exist: the IPv4 side of the NAT network the
    /// CPI would create from network.subnet.
    pub planned_network: Option<Ipv4Facts>,
    /// Every network of the host (the configured one included) with an
    /// IPv4 subnet, in libvirt's order.
    pub subnets: Vec<(String, Ipv4Net)>,
    /// The uid and gid QEMU opens images as, for the configured domain type
    /// (libvirt's DAC base label); `None` when not reported.
    pub qemu_user: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolFacts {
    /// libvirt's pool type: dir, logical, ...
    pub kind: String,
    pub active: bool,
    pub autostart: bool,
    /// Its directory on the host, when it has one.
    pub directory: Option<String>,
    /// Free bytes, when the pool is active.
    pub available: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFacts {
    pub active: bool,
    pub autostart: bool,
    /// Its IPv4 side, or why its definition could not be read.
    pub ipv4: Result<Ipv4Facts, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ipv4Facts {
    /// The subnet of the first IPv4 `<ip>`, if any.
    pub subnet: Option<Ipv4Net>,
    /// Whether that `<ip>` has a `<dhcp>` section.
    pub dhcp: bool,
    pub dhcp_ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
}
