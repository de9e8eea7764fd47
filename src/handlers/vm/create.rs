//! create_vm: validation, then the journal of what is made (domain, root
//! overlay, ephemeral disk, config drive, start with the DHCP reservations)
//! and its undo, newest first, when a step fails. See the module doc of `super`.

use serde_json::{json, Value};

use super::creation_failed;
use super::janitor::{reclaim_stale_reservation, sweep_dead_creates, sweep_killed_creates};
use super::plan::{
    check_host_interfaces, networks_with_macs, nic_summary, plan_nics, put_nics, resolve_networks,
    NicPlan,
};
use crate::config::Config;
use crate::configdrive;
use crate::creator::Creator;
use crate::error::{CpiError, Result};
use crate::host::{
    random_mac, DhcpHost, DiskFormat, DiskHost, DomainSpec, VmHost, VmMetadata, VolumeFacts, MIB,
};
use crate::log::Logger;
use crate::method::Object;
use crate::names::{self, marker_name};
use crate::records::StemcellRecord;
use crate::settings::{self, SettingsInput};
use crate::vm_spec::{self, Graphics, VmProperties};

pub struct CreateVm<'a> {
    pub agent_id: &'a str,
    pub stemcell_cid: &'a str,
    pub cloud_properties: &'a Object,
    pub networks: &'a Object,
    pub disk_cids: &'a [String],
    pub env: &'a Value,
    /// `vm.stemcell.api_version` of the request's context, when given.
    pub stemcell_api: Option<u64>,
}

/// Something create_vm made, to undo on failure.
enum Made {
    Dhcp {
        network_name: String,
        entry: DhcpHost,
    },
    Volume(String),
    Domain(String),
}

/// Makes a VM; the result is v2's `[vm_cid, networks]`, each network with
/// a NIC carrying its `mac`.
pub fn create_vm(
    host: &dyn VmHost,
    log: &mut Logger,
    config: &Config,
    args: CreateVm,
) -> Result<Value> {
    // Validation that needs no libvirt.
    let props = VmProperties::parse(args.cloud_properties).map_err(creation_failed)?;
    let requests = vm_spec::parse_networks(args.networks).map_err(creation_failed)?;
    if let Some(v) = args.stemcell_api {
        if v < 2 {
            return Err(creation_failed(format!(
                "stemcell api_version {v}: this CPI has no registry and needs stemcells with api_version >= 2"
            )));
        }
    }
    if !names::is_stemcell_cid(args.stemcell_cid) {
        return Err(creation_failed(format!(
            "stemcell '{}' not found (not a stemcell CID of this CPI)",
            args.stemcell_cid
        )));
    }

    let domain_type = props
        .domain_type
        .clone()
        .unwrap_or_else(|| config_domain_type(config));
    props
        .check_domain_type(&domain_type)
        .map_err(creation_failed)?;

    let unknown: Vec<String> = props
        .ignored
        .iter()
        .map(|k| format!("cloud_properties.{k}"))
        .chain(requests.iter().flat_map(|r| r.ignored.iter().cloned()))
        .collect();
    if !unknown.is_empty() {
        log.warning(format!(
            "ignoring unknown keys (not used by this CPI): {}",
            unknown.join(", ")
        ));
    }
    if !args.disk_cids.is_empty() {
        log.debug(format!(
            "disk_cids {:?} are a placement hint only; attach_disk follows",
            args.disk_cids
        ));
    }

    // Validation against what libvirt holds.
    let stemcell = find_stemcell(host, args.stemcell_cid)?;
    let root_bytes = match props.root_disk_mib.map(|mib| (mib, mib.checked_mul(MIB))) {
        None => stemcell.virtual_size,
        Some((_, Some(bytes))) if bytes >= stemcell.virtual_size => bytes,
        Some((mib, Some(_))) => {
            return Err(creation_failed(format!(
                "root_disk_size {mib} MiB is smaller than the stemcell's {} MiB",
                stemcell.virtual_size.div_ceil(MIB)
            )))
        }
        Some((mib, None)) => {
            return Err(creation_failed(format!(
                "root_disk_size {mib} MiB is too large"
            )))
        }
    };
    let ephemeral_bytes = props
        .ephemeral_disk_mib
        .checked_mul(MIB)
        .ok_or_else(|| creation_failed("ephemeral_disk size overflows"))?;

    log.debug(format!(
        "stemcell {} is {} ({}, {} bytes)",
        args.stemcell_cid, stemcell.path, stemcell.format, stemcell.virtual_size
    ));
    let vm_cid = names::new_vm_cid();
    let networks = resolve_networks(host, config, &requests)?;
    check_host_interfaces(host, &requests)?;
    let mut nics = plan_nics(config, &vm_cid, requests, &networks, log)?;
    log.debug(format!("{vm_cid}: networks checked, MACs chosen"));

    let mut journal: Vec<Made> = Vec::new();
    let inputs = MakeInputs {
        config,
        args: &args,
        props: &props,
        vm_cid: &vm_cid,
        stemcell: &stemcell,
        root_bytes,
        ephemeral_bytes,
        domain_type: &domain_type,
    };
    let made = make_vm(host, log, &inputs, &mut nics, &mut journal);
    match made {
        Ok(()) => {
            let nic_text = nic_summary(&nics);
            log.summary(format!(
                "created {vm_cid} from {} ({} CPU, {} MiB, root {} MiB{}, NICs: {})",
                args.stemcell_cid,
                props.cpu,
                props.memory_mib,
                root_bytes / MIB,
                if ephemeral_bytes > 0 {
                    format!(", ephemeral {} MiB", props.ephemeral_disk_mib)
                } else {
                    String::new()
                },
                nic_text
            ));
            let out = networks_with_macs(args.networks, &nics);
            Ok(json!([vm_cid, Value::Object(out)]))
        }
        Err(e) => {
            log.warn(format!(
                "creating {vm_cid} failed: {}; removing what was made",
                e.message
            ));
            let problems = undo(host, journal, log);
            let ok_to_retry = problems.is_empty() && e.ok_to_retry;
            let mut message = format!("creating {vm_cid}: {}", e.message);
            if !problems.is_empty() {
                message.push_str(&format!(
                    "; cleanup left things behind: {}",
                    problems.join("; ")
                ));
            }
            Err(creation_failed(message).retryable(ok_to_retry))
        }
    }
}

/// The stemcell a root disk is built on: its image's path and the format
/// and virtual size its import recorded in the marker (the probed format of
/// a raw image is the guest's business, never trusted).
struct Stemcell {
    path: String,
    format: DiskFormat,
    virtual_size: u64,
}

fn find_stemcell(host: &dyn VmHost, cid: &str) -> Result<Stemcell> {
    let not_found = || creation_failed(format!("stemcell '{cid}' not found"));
    if !host.stemcell_exists(cid)? {
        return Err(not_found());
    }
    let disks: &dyn DiskHost = host;
    let marker = disks
        .read_record::<StemcellRecord>(&marker_name(cid))?
        .ok_or_else(not_found)?;
    let format = marker
        .format
        .as_deref()
        .and_then(DiskFormat::parse)
        .ok_or_else(|| {
            creation_failed(format!(
                "stemcell '{cid}': its marker records no usable format ({})",
                serde_json::to_string(&marker).unwrap_or_default()
            ))
        })?;
    let vol = host.volume(cid)?.ok_or_else(not_found)?;
    Ok(Stemcell {
        virtual_size: marker.virtual_size.unwrap_or(vol.capacity),
        path: vol.path,
        format,
    })
}

fn config_domain_type(config: &Config) -> String {
    config.libvirt.domain_type.as_str().to_string()
}

/// What create_vm decided before it makes anything.
struct MakeInputs<'a> {
    config: &'a Config,
    args: &'a CreateVm<'a>,
    props: &'a VmProperties,
    vm_cid: &'a str,
    stemcell: &'a Stemcell,
    root_bytes: u64,
    ephemeral_bytes: u64,
    domain_type: &'a str,
}

fn make_vm(
    host: &dyn VmHost,
    log: &mut Logger,
    m: &MakeInputs,
    nics: &mut [NicPlan],
    journal: &mut Vec<Made>,
) -> Result<()> {
    let (config, args, props, vm_cid) = (m.config, m.args, m.props, m.vm_cid);
    let dir = host.pool_directory()?;
    let root_name = names::root_volume(vm_cid);
    let ephemeral_name = (m.ephemeral_bytes > 0).then(|| names::ephemeral_volume(vm_cid));
    let iso_name = names::config_drive_volume(vm_cid);
    let mut spec = DomainSpec {
        name: vm_cid.to_string(),
        uuid: vm_cid.trim_start_matches("vm-").to_string(),
        domain_type: m.domain_type.to_string(),
        machine: props
            .machine
            .clone()
            .unwrap_or_else(|| config.libvirt.machine.clone()),
        memory_mib: props.memory_mib,
        cpus: props.cpu,
        cpu_mode: props.cpu_mode.clone(),
        cpu_topology: props.cpu_topology,
        memory_balloon: props.memory_balloon,
        firmware: props.firmware,
        graphics: (props.graphics != Graphics::None).then(|| (props.graphics, console_password())),
        root_disk: format!("{dir}/{root_name}"),
        ephemeral_disk: ephemeral_name.as_ref().map(|n| format!("{dir}/{n}")),
        disk: props.disk.clone(),
        config_drive: format!("{dir}/{iso_name}"),
        nics: Vec::new(),
        console_log: format!(
            "{}/{vm_cid}.console.log",
            config.console_log_dir.trim_end_matches('/')
        ),
        metadata: VmMetadata {
            agent_id: args.agent_id.to_string(),
            stemcell: args.stemcell_cid.to_string(),
            created_at: crate::log::timestamp(),
            networks: Vec::new(),
            tags: Vec::new(),
            creating: Creator::this_process().map(|c| c.to_string()),
        },
    };
    // 1. The domain first, defined but not started, recording this process
    // as its creator: from now on whatever this call makes belongs to a
    // domain, and a later call can tell a killed create_vm (creator dead)
    // from one still at work (see reclaim_stale_reservation).
    put_nics(&mut spec, nics);
    host.define_vm(&spec)?;
    journal.push(Made::Domain(vm_cid.to_string()));
    log.debug(format!("defined domain {vm_cid}"));

    // 2. Root disk: a thin overlay on the stemcell.
    host.create_overlay(
        &root_name,
        &m.stemcell.path,
        m.stemcell.format,
        m.root_bytes,
    )?;
    journal.push(Made::Volume(root_name.clone()));
    log.debug(format!("created {root_name} on {}", m.stemcell.path));
    let root = expect_path(host, &root_name, &spec.root_disk)?;
    // delete_stemcell removes the marker, then looks for overlays; we made the
    // overlay, now look for the marker: one of the two always sees the other.
    if !host.stemcell_exists(args.stemcell_cid)? {
        return Err(creation_failed(format!(
            "stemcell '{}' was deleted while this VM was being created",
            args.stemcell_cid
        )));
    }
    sweep_killed_creates(host, log, &root, &root_name, vm_cid);
    sweep_dead_creates(host, vm_cid, log);

    // 3. Ephemeral disk, sparse.
    if let (Some(name), Some(path)) = (&ephemeral_name, &spec.ephemeral_disk) {
        host.create_volume(name, m.ephemeral_bytes, DiskFormat::Raw)?;
        journal.push(Made::Volume(name.clone()));
        log.debug(format!("created {name}"));
        expect_path(host, name, path)?;
    }

    // 4. Config drive with the agent settings (networks carry their MACs).
    // Journaled first: should the clean-up of a failed upload fail too, the
    // undo tries again.
    journal.push(Made::Volume(iso_name.clone()));
    write_config_drive(host, log, m, nics, &iso_name, &spec)?;

    // 5. Start, with the DHCP reservations (libvirt refuses a second entry
    // with the same MAC, name or IP: they are the atomic IP allocation).
    // Each is a live update of a libvirt network, ~0.5 s of libvirt's own:
    // made while QEMU starts, paused, and the guest runs only once they
    // exist (see VmHost::start_paused_vm_with).
    if nics
        .iter()
        .any(|n| n.dhcp.is_some() && n.libvirt_network.is_some())
    {
        let mut macs_changed = false;
        host.start_paused_vm_with(vm_cid, &mut || {
            macs_changed = reserve(host, log, nics, journal)?;
            Ok(())
        })?;
        if macs_changed {
            // A MAC was taken (rare: they are random): the VM and its config
            // drive carry the new one before its guest ever runs.
            host.destroy_vm(vm_cid)?;
            put_nics(&mut spec, nics);
            host.define_vm(&spec)?;
            host.delete_volume(&iso_name)?;
            write_config_drive(host, log, m, nics, &iso_name, &spec)?;
            host.start_vm(vm_cid)?;
        } else {
            host.resume_vm(vm_cid)?;
        }
    } else {
        host.start_vm(vm_cid)?;
    }
    log.debug(format!("started domain {vm_cid}"));

    // 6. Drop the creator record: the VM is complete, and only a delete_vm
    // removes it from now on.
    spec.metadata.creating = None;
    host.set_vm_metadata(vm_cid, &spec.metadata)?;
    Ok(())
}

/// Makes the DHCP reservations of `nics`, journaling each; true when a MAC
/// had to change (it was taken), so the VM and its config drive must follow.
fn reserve(
    host: &dyn VmHost,
    log: &mut Logger,
    nics: &mut [NicPlan],
    journal: &mut Vec<Made>,
) -> Result<bool> {
    let mut macs_changed = false;
    for nic in nics.iter_mut() {
        let (Some(entry), Some(net_name)) = (nic.dhcp.clone(), nic.libvirt_network.clone()) else {
            continue;
        };
        let mut entry = entry;
        let mut attempt = 0;
        let mut reclaimed = false;
        loop {
            match host.reserve(&net_name, &entry) {
                Ok(()) => break,
                Err(e) => {
                    // Find out which field clashed: a taken IP is final (unless its
                    // holder is a killed create_vm's leftover), a taken MAC is luck.
                    let info = host.network(&net_name)?.ok_or_else(|| {
                        CpiError::vanished(format_args!("libvirt network {net_name}"))
                    })?;
                    if let Some(h) = info.hosts.iter().find(|h| h.ip == entry.ip) {
                        if !reclaimed && reclaim_stale_reservation(host, &net_name, h, log)? {
                            reclaimed = true;
                            continue;
                        }
                        return Err(CpiError::cloud(format!(
                            "IP {} is already reserved in libvirt network '{net_name}' for MAC {} ({})",
                            entry.ip.as_deref().unwrap_or("?"),
                            h.mac.as_deref().unwrap_or("?"),
                            h.name.as_deref().unwrap_or("no name")
                        )));
                    }
                    attempt += 1;
                    if attempt > 3 || !info.hosts.iter().any(|h| h.mac == entry.mac) {
                        return Err(e);
                    }
                    let mac = random_mac();
                    log.info(format!(
                        "MAC {} is taken on {net_name}; trying {mac}",
                        entry.mac.as_deref().unwrap_or("?")
                    ));
                    entry.mac = Some(mac.clone());
                    nic.mac = Some(mac);
                    macs_changed = true;
                }
            }
        }
        log.debug(format!("reserved {} on {net_name}", entry.to_xml()));
        nic.dhcp = Some(entry.clone());
        journal.push(Made::Dhcp {
            network_name: net_name,
            entry,
        });
    }
    Ok(macs_changed)
}

/// Writes the VM's config drive: the agent settings, whose networks carry
/// the NICs' MACs.
fn write_config_drive(
    host: &dyn VmHost,
    log: &mut Logger,
    m: &MakeInputs,
    nics: &[NicPlan],
    iso_name: &str,
    spec: &DomainSpec,
) -> Result<()> {
    let args = m.args;
    let settings_networks = networks_with_macs(args.networks, nics);
    let agent_settings = settings::agent_settings(&SettingsInput {
        agent_id: args.agent_id,
        vm_cid: m.vm_cid,
        agent: &m.config.agent,
        networks: &settings_networks,
        has_ephemeral_disk: spec.ephemeral_disk.is_some(),
        disk_bus: m.props.disk.bus,
        env: args.env,
    });
    let iso = configdrive::build(&agent_settings, &settings::meta_data(m.vm_cid))?;
    host.create_volume_with(iso_name, &iso)?;
    log.debug(format!("uploaded {iso_name} ({} bytes)", iso.len()));
    expect_path(host, iso_name, &spec.config_drive)?;
    Ok(())
}

/// A password for a VM's graphics console: 8 characters, VNC's limit.
fn console_password() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    uuid::Uuid::new_v4().as_bytes()[..8]
        .iter()
        .map(|b| CHARS[usize::from(*b) % CHARS.len()] as char)
        .collect()
}

/// The domain was defined with the path the pool's directory implies; the
/// volume must really be there. Returns its facts.
fn expect_path(host: &dyn VmHost, name: &str, expected: &str) -> Result<VolumeFacts> {
    let facts = host
        .volume(name)?
        .ok_or_else(|| CpiError::vanished(format_args!("volume {name}")))?;
    if facts.path != expected {
        return Err(CpiError::cloud(format!(
            "volume {name} is at {}, not at {expected} where its pool's directory puts it",
            facts.path
        )));
    }
    Ok(facts)
}

/// Undoes a failed create_vm, newest first. Returns what could not be undone.
fn undo(host: &dyn VmHost, journal: Vec<Made>, log: &mut Logger) -> Vec<String> {
    let mut problems = Vec::new();
    for made in journal.into_iter().rev() {
        let r = match &made {
            Made::Domain(name) => host
                .destroy_vm(name)
                .and_then(|()| host.undefine_vm(name))
                .map(|()| format!("removed domain {name}")),
            Made::Volume(name) => host
                .delete_volume(name)
                .map(|_| format!("deleted volume {name}")),
            Made::Dhcp {
                network_name,
                entry,
            } => host
                .release(network_name, entry)
                .map(|_| format!("removed DHCP host {} from {network_name}", entry.to_xml())),
        };
        match r {
            Ok(done) => log.info(done),
            Err(e) => {
                log.error(format!("cleanup: {}", e.message));
                problems.push(e.message);
            }
        }
    }
    problems
}
