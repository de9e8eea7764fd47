//! libvirt networks as VMs use them: the CPI's own NAT network (created and
//! started when missing and the config gives its subnet), the IPv4 facts of a
//! network (subnet, DHCP range, host reservations), DHCP host entries
//! (MAC -> IP) added and removed live and in the persistent config, and MAC
//! addresses.
//!
//! libvirt itself makes a DHCP host entry an atomic reservation: adding one
//! fails when an entry with the same MAC, name or IP exists, whatever process
//! made it. That is what keeps concurrent `create_vm`s from sharing an IP.
//!
//! The network XML, read and written, is `xml`'s.

mod xml;

use virt::network::Network;
use virt::sys;

pub use self::xml::{matches_host, nat_network_xml, DhcpHost, NetworkInfo};
use super::{lv_error, not_found_as_none, Libvirt};
use crate::config::NetworkConfig;
use crate::error::{CpiError, Result};
use crate::net::{parse_subnet, Ipv4Net};

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
                let subnet = parse_subnet(subnet)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
