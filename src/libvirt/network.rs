//! libvirt networks as VMs use them: the CPI's own NAT network (created and
//! started when missing and the config gives its subnet), the IPv4 facts of a
//! network (subnet, DHCP range, host reservations), DHCP host entries
//! (MAC -> IP) added and removed live and in the persistent config, and MAC
//! addresses.
//!
//! libvirt itself makes a DHCP host entry an atomic reservation: adding one
//! fails when an entry with the same MAC, name or IP exists, whatever process
//! made it. That is what keeps concurrent `create_vm`s from sharing an IP.

use std::net::{Ipv4Addr, Ipv6Addr};

use virt::network::Network;
use virt::sys;

use super::xmltree::Element;
use super::{lv_error, not_found_as_none, xml_escape, Libvirt};
use crate::config::NetworkConfig;
use crate::error::{CpiError, Result};
use crate::net::Ipv4Net;

pub use crate::host::{DhcpHost, NetworkInfo};

impl DhcpHost {
    pub fn to_xml(&self) -> String {
        let mut xml = String::from("<host");
        for (key, value) in [("mac", &self.mac), ("name", &self.name), ("ip", &self.ip)] {
            if let Some(v) = value {
                xml.push_str(&format!(" {key}='{}'", xml_escape(v)));
            }
        }
        xml.push_str("/>");
        xml
    }
}

impl NetworkInfo {
    pub fn from_xml(xml: &str) -> std::result::Result<NetworkInfo, String> {
        let root = Element::parse(xml)?;
        let name = root
            .child("name")
            .map(|n| n.text_trimmed().to_string())
            .unwrap_or_default();
        let mut info = NetworkInfo {
            name,
            subnet: None,
            host_ip: None,
            dhcp: false,
            dhcp_ranges: Vec::new(),
            hosts: Vec::new(),
            ipv6: None,
        };
        info.ipv6 = root.children_named("ip").find_map(|ip| {
            let address: Ipv6Addr = ip.attr("address")?.parse().ok()?;
            // libvirt's default prefix for IPv6 is 64.
            let prefix = ip.attr("prefix").map_or(Some(64), |p| p.parse().ok())?;
            (prefix <= 128).then_some((address, prefix))
        });
        let ipv4 = root.children_named("ip").find(|ip| {
            ip.attr("family").unwrap_or("ipv4") == "ipv4"
                && ip
                    .attr("address")
                    .is_some_and(|a| a.parse::<Ipv4Addr>().is_ok())
        });
        let Some(ip) = ipv4 else { return Ok(info) };
        let address: Ipv4Addr = ip
            .attr("address")
            .and_then(|a| a.parse().ok())
            .ok_or("network <ip> without an IPv4 address")?;
        let prefix = match (ip.attr("prefix"), ip.attr("netmask")) {
            (Some(p), _) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("network <ip prefix='{p}'> is not a prefix length"))?,
            (None, Some(m)) => netmask_prefix(m)?,
            // libvirt's default for an IPv4 <ip> without either: the class-based mask; assume /24.
            (None, None) => 24,
        };
        info.subnet = Some(subnet_of(address, prefix));
        info.host_ip = Some(address);
        if let Some(dhcp) = ip.child("dhcp") {
            info.dhcp = true;
            for r in dhcp.children_named("range") {
                if let (Some(Ok(s)), Some(Ok(e))) = (
                    r.attr("start").map(str::parse::<Ipv4Addr>),
                    r.attr("end").map(str::parse::<Ipv4Addr>),
                ) {
                    info.dhcp_ranges.push((s, e));
                }
            }
            info.hosts = dhcp
                .children_named("host")
                .map(|h| DhcpHost {
                    mac: h.attr("mac").map(|m| m.to_ascii_lowercase()),
                    name: h.attr("name").map(str::to_string),
                    ip: h.attr("ip").map(str::to_string),
                })
                .collect();
        }
        Ok(info)
    }

    /// Whether `ip` lies in the network's IPv6 subnet and is not the host's
    /// own address; true when the network has no IPv6 subnet to check.
    pub fn usable_ipv6(&self, ip: Ipv6Addr) -> bool {
        let Some((host, prefix)) = self.ipv6 else {
            return true;
        };
        let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
        ip != host && u128::from(ip) & mask == u128::from(host) & mask
    }

    pub fn in_dhcp_range(&self, ip: Ipv4Addr) -> bool {
        self.dhcp_ranges
            .iter()
            .any(|(s, e)| (u32::from(*s)..=u32::from(*e)).contains(&u32::from(ip)))
    }
}

fn subnet_of(address: Ipv4Addr, prefix: u8) -> Ipv4Net {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ipv4Net {
        network: Ipv4Addr::from(u32::from(address) & mask),
        prefix,
    }
}

fn netmask_prefix(mask: &str) -> std::result::Result<u8, String> {
    let m: Ipv4Addr = mask
        .parse()
        .map_err(|_| format!("network netmask '{mask}' is not an IPv4 address"))?;
    let bits = u32::from(m);
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(format!("network netmask '{mask}' is not contiguous"));
    }
    Ok(prefix as u8)
}

/// The XML of the CPI's NAT network: the host is `.1`, DHCP hands out the
/// upper half of the subnet to dynamic networks, so BOSH manual IPs belong in
/// the lower half.
pub fn nat_network_xml(name: &str, subnet: &Ipv4Net) -> String {
    let size = 1u32 << (32 - subnet.prefix);
    let start = subnet.host((size / 2).max(2));
    let end = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
    format!(
        "<network><name>{}</name><forward mode='nat'/><bridge stp='on' delay='0'/>\
         <ip address='{}' netmask='{}'><dhcp><range start='{start}' end='{end}'/></dhcp></ip></network>",
        xml_escape(name),
        subnet.host(1),
        subnet.netmask()
    )
}

pub use crate::host::random_mac;

impl Libvirt {
    pub fn find_network(&self, name: &str) -> Result<Option<Network>> {
        not_found_as_none(
            self.conn().lookup_network_by_name(name),
            format!("looking up libvirt network {name}"),
        )
    }

    /// The config's network, active. When it is missing and the config gives
    /// a subnet, it is defined as a NAT network, started and autostarted;
    /// several CPIs doing this at once all succeed.
    pub fn ensure_config_network(&self, cfg: &NetworkConfig) -> Result<Network> {
        let name = &cfg.name;
        let net = match (self.find_network(name)?, &cfg.subnet) {
            (Some(net), _) => net,
            (None, Some(subnet)) => {
                let subnet = Ipv4Net::parse(subnet)
                    .map_err(|e| CpiError::cloud(format!("network.subnet: {e}")))?;
                self.define_nat_network(name, &subnet)?
            }
            (None, None) => {
                return Err(CpiError::cloud(format!(
                    "libvirt network '{name}' does not exist (set network.subnet to let the CPI create it)"
                )))
            }
        };
        self.start_network(&net, name, cfg.subnet.is_some())?;
        Ok(net)
    }

    /// A network named in a network's cloud_properties: it must exist and run.
    pub fn existing_network(&self, name: &str) -> Result<Option<Network>> {
        let Some(net) = self.find_network(name)? else {
            return Ok(None);
        };
        self.start_network(&net, name, false)?;
        Ok(Some(net))
    }

    fn start_network(&self, net: &Network, name: &str, ours: bool) -> Result<()> {
        let active = net
            .is_active()
            .map_err(|e| lv_error(format!("checking libvirt network {name}"), e))?;
        if active {
            return Ok(());
        }
        if !ours {
            return Err(CpiError::cloud(format!(
                "libvirt network '{name}' exists but is not active"
            )));
        }
        if let Err(e) = net.create() {
            // Another CPI may have started it since we looked.
            if !net.is_active().unwrap_or(false) {
                return Err(lv_error(format!("starting libvirt network {name}"), e));
            }
        }
        Ok(())
    }

    fn define_nat_network(&self, name: &str, subnet: &Ipv4Net) -> Result<Network> {
        let xml = nat_network_xml(name, subnet);
        match self.conn().define_network_xml(&xml) {
            Ok(net) => {
                net.set_autostart(true).map_err(|e| {
                    lv_error(format!("setting autostart on libvirt network {name}"), e)
                })?;
                Ok(net)
            }
            // Lost a race with another CPI defining it: use theirs.
            Err(e) => match self.find_network(name)? {
                Some(net) => Ok(net),
                None => Err(lv_error(
                    format!("defining NAT network {name} on {subnet}"),
                    e,
                )),
            },
        }
    }

    pub fn network_info(&self, net: &Network, name: &str) -> Result<NetworkInfo> {
        let xml = net
            .xml_desc(0)
            .map_err(|e| lv_error(format!("reading libvirt network {name}"), e))?;
        NetworkInfo::from_xml(&xml)
            .map_err(|e| CpiError::cloud(format!("parsing libvirt network {name}: {e}")))
    }

    /// Adds a DHCP host entry to the running network and its persistent config.
    pub fn add_dhcp_host(&self, net: &Network, name: &str, host: &DhcpHost) -> Result<()> {
        self.update_dhcp_host(net, sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, host)
            .map_err(|e| {
                lv_error(
                    format!(
                        "adding DHCP host {} to libvirt network {name}",
                        host.to_xml()
                    ),
                    e,
                )
            })
    }

    /// Removes a DHCP host entry (matched on the fields it has). Ok(false)
    /// when no such entry exists (any more).
    pub fn remove_dhcp_host(&self, net: &Network, name: &str, host: &DhcpHost) -> Result<bool> {
        match self.update_dhcp_host(net, sys::VIR_NETWORK_UPDATE_COMMAND_DELETE, host) {
            Ok(()) => Ok(true),
            Err(e) => {
                // "couldn't locate a matching dhcp host entry": check rather than trust the text.
                let info = self.network_info(net, name)?;
                if info.hosts.iter().any(|h| matches_host(h, host)) {
                    Err(lv_error(
                        format!(
                            "removing DHCP host {} from libvirt network {name}",
                            host.to_xml()
                        ),
                        e,
                    ))
                } else {
                    Ok(false)
                }
            }
        }
    }

    fn update_dhcp_host(
        &self,
        net: &Network,
        command: sys::virNetworkUpdateCommand,
        host: &DhcpHost,
    ) -> std::result::Result<(), virt::error::Error> {
        let flags = if net.is_active().unwrap_or(true) {
            sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
        } else {
            sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
        };
        net.update(
            command,
            sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
            -1,
            &host.to_xml(),
            flags,
        )
    }

    /// Whether the host has a network interface of that name (a bridge, or a
    /// device for macvtap), as libvirt's interface driver sees it. None when
    /// the host's libvirt has no interface driver to ask.
    pub fn host_interface_exists(&self, name: &str) -> Result<Option<bool>> {
        use virt::error::ErrorNumber;
        match self.conn().lookup_interface_by_name(name) {
            Ok(_) => Ok(Some(true)),
            Err(e)
                if e.code()
                    .is_known_and(|c| matches!(c, ErrorNumber::NoInterface)) =>
            {
                Ok(Some(false))
            }
            Err(e)
                if e.code()
                    .is_known_and(|c| matches!(c, ErrorNumber::NoSupport)) =>
            {
                Ok(None)
            }
            Err(e) => Err(lv_error(format!("looking up host interface {name}"), e)),
        }
    }

    /// Every libvirt network's name, for sweeps.
    pub fn network_names(&self) -> Result<Vec<String>> {
        let nets = self
            .conn()
            .list_all_networks(0)
            .map_err(|e| lv_error("listing libvirt networks", e))?;
        Ok(nets.iter().filter_map(|n| n.name().ok()).collect())
    }
}

pub use crate::host::matches_host;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ipv4_dhcp_facts() {
        let xml = "<network><name>n</name><forward mode='nat'/><ip family='ipv6' address='fd00::1' prefix='64'/>\
            <ip address='10.253.77.1' netmask='255.255.255.0'><dhcp><range start='10.253.77.128' end='10.253.77.254'/>\
            <host mac='52:54:00:AA:00:01' name='vm-1' ip='10.253.77.10'/></dhcp></ip></network>";
        let info = NetworkInfo::from_xml(xml).unwrap();
        assert_eq!(info.name, "n");
        assert_eq!(info.subnet.unwrap().to_string(), "10.253.77.0/24");
        assert_eq!(info.host_ip, Some(Ipv4Addr::new(10, 253, 77, 1)));
        assert!(info.dhcp);
        assert!(info.in_dhcp_range(Ipv4Addr::new(10, 253, 77, 200)));
        assert!(!info.in_dhcp_range(Ipv4Addr::new(10, 253, 77, 20)));
        assert_eq!(info.hosts[0].mac.as_deref(), Some("52:54:00:aa:00:01"));
        let bare =
            NetworkInfo::from_xml("<network><name>b</name><forward mode='bridge'/></network>")
                .unwrap();
        assert!(bare.subnet.is_none() && !bare.dhcp);
        let p = NetworkInfo::from_xml(
            "<network><name>p</name><ip address='192.168.9.1' prefix='23'/></network>",
        )
        .unwrap();
        assert_eq!(p.subnet.unwrap().to_string(), "192.168.8.0/23");
        assert!(netmask_prefix("255.0.255.0").is_err());
        assert_eq!(info.ipv6, Some(("fd00::1".parse().unwrap(), 64)));
        assert!(info.usable_ipv6("fd00::10".parse().unwrap()));
        assert!(!info.usable_ipv6("fd00::1".parse().unwrap()));
        assert!(!info.usable_ipv6("fd01::10".parse().unwrap()));
        assert!(bare.usable_ipv6("fd01::10".parse().unwrap()));
    }

    #[test]
    fn nat_network_reserves_lower_half_for_manual_ips() {
        let xml = nat_network_xml("cpi-net", &Ipv4Net::parse("10.253.77.0/24").unwrap());
        let info = NetworkInfo::from_xml(&xml).unwrap();
        assert_eq!(info.host_ip, Some(Ipv4Addr::new(10, 253, 77, 1)));
        assert_eq!(
            info.dhcp_ranges,
            vec![(
                Ipv4Addr::new(10, 253, 77, 128),
                Ipv4Addr::new(10, 253, 77, 254)
            )]
        );
        let small = nat_network_xml("s", &Ipv4Net::parse("10.0.0.0/30").unwrap());
        assert!(small.contains("start='10.0.0.2' end='10.0.0.2'"), "{small}");
    }

    #[test]
    fn macs_are_random_local_unicast_with_46_bits() {
        let mut seen = std::collections::HashSet::new();
        let (mut ones, mut zeros) = (0u64, 0u64);
        for _ in 0..256 {
            let m = random_mac();
            let bytes: Vec<u8> = m
                .split(':')
                .map(|x| u8::from_str_radix(x, 16).unwrap())
                .collect();
            assert!(m.len() == 17 && bytes.len() == 6, "{m}");
            assert_eq!(bytes[0] & 0x01, 0, "multicast: {m}");
            assert_eq!(bytes[0] & 0x02, 0x02, "not locally administered: {m}");
            let v = bytes.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
            ones |= v;
            zeros |= !v;
            assert!(seen.insert(m));
        }
        // Every bit but the two fixed ones varies.
        let fixed = 0x03u64 << 40;
        let mask = (1u64 << 48) - 1;
        assert_eq!(ones & zeros & mask, mask & !fixed);
    }

    #[test]
    fn host_matching_follows_libvirt() {
        let entry = DhcpHost {
            mac: Some("52:54:00:00:00:01".into()),
            name: Some("vm-1".into()),
            ip: Some("10.0.0.5".into()),
        };
        let by_mac = DhcpHost {
            mac: Some("52:54:00:00:00:01".into()),
            name: None,
            ip: None,
        };
        assert!(matches_host(&entry, &by_mac));
        assert!(!matches_host(
            &entry,
            &DhcpHost {
                ip: Some("10.0.0.6".into()),
                ..by_mac.clone()
            }
        ));
        assert_eq!(
            entry.to_xml(),
            "<host mac='52:54:00:00:00:01' name='vm-1' ip='10.0.0.5'/>"
        );
    }
}
