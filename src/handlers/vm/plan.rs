//! The NICs of a create_vm, planned before anything is made: each libvirt
//! network the NICs join, running, with its facts; the host devices bridge
//! and macvtap NICs use; a MAC per NIC and a DHCP reservation per manual
//! IPv4 address on a network with DHCP, every address checked against its
//! network.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use super::creation_failed;
use crate::config::Config;
use crate::error::{CpiError, Result};
use serde_json::{json, Value};

use crate::host::{random_mac, DhcpHost, DomainSpec, NetworkInfo, NicRecord, VmHost};
use crate::log::Logger;
use crate::method::Object;
use crate::names;
use crate::vm_spec::{NetKind, NetworkRequest, NicSource};

/// One NIC (or vip network) as planned before anything is made.
pub(super) struct NicPlan {
    pub request: NetworkRequest,
    /// libvirt network name (None for vip).
    pub libvirt_network: Option<String>,
    pub mac: Option<String>,
    /// The DHCP entry to add for a manual IPv4 address.
    pub dhcp: Option<DhcpHost>,
    /// A network of a nic_group after the first: the plan whose NIC it shares.
    pub shares_nic_of: Option<usize>,
}

/// Each libvirt network the NICs use, active, with its IPv4 facts.
pub(super) fn resolve_networks(
    host: &dyn VmHost,
    config: &Config,
    requests: &[NetworkRequest],
) -> Result<BTreeMap<String, NetworkInfo>> {
    let mut out = BTreeMap::new();
    for r in requests.iter().filter(|r| r.has_nic()) {
        let Some(name) = libvirt_network_of(r, config) else {
            continue;
        };
        if out.contains_key(&name) {
            continue;
        }
        if name == config.network.name {
            host.ensure_network(&config.network)
                .map_err(|e| creation_failed(e.message).retryable(e.ok_to_retry))?;
        } else if !host
            .network_in_use(&name)
            .map_err(|e| creation_failed(e.message))?
        {
            return Err(creation_failed(format!(
                "libvirt network '{name}' (networks.{}.cloud_properties.network_name) does not exist",
                r.name
            )));
        }
        let info = host
            .network(&name)?
            .ok_or_else(|| CpiError::vanished(format_args!("libvirt network {name}")))?;
        out.insert(name, info);
    }
    Ok(out)
}

/// The host devices bridge and macvtap NICs use must exist (checked before
/// anything is made; libvirt would only notice when the VM starts).
pub(super) fn check_host_interfaces(host: &dyn VmHost, requests: &[NetworkRequest]) -> Result<()> {
    for r in requests.iter().filter(|r| r.has_nic()) {
        let (dev, key) = match &r.source {
            NicSource::Bridge(b) => (b, "bridge"),
            NicSource::Direct { dev, .. } => (dev, "macvtap"),
            NicSource::Network(_) => continue,
        };
        if host.host_interface_exists(dev)? == Some(false) {
            return Err(creation_failed(format!(
                "networks.{}.cloud_properties.{key}: the host has no interface '{dev}'",
                r.name
            )));
        }
    }
    Ok(())
}

/// Chooses MACs and checks manual IPs against the libvirt networks.
pub(super) fn plan_nics(
    config: &Config,
    vm_cid: &str,
    requests: Vec<NetworkRequest>,
    networks: &BTreeMap<String, NetworkInfo>,
    log: &mut Logger,
) -> Result<Vec<NicPlan>> {
    // MACs are 46 random bits: with 5,000 NICs on a host the chance that any
    // two are equal is about 1 in 10 million, so no scan of every domain's
    // MACs (which grew with the host). Reserved MACs are still checked here
    // and libvirt refuses a duplicate reservation (then another is drawn).
    let mut used: HashSet<String> = HashSet::new();
    for info in networks.values() {
        used.extend(info.hosts.iter().filter_map(|h| h.mac.clone()));
    }
    let mut taken_ips: HashSet<(String, Ipv4Addr)> = HashSet::new();
    let mut dhcp_names_per_net: BTreeMap<String, usize> = BTreeMap::new();
    let mut plans = Vec::new();
    for r in requests {
        if !r.has_nic() {
            plans.push(NicPlan {
                request: r,
                libvirt_network: None,
                mac: None,
                dhcp: None,
                shares_nic_of: None,
            });
            continue;
        }
        let net_name = libvirt_network_of(&r, config);
        // A later network of a nic_group rides on the group's first NIC:
        // the agent configures every network whose settings carry a NIC's
        // MAC on that NIC (bosh-agent platform/net/
        // interface_configuration_creator.go, NetworksForMac).
        let group_head = r.nic_group.as_ref().and_then(|g| {
            plans
                .iter()
                .position(|p| p.shares_nic_of.is_none() && p.request.nic_group.as_ref() == Some(g))
        });
        if let Some(head) = group_head {
            if r.kind == NetKind::Manual {
                log.info(format!(
                    "networks.{} shares the NIC of networks.{} (nic_group): its IP {} is configured by the agent, no DHCP reservation",
                    r.name,
                    plans[head].request.name,
                    r.ip.as_deref().unwrap_or_default()
                ));
            }
            plans.push(NicPlan {
                request: r,
                libvirt_network: net_name,
                mac: plans[head].mac.clone(),
                dhcp: None,
                shares_nic_of: Some(head),
            });
            continue;
        }
        let mut mac = random_mac();
        while used.contains(&mac) {
            mac = random_mac();
        }
        used.insert(mac.clone());
        let Some(net_name) = net_name else {
            if r.kind == NetKind::Manual {
                log.info(format!(
                    "networks.{}: {} on a host {}: no libvirt DHCP, the agent configures it from the settings",
                    r.name,
                    r.ip.as_deref().unwrap_or_default(),
                    match r.source {
                        NicSource::Bridge(_) => "bridge",
                        _ => "device (macvtap)",
                    }
                ));
            }
            plans.push(NicPlan {
                request: r,
                libvirt_network: None,
                mac: Some(mac),
                dhcp: None,
                shares_nic_of: None,
            });
            continue;
        };
        let info = &networks[&net_name];
        let mut dhcp = None;
        if let (NetKind::Manual, Some(ip_text)) = (r.kind, &r.ip) {
            let ip: IpAddr = ip_text.parse().map_err(|_| {
                creation_failed(format!(
                    "networks.{}.ip '{ip_text}' is not an IP address",
                    r.name
                ))
            })?;
            match (ip, info.subnet) {
                (IpAddr::V4(ip), Some(subnet)) => {
                    if !subnet.contains(&ip)
                        || ip == subnet.network()
                        || ip == subnet.broadcast()
                        || Some(ip) == info.host_ip
                    {
                        return Err(creation_failed(format!(
                            "networks.{}.ip {ip} is not a usable address of libvirt network '{net_name}' ({subnet}, host {})",
                            r.name,
                            info.host_ip.map(|h| h.to_string()).unwrap_or_default()
                        )));
                    }
                    if !taken_ips.insert((net_name.clone(), ip)) {
                        return Err(creation_failed(format!(
                            "IP {ip} is asked for twice on libvirt network '{net_name}'"
                        )));
                    }
                    // An entry named after a VM CID may be the stale leftover of a
                    // killed create_vm: the reservation step decides (and reclaims it).
                    if let Some(h) = info.hosts.iter().find(|h| {
                        h.ip.as_deref() == Some(ip_text.as_str())
                            && h.name.as_deref().and_then(names::vm_cid_of_dhcp_name).is_none()
                    }) {
                        return Err(creation_failed(format!(
                            "IP {ip} is already reserved in libvirt network '{net_name}' for MAC {} ({})",
                            h.mac.as_deref().unwrap_or("?"),
                            h.name.as_deref().unwrap_or("no name")
                        )));
                    }
                    if info.in_dhcp_range(ip) {
                        log.warn(format!(
                            "networks.{}.ip {ip} lies in the DHCP range of libvirt network '{net_name}'; dynamic VMs may be handed the same address",
                            r.name
                        ));
                    }
                    if info.dhcp {
                        let n = dhcp_names_per_net.entry(net_name.clone()).or_insert(0);
                        let name = names::dhcp_host_name(vm_cid, *n);
                        *n += 1;
                        dhcp = Some(DhcpHost {
                            mac: Some(mac.clone()),
                            name: Some(name),
                            ip: Some(ip.to_string()),
                        });
                    } else {
                        log.info(format!(
                            "libvirt network '{net_name}' has no DHCP: {ip} is configured by the agent only"
                        ));
                    }
                }
                // libvirt refuses a MAC in an IPv6 host entry ("Invalid to
                // specify MAC address ... IPv6 static host definition",
                // src/conf/network_conf.c): DHCPv6 hosts match a DUID.
                (IpAddr::V6(ip), _) if !info.usable_ipv6(ip) => {
                    let (host, prefix) = info.ipv6.unwrap_or((ip, 128));
                    return Err(creation_failed(format!(
                        "networks.{}.ip {ip} is not a usable address of libvirt network '{net_name}' (IPv6 {host}/{prefix})",
                        r.name
                    )));
                }
                (IpAddr::V6(ip), _) => log.info(format!(
                    "networks.{}.ip {ip}: IPv6, configured by the agent from the settings (libvirt's DHCPv6 host entries match a DUID, not the MAC, so no reservation is made)",
                    r.name
                )),
                (ip, None) => log.info(format!(
                    "networks.{}.ip {ip}: no IPv4 subnet on libvirt network '{net_name}' to reserve it in; the agent configures it",
                    r.name
                )),
            }
        }
        plans.push(NicPlan {
            request: r,
            libvirt_network: Some(net_name),
            mac: Some(mac),
            dhcp,
            shares_nic_of: None,
        });
    }
    Ok(plans)
}

/// The libvirt network a NIC goes on: the network's cloud_properties, else
/// the config's; None for a NIC on a host bridge or device.
pub(super) fn libvirt_network_of(r: &NetworkRequest, config: &Config) -> Option<String> {
    match &r.source {
        NicSource::Network(n) => Some(n.clone().unwrap_or_else(|| config.network.name.clone())),
        _ => None,
    }
}

/// The NICs into the domain's definition: a NIC per plan that has its own
/// (a later network of a nic_group takes its head's MAC), and a record of
/// every network, with its reservation, in the metadata.
pub(super) fn put_nics(spec: &mut DomainSpec, nics: &mut [NicPlan]) {
    for i in 0..nics.len() {
        if let Some(head) = nics[i].shares_nic_of {
            nics[i].mac = nics[head].mac.clone();
        }
    }
    spec.nics = nics
        .iter()
        .filter(|n| n.shares_nic_of.is_none())
        .filter_map(|n| {
            let source = match &n.request.source {
                NicSource::Network(_) => NicSource::Network(n.libvirt_network.clone()),
                other => other.clone(),
            };
            Some((n.mac.clone()?, source))
        })
        .collect();
    spec.metadata.networks = nics
        .iter()
        .map(|n| NicRecord {
            network: n.request.name.clone(),
            kind: n.request.kind.as_str().to_string(),
            libvirt_network: n.libvirt_network.clone(),
            mac: n.mac.clone(),
            ip: n.request.ip.clone(),
            dhcp_host: n.dhcp.as_ref().and_then(|h| h.name.clone()),
        })
        .collect();
}

/// The request's networks, each that has a NIC carrying its MAC (what the
/// agent's settings and v2's result hold).
pub(super) fn networks_with_macs(networks: &Object, nics: &[NicPlan]) -> Object {
    let mut out = networks.clone();
    for nic in nics {
        if let (Some(mac), Some(Value::Object(n))) = (&nic.mac, out.get_mut(&nic.request.name)) {
            n.insert("mac".into(), json!(mac));
        }
    }
    out
}

/// `name=mac (ip)` per NIC, for the summary line; "none" without NICs.
pub(super) fn nic_summary(nics: &[NicPlan]) -> String {
    let text: Vec<String> = nics
        .iter()
        .filter_map(|n| {
            n.mac.as_ref().map(|m| {
                format!(
                    "{}={}{}",
                    n.request.name,
                    m,
                    n.request
                        .ip
                        .as_ref()
                        .map(|ip| format!(" ({ip})"))
                        .unwrap_or_default()
                )
            })
        })
        .collect();
    if text.is_empty() {
        "none".to_string()
    } else {
        text.join(", ")
    }
}
