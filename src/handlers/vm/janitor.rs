//! The janitor: what create_vm calls that were killed (or whose undo
//! failed) left behind, removed by later create_vm calls (see the module doc
//! of `super`): VMs whose recorded creator is dead, volumes of domain-less
//! VM CIDs untouched for half an hour, and DHCP reservations of VMs that
//! have neither a domain nor volumes. Best effort where it runs on its own;
//! never touches what a live create_vm, a domain of any name, or another
//! program holds.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::delete::sweep_vm_leftovers;
use crate::creator::{Creator, Liveness};
use crate::error::{CpiError, Result};
use crate::host::{DhcpHost, DiskRef, DomainFacts, VmHost, VolumeFacts};
use crate::log::Logger;
use crate::names;

/// A live create_vm has defined its domain and made its volumes before it
/// reserves its IPs (and its undo releases them before it deletes those); a
/// reservation whose VM still has no domain and no volume this long after it
/// was first seen belongs to a create_vm that was killed (or whose undo
/// failed). DHCP entries carry no time, so this is the only age.
const STALE_RESERVATION_RECHECK: Duration = Duration::from_secs(2);

/// When `entry` (which holds the IP a reservation needs) is named after a VM
/// CID that has no domain and no `<cid>-*` volume, now and again after
/// `STALE_RESERVATION_RECHECK`, removes that VM's leftovers with delete_vm's
/// sweep and returns true (the caller retries its reservation once). False
/// when the entry is someone's live reservation.
pub(super) fn reclaim_stale_reservation(
    host: &dyn VmHost,
    net_name: &str,
    entry: &DhcpHost,
    log: &mut Logger,
) -> Result<bool> {
    let Some(vm) = entry.name.as_deref().and_then(names::vm_cid_of_dhcp_name) else {
        return Ok(false);
    };
    if let Some(facts) = host.vm_facts(vm)? {
        return match dead_creator(host, &facts, vm, log)? {
            Some(c) => {
                let why = format!(", which holds {} on {net_name}", entry.to_xml());
                remove_killed_create(host, vm, &c, &why, log)
            }
            None => Ok(false),
        };
    }
    let vanished = || -> Result<bool> {
        Ok(!host.vm_exists(vm)?
            && host
                .volume_names_with_prefix(&names::volumes_of_vm(vm))?
                .is_empty())
    };
    if !vanished()? {
        return Ok(false);
    }
    log.info(format!(
        "{} on {net_name} belongs to {vm}, which has neither a domain nor volumes; checking again in {}s whether it is a create_vm still starting",
        entry.to_xml(),
        STALE_RESERVATION_RECHECK.as_secs()
    ));
    host.pause(STALE_RESERVATION_RECHECK);
    let hosts = host.network(net_name)?.map(|i| i.hosts).unwrap_or_default();
    if !hosts.iter().any(|h| h == entry) {
        // Gone meanwhile (its create_vm undid it): just retry.
        return Ok(true);
    }
    if !vanished()? {
        return Ok(false);
    }
    log.warn(format!(
        "removing stale DHCP host {} from {net_name}: {vm} still has neither a domain nor volumes (a create_vm killed before it made its root disk, or a failed undo)",
        entry.to_xml()
    ));
    let problems = sweep_vm_leftovers(host, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
    }
    Ok(problems.is_empty())
}

/// The create_vm that made `vm`, when its domain still records one (it
/// ran until the VM was started) and that process is dead: the create_vm
/// was killed, or libvirtd died under it, and the director never learned
/// the CID. None for a complete VM or a create_vm still at work, and for a
/// VM made from another pool (its stemcell and its root disk are not in
/// this one): a CPI config for another pool on the same libvirtd removes
/// that, as only it can delete the volumes there.
fn dead_creator(
    host: &dyn VmHost,
    facts: &DomainFacts,
    vm: &str,
    log: &mut Logger,
) -> Result<Option<Creator>> {
    let Some(md) = facts.metadata.as_ref() else {
        return Ok(None);
    };
    let Some(creating) = md.creating.as_deref() else {
        return Ok(None);
    };
    let Some(creator) = Creator::parse(creating) else {
        log.warn(format!(
            "{vm} records an unreadable creator '{creating}': leaving it"
        ));
        return Ok(None);
    };
    if creator.liveness() != Liveness::Dead {
        return Ok(None);
    }
    let stemcell_here = names::is_stemcell_cid(&md.stemcell) && host.volume_exists(&md.stemcell)?;
    if !stemcell_here && !host.volume_exists(&names::root_volume(vm))? {
        return Ok(None);
    }
    Ok(Some(creator))
}

/// Removes a VM whose create_vm died (see `dead_creator`) as delete_vm
/// would; `why` says what led here. True when nothing of it is left.
fn remove_killed_create(
    host: &dyn VmHost,
    vm: &str,
    creator: &Creator,
    why: &str,
    log: &mut Logger,
) -> Result<bool> {
    log.warn(format!(
        "removing {vm}{why}: the create_vm that made it (process {} on boot {}) ended before it finished, so the director never learned of it",
        creator.pid, creator.boot_id
    ));
    host.destroy_vm(vm)?;
    // The domain, with its dead creator, marks the leftovers until they are
    // gone: it is undefined only once the sweep found nothing it could not
    // remove (a volume libvirtd is still building for the killed call stays,
    // and so does the domain, for the next call's sweep).
    let problems = sweep_vm_leftovers(host, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
        return Ok(false);
    }
    host.undefine_vm(vm)?;
    // libvirtd finishes a call whose client was killed: a volume that call
    // made while the first sweep ran shows up only now.
    let problems = sweep_vm_leftovers(host, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
    }
    Ok(problems.is_empty())
}

/// Best effort, never fails create_vm: removes the VMs of killed create_vm
/// calls whose guest never ran (defined and not running, or started paused
/// while the call made its reservations; creator dead). One that was killed
/// in the moment between its guest's start and the end of the call runs on;
/// it is removed when a create_vm needs its IP.
pub(super) fn sweep_dead_creates(host: &dyn VmHost, own: &str, log: &mut Logger) {
    let doms = match host.stopped_vm_names() {
        Ok(doms) => doms,
        Err(e) => {
            log.warn(format!(
                "not sweeping VMs of killed create_vm calls: {}",
                e.message
            ));
            return;
        }
    };
    for vm in doms {
        if vm == own || !names::is_vm_cid(&vm) {
            continue;
        }
        let removed = host.vm_facts(&vm).and_then(|facts| {
            let dead = match facts {
                Some(f) => dead_creator(host, &f, &vm, log)?,
                None => None,
            };
            match dead {
                Some(c) => remove_killed_create(host, &vm, &c, "", log),
                None => Ok(true),
            }
        });
        if let Err(e) = removed {
            log.warn(format!("sweeping {vm}: {}", e.message));
        }
    }
}

/// A create_vm makes its volumes within seconds and defines its domain right
/// after; volumes of a domain-less CID untouched this long belong to a
/// create_vm that was killed (its journal never ran and the director never
/// learned the CID, so no delete_vm will ever come for it).
const ABANDONED_MAX_AGE_SECS: f64 = 30.0 * 60.0;

/// Best effort, never fails create_vm: removes the leftovers of killed
/// create_vm calls with delete_vm's sweep of a vanished VM. `root` is the
/// overlay this call just created: its mtime is "now" on the host's clock.
pub(super) fn sweep_killed_creates(
    host: &dyn VmHost,
    log: &mut Logger,
    root: &VolumeFacts,
    root_name: &str,
    own_cid: &str,
) {
    let found = root
        .mtime
        .ok_or_else(|| CpiError::cloud(format!("libvirt reports no mtime for {root_name}")))
        .and_then(|host_now| abandoned_vm_cids(host, host_now, own_cid, log));
    let cids = match found {
        Ok(cids) => cids,
        Err(e) => {
            log.warn(format!(
                "not sweeping leftovers of killed create_vm calls: {}",
                e.message
            ));
            return;
        }
    };
    for vm in cids {
        log.info(format!(
            "{vm} has no domain and its volumes are untouched for over {} minutes: removing what a killed create_vm left",
            ABANDONED_MAX_AGE_SECS / 60.0
        ));
        match sweep_vm_leftovers(host, &vm, &[], log) {
            Ok(problems) if problems.is_empty() => {}
            Ok(problems) => log.warn(format!("sweeping {vm}: {}", problems.join("; "))),
            Err(e) => log.warn(format!("sweeping {vm}: {}", e.message)),
        }
    }
}

/// VM CIDs other than `own` that have `<cid>-*` volumes but no domain, and
/// whose volumes are ALL untouched for `ABANDONED_MAX_AGE_SECS` before
/// `host_now` (a live create_vm that has not defined its domain yet has fresh
/// ones), and that no domain of any name uses (a renamed domain, or one an
/// operator defined on those files, keeps them).
fn abandoned_vm_cids(
    host: &dyn VmHost,
    host_now: f64,
    own: &str,
    log: &mut Logger,
) -> Result<Vec<String>> {
    let names = host.volume_names_with_prefix("")?;
    let mut by_vm: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in &names {
        if let Some(vm) = names::vm_cid_of_volume(name).filter(|vm| *vm != own) {
            by_vm.entry(vm).or_default().push(name);
        }
    }
    if by_vm.is_empty() {
        return Ok(Vec::new());
    }
    // One listing, not a lookup per VM: the cost stays flat as the host fills.
    let defined: HashSet<String> = host.vm_names()?.into_iter().collect();
    let mut abandoned = Vec::new();
    'vms: for (vm, vols) in by_vm {
        if defined.contains(vm) {
            continue;
        }
        for vol in &vols {
            if !host.volume_untouched_for(vol, ABANDONED_MAX_AGE_SECS, host_now)? {
                continue 'vms;
            }
        }
        // Only CIDs that passed the cheap checks get the scan of every domain.
        for vol in &vols {
            let Some(v) = host.volume(vol)? else {
                continue;
            };
            let r = DiskRef {
                cid: vol,
                path: Some(&v.path),
                pool: host.pool_name(),
            };
            if let Some(h) = host.disk_holders(&r)?.first() {
                log.warn(format!(
                    "{vm} has no domain of that name, but domain {} uses its volume {vol}: not sweeping it",
                    h.domain
                ));
                continue 'vms;
            }
        }
        abandoned.push(vm.to_string());
    }
    Ok(abandoned)
}
