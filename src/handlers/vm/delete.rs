//! delete_vm, and the sweep of a VM's leftovers it shares with the janitor:
//! only what belongs to the VM (the domain, `<vm_cid>-*` volumes, DHCP
//! entries named after it or recorded in its metadata) goes, and success is
//! reported only for what is verifiably gone.

use serde_json::Value;

use crate::error::{CpiError, Result};
use crate::host::{matches_host, DhcpHost, Released, VmHost};
use crate::log::Logger;
use crate::names;

pub fn delete_vm(host: &dyn VmHost, log: &mut Logger, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        // Nothing of ours can carry this name; sweeping by it could hit others' objects.
        log.summary(format!(
            "{vm_cid} is not a VM CID of this CPI: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    let prefix = names::volumes_of_vm(vm_cid);

    // (libvirt network, DHCP host pattern) to remove.
    let mut dhcp: Vec<(String, DhcpHost)> = Vec::new();
    // What the reservations' removal said, when the domain existed.
    let reservations = match host.vm_facts(vm_cid)? {
        Some(facts) => {
            if let Some(md) = &facts.metadata {
                for nic in &md.networks {
                    if let (Some(net), Some(name)) = (&nic.libvirt_network, &nic.dhcp_host) {
                        dhcp.push((
                            net.clone(),
                            DhcpHost {
                                mac: nic.mac.clone(),
                                name: Some(name.clone()),
                                ip: nic.ip.clone(),
                            },
                        ));
                    }
                }
            }
            for (mac, net) in &facts.interfaces {
                dhcp.push((
                    net.clone(),
                    DhcpHost {
                        mac: Some(mac.clone()),
                        name: None,
                        ip: None,
                    },
                ));
            }
            // A reservation's removal is a live update of the libvirt
            // network (~0.5 s, most of it libvirt's): it runs while the
            // domain is destroyed, not after.
            let select = reservations_of(vm_cid, &dhcp);
            let (gone, released) = host.remove_vm_and_release(vm_cid, &select);
            let Released { removed, problems } = released?;
            for line in removed {
                log.info(line);
            }
            gone?;
            log.info(format!("destroyed and undefined domain {vm_cid}"));
            Some(problems)
        }
        None => None,
    };
    let existed = reservations.is_some();
    let mut problems = match reservations {
        Some(problems) => {
            let mut more = sweep_volumes(host, vm_cid, log)?;
            more.extend(problems);
            more
        }
        None => sweep_vm_leftovers(host, vm_cid, &dhcp, log)?,
    };

    // Only report success for what is verifiably gone.
    if host.vm_exists(vm_cid)? {
        problems.push(format!("domain {vm_cid} still exists"));
    }
    let left = host.volume_names_with_prefix(&prefix)?;
    if !left.is_empty() {
        problems.push(format!("volumes still there: {}", left.join(", ")));
    }
    if !problems.is_empty() {
        return Err(CpiError::cloud(format!(
            "deleting {vm_cid}: {}",
            problems.join("; ")
        )));
    }
    log.summary(if existed {
        format!("deleted {vm_cid}")
    } else {
        format!("{vm_cid} was already gone; leftovers swept")
    });
    Ok(Value::Null)
}

/// Removes what is left of `vm_cid` once its domain is gone: its volumes
/// (`<vm_cid>-*` only: root overlay, ephemeral disk, config drive) and the
/// DHCP entries named after it or matching one of `dhcp` (libvirt network,
/// pattern). Returns what could not be removed; errors when it could not look.
pub(super) fn sweep_vm_leftovers(
    host: &dyn VmHost,
    vm_cid: &str,
    dhcp: &[(String, DhcpHost)],
    log: &mut Logger,
) -> Result<Vec<String>> {
    let mut problems = sweep_volumes(host, vm_cid, log)?;
    let Released {
        removed,
        problems: more,
    } = host.release_all(&reservations_of(vm_cid, dhcp))?;
    for line in removed {
        log.info(line);
    }
    problems.extend(more);
    Ok(problems)
}

/// Deletes the `<vm_cid>-*` volumes; returns what could not be deleted.
fn sweep_volumes(host: &dyn VmHost, vm_cid: &str, log: &mut Logger) -> Result<Vec<String>> {
    let prefix = names::volumes_of_vm(vm_cid);
    let mut problems = Vec::new();
    for name in host.volume_names_with_prefix(&prefix)? {
        match host.delete_volume(&name) {
            Ok(true) => log.info(format!("deleted volume {name}")),
            Ok(false) => {}
            Err(e) => problems.push(e.message),
        }
    }
    Ok(problems)
}

/// The DHCP entries of `vm_cid`: named after it, or matching one of `dhcp`
/// (libvirt network, pattern).
fn reservations_of<'a>(
    vm_cid: &'a str,
    dhcp: &'a [(String, DhcpHost)],
) -> impl Fn(&str, &DhcpHost) -> bool + Sync + 'a {
    let prefix = format!("{vm_cid}-");
    move |net_name: &str, entry: &DhcpHost| {
        let named = entry
            .name
            .as_deref()
            .is_some_and(|n| n == vm_cid || n.starts_with(&prefix));
        let listed = dhcp
            .iter()
            .any(|(n, pattern)| n == net_name && matches_host(entry, pattern));
        named || listed
    }
}
