//! IPv4 subnets as the config and the NAT network need them: `ipnet`'s
//! `Ipv4Net`, and the subnet rule the CPI's own network follows.

use std::net::Ipv4Addr;

pub use ipnet::Ipv4Net;

/// A `network.subnet` of the config, such as `10.253.77.0/24`: a /8 to a /30
/// (room for the host, DHCP and BOSH's manual IPs), host bits cleared.
pub fn parse_subnet(text: &str) -> Result<Ipv4Net, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("'{text}' is not a CIDR like 10.0.0.0/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
    prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .and_then(|p| Ipv4Net::new(addr, p).ok())
        .map(|n| n.trunc())
        .ok_or_else(|| format!("prefix '/{prefix}' must be between /8 and /30"))
}

/// The address `n` places above the subnet's network address, when it lies
/// in the subnet.
pub fn nth_address(subnet: &Ipv4Net, n: u32) -> Option<Ipv4Addr> {
    let addr = u32::from(subnet.network())
        .checked_add(n)
        .map(Ipv4Addr::from)?;
    subnet.contains(&addr).then_some(addr)
}

/// The addresses DHCP hands out on the CPI's NAT network (and the fake
/// host's): the upper half of the subnet without its broadcast address, so
/// never the host's `.1`. None for a /31 or /32, which have no room for a
/// host, DHCP and manual IPs.
pub fn dhcp_range(subnet: &Ipv4Net) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if subnet.prefix_len() > 30 {
        return None;
    }
    // From a /30 up the upper half starts at .2 or above.
    let upper = subnet.subnets(subnet.prefix_len() + 1).ok()?.nth(1)?;
    let end = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
    Some((upper.network(), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let n = parse_subnet("10.253.77.9/24").unwrap();
        assert_eq!(n.to_string(), "10.253.77.0/24");
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(nth_address(&n, 1), Some(Ipv4Addr::new(10, 253, 77, 1)));
        assert_eq!(nth_address(&n, 256), None);
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 253, 77, 255));
        assert!(n.contains(&Ipv4Addr::new(10, 253, 77, 200)));
        assert!(!n.contains(&Ipv4Addr::new(10, 253, 78, 1)));
        assert!(parse_subnet("10.0.0.0").is_err());
        assert!(parse_subnet("10.0.0.0/31").is_err());
        assert!(parse_subnet("10.0.0.0/7").is_err());
        assert!(parse_subnet("10.0.0.0/33").is_err());
        assert!(parse_subnet("nope/24").is_err());
        assert_eq!(
            parse_subnet("10.0.0.6/30").unwrap().to_string(),
            "10.0.0.4/30"
        );
    }

    #[test]
    fn dhcp_range_at_the_edges() {
        let range = |s: &str| dhcp_range(&s.parse().unwrap());
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            range("10.0.0.0/24"),
            Some((ip("10.0.0.128"), ip("10.0.0.254")))
        );
        assert_eq!(range("10.0.0.4/30"), Some((ip("10.0.0.6"), ip("10.0.0.6"))));
        assert_eq!(
            range("0.0.0.0/0"),
            Some((ip("128.0.0.0"), ip("255.255.255.254")))
        );
        assert_eq!(range("10.0.0.2/31"), None);
        assert_eq!(range("255.255.255.255/32"), None);
    }

    #[test]
    fn nth_address_at_the_edges() {
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert_eq!(nth_address(&all, u32::MAX), Some(Ipv4Addr::BROADCAST));
        let top: Ipv4Net = "255.255.255.255/32".parse().unwrap();
        assert_eq!(nth_address(&top, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(nth_address(&top, 1), None);
    }
}
