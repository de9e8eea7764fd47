//! VM methods: create_vm, delete_vm, has_vm, reboot_vm, set_vm_metadata,
//! calculate_vm_cloud_properties.
//!
//! create_vm validates everything it can before it makes anything, then makes
//! objects in the order domain (defined, not started, recording the process
//! that creates it), DHCP reservations, root overlay, ephemeral disk, config
//! drive, start, and records each in a journal; any failure undoes the
//! journal before `VMCreationFailed` goes back (`ok_to_retry` only when the
//! undo was complete and the failure looks transient). Once the VM runs, the
//! creator record is dropped.
//!
//! delete_vm removes only what belongs to the VM: the domain, volumes named
//! `<vm_cid>-*` (never a persistent disk, attached or not, never a stemcell)
//! and its DHCP host entries. It reports success only when it saw them gone.
//!
//! A create_vm killed mid-way (kill -9, host crash, libvirtd dying under it)
//! never runs its journal, and the director never learned that CID. Its
//! domain still records a creator that is gone: a create_vm that needs an IP
//! it holds removes it at once, and every create_vm removes such domains
//! that never started. Leftovers of older CPI versions (volumes without a
//! domain) are judged by age: every create_vm, once it has its root overlay,
//! also sweeps VM CIDs that have volumes but no domain and whose volumes all
//! have been untouched for 30 minutes by the host's clock (read from the
//! overlay just made) and are used by no domain of any name (live or
//! persistent XML), with delete_vm's own sweep; a DHCP entry whose VM has
//! neither domain nor volumes is removed when a create_vm needs its IP and
//! it is still so 2 s after the clash was seen.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::{json, Map, Value};
use virt::domain::Domain;
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::Call;
use crate::config::Config;
use crate::configdrive;
use crate::creator::{Creator, Liveness};
use crate::error::{CpiError, ErrorKind, Result};
use crate::libvirt::disk::DiskRef;
use crate::libvirt::domain::{DomainSpec, NicRecord, RebootOutcome, VmMetadata};
use crate::libvirt::network::{random_mac, DhcpHost, NetworkInfo};
use crate::libvirt::volume::{DiskFormat, MIB};
use crate::libvirt::Libvirt;
use crate::log::Logger;
use crate::method::Object;
use crate::names::{self, marker_name};
use crate::records::StemcellRecord;
use crate::settings::{self, SettingsInput};
use crate::vm_spec::{self, Graphics, NetKind, NetworkRequest, NicSource, VmProperties};

fn creation_failed(message: impl Into<String>) -> CpiError {
    CpiError::new(ErrorKind::VmCreationFailed, message)
}

/// True while a domain of that name is defined (running or not); a CID that is
/// not ours is simply absent. Errors only for infrastructure failures.
pub fn has_vm(call: &mut Call, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Ok(Value::Bool(false));
    }
    let found = call.libvirt()?.find_domain(vm_cid)?.is_some();
    Ok(Value::Bool(found))
}

pub fn calculate_vm_cloud_properties(cpu: u64, ram_mib: u64, ephemeral_mib: u64) -> Result<Value> {
    vm_spec::cloud_properties_for(cpu, ram_mib, ephemeral_mib).map_err(CpiError::cloud)
}

// ---------------------------------------------------------------------------
// create_vm
// ---------------------------------------------------------------------------

pub struct CreateVm<'a> {
    pub agent_id: &'a str,
    pub stemcell_cid: &'a str,
    pub cloud_properties: &'a Object,
    pub networks: &'a Object,
    pub disk_cids: &'a [String],
    pub env: &'a Value,
}

/// One NIC (or vip network) as planned before anything is made.
struct NicPlan {
    request: NetworkRequest,
    /// libvirt network name (None for vip).
    libvirt_network: Option<String>,
    mac: Option<String>,
    /// The DHCP entry to add for a manual IPv4 address.
    dhcp: Option<DhcpHost>,
    /// A network of a nic_group after the first: the plan whose NIC it shares.
    shares_nic_of: Option<usize>,
}

/// Something create_vm made, to undo on failure.
enum Made {
    Dhcp {
        network: Network,
        network_name: String,
        host: DhcpHost,
    },
    Volume(String),
    Domain(Domain),
}

pub fn create_vm(call: &mut Call, args: CreateVm) -> Result<Value> {
    let v1 = call.request.wants_v1_shapes();
    let stemcell_api = call
        .request
        .context
        .get("vm")
        .and_then(|v| v.pointer("/stemcell/api_version"))
        .and_then(Value::as_u64);

    // Validation that needs no libvirt.
    let props = VmProperties::parse(args.cloud_properties).map_err(creation_failed)?;
    let requests = vm_spec::parse_networks(args.networks).map_err(creation_failed)?;
    if let Some(v) = stemcell_api {
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
        .unwrap_or_else(|| config_domain_type(call.config));
    props
        .check_domain_type(&domain_type)
        .map_err(creation_failed)?;

    let (lv, log, config) = call.parts()?;
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
    let pool = lv.pool(&config.pool)?;
    let stemcell = find_stemcell(lv, &pool, args.stemcell_cid)?;
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
    let networks = resolve_networks(lv, config, &requests)?;
    check_host_interfaces(lv, &requests)?;
    let mut nics = plan_nics(config, &vm_cid, requests, &networks, log)?;
    log.debug(format!("{vm_cid}: networks checked, MACs chosen"));

    let mut journal: Vec<Made> = Vec::new();
    let made = make_vm(
        lv,
        log,
        config,
        &args,
        &props,
        MakeInputs {
            vm_cid: &vm_cid,
            pool: &pool,
            stemcell: &stemcell,
            root_bytes,
            ephemeral_bytes,
            domain_type: &domain_type,
            networks: &networks,
        },
        &mut nics,
        &mut journal,
    );
    match made {
        Ok(()) => {
            let mut out = args.networks.clone();
            for nic in &nics {
                if let (Some(mac), Some(Value::Object(n))) =
                    (&nic.mac, out.get_mut(&nic.request.name))
                {
                    n.insert("mac".into(), json!(mac));
                }
            }
            let nic_text: Vec<String> = nics
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
                if nic_text.is_empty() {
                    "none".to_string()
                } else {
                    nic_text.join(", ")
                }
            ));
            if v1 {
                Ok(json!(vm_cid))
            } else {
                Ok(json!([vm_cid, Value::Object(out)]))
            }
        }
        Err(e) => {
            log.warn(format!(
                "creating {vm_cid} failed: {}; removing what was made",
                e.message
            ));
            let problems = undo(lv, &pool, journal, log);
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

fn find_stemcell(lv: &Libvirt, pool: &StoragePool, cid: &str) -> Result<Stemcell> {
    let not_found = || creation_failed(format!("stemcell '{cid}' not found"));
    let vol = lv.find_stemcell(pool, cid)?.ok_or_else(not_found)?;
    let marker = lv
        .read_json_volume::<StemcellRecord>(pool, &marker_name(cid))?
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
    let virtual_size = match marker.virtual_size {
        Some(size) => size,
        None => lv.volume_facts(&vol, cid)?.capacity,
    };
    Ok(Stemcell {
        path: lv.volume_path(&vol, cid)?,
        format,
        virtual_size,
    })
}

/// Each libvirt network the NICs use, active, with its IPv4 facts.
fn resolve_networks(
    lv: &Libvirt,
    config: &Config,
    requests: &[NetworkRequest],
) -> Result<BTreeMap<String, (Network, NetworkInfo)>> {
    let mut out = BTreeMap::new();
    for r in requests.iter().filter(|r| r.has_nic()) {
        let Some(name) = libvirt_network_of(r, config) else {
            continue;
        };
        if out.contains_key(&name) {
            continue;
        }
        let net = if name == config.network.name {
            lv.ensure_config_network(&config.network)
                .map_err(|e| creation_failed(e.message).retryable(e.ok_to_retry))?
        } else {
            lv.existing_network(&name)
                .map_err(|e| creation_failed(e.message))?
                .ok_or_else(|| {
                    creation_failed(format!(
                        "libvirt network '{name}' (networks.{}.cloud_properties.network_name) does not exist",
                        r.name
                    ))
                })?
        };
        let info = lv.network_info(&net, &name)?;
        out.insert(name, (net, info));
    }
    Ok(out)
}

fn config_domain_type(config: &Config) -> String {
    config.libvirt.domain_type.as_str().to_string()
}

/// The host devices bridge and macvtap NICs use must exist (checked before
/// anything is made; libvirt would only notice when the VM starts).
fn check_host_interfaces(lv: &Libvirt, requests: &[NetworkRequest]) -> Result<()> {
    for r in requests.iter().filter(|r| r.has_nic()) {
        let (dev, key) = match &r.source {
            NicSource::Bridge(b) => (b, "bridge"),
            NicSource::Direct { dev, .. } => (dev, "macvtap"),
            NicSource::Network(_) => continue,
        };
        if lv.host_interface_exists(dev)? == Some(false) {
            return Err(creation_failed(format!(
                "networks.{}.cloud_properties.{key}: the host has no interface '{dev}'",
                r.name
            )));
        }
    }
    Ok(())
}

/// Chooses MACs and checks manual IPs against the libvirt networks.
fn plan_nics(
    config: &Config,
    vm_cid: &str,
    requests: Vec<NetworkRequest>,
    networks: &BTreeMap<String, (Network, NetworkInfo)>,
    log: &mut Logger,
) -> Result<Vec<NicPlan>> {
    // MACs are 46 random bits: with 5,000 NICs on a host the chance that any
    // two are equal is about 1 in 10 million, so no scan of every domain's
    // MACs (which grew with the host). Reserved MACs are still checked here
    // and libvirt refuses a duplicate reservation (then another is drawn).
    let mut used: HashSet<String> = HashSet::new();
    for (_, info) in networks.values() {
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
        let (_, info) = &networks[&net_name];
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
fn libvirt_network_of(r: &NetworkRequest, config: &Config) -> Option<String> {
    match &r.source {
        NicSource::Network(n) => Some(n.clone().unwrap_or_else(|| config.network.name.clone())),
        _ => None,
    }
}

struct MakeInputs<'a> {
    vm_cid: &'a str,
    pool: &'a StoragePool,
    stemcell: &'a Stemcell,
    root_bytes: u64,
    ephemeral_bytes: u64,
    domain_type: &'a str,
    networks: &'a BTreeMap<String, (Network, NetworkInfo)>,
}

#[allow(clippy::too_many_arguments)]
fn make_vm(
    lv: &Libvirt,
    log: &mut Logger,
    config: &Config,
    args: &CreateVm,
    props: &VmProperties,
    m: MakeInputs,
    nics: &mut [NicPlan],
    journal: &mut Vec<Made>,
) -> Result<()> {
    let vm_cid = m.vm_cid;
    let dir = lv.pool_directory(m.pool, &config.pool.name)?;
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
    let with_nics = |spec: &mut DomainSpec, nics: &mut [NicPlan]| {
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
    };

    // 1. The domain first, defined but not started, recording this process
    // as its creator: from now on whatever this call makes belongs to a
    // domain, and a later call can tell a killed create_vm (creator dead)
    // from one still at work (see reclaim_stale_reservation).
    with_nics(&mut spec, nics);
    let dom = lv.define_domain(&spec)?;
    journal.push(Made::Domain(dom.clone()));
    log.debug(format!("defined domain {vm_cid}"));

    // 2. DHCP reservations: libvirt refuses a second entry with the same MAC,
    // name or IP, which makes them the atomic IP allocation.
    let mut macs_changed = false;
    for nic in nics.iter_mut() {
        let (Some(host), Some(net_name)) = (nic.dhcp.clone(), nic.libvirt_network.clone()) else {
            continue;
        };
        let (network, _) = &m.networks[&net_name];
        let mut host = host;
        let mut attempt = 0;
        let mut reclaimed = false;
        loop {
            match lv.add_dhcp_host(network, &net_name, &host) {
                Ok(()) => break,
                Err(e) => {
                    // Find out which field clashed: a taken IP is final (unless its
                    // holder is a killed create_vm's leftover), a taken MAC is luck.
                    let info = lv.network_info(network, &net_name)?;
                    if let Some(h) = info.hosts.iter().find(|h| h.ip == host.ip) {
                        if !reclaimed
                            && reclaim_stale_reservation(lv, m.pool, network, &net_name, h, log)?
                        {
                            reclaimed = true;
                            continue;
                        }
                        return Err(CpiError::cloud(format!(
                            "IP {} is already reserved in libvirt network '{net_name}' for MAC {} ({})",
                            host.ip.as_deref().unwrap_or("?"),
                            h.mac.as_deref().unwrap_or("?"),
                            h.name.as_deref().unwrap_or("no name")
                        )));
                    }
                    attempt += 1;
                    if attempt > 3 || !info.hosts.iter().any(|h| h.mac == host.mac) {
                        return Err(e);
                    }
                    let mac = random_mac();
                    log.info(format!(
                        "MAC {} is taken on {net_name}; trying {mac}",
                        host.mac.as_deref().unwrap_or("?")
                    ));
                    host.mac = Some(mac.clone());
                    nic.mac = Some(mac);
                    macs_changed = true;
                }
            }
        }
        log.debug(format!("reserved {} on {net_name}", host.to_xml()));
        nic.dhcp = Some(host.clone());
        journal.push(Made::Dhcp {
            network: network.clone(),
            network_name: net_name,
            host,
        });
    }
    if macs_changed {
        with_nics(&mut spec, nics);
        lv.define_domain(&spec)?;
    }

    // 3. Root disk: a thin overlay on the stemcell.
    let root = lv.create_overlay(
        m.pool,
        &root_name,
        &m.stemcell.path,
        m.stemcell.format,
        m.root_bytes,
    )?;
    journal.push(Made::Volume(root_name.clone()));
    log.debug(format!("created {root_name} on {}", m.stemcell.path));
    expect_path(lv, &root, &root_name, &spec.root_disk)?;
    // delete_stemcell removes the marker, then looks for overlays; we made the
    // overlay, now look for the marker: one of the two always sees the other.
    if lv.find_stemcell(m.pool, args.stemcell_cid)?.is_none() {
        return Err(creation_failed(format!(
            "stemcell '{}' was deleted while this VM was being created",
            args.stemcell_cid
        )));
    }
    sweep_killed_creates(
        lv,
        log,
        m.pool,
        &config.pool.name,
        &root,
        &root_name,
        vm_cid,
    );
    sweep_dead_creates(lv, m.pool, vm_cid, log);

    // 4. Ephemeral disk, sparse.
    if let (Some(name), Some(path)) = (&ephemeral_name, &spec.ephemeral_disk) {
        let vol = lv.create_volume(m.pool, name, m.ephemeral_bytes, DiskFormat::Raw)?;
        journal.push(Made::Volume(name.clone()));
        log.debug(format!("created {name}"));
        expect_path(lv, &vol, name, path)?;
    }

    // 5. Config drive with the agent settings (networks now carry their MACs).
    let mut settings_networks: Map<String, Value> = args.networks.clone();
    for nic in nics.iter() {
        if let (Some(mac), Some(Value::Object(n))) =
            (&nic.mac, settings_networks.get_mut(&nic.request.name))
        {
            n.insert("mac".into(), json!(mac));
        }
    }
    let agent_settings = settings::agent_settings(&SettingsInput {
        agent_id: args.agent_id,
        vm_cid,
        agent: &config.agent,
        networks: &settings_networks,
        has_ephemeral_disk: ephemeral_name.is_some(),
        disk_bus: props.disk.bus,
        env: args.env,
    });
    let iso = configdrive::build(&agent_settings, &settings::meta_data(vm_cid))?;
    // Journaled first: should the clean-up of a failed upload fail too, the
    // undo tries again.
    journal.push(Made::Volume(iso_name.clone()));
    let iso_vol = lv.create_volume_with(m.pool, &iso_name, &iso)?;
    log.debug(format!("uploaded {iso_name} ({} bytes)", iso.len()));
    expect_path(lv, &iso_vol, &iso_name, &spec.config_drive)?;

    // 6. Start (not waiting for the guest), then drop the creator record:
    // the VM is complete, and only a delete_vm removes it from now on.
    lv.start_domain(&dom, vm_cid)?;
    log.debug(format!("started domain {vm_cid}"));
    spec.metadata.creating = None;
    lv.set_vm_metadata(&dom, vm_cid, &spec.metadata)?;
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
/// volume must really be there.
fn expect_path(lv: &Libvirt, vol: &StorageVol, name: &str, expected: &str) -> Result<()> {
    let path = lv.volume_path(vol, name)?;
    if path != expected {
        return Err(CpiError::cloud(format!(
            "volume {name} is at {path}, not at {expected} where its pool's directory puts it"
        )));
    }
    Ok(())
}

/// Undoes a failed create_vm, newest first. Returns what could not be undone.
fn undo(lv: &Libvirt, pool: &StoragePool, journal: Vec<Made>, log: &mut Logger) -> Vec<String> {
    let mut problems = Vec::new();
    for made in journal.into_iter().rev() {
        let r = match &made {
            Made::Domain(dom) => {
                let name = dom.name().unwrap_or_default();
                lv.destroy_domain(dom, &name)
                    .and_then(|()| lv.undefine_domain(dom, &name))
                    .map(|()| format!("removed domain {name}"))
            }
            Made::Volume(name) => lv
                .delete_volume(pool, name)
                .map(|_| format!("deleted volume {name}")),
            Made::Dhcp {
                network,
                network_name,
                host,
            } => lv
                .remove_dhcp_host(network, network_name, host)
                .map(|_| format!("removed DHCP host {} from {network_name}", host.to_xml())),
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

// ---------------------------------------------------------------------------
// delete_vm
// ---------------------------------------------------------------------------

pub fn delete_vm(call: &mut Call, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        // Nothing of ours can carry this name; sweeping by it could hit others' objects.
        call.log.summary(format!(
            "{vm_cid} is not a VM CID of this CPI: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    let (lv, log, config) = call.parts()?;
    let pool = lv.pool(&config.pool)?;
    let prefix = names::volumes_of_vm(vm_cid);

    // (libvirt network, DHCP host pattern) to remove.
    let mut dhcp: Vec<(String, DhcpHost)> = Vec::new();
    // What the reservations' removal said, when the domain existed.
    let reservations = match lv.find_domain(vm_cid)? {
        Some(dom) => {
            let facts = lv.domain_facts(&dom, vm_cid)?;
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
            let (reservations, gone) = std::thread::scope(|s| {
                let reservations = s.spawn(|| sweep_reservations(lv, vm_cid, &dhcp));
                let gone = lv
                    .destroy_domain(&dom, vm_cid)
                    .and_then(|()| lv.undefine_domain(&dom, vm_cid));
                (reservations.join(), gone)
            });
            let (removed, problems) = reservations.map_err(|_| {
                CpiError::cloud("removing DHCP reservations: the thread panicked")
            })??;
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
            let mut more = sweep_volumes(lv, &pool, vm_cid, log)?;
            more.extend(problems);
            more
        }
        None => sweep_vm_leftovers(lv, &pool, vm_cid, &dhcp, log)?,
    };

    // Only report success for what is verifiably gone.
    if lv.find_domain(vm_cid)?.is_some() {
        problems.push(format!("domain {vm_cid} still exists"));
    }
    let left = lv.volume_names_with_prefix(&pool, &prefix)?;
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
fn sweep_vm_leftovers(
    lv: &Libvirt,
    pool: &StoragePool,
    vm_cid: &str,
    dhcp: &[(String, DhcpHost)],
    log: &mut Logger,
) -> Result<Vec<String>> {
    let mut problems = sweep_volumes(lv, pool, vm_cid, log)?;
    let (removed, more) = sweep_reservations(lv, vm_cid, dhcp)?;
    for line in removed {
        log.info(line);
    }
    problems.extend(more);
    Ok(problems)
}

/// Deletes the `<vm_cid>-*` volumes; returns what could not be deleted.
fn sweep_volumes(
    lv: &Libvirt,
    pool: &StoragePool,
    vm_cid: &str,
    log: &mut Logger,
) -> Result<Vec<String>> {
    let prefix = names::volumes_of_vm(vm_cid);
    let mut problems = Vec::new();
    for name in lv.volume_names_with_prefix(pool, &prefix)? {
        match lv.delete_volume(pool, &name) {
            Ok(true) => log.info(format!("deleted volume {name}")),
            Ok(false) => {}
            Err(e) => problems.push(e.message),
        }
    }
    Ok(problems)
}

/// Removes the DHCP entries named after `vm_cid` or matching one of `dhcp`
/// from every libvirt network; returns (what was removed, for the log; what
/// could not be removed). Takes no logger: delete_vm runs it on a thread.
fn sweep_reservations(
    lv: &Libvirt,
    vm_cid: &str,
    dhcp: &[(String, DhcpHost)],
) -> Result<(Vec<String>, Vec<String>)> {
    let prefix = format!("{vm_cid}-");
    let (mut removed, mut problems) = (Vec::new(), Vec::new());
    for net_name in lv.network_names()? {
        let Some(net) = lv.find_network(&net_name)? else {
            continue;
        };
        let info = match lv.network_info(&net, &net_name) {
            Ok(info) => info,
            // Removed since it was listed (another client's network): nothing to sweep there.
            Err(_) if lv.find_network(&net_name)?.is_none() => continue,
            Err(e) => return Err(e),
        };
        for host in &info.hosts {
            let named = host
                .name
                .as_deref()
                .is_some_and(|n| n == vm_cid || n.starts_with(&prefix));
            let listed = dhcp.iter().any(|(n, pattern)| {
                n == &net_name && crate::libvirt::network::matches_host(host, pattern)
            });
            if !(named || listed) {
                continue;
            }
            match lv.remove_dhcp_host(&net, &net_name, host) {
                Ok(_) => removed.push(format!(
                    "removed DHCP host {} from {net_name}",
                    host.to_xml()
                )),
                Err(e) => problems.push(e.message),
            }
        }
    }
    Ok((removed, problems))
}

// ---------------------------------------------------------------------------
// Leftovers of killed create_vm calls
// ---------------------------------------------------------------------------

/// A live create_vm makes its root overlay within milliseconds of reserving
/// its IPs; a reservation whose VM still has no domain and no volume this
/// long after it was first seen belongs to a create_vm that was killed (or
/// whose undo failed). DHCP entries carry no time, so this is the only age.
const STALE_RESERVATION_RECHECK: Duration = Duration::from_secs(2);

/// When `entry` (which holds the IP a reservation needs) is named after a VM
/// CID that has no domain and no `<cid>-*` volume, now and again after
/// `STALE_RESERVATION_RECHECK`, removes that VM's leftovers with delete_vm's
/// sweep and returns true (the caller retries its reservation once). False
/// when the entry is someone's live reservation.
fn reclaim_stale_reservation(
    lv: &Libvirt,
    pool: &StoragePool,
    network: &Network,
    net_name: &str,
    entry: &DhcpHost,
    log: &mut Logger,
) -> Result<bool> {
    let Some(vm) = entry.name.as_deref().and_then(names::vm_cid_of_dhcp_name) else {
        return Ok(false);
    };
    if let Some(dom) = lv.find_domain(vm)? {
        return match dead_creator(lv, &dom, vm, log)? {
            Some(c) => {
                let why = format!(", which holds {} on {net_name}", entry.to_xml());
                remove_killed_create(lv, pool, &dom, vm, &c, &why, log)
            }
            None => Ok(false),
        };
    }
    let vanished = |lv: &Libvirt| -> Result<bool> {
        Ok(lv.find_domain(vm)?.is_none()
            && lv
                .volume_names_with_prefix(pool, &names::volumes_of_vm(vm))?
                .is_empty())
    };
    if !vanished(lv)? {
        return Ok(false);
    }
    log.info(format!(
        "{} on {net_name} belongs to {vm}, which has neither a domain nor volumes; checking again in {}s whether it is a create_vm still starting",
        entry.to_xml(),
        STALE_RESERVATION_RECHECK.as_secs()
    ));
    std::thread::sleep(STALE_RESERVATION_RECHECK);
    let info = lv.network_info(network, net_name)?;
    if !info.hosts.iter().any(|h| h == entry) {
        // Gone meanwhile (its create_vm undid it): just retry.
        return Ok(true);
    }
    if !vanished(lv)? {
        return Ok(false);
    }
    log.warn(format!(
        "removing stale DHCP host {} from {net_name}: {vm} still has neither a domain nor volumes (a create_vm killed before it made its root disk, or a failed undo)",
        entry.to_xml()
    ));
    let problems = sweep_vm_leftovers(lv, pool, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
    }
    Ok(problems.is_empty())
}

/// The create_vm that made `vm`, when its domain still records one (it
/// ran until the VM was started) and that process is dead: the create_vm
/// was killed, or libvirtd died under it, and the director never learned
/// the CID. None for a complete VM or a create_vm still at work.
fn dead_creator(lv: &Libvirt, dom: &Domain, vm: &str, log: &mut Logger) -> Result<Option<Creator>> {
    let facts = lv.domain_facts(dom, vm)?;
    let Some(creating) = facts.metadata.as_ref().and_then(|m| m.creating.as_deref()) else {
        return Ok(None);
    };
    let Some(creator) = Creator::parse(creating) else {
        log.warn(format!(
            "{vm} records an unreadable creator '{creating}': leaving it"
        ));
        return Ok(None);
    };
    Ok((creator.liveness() == Liveness::Dead).then_some(creator))
}

/// Removes a VM whose create_vm died (see `dead_creator`) as delete_vm
/// would; `why` says what led here. True when nothing of it is left.
fn remove_killed_create(
    lv: &Libvirt,
    pool: &StoragePool,
    dom: &Domain,
    vm: &str,
    creator: &Creator,
    why: &str,
    log: &mut Logger,
) -> Result<bool> {
    log.warn(format!(
        "removing {vm}{why}: the create_vm that made it (process {} on boot {}) ended before it finished, so the director never learned of it",
        creator.pid, creator.boot_id
    ));
    lv.destroy_domain(dom, vm)?;
    // The domain, with its dead creator, marks the leftovers until they are
    // gone: it is undefined only once the sweep found nothing it could not
    // remove (a volume libvirtd is still building for the killed call stays,
    // and so does the domain, for the next call's sweep).
    let problems = sweep_vm_leftovers(lv, pool, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
        return Ok(false);
    }
    lv.undefine_domain(dom, vm)?;
    // libvirtd finishes a call whose client was killed: a volume that call
    // made while the first sweep ran shows up only now.
    let problems = sweep_vm_leftovers(lv, pool, vm, &[], log)?;
    if !problems.is_empty() {
        log.warn(format!("sweeping {vm}: {}", problems.join("; ")));
    }
    Ok(problems.is_empty())
}

/// Best effort, never fails create_vm: removes the VMs of killed create_vm
/// calls that never started (defined, not running, creator dead). One that
/// was killed in the moment between its start and the end of the call runs
/// on; it is removed when a create_vm needs its IP.
fn sweep_dead_creates(lv: &Libvirt, pool: &StoragePool, own: &str, log: &mut Logger) {
    let doms = match lv.inactive_domains() {
        Ok(doms) => doms,
        Err(e) => {
            log.warn(format!(
                "not sweeping VMs of killed create_vm calls: {}",
                e.message
            ));
            return;
        }
    };
    for (vm, dom) in doms {
        if vm == own || !names::is_vm_cid(&vm) {
            continue;
        }
        let removed = dead_creator(lv, &dom, &vm, log).and_then(|dead| match dead {
            Some(c) => remove_killed_create(lv, pool, &dom, &vm, &c, "", log),
            None => Ok(true),
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
fn sweep_killed_creates(
    lv: &Libvirt,
    log: &mut Logger,
    pool: &StoragePool,
    pool_name: &str,
    root: &StorageVol,
    root_name: &str,
    own_cid: &str,
) {
    let found = lv
        .volume_facts(root, root_name)
        .and_then(|f| {
            f.mtime
                .ok_or_else(|| CpiError::cloud(format!("libvirt reports no mtime for {root_name}")))
        })
        .and_then(|host_now| abandoned_vm_cids(lv, pool, pool_name, host_now, own_cid, log));
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
        match sweep_vm_leftovers(lv, pool, &vm, &[], log) {
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
    lv: &Libvirt,
    pool: &StoragePool,
    pool_name: &str,
    host_now: f64,
    own: &str,
    log: &mut Logger,
) -> Result<Vec<String>> {
    let names = lv.volume_names(pool)?;
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
    let defined: HashSet<String> = lv.domain_names()?.into_iter().collect();
    let mut abandoned = Vec::new();
    'vms: for (vm, vols) in by_vm {
        if defined.contains(vm) {
            continue;
        }
        for vol in &vols {
            if !lv.volume_untouched_for(pool, vol, ABANDONED_MAX_AGE_SECS, host_now)? {
                continue 'vms;
            }
        }
        // Only CIDs that passed the cheap checks get the scan of every domain.
        for vol in &vols {
            let Some(v) = lv.find_volume(pool, vol)? else {
                continue;
            };
            let path = lv.volume_path(&v, vol)?;
            let r = DiskRef {
                cid: vol,
                path: Some(&path),
                pool: pool_name,
            };
            if let Some(h) = lv.disk_holders(&r)?.first() {
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

// ---------------------------------------------------------------------------
// reboot_vm, set_vm_metadata
// ---------------------------------------------------------------------------

pub fn reboot_vm(call: &mut Call, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let (lv, log, config) = call.parts()?;
    let dom = lv
        .find_domain(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    let grace = Duration::from_secs(config.reboot_grace_seconds);
    let outcome = lv.reboot_domain(&dom, vm_cid, grace)?;
    log.summary(match outcome {
        RebootOutcome::Graceful => format!("{vm_cid} rebooted"),
        RebootOutcome::HardReset => format!(
            "{vm_cid} did not reboot within {}s of the ACPI request: reset",
            grace.as_secs()
        ),
        RebootOutcome::Started => format!("{vm_cid} was shut off: started"),
    });
    Ok(Value::Null)
}

pub fn set_vm_metadata(call: &mut Call, vm_cid: &str, metadata: &Object) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let (lv, log, _) = call.parts()?;
    let dom = lv
        .find_domain(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    let mut md = lv.domain_facts(&dom, vm_cid)?.metadata.unwrap_or_default();
    md.tags = metadata
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect();
    lv.set_vm_metadata(&dom, vm_cid, &md)?;
    let title = title_for(metadata);
    if let Some(title) = &title {
        lv.set_title(&dom, vm_cid, title)?;
    }
    log.summary(format!(
        "metadata of {vm_cid} set ({} keys{})",
        md.tags.len(),
        title.map(|t| format!(", title '{t}'")).unwrap_or_default()
    ));
    Ok(Value::Null)
}

/// `name`, else `job/index`, as a one-line title.
fn title_for(metadata: &Object) -> Option<String> {
    let s = |k: &str| match metadata.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let title = s("name").or_else(|| match (s("job"), s("index")) {
        (Some(j), Some(i)) => Some(format!("{j}/{i}")),
        (Some(j), None) => Some(j),
        _ => None,
    })?;
    Some(
        title
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            title_for(&m(json!({"name": "redis/ce7d", "job": "redis"}))).as_deref(),
            Some("redis/ce7d")
        );
        assert_eq!(
            title_for(&m(json!({"job": "redis", "index": "0"}))).as_deref(),
            Some("redis/0")
        );
        assert_eq!(
            title_for(&m(json!({"name": "a\nb"}))).as_deref(),
            Some("a b")
        );
        assert_eq!(title_for(&m(json!({"director": "d"}))), None);
    }
}
