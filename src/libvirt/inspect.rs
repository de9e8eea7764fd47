//! The host check's questions to libvirt, asked through the CPI's own
//! connection code and lookups, answered as `crate::host::facts`: versions,
//! whether the domain type can run, the pool, the networks, QEMU's user.
//! Read-only: a missing pool or network is reported, never made.

use virt::network::Network;
use virt::storage_pool::StoragePool;

use super::network::{nat_network_xml, NetworkInfo};
use super::xmltree::Element;
use super::{connect_hint, Libvirt};
use crate::config::Config;
use crate::host::facts::{ConnectFailure, HostFacts, Ipv4Facts, NetworkFacts, PoolFacts};
use crate::net::{parse_subnet, Ipv4Net};

/// Connects as the CPI does and reads the facts; the connection is closed
/// again when this returns.
pub fn inspect(config: &Config) -> Result<HostFacts, ConnectFailure> {
    let lv = Libvirt::open(&config.libvirt_uri()).map_err(|e| {
        let hint = connect_hint(&e.message, &config.libvirt.uri);
        // The hint is the message's last parenthesis: told apart here.
        let message = match &hint {
            Some(h) => e
                .message
                .strip_suffix(&format!(" ({h})"))
                .unwrap_or(&e.message)
                .to_string(),
            None => e.message,
        };
        ConnectFailure { message, hint }
    })?;
    let conn = lv.conn();
    let kind = config.libvirt.domain_type.as_str();
    let machine = &config.libvirt.machine;
    let caps =
        |kind: &str| conn.domain_capabilities(None, Some("x86_64"), Some(machine), Some(kind), 0);
    let domain_type = caps(kind)
        .map(|xml| {
            Element::parse(&xml)
                .ok()
                .and_then(|r| r.text_at(&["machine"]).map(str::to_string))
        })
        .map_err(|e| e.message().to_string());
    let kvm_available = kind != "kvm" && caps("kvm").is_ok();
    let network = lv
        .find_network(&config.network.name)
        .map(|n| n.map(|n| network(&lv, &n, &config.network.name)))
        .map_err(|e| e.message);
    let planned_network = match (&network, config.network.subnet.as_deref()) {
        (Ok(None), Some(subnet)) => parse_subnet(subnet).ok().and_then(|subnet| {
            NetworkInfo::from_xml(&nat_network_xml(&config.network.name, &subnet))
                .ok()
                .map(|i| ipv4(&i))
        }),
        _ => None,
    };
    Ok(HostFacts {
        hostname: conn.hostname().ok(),
        versions: conn.lib_version().ok().zip(conn.hyp_version().ok()),
        domain_type,
        kvm_available,
        pool: lv
            .find_pool(&config.pool.name)
            .map(|p| p.map(|p| pool(&lv, &p, &config.pool.name)))
            .map_err(|e| e.message),
        network,
        planned_network,
        subnets: subnets(&lv),
        qemu_user: qemu_user(&lv, kind),
    })
}

fn pool(lv: &Libvirt, pool: &StoragePool, name: &str) -> PoolFacts {
    let active = pool.is_active().unwrap_or(false);
    PoolFacts {
        kind: pool
            .xml_desc(0)
            .ok()
            .and_then(|x| Element::parse(&x).ok())
            .and_then(|r| r.attr("type").map(str::to_string))
            .unwrap_or_default(),
        active,
        autostart: pool.autostart().unwrap_or(false),
        directory: lv.pool_directory(pool, name).ok(),
        available: active
            .then(|| pool.info().ok().map(|i| i.available))
            .flatten(),
    }
}

fn network(lv: &Libvirt, net: &Network, name: &str) -> NetworkFacts {
    NetworkFacts {
        active: net.is_active().unwrap_or(false),
        autostart: net.autostart().unwrap_or(false),
        ipv4: lv
            .network_info(net, name)
            .map(|i| ipv4(&i))
            .map_err(|e| e.message),
    }
}

fn ipv4(info: &NetworkInfo) -> Ipv4Facts {
    Ipv4Facts {
        subnet: info.subnet,
        dhcp: info.dhcp,
        dhcp_ranges: info.dhcp_ranges.clone(),
    }
}

/// Every network's IPv4 subnet; a network that cannot be read is left out.
fn subnets(lv: &Libvirt) -> Vec<(String, Ipv4Net)> {
    let Ok(nets) = lv.conn().list_all_networks(0) else {
        return Vec::new();
    };
    nets.iter()
        .filter_map(|n| {
            let info = NetworkInfo::from_xml(&n.xml_desc(0).ok()?).ok()?;
            Some((info.name, info.subnet?))
        })
        .collect()
}

/// QEMU opens the images as its own user: libvirt's DAC label, in the host
/// capabilities' `<secmodel><model>dac</model><baselabel
/// type='kvm'>+UID:+GID</baselabel>`.
fn qemu_user(lv: &Libvirt, kind: &str) -> Option<(u32, u32)> {
    let caps = lv.conn().capabilities().ok()?;
    let root = Element::parse(&caps).ok()?;
    let label = root
        .child("host")?
        .children_named("secmodel")
        .find_map(|m| {
            (m.text_at(&["model"]) == Some("dac"))
                .then(|| {
                    m.children_named("baselabel")
                        .find(|b| b.attr("type") == Some(kind))
                        .map(|b| b.text_trimmed().to_string())
                })
                .flatten()
        })?;
    let (uid, gid) = label.split_once(':')?;
    let uid = uid.trim_start_matches('+').parse().ok()?;
    let gid = gid.trim_start_matches('+').parse().ok()?;
    Some((uid, gid))
}
