//! A libvirt network's XML: the IPv4 and IPv6 facts the CPI reads from it
//! (subnet, host address, DHCP ranges and host entries), the DHCP host
//! entries it adds and removes, and the CPI's own NAT network.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::Ipv6Net;

use crate::libvirt::xmltree::Element;
use crate::libvirt::xmlwrite::El;
use crate::net::{dhcp_range, nth_address, Ipv4Net};

pub use crate::host::{matches_host, DhcpHost, NetworkInfo};

impl DhcpHost {
    pub fn to_xml(&self) -> String {
        El::new("host")
            .attr_opt("mac", self.mac.as_ref())
            .attr_opt("name", self.name.as_ref())
            .attr_opt("ip", self.ip.as_ref())
            .to_compact()
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
        let subnet = match (ip.attr("prefix"), ip.attr("netmask")) {
            (Some(p), _) => p
                .parse::<u8>()
                .ok()
                .and_then(|p| Ipv4Net::new(address, p).ok())
                .ok_or_else(|| format!("network <ip prefix='{p}'> is not a prefix length"))?,
            (None, Some(m)) => with_netmask(address, m)?,
            // libvirt's default for an IPv4 <ip> without either: the class-based mask; assume /24.
            (None, None) => Ipv4Net::new(address, 24).map_err(|e| e.to_string())?,
        };
        info.subnet = Some(subnet.trunc());
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
        // `from_xml` keeps only prefixes of 128 or less.
        Ipv6Net::new(host, prefix).is_ok_and(|subnet| ip != host && subnet.contains(&ip))
    }

    pub fn in_dhcp_range(&self, ip: Ipv4Addr) -> bool {
        self.dhcp_ranges
            .iter()
            .any(|(s, e)| (u32::from(*s)..=u32::from(*e)).contains(&u32::from(ip)))
    }
}

fn with_netmask(address: Ipv4Addr, mask: &str) -> std::result::Result<Ipv4Net, String> {
    let m: Ipv4Addr = mask
        .parse()
        .map_err(|_| format!("network netmask '{mask}' is not an IPv4 address"))?;
    Ipv4Net::with_netmask(address, m)
        .map_err(|_| format!("network netmask '{mask}' is not contiguous"))
}

/// The XML of the CPI's NAT network: the host is `.1`, DHCP hands out the
/// upper half of the subnet to dynamic networks, so BOSH manual IPs belong in
/// the lower half.
pub fn nat_network_xml(name: &str, subnet: &Ipv4Net) -> String {
    let range = dhcp_range(subnet).map(|(start, end)| {
        El::new("dhcp").child(El::new("range").attr("start", start).attr("end", end))
    });
    El::new("network")
        .text_child("name", name)
        .child(El::new("forward").attr("mode", "nat"))
        .child(El::new("bridge").attr("stp", "on").attr("delay", 0))
        .child(
            El::new("ip")
                .attr_opt("address", nth_address(subnet, 1))
                .attr("netmask", subnet.netmask())
                .children(range),
        )
        .to_compact()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::parse_subnet;

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
        let addr = Ipv4Addr::new(10, 0, 0, 1);
        assert!(with_netmask(addr, "255.0.255.0").is_err());
        assert!(with_netmask(addr, "nope").is_err());
        assert_eq!(info.ipv6, Some(("fd00::1".parse().unwrap(), 64)));
        assert!(info.usable_ipv6("fd00::10".parse().unwrap()));
        assert!(!info.usable_ipv6("fd00::1".parse().unwrap()));
        assert!(!info.usable_ipv6("fd01::10".parse().unwrap()));
        assert!(bare.usable_ipv6("fd01::10".parse().unwrap()));
    }

    #[test]
    fn nat_network_reserves_lower_half_for_manual_ips() {
        let xml = nat_network_xml("cpi-net", &parse_subnet("10.253.77.0/24").unwrap());
        let info = NetworkInfo::from_xml(&xml).unwrap();
        assert_eq!(info.host_ip, Some(Ipv4Addr::new(10, 253, 77, 1)));
        assert_eq!(
            info.dhcp_ranges,
            vec![(
                Ipv4Addr::new(10, 253, 77, 128),
                Ipv4Addr::new(10, 253, 77, 254)
            )]
        );
        let small = nat_network_xml("s", &parse_subnet("10.0.0.0/30").unwrap());
        assert!(small.contains("start='10.0.0.2' end='10.0.0.2'"), "{small}");
    }

    #[test]
    fn prefixes_at_the_edges_do_not_panic() {
        let net = |ip: &str| {
            NetworkInfo::from_xml(&format!(
                "<network><name>e</name><ip {ip}><dhcp/></ip></network>"
            ))
        };
        let all = net("address='10.1.2.3' prefix='0'").unwrap();
        let all_subnet = all.subnet.unwrap();
        assert_eq!(all_subnet.to_string(), "0.0.0.0/0");
        assert!(all_subnet.contains(&Ipv4Addr::new(200, 1, 1, 1)));
        assert_eq!(
            dhcp_range(&all_subnet),
            Some((
                Ipv4Addr::new(128, 0, 0, 0),
                Ipv4Addr::new(255, 255, 255, 254)
            ))
        );
        assert_eq!(
            net("address='10.1.2.3' netmask='0.0.0.0'").unwrap().subnet,
            Some(all_subnet)
        );
        let p31 = net("address='10.1.2.3' prefix='31'")
            .unwrap()
            .subnet
            .unwrap();
        assert_eq!(p31.to_string(), "10.1.2.2/31");
        assert!(p31.contains(&Ipv4Addr::new(10, 1, 2, 2)));
        assert!(!p31.contains(&Ipv4Addr::new(10, 1, 2, 4)));
        assert_eq!(dhcp_range(&p31), None);
        let p32 = net("address='10.1.2.3' netmask='255.255.255.255'").unwrap();
        let p32 = p32.subnet.unwrap();
        assert_eq!(p32.to_string(), "10.1.2.3/32");
        assert_eq!(dhcp_range(&p32), None);
        assert!(nat_network_xml("n", &p32).contains("netmask='255.255.255.255'"));
        assert!(net("address='10.1.2.3' prefix='33'").is_err());
        let p30 = parse_subnet("10.0.0.0/30").unwrap();
        let ends = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(dhcp_range(&p30), Some(ends));
        // IPv6: /0, /64, /128, and a prefix libvirt would refuse.
        let v6 = |prefix: &str| {
            NetworkInfo::from_xml(&format!(
                "<network><name>6</name><ip family='ipv6' address='fd00::1' prefix='{prefix}'/></network>"
            ))
            .unwrap()
        };
        assert!(v6("0").usable_ipv6("2001:db8::1".parse().unwrap()));
        assert!(!v6("0").usable_ipv6("fd00::1".parse().unwrap()));
        assert!(v6("64").usable_ipv6("fd00::ffff:1".parse().unwrap()));
        assert!(!v6("64").usable_ipv6("fd00:0:0:1::1".parse().unwrap()));
        assert!(!v6("128").usable_ipv6("fd00::2".parse().unwrap()));
        assert_eq!(v6("129").ipv6, None);
    }

    #[test]
    fn hostile_names_stay_values() {
        for v in crate::libvirt::xmlwrite::HOSTILE {
            let xml = nat_network_xml(v, &parse_subnet("10.0.0.0/24").unwrap());
            let info = NetworkInfo::from_xml(&xml).unwrap();
            assert_eq!(info.name, v.trim(), "{xml}");
            assert_eq!(info.dhcp_ranges.len(), 1);
            let host = DhcpHost {
                mac: Some(v.to_string()),
                name: Some(v.to_string()),
                ip: Some(v.to_string()),
            };
            let el = Element::parse(&host.to_xml()).unwrap();
            assert!(el.name == "host" && el.children.is_empty() && el.text.is_empty());
            let attr = |k| el.attr(k).map(str::to_string);
            assert_eq!(
                (attr("mac"), attr("name"), attr("ip")),
                (host.mac.clone(), host.name.clone(), host.ip.clone())
            );
        }
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
