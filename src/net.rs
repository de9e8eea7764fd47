//! IPv4 subnets as the config and the NAT network need them.

use std::fmt;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(text: &str) -> Result<Ipv4Net, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not a CIDR like 10.0.0.0/24"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix '/{prefix}' must be between /8 and /30"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Ipv4Net {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }

    /// The n-th address of the subnet (0 = the network address).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !(u32::MAX << (32 - self.prefix)))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.network)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let n = Ipv4Net::parse("10.253.77.9/24").unwrap();
        assert_eq!(n.to_string(), "10.253.77.0/24");
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.host(1), Ipv4Addr::new(10, 253, 77, 1));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 253, 77, 255));
        assert!(n.contains(Ipv4Addr::new(10, 253, 77, 200)));
        assert!(!n.contains(Ipv4Addr::new(10, 253, 78, 1)));
        assert!(Ipv4Net::parse("10.0.0.0").is_err());
        assert!(Ipv4Net::parse("10.0.0.0/31").is_err());
        assert!(Ipv4Net::parse("nope/24").is_err());
    }
}
