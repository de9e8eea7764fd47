//! The host check's judgement of what libvirt reports (`HostFacts`, read by
//! `crate::libvirt::inspect`): versions, whether the domain type can run, the
//! pool and the network. A missing pool or network is judged by what the CPI
//! would do on first use.
//!
//! Paths on the host (the pool directory and its parents) can only be looked
//! at when the host is this machine: the unix socket, or a loopback host.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Finding, IpRange};
use crate::config::{Config, DomainType};
use crate::host::facts::{ConnectFailure, HostFacts, Ipv4Facts, PoolFacts};
use crate::net::{parse_subnet, Ipv4Net};
use crate::uri::{LibvirtUri, Transport};

/// Below this much free space in the pool, a stemcell import (an openstack
/// raw stemcell's image is 5 GiB, sparse or not on the way in) can fail.
pub const POOL_FREE_ERROR_BYTES: u64 = 5 << 30;
/// Below this, a director VM's thin disks (bosh-deployment: 32 GiB
/// ephemeral, 64 GiB persistent) soon fill the pool.
pub const POOL_FREE_WARNING_BYTES: u64 = 20 << 30;

/// The newest libvirt API flag the CPI passes is
/// VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA, from libvirt 5.6.0; an older
/// libvirtd refuses it.
const MIN_LIBVIRT: u32 = 5_006_000;

pub fn check(
    config: &Config,
    uri: &LibvirtUri,
    statics: &[IpRange],
    facts: Result<HostFacts, ConnectFailure>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let facts = match facts {
        Ok(facts) => facts,
        Err(ConnectFailure { message, hint }) => {
            out.push(Finding::error(
                "connection",
                message,
                hint.unwrap_or_else(|| {
                    "check libvirt.uri, and that libvirtd runs on that host and accepts this transport".into()
                }),
            ));
            return out;
        }
    };
    out.push(Finding::ok(
        "connection",
        format!(
            "connected to {} over {}",
            facts.hostname.as_deref().unwrap_or(&uri.host),
            uri.transport.as_str()
        ),
    ));
    let local = uri.transport == Transport::Unix
        || ["localhost", "127.0.0.1", "[::1]", "::1", ""].contains(&uri.host.as_str());
    out.push(versions(facts.versions));
    out.push(domain_type(&facts, config));
    out.extend(pool(&facts, config, local));
    out.extend(network(&facts, config, statics));
    out
}

fn version_text(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

fn versions(versions: Option<(u32, u32)>) -> Finding {
    let Some((libvirt, qemu)) = versions else {
        return Finding::error(
            "versions",
            "libvirtd does not report its libvirt and QEMU versions",
            "is QEMU installed on the host (qemu-system-x86)?",
        );
    };
    let text = format!(
        "libvirt {}, QEMU {}",
        version_text(libvirt),
        version_text(qemu)
    );
    if libvirt < MIN_LIBVIRT {
        Finding::error(
            "versions",
            format!(
                "{text}: the CPI needs libvirt {} or newer",
                version_text(MIN_LIBVIRT)
            ),
            "upgrade libvirt on the host (Debian 12: libvirt-daemon-system from bookworm-backports)",
        )
    } else {
        Finding::ok("versions", text)
    }
}

/// What libvirt's domain capabilities say of the configured type and
/// machine: for kvm they fail when the host has no usable /dev/kvm.
fn domain_type(facts: &HostFacts, config: &Config) -> Finding {
    let check = "domain_type";
    let kind = config.libvirt.domain_type;
    let machine = &config.libvirt.machine;
    match (kind, &facts.domain_type) {
        (DomainType::Kvm, Err(e)) => Finding::error(
            check,
            format!("domain type kvm cannot run on this host: {e}"),
            "enable hardware virtualisation (VT-x/AMD-V, nested virtualisation on a VM host) and load kvm_intel or kvm_amd so the host has /dev/kvm; or set libvirt.domain_type to qemu (software emulation, slow)",
        ),
        (DomainType::Qemu, Err(e)) => Finding::error(
            check,
            format!("QEMU cannot run machine {machine} on this host: {e}"),
            "install qemu-system-x86 on the host, and set libvirt.machine to a machine type it has (virsh domcapabilities)",
        ),
        (kind, Ok(resolved)) => {
            let resolved = resolved.as_deref().unwrap_or(machine);
            match kind {
                DomainType::Kvm => Finding::ok(
                    check,
                    format!("kvm available (machine {machine} is {resolved})"),
                ),
                DomainType::Qemu => Finding::warning(
                    check,
                    format!("domain type qemu: VMs run under TCG software emulation (machine {resolved}), several times slower than kvm"),
                    if facts.kvm_available {
                        "this host has KVM: set libvirt.domain_type to kvm"
                    } else {
                        "fine for tests; for real workloads give the host KVM (/dev/kvm) and set libvirt.domain_type to kvm"
                    },
                ),
            }
        }
    }
}

fn pool(facts: &HostFacts, config: &Config, local: bool) -> Vec<Finding> {
    let cfg = &config.pool;
    let name = &cfg.name;
    let mut out = Vec::new();
    let found = match &facts.pool {
        Ok(p) => p,
        Err(e) => {
            out.push(Finding::error(
                "pool",
                e,
                "check the connection's permissions",
            ));
            return out;
        }
    };
    let found_missing = found.is_none();
    let directory: Option<PathBuf> = match found {
        None if !cfg.create => {
            out.push(Finding::error(
                "pool",
                format!("storage pool '{name}' does not exist, and pool.create is false"),
                format!("set pool.create: true and pool.path (a directory on the host) to let the CPI create it, or define it yourself: virsh pool-define-as {name} dir --target DIR && virsh pool-build {name} && virsh pool-start {name} && virsh pool-autostart {name}"),
            ));
            return out;
        }
        None => {
            let path = PathBuf::from(cfg.path.as_deref().unwrap_or_default());
            out.push(creatable_dir(name, &path, local));
            if local {
                if let Some(free) = free_bytes_at(&path) {
                    out.push(free_space(name, free, "the filesystem it will be on"));
                }
            }
            Some(path)
        }
        Some(PoolFacts {
            kind,
            active,
            autostart,
            directory: path,
            available,
        }) => {
            let active = *active;
            let at = path.as_deref().unwrap_or("?");
            if kind != "dir" {
                out.push(Finding::error(
                    "pool",
                    format!("storage pool '{name}' is of type '{kind}'"),
                    "the CPI keeps its volumes as files of a dir pool: name a dir pool in pool.name",
                ));
            } else if active {
                if *autostart {
                    out.push(Finding::ok(
                        "pool",
                        format!("storage pool '{name}' active at {at}"),
                    ));
                } else {
                    out.push(Finding::warning(
                        "pool",
                        format!("storage pool '{name}' is active at {at}, but not autostarted: it is inactive after the host reboots"),
                        format!("virsh pool-autostart {name}"),
                    ));
                }
            } else if cfg.create {
                out.push(Finding::ok(
                    "pool",
                    format!("storage pool '{name}' is defined at {at} but inactive; the CPI starts it on first use"),
                ));
            } else {
                out.push(Finding::error(
                    "pool",
                    format!("storage pool '{name}' at {at} is not active"),
                    format!("virsh pool-start {name} && virsh pool-autostart {name} (or set pool.create: true to let the CPI start it)"),
                ));
            }
            if let (Some(want), Some(have)) = (&cfg.path, &path) {
                if Path::new(want) != Path::new(have) {
                    out.push(Finding::warning(
                        "pool.path",
                        format!("pool.path is {want}, but storage pool '{name}' is at {have}; the CPI uses the pool as it is"),
                        format!("set pool.path to {have}, or give the CPI another pool.name"),
                    ));
                }
            }
            if let Some(free) = available {
                out.push(free_space(name, *free, "the pool"));
            }
            path.as_ref().map(PathBuf::from)
        }
    };
    // An existing pool's directory that this machine cannot see: the host is
    // loopback-reached but not this filesystem (a container, a chroot).
    let visible = |dir: &Path| dir.exists() || found_missing;
    if let (Some(dir), true) = (directory, local) {
        if !visible(&dir) {
            return out;
        }
        if let Some(f) = qemu_can_reach(facts.qemu_user, &dir) {
            out.push(f);
        }
    }
    out
}

/// Whether the CPI's pool build (a mkdir with parents, as root) can make `path`.
fn creatable_dir(name: &str, path: &Path, local: bool) -> Finding {
    let check = "pool";
    let intro = format!(
        "storage pool '{name}' does not exist; the CPI creates it at {} on first use (pool.create)",
        path.display()
    );
    if !local {
        return Finding::ok(
            check,
            format!("{intro}; the host is not this machine, so the directory is not checked"),
        );
    }
    let mut at = Some(path);
    while let Some(p) = at {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => return Finding::ok(check, intro),
            Ok(_) => {
                return Finding::error(
                    check,
                    format!("storage pool '{name}' does not exist, and it cannot be created at {}: {} is not a directory", path.display(), p.display()),
                    "set pool.path to a directory that exists or can be made on the host",
                )
            }
            Err(_) => at = p.parent(),
        }
    }
    Finding::error(
        check,
        format!(
            "storage pool '{name}' cannot be created at {}",
            path.display()
        ),
        "set pool.path to an absolute directory on the host",
    )
}

fn free_bytes_at(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn free_space(name: &str, free: u64, place: &str) -> Finding {
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
    let text = format!("{} free in {place} (pool '{name}')", gib(free));
    if free < POOL_FREE_ERROR_BYTES {
        Finding::error(
            "pool.space",
            format!(
                "{text}: a stemcell import needs up to {}",
                gib(POOL_FREE_ERROR_BYTES)
            ),
            "free space on the pool's filesystem, or put pool.path on a larger one",
        )
    } else if free < POOL_FREE_WARNING_BYTES {
        Finding::warning(
            "pool.space",
            format!("{text}: a director's thin disks grow to about 100 GiB"),
            format!(
                "give the pool's filesystem at least {} free",
                gib(POOL_FREE_WARNING_BYTES)
            ),
        )
    } else {
        Finding::ok("pool.space", text)
    }
}

/// QEMU opens the images in the pool as its own user: every directory
/// above the images must let that user through.
fn qemu_can_reach(qemu_user: Option<(u32, u32)>, dir: &Path) -> Option<Finding> {
    let (uid, gid) = qemu_user?;
    if uid == 0 {
        return Some(Finding::ok(
            "pool.qemu_access",
            "QEMU runs as root: it reaches the pool",
        ));
    }
    for p in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let Ok(m) = std::fs::metadata(p) else { break };
        let bits = if m.uid() == uid {
            m.mode() >> 6
        } else if m.gid() == gid {
            m.mode() >> 3
        } else {
            m.mode()
        };
        if bits & 0o1 == 0 {
            return Some(Finding::error(
                "pool.qemu_access",
                format!(
                    "QEMU's user (uid {uid}, gid {gid}) cannot enter {} (mode {:04o}), so it cannot open the pool's images in {}",
                    p.display(),
                    m.mode() & 0o7777,
                    dir.display()
                ),
                format!("chmod o+x {} (or move pool.path to a directory QEMU's user can reach)", p.display()),
            ));
        }
    }
    Some(Finding::ok(
        "pool.qemu_access",
        format!("QEMU's user (uid {uid}) can reach {}", dir.display()),
    ))
}

fn network(facts: &HostFacts, config: &Config, statics: &[IpRange]) -> Vec<Finding> {
    let cfg = &config.network;
    let name = &cfg.name;
    let mut out = Vec::new();
    let found = match &facts.network {
        Ok(n) => n,
        Err(e) => {
            out.push(Finding::error(
                "network",
                e,
                "check the connection's permissions",
            ));
            return out;
        }
    };
    let info = match (found, &cfg.subnet) {
        (None, None) => {
            out.push(Finding::error(
                "network",
                format!("libvirt network '{name}' does not exist, and network.subnet is not set"),
                format!("set network.subnet (e.g. 10.0.16.0/24) to let the CPI create it as a NAT network, or define '{name}' on the host (virsh net-define, net-start, net-autostart)"),
            ));
            return out;
        }
        (None, Some(subnet)) => {
            // Validated with the config.
            let Ok(subnet) = parse_subnet(subnet) else {
                return out;
            };
            match clashing_network(&facts.subnets, &subnet) {
                Some(other) => out.push(Finding::error(
                    "network",
                    format!("libvirt network '{name}' does not exist, and the CPI cannot create it on {subnet}: libvirt network '{other}' uses an overlapping subnet"),
                    "set network.subnet to a subnet no other network of the host uses",
                )),
                None => out.push(Finding::ok(
                    "network",
                    format!("libvirt network '{name}' does not exist; the CPI creates it on first use as a NAT network on {subnet}"),
                )),
            }
            match &facts.planned_network {
                Some(info) => info,
                None => return out,
            }
        }
        (Some(net), subnet) => {
            let (active, autostart) = (net.active, net.autostart);
            let info = match &net.ipv4 {
                Ok(i) => i,
                Err(e) => {
                    out.push(Finding::error(
                        "network",
                        e,
                        "check the network's definition (virsh net-dumpxml)",
                    ));
                    return out;
                }
            };
            let on = info.subnet.map(|s| format!(" on {s}")).unwrap_or_default();
            if !active && subnet.is_none() {
                out.push(Finding::error(
                    "network",
                    format!("libvirt network '{name}'{on} is not active"),
                    format!("virsh net-start {name} && virsh net-autostart {name}"),
                ));
            } else if !active {
                out.push(Finding::ok(
                    "network",
                    format!(
                        "libvirt network '{name}'{on} is inactive; the CPI starts it on first use"
                    ),
                ));
            } else if !autostart {
                out.push(Finding::warning(
                    "network",
                    format!("libvirt network '{name}'{on} is active, but not autostarted: it is down after the host reboots"),
                    format!("virsh net-autostart {name}"),
                ));
            } else {
                out.push(Finding::ok(
                    "network",
                    format!("libvirt network '{name}'{on} active"),
                ));
            }
            match (subnet.as_deref().map(parse_subnet), info.subnet) {
                (Some(Ok(want)), Some(have)) if want != have => out.push(Finding::warning(
                    "network.subnet",
                    format!("network.subnet is {want}, but libvirt network '{name}' is on {have}; the CPI uses the network as it is"),
                    format!("set network.subnet to {have} (and the manifests' IPs with it), or give the CPI another network.name"),
                )),
                (_, None) => out.push(Finding::warning(
                    "network.subnet",
                    format!("libvirt network '{name}' has no IPv4 subnet: the CPI cannot reserve manual IPs in it"),
                    "give the network an IPv4 <ip> with <dhcp>, or let the CPI create one (network.subnet with a new network.name)",
                )),
                _ => {}
            }
            info
        }
    };
    out.push(dhcp_vs_statics(name, info, config, statics));
    out
}

/// Another network whose IPv4 subnet overlaps `subnet`: libvirt refuses to
/// start a second one on it.
fn clashing_network(subnets: &[(String, Ipv4Net)], subnet: &Ipv4Net) -> Option<String> {
    subnets
        .iter()
        .find(|(_, other)| other.contains(&subnet.network()) || subnet.contains(&other.network()))
        .map(|(name, _)| name.clone())
}

/// The static IPs the operator named (and the director's own address in
/// agent.mbus) against the network: inside its subnet, outside its DHCP range.
fn dhcp_vs_statics(name: &str, info: &Ipv4Facts, config: &Config, statics: &[IpRange]) -> Finding {
    let check = "network.dhcp";
    let mut statics: Vec<(IpRange, String)> = statics
        .iter()
        .map(|r| (*r, "--static".to_string()))
        .collect();
    if let Some(ip) = mbus_ip(&config.agent.mbus) {
        statics.push((
            IpRange {
                first: ip,
                last: ip,
            },
            "agent.mbus".to_string(),
        ));
    }
    let ranges = info
        .dhcp_ranges
        .iter()
        .map(|(s, e)| format!("{s}-{e}"))
        .collect::<Vec<_>>()
        .join(", ");
    let Some(subnet) = info.subnet else {
        return Finding::ok(check, "no IPv4 subnet: nothing to compare static IPs with");
    };
    for (r, from) in &statics {
        if !subnet.contains(&r.first) || !subnet.contains(&r.last) {
            return Finding::error(
                check,
                format!("static {r} ({from}) is not in libvirt network '{name}''s subnet {subnet}"),
                format!("use static IPs of {subnet} (the manifests' internal_cidr must be the network's subnet)"),
            );
        }
        if let Some((s, e)) = info.dhcp_ranges.iter().find(|(s, e)| {
            u32::from(r.first) <= u32::from(*e) && u32::from(*s) <= u32::from(r.last)
        }) {
            return Finding::error(
                check,
                format!("static {r} ({from}) overlaps the DHCP range {s}-{e} of libvirt network '{name}': dnsmasq may hand the same address to another VM"),
                format!("keep BOSH's static and manual IPs out of {s}-{e} (list it under the cloud-config subnet's reserved:), or shrink the network's DHCP range (virsh net-edit {name})"),
            );
        }
    }
    if !info.dhcp {
        return Finding::warning(
            check,
            format!("libvirt network '{name}' ({subnet}) has no DHCP: manual IPs are not reserved, and only the agent configures them"),
            "give the network a <dhcp> section so the CPI can reserve each VM's IP",
        );
    }
    let checked = if statics.is_empty() {
        "no static IPs given (--static) to compare".to_string()
    } else {
        format!(
            "{} outside it",
            statics
                .iter()
                .map(|(r, _)| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Finding::ok(
        check,
        format!("subnet {subnet}, DHCP range {ranges}; {checked}; keep BOSH's manual IPs outside the DHCP range (cloud-config reserved:)"),
    )
}

/// The host of a `nats://...@10.0.16.6:4222` mbus, when it is an IPv4
/// address (the director's own static IP); create-env's 0.0.0.0 is none.
fn mbus_ip(mbus: &str) -> Option<Ipv4Addr> {
    let rest = mbus.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let ip: Ipv4Addr = host_port.split(':').next()?.parse().ok()?;
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn mbus_addresses() {
        assert_eq!(
            mbus_ip("nats://nats:pw@10.0.16.6:4222"),
            Some(Ipv4Addr::new(10, 0, 16, 6))
        );
        assert_eq!(mbus_ip("https://mbus:pw@0.0.0.0:6868"), None);
        assert_eq!(mbus_ip("nats://director.example:4222"), None);
    }

    #[test]
    fn versions_read_as_libvirt_packs_them() {
        assert_eq!(version_text(11_003_000), "11.3.0");
        assert_eq!(version_text(MIN_LIBVIRT), "5.6.0");
    }
}
