//! The host check's judgement (check/host.rs) of made-up facts: hermetic,
//! no libvirt. What libvirt really reports is proven by tests/check.rs.

use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use super::host::{check, POOL_FREE_ERROR_BYTES, POOL_FREE_WARNING_BYTES};
use super::{Finding, IpRange, Status};
use crate::config::Config;
use crate::host::facts::{ConnectFailure, HostFacts, Ipv4Facts, NetworkFacts, PoolFacts};
use crate::net::Ipv4Net;
use crate::uri::LibvirtUri;

fn net(s: &str) -> Ipv4Net {
    crate::net::parse_subnet(s).unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A remote host (so no local path is looked at) with all in order.
fn facts() -> HostFacts {
    HostFacts {
        hostname: Some("kvm1".into()),
        versions: Some((11_003_000, 9_002_000)),
        domain_type: Ok(Some("pc-q35-9.2".into())),
        kvm_available: false,
        pool: Ok(Some(PoolFacts {
            kind: "dir".into(),
            active: true,
            autostart: true,
            directory: Some("/var/lib/bosh-pool".into()),
            available: Some(50 << 30),
        })),
        network: Ok(Some(NetworkFacts {
            active: true,
            autostart: true,
            ipv4: Ok(Ipv4Facts {
                subnet: Some(net("10.0.16.0/24")),
                dhcp: true,
                dhcp_ranges: vec![(ip("10.0.16.128"), ip("10.0.16.254"))],
            }),
        })),
        planned_network: None,
        subnets: vec![("bosh-net".into(), net("10.0.16.0/24"))],
        qemu_user: Some((64055, 994)),
    }
}

/// config/tests' sample: qemu, pool 'bosh' (create), network 'bosh-net'
/// on 10.0.16.0/24, mbus at 10.0.16.6.
fn judge_with(
    config: Value,
    facts: Result<HostFacts, ConnectFailure>,
    statics: &[&str],
) -> Vec<Finding> {
    let config = Config::from_value(config, &Map::new()).unwrap();
    let uri = LibvirtUri::parse("qemu+tls://192.0.2.10/system").unwrap();
    let statics: Vec<IpRange> = statics.iter().map(|s| IpRange::parse(s).unwrap()).collect();
    check(&config, &uri, &statics, facts)
}

fn judge(facts: HostFacts, statics: &[&str]) -> Vec<Finding> {
    judge_with(crate::config::tests::sample(), Ok(facts), statics)
}

fn finding<'a>(out: &'a [Finding], check: &str) -> &'a Finding {
    out.iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} finding in {out:#?}"))
}

#[test]
fn a_host_in_order_is_ok_but_for_software_emulation() {
    let out = judge(facts(), &["10.0.16.10-10.0.16.20"]);
    let checks: Vec<_> = out.iter().map(|f| (f.check.as_str(), f.status)).collect();
    assert_eq!(
        checks,
        [
            ("connection", Status::Ok),
            ("versions", Status::Ok),
            ("domain_type", Status::Warning),
            ("pool", Status::Ok),
            ("pool.space", Status::Ok),
            ("network", Status::Ok),
            ("network.dhcp", Status::Ok),
        ]
    );
    assert_eq!(
        finding(&out, "connection").message,
        "connected to kvm1 over tls"
    );
    assert!(finding(&out, "versions")
        .message
        .contains("libvirt 11.3.0, QEMU 9.2.0"));
}

#[test]
fn an_unreachable_host_is_one_error_with_the_transports_hint() {
    let out = judge_with(
        crate::config::tests::sample(),
        Err(ConnectFailure {
            message: "unable to connect".into(),
            hint: Some("is libvirtd listening?".into()),
        }),
        &[],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status, Status::Error);
    assert_eq!(out[0].fix.as_deref(), Some("is libvirtd listening?"));
}

#[test]
fn an_old_libvirt_is_an_error() {
    let mut f = facts();
    f.versions = Some((5_005_000, 4_002_000));
    let v = finding(&judge(f, &[]), "versions").clone();
    assert_eq!(v.status, Status::Error);
    assert!(v.message.contains("needs libvirt 5.6.0"), "{}", v.message);
}

#[test]
fn qemu_on_a_host_with_kvm_says_so() {
    let mut f = facts();
    f.kvm_available = true;
    let d = finding(&judge(f, &[]), "domain_type").clone();
    assert_eq!(
        d.fix.as_deref(),
        Some("this host has KVM: set libvirt.domain_type to kvm")
    );
}

#[test]
fn a_missing_pool_is_an_error_unless_the_cpi_may_create_it() {
    let mut f = facts();
    f.pool = Ok(None);
    let out = judge(f.clone(), &[]);
    let p = finding(&out, "pool");
    assert_eq!(p.status, Status::Ok, "{}", p.message);
    assert!(
        p.message.contains("creates it at /var/lib/bosh-pool"),
        "{}",
        p.message
    );
    let mut config = crate::config::tests::sample();
    config["pool"]["create"] = json!(false);
    let out = judge_with(config, Ok(f), &[]);
    let p = finding(&out, "pool");
    assert_eq!(p.status, Status::Error);
    assert!(p.message.contains("pool.create is false"), "{}", p.message);
}

/// facts() with its pool changed by `edit`.
fn with_pool(edit: impl FnOnce(&mut PoolFacts)) -> HostFacts {
    let mut f = facts();
    if let Ok(Some(p)) = f.pool.as_mut() {
        edit(p);
    }
    f
}

#[test]
fn a_pool_that_is_no_dir_pool_or_inactive_is_an_error() {
    let f = with_pool(|p| p.kind = "logical".into());
    assert_eq!(finding(&judge(f, &[]), "pool").status, Status::Error);
    let f = with_pool(|p| {
        p.active = false;
        p.available = None;
    });
    let mut config = crate::config::tests::sample();
    config["pool"]["create"] = json!(false);
    let out = judge_with(config, Ok(f.clone()), &[]);
    assert_eq!(finding(&out, "pool").status, Status::Error);
    assert!(!out.iter().any(|x| x.check == "pool.space"));
    // With pool.create the CPI starts it.
    assert_eq!(finding(&judge(f, &[]), "pool").status, Status::Ok);
}

#[test]
fn too_little_room_in_the_pool_is_judged() {
    for (free, status) in [
        (POOL_FREE_ERROR_BYTES - 1, Status::Error),
        (POOL_FREE_ERROR_BYTES, Status::Warning),
        (POOL_FREE_WARNING_BYTES, Status::Ok),
    ] {
        let f = with_pool(|p| p.available = Some(free));
        assert_eq!(
            finding(&judge(f, &[]), "pool.space").status,
            status,
            "{free}"
        );
    }
}

#[test]
fn a_network_to_create_on_a_subnet_another_network_uses_is_an_error() {
    let mut f = facts();
    f.network = Ok(None);
    f.planned_network = Some(Ipv4Facts {
        subnet: Some(net("10.0.16.0/24")),
        dhcp: true,
        dhcp_ranges: vec![(ip("10.0.16.128"), ip("10.0.16.254"))],
    });
    f.subnets = vec![("default".into(), net("10.0.0.0/16"))];
    let out = judge(f.clone(), &[]);
    let n = finding(&out, "network");
    assert_eq!(n.status, Status::Error);
    assert!(
        n.message
            .contains("libvirt network 'default' uses an overlapping subnet"),
        "{}",
        n.message
    );
    f.subnets = vec![("default".into(), net("192.168.122.0/24"))];
    let out = judge(f, &[]);
    assert_eq!(finding(&out, "network").status, Status::Ok);
    // The DHCP range judged is the one the CPI would create.
    assert_eq!(finding(&out, "network.dhcp").status, Status::Ok);
}

#[test]
fn static_ips_in_the_dhcp_range_or_outside_the_subnet_are_errors() {
    for (statics, wanted) in [
        (&["10.0.16.10"][..], Status::Ok),
        (&["10.0.16.100-10.0.16.130"][..], Status::Error),
        (&["10.0.17.5"][..], Status::Error),
    ] {
        let d = finding(&judge(facts(), statics), "network.dhcp").clone();
        assert_eq!(d.status, wanted, "{statics:?}: {}", d.message);
    }
    // The director's own address (agent.mbus) counts as a static IP.
    let mut config = crate::config::tests::sample();
    config["agent"]["mbus"] = json!("nats://nats:pw@10.0.16.200:4222");
    let out = judge_with(config, Ok(facts()), &[]);
    let d = finding(&out, "network.dhcp");
    assert_eq!(d.status, Status::Error);
    assert!(
        d.message.contains("(agent.mbus) overlaps the DHCP range"),
        "{}",
        d.message
    );
}

#[test]
fn a_network_without_dhcp_is_a_warning() {
    let mut f = facts();
    if let Ok(Some(n)) = f.network.as_mut() {
        n.ipv4.as_mut().unwrap().dhcp = false;
        n.ipv4.as_mut().unwrap().dhcp_ranges.clear();
    }
    assert_eq!(
        finding(&judge(f, &[]), "network.dhcp").status,
        Status::Warning
    );
}
