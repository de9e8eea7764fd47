//! VM shapes and networks through the built binary against the TLS test bed:
//! what the cloud_properties of vm_types, networks and disk_types ask for is
//! in the domain XML, and where the guest can see it (firmware, CPU
//! topology, NICs and their MACs on a host bridge or macvtap, disk buses and
//! serials) the test guest's console shows it. Every invalid property is
//! refused with an error naming it and the accepted values, nothing made.
//!
//! Two guests boot (TCG, slow), at the same time, in one test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The test bed's host bridge (ci/testbed): no address, no uplink.
const BRIDGE: &str = "cpitb-br0";

fn net_name(tb: &Testbed) -> String {
    tb.config_json()["network"]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The `<host .../>` lines of every libvirt network's DHCP section.
fn all_dhcp_hosts(tb: &Testbed) -> Vec<String> {
    tb.virsh_ok(&["net-list", "--all", "--name"])
        .lines()
        .filter(|n| !n.trim().is_empty())
        .flat_map(|n| {
            let xml = tb.virsh(&["net-dumpxml", n.trim()]);
            String::from_utf8_lossy(&xml.stdout)
                .lines()
                .filter(|l| l.trim_start().starts_with("<host "))
                .map(|l| l.trim().to_lowercase())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What the test made, removed however it ends.
struct Made {
    config: std::path::PathBuf,
    vms: Vec<String>,
    disks: Vec<String>,
    network: Option<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        let tb = testbed();
        for vm in &self.vms {
            let _ = call(&self.config, "delete_vm", json!([vm]));
        }
        for d in &self.disks {
            let _ = call(&self.config, "delete_disk", json!([d]));
        }
        if let Some(n) = &self.network {
            let _ = tb.virsh(&["net-destroy", n]);
            let _ = tb.virsh(&["net-undefine", n]);
        }
    }
}

/// A transient libvirt network of this test, isolated, without DHCP, with
/// the given `<ip>` elements.
fn test_network(tb: &Testbed, kind: &str, ips: &str) -> String {
    let name = format!(
        "cpitb-{kind}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let xml = scratch_dir(kind).join("net.xml");
    std::fs::write(&xml, format!("<network><name>{name}</name>{ips}</network>")).unwrap();
    tb.virsh_ok(&["net-create", xml.to_str().unwrap()]);
    name
}

/// Removes a network of `test_network` on drop.
struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let _ = testbed().virsh(&["net-destroy", &self.0]);
    }
}

fn guest_macs(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("mac "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_lowercase)
        .collect()
}

fn settings_of(lines: &[String]) -> Value {
    let user_data = lines
        .iter()
        .find_map(|l| l.strip_prefix("userdata "))
        .unwrap_or_else(|| panic!("no userdata line: {lines:?}"));
    serde_json::from_str(user_data).unwrap()
}

fn wait_ready(tb: &Testbed, vm: &str) -> Vec<String> {
    wait_console(
        &console_path(tb, vm),
        "CPITEST ready",
        Duration::from_secs(240),
        |l| l.iter().any(|l| l == "ready"),
    )
}

/// The last `disks` line of a console: the guest's current set of disks with
/// serials (`name=serial`).
fn wait_disks(tb: &Testbed, vm: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let lines = wait_console(&console_path(tb, vm), what, Duration::from_secs(90), |l| {
        l.iter()
            .rev()
            .find(|l| l.starts_with("disks"))
            .is_some_and(|l| done(l))
    });
    lines
        .into_iter()
        .rev()
        .find(|l| l.starts_with("disks"))
        .unwrap()
}

#[test]
fn shapes_reach_the_domain_xml_and_the_guest() {
    let tb = testbed();
    let config = tb.config.clone();
    let sc = Stemcell::import(tb);
    let mut made = Made {
        config: config.clone(),
        vms: Vec::new(),
        disks: Vec::new(),
        network: None,
    };
    let isolated = test_network(tb, "nodhcp", "<ip address='192.168.251.1' prefix='24'/>");
    made.network = Some(isolated.clone());
    let hosts_before = all_dhcp_hosts(tb).len();

    // VM u: UEFI, a named CPU model in a 1x2x1 topology, no balloon, SCSI
    // root and ephemeral disks, VNC; two BOSH networks sharing one NIC on
    // the host bridge (IPv4 and IPv6), one on the NAT network, one vip.
    let u_cp = json!({"cpu": 2, "memory": 256, "ephemeral_disk": 64, "firmware": "uefi",
        "cpu_mode": "custom", "cpu_model": "qemu64",
        "cpu_topology": {"sockets": 1, "cores": 2, "threads": 1}, "memory_balloon": false,
        "disk_bus": "scsi", "disk_cache": "none", "disk_io": "native", "disk_discard": "unmap",
        "graphics": "vnc", "flavor": "m1.small"});
    let u_nets = json!({
        "a-lan": {"type": "manual", "ip": "192.168.250.10", "netmask": "255.255.255.0",
                  "gateway": "192.168.250.1", "default": ["dns", "gateway"],
                  "cloud_properties": {"bridge": BRIDGE, "nic_group": "lan"}},
        "b-lan6": {"type": "manual", "ip": "fd00:250::10", "prefix": "64", "gateway": "fd00:250::1",
                   "cloud_properties": {"bridge": BRIDGE, "nic_group": "lan", "speed": 10}},
        "c-nat": {"type": "dynamic", "cloud_properties": {}},
        "d-vip": {"type": "vip", "ip": "203.0.113.9"},
    });
    let agent_u = format!("agent-shapes-u-{}", uuid::Uuid::new_v4());
    let run = run_cpi_raw(
        Some(&config),
        &director_request("create_vm", json!([agent_u, sc.cid, u_cp, u_nets, [], {}])),
    );
    let r = &run.response;
    assert!(r["error"].is_null(), "{r}");
    let u = r["result"][0].as_str().unwrap().to_string();
    made.vms.push(u.clone());
    let u_out = &r["result"][1];
    let lan_mac = u_out["a-lan"]["mac"].as_str().unwrap().to_string();
    let nat_mac = u_out["c-nat"]["mac"].as_str().unwrap().to_string();
    assert_eq!(
        u_out["b-lan6"]["mac"],
        json!(lan_mac),
        "one NIC for the nic_group"
    );
    assert_ne!(lan_mac, nat_mac);
    assert!(u_out["d-vip"].get("mac").is_none(), "vip: no NIC");
    // Unknown keys: named in a warning, in the response's log and on stderr.
    let log = r["log"].as_str().unwrap();
    for key in [
        "cloud_properties.flavor",
        "networks.b-lan6.cloud_properties.speed",
    ] {
        assert!(log.contains("WARNING") && log.contains(key), "{key}: {log}");
        assert!(run.stderr.contains(key), "{key}: {}", run.stderr);
    }

    // VM b: BIOS (the default), plain virtio disks with a cache mode, SPICE;
    // a NIC on macvtap over the host bridge and one on a libvirt network
    // without DHCP (manual IP: the agent configures it, nothing reserved).
    // Its size comes from vm_resources as the director does it: the CPI's
    // calculate_vm_cloud_properties answer, merged shallowly with a
    // vm_extension's shapes (bosh-director deployment_plan/
    // merged_cloud_properties.rb).
    let mut b_cp = ok(
        &config,
        "calculate_vm_cloud_properties",
        json!([{"cpu": 1, "ram": 256, "ephemeral_disk_size": 64}]),
    );
    b_cp.as_object_mut().unwrap().extend(
        json!({"disk_cache": "writeback", "graphics": "spice"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let b_nets = json!({
        "a-direct": {"type": "dynamic", "cloud_properties": {"macvtap": BRIDGE, "macvtap_mode": "bridge"}},
        "b-isolated": {"type": "manual", "ip": "192.168.251.10", "netmask": "255.255.255.0",
                       "gateway": "192.168.251.1", "cloud_properties": {"network_name": isolated}},
    });
    let agent_b = format!("agent-shapes-b-{}", uuid::Uuid::new_v4());
    let b_res = ok(
        &config,
        "create_vm",
        json!([agent_b, sc.cid, b_cp, b_nets, [], {}]),
    );
    let b = b_res[0].as_str().unwrap().to_string();
    made.vms.push(b.clone());
    let direct_mac = b_res[1]["a-direct"]["mac"].as_str().unwrap().to_string();
    let isolated_mac = b_res[1]["b-isolated"]["mac"].as_str().unwrap().to_string();

    // No DHCP reservation anywhere: bridge, macvtap and no-DHCP networks are
    // configured by the agent, dynamic ones by DHCP without a reservation.
    let hosts = all_dhcp_hosts(tb);
    for mac in [&lan_mac, &nat_mac, &direct_mac, &isolated_mac] {
        assert!(
            !hosts.iter().any(|h| h.contains(mac.as_str())),
            "{mac}: {hosts:?}"
        );
    }
    assert!(
        !hosts.iter().any(|h| h.contains(&u) || h.contains(&b)),
        "{hosts:?} (had {hosts_before})"
    );

    // The domain XML of u.
    let x = tb.virsh_ok(&["dumpxml", &u, "--inactive", "--security-info"]);
    for want in [
        "<os firmware='efi'>",
        "<feature enabled='no' name='secure-boot'/>",
        "<cpu mode='custom' match='exact'",
        "<model fallback='forbid'>qemu64</model>",
        "sockets='1' dies='1'",
        "cores='2' threads='1'/>",
        "<memballoon model='none'/>",
        "<driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>",
        "<driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/>",
        "<target dev='sdb' bus='scsi'/>",
        "<target dev='sdc' bus='scsi'/>",
        "<serial>bosh-ephemeral</serial>",
        "<controller type='scsi' index='0' model='virtio-scsi'>",
        "<interface type='bridge'>",
        &format!("<source bridge='{BRIDGE}'/>"),
        &format!("<mac address='{lan_mac}'/>"),
        &format!("<mac address='{nat_mac}'/>"),
        "<listen type='address' address='127.0.0.1'/>",
    ] {
        assert!(x.contains(want), "{want} not in the XML of {u}:\n{x}");
    }
    assert_eq!(x.matches("<interface ").count(), 2, "{x}");
    let graphics = x
        .lines()
        .find(|l| l.contains("<graphics type='vnc'"))
        .unwrap_or_else(|| panic!("no VNC: {x}"));
    let passwd = graphics
        .split("passwd='")
        .nth(1)
        .and_then(|p| p.split('\'').next())
        .unwrap_or_default();
    assert_eq!(passwd.len(), 8, "a generated password: {graphics}");
    assert!(!graphics.contains("0.0.0.0"), "{graphics}");
    // The XML of b.
    let x = tb.virsh_ok(&["dumpxml", &b, "--inactive"]);
    for want in [
        "<memory unit='KiB'>262144</memory>",
        ">1</vcpu>",
        "<interface type='direct'>",
        &format!("<source dev='{BRIDGE}' mode='bridge'/>"),
        &format!("<source network='{isolated}'/>"),
        "<driver name='qemu' type='qcow2' cache='writeback' discard='unmap'/>",
        "<target dev='vda' bus='virtio'/>",
        "<memballoon model='virtio'>",
        "<graphics type='spice' autoport='yes' listen='127.0.0.1'>",
    ] {
        assert!(x.contains(want), "{want} not in the XML of {b}:\n{x}");
    }
    // libvirt fills in its own default CPU (qemu64 under TCG) and BIOS.
    assert!(
        !x.contains("<topology") && !x.contains("firmware='efi'"),
        "{x}"
    );

    // The guests.
    let lu = wait_ready(tb, &u);
    let lb = wait_ready(tb, &b);
    assert!(lu.contains(&"firmware uefi".to_string()), "{lu:?}");
    assert!(lb.contains(&"firmware bios".to_string()), "{lb:?}");
    let cpus: Vec<&String> = lu.iter().filter(|l| l.starts_with("cpu ")).collect();
    assert_eq!(
        cpus,
        ["cpu 0 package 0 core 0", "cpu 1 package 0 core 1"],
        "1 socket x 2 cores"
    );
    let mut macs = guest_macs(&lu);
    macs.sort();
    let mut want = vec![lan_mac.clone(), nat_mac.clone()];
    want.sort();
    assert_eq!(macs, want, "u's NICs");
    let mut macs = guest_macs(&lb);
    macs.sort();
    let mut want = vec![direct_mac.clone(), isolated_mac.clone()];
    want.sort();
    assert_eq!(macs, want, "b's NICs");
    assert!(
        lu.iter()
            .any(|l| l.starts_with("disk sd") && l.ends_with(" bosh-ephemeral")),
        "u's ephemeral disk on SCSI: {lu:?}"
    );
    assert!(
        lb.iter().any(|l| l == "disk vdb bosh-ephemeral"),
        "b's ephemeral disk on virtio: {lb:?}"
    );
    let su = settings_of(&lu);
    assert_eq!(su["disks"]["system"], "/dev/sda");
    assert_eq!(
        su["disks"]["ephemeral"]["path"],
        "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_bosh-ephemeral"
    );
    assert_eq!(su["networks"]["b-lan6"]["ip"], "fd00:250::10");
    assert_eq!(su["networks"]["b-lan6"]["mac"], json!(lan_mac));
    assert_eq!(su["networks"]["a-lan"]["mac"], json!(lan_mac));
    let sb = settings_of(&lb);
    assert_eq!(sb["disks"]["system"], "/dev/vda");
    assert_eq!(sb["networks"]["b-isolated"]["ip"], "192.168.251.10");

    // Persistent disks of two disk_types on u: SCSI with writeback, virtio
    // with directsync/native and discard ignored; each carries its CID as
    // serial in the guest and its options in the XML.
    let scsi = ok(
        &config,
        "create_disk",
        json!([16, {"bus": "scsi", "cache": "writeback"}, u]),
    );
    let scsi = scsi.as_str().unwrap().to_string();
    made.disks.push(scsi.clone());
    let blk = ok(
        &config,
        "create_disk",
        json!([16, {"cache": "directsync", "io": "native", "discard": "ignore"}, u]),
    );
    let blk = blk.as_str().unwrap().to_string();
    made.disks.push(blk.clone());
    let hint = ok(&config, "attach_disk", json!([u, scsi]));
    assert_eq!(
        hint,
        json!({"path": format!("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{scsi}")})
    );
    let hint = ok(&config, "attach_disk", json!([u, blk]));
    assert_eq!(
        hint,
        json!({"path": "/dev/vda"}),
        "the first free virtio name"
    );
    let x = tb.virsh_ok(&["dumpxml", &u]);
    let device = |cid: &str| {
        x.split("<disk ")
            .find(|d| d.contains(&format!("<serial>{cid}</serial>")))
            .unwrap_or_else(|| panic!("{cid} not in {x}"))
            .to_string()
    };
    let d = device(&scsi);
    assert!(
        d.contains("bus='scsi'") && d.contains("cache='writeback'"),
        "{d}"
    );
    let d = device(&blk);
    assert!(
        d.contains("bus='virtio'")
            && d.contains("cache='directsync'")
            && d.contains("io='native'")
            && d.contains("discard='ignore'"),
        "{d}"
    );
    let disks = wait_disks(tb, &u, "both persistent disks", |l| {
        l.contains(&format!("={scsi}")) && l.contains(&format!("={blk}"))
    });
    assert!(
        disks.contains(&format!("vda={blk}")),
        "SCSI and virtio names: {disks}"
    );
    assert!(
        disks
            .split_whitespace()
            .any(|d| d.starts_with("sd") && d.ends_with(&format!("={scsi}"))),
        "{disks}"
    );
    ok(&config, "detach_disk", json!([u, scsi]));
    ok(&config, "detach_disk", json!([u, blk]));
    wait_disks(tb, &u, "both persistent disks gone", |l| {
        !l.contains(&scsi) && !l.contains(&blk)
    });

    for vm in [&u, &b] {
        ok(&config, "delete_vm", json!([vm]));
        assert!(!tb.virsh(&["dominfo", vm]).status.success(), "{vm}");
    }
    made.vms.clear();
    let left: Vec<String> = tb
        .volumes()
        .into_iter()
        .filter(|v| v.starts_with(&u) || v.starts_with(&b))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !std::path::Path::new(&format!("/var/lib/libvirt/qemu/nvram/{u}_VARS.fd")).exists(),
        "the UEFI variables go with the VM"
    );
}

#[test]
fn every_invalid_property_is_refused_and_nothing_is_made() {
    let tb = testbed();
    let config = &tb.config;
    let sc = Stemcell::import(tb);
    let net = net_name(tb);
    let ip = "10.253.77.97";
    let manual = json!({"type": "manual", "ip": ip, "netmask": "255.255.255.0",
                        "gateway": "10.253.77.1", "cloud_properties": {}});
    let base = json!({"cpu": 2, "memory": 256});
    let with = |extra: Value| {
        let mut cp = base.clone();
        cp.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        cp
    };
    let lan =
        |cp: Value| json!({"default": manual, "lan": {"type": "dynamic", "cloud_properties": cp}});
    let v6 = NetworkGuard(test_network(
        tb,
        "v6",
        "<ip family='ipv6' address='fd00:252::1' prefix='64'/>",
    ));
    let cases: Vec<(Value, Value, &str)> = vec![
        // The test bed's domains are qemu (TCG): no host CPU to expose.
        (with(json!({"cpu_mode": "host-passthrough"})), json!({"default": manual}),
         "cloud_properties.cpu_mode \"host-passthrough\" needs domain_type \"kvm\""),
        (with(json!({"cpu_mode": "host-model"})), json!({"default": manual}),
         "cloud_properties.cpu_mode \"host-model\" needs domain_type \"kvm\""),
        (with(json!({"cpu_mode": "turbo"})), json!({"default": manual}),
         "cloud_properties.cpu_mode must be one of host-passthrough, host-model, custom, default"),
        (with(json!({"cpu_mode": "custom"})), json!({"default": manual}),
         "needs cloud_properties.cpu_model"),
        (with(json!({"cpu_topology": {"sockets": 2, "cores": 2}})), json!({"default": manual}),
         "sockets 2 x cores 2 x threads 1 must equal cpu (2)"),
        (with(json!({"memory_balloon": "off"})), json!({"default": manual}),
         "cloud_properties.memory_balloon must be true or false"),
        (with(json!({"disk_bus": "ide"})), json!({"default": manual}),
         "cloud_properties.disk_bus must be one of virtio, scsi"),
        (with(json!({"disk_cache": "fast"})), json!({"default": manual}),
         "cloud_properties.disk_cache must be one of none, writethrough, writeback, directsync, unsafe, default"),
        (with(json!({"disk_io": "native", "disk_cache": "writeback"})), json!({"default": manual}),
         "cloud_properties.disk_io \"native\" needs cloud_properties.disk_cache \"none\" or \"directsync\""),
        (with(json!({"disk_discard": "yes"})), json!({"default": manual}),
         "cloud_properties.disk_discard must be one of unmap, ignore"),
        (with(json!({"firmware": "coreboot"})), json!({"default": manual}),
         "cloud_properties.firmware must be one of bios, uefi"),
        (with(json!({"graphics": "rdp"})), json!({"default": manual}),
         "cloud_properties.graphics must be one of none, vnc, spice"),
        (base.clone(), lan(json!({"bridge": "cpitb-nope0"})),
         "networks.lan.cloud_properties.bridge: the host has no interface 'cpitb-nope0'"),
        (base.clone(), lan(json!({"macvtap": "cpitb-nope0"})),
         "networks.lan.cloud_properties.macvtap: the host has no interface 'cpitb-nope0'"),
        (base.clone(), lan(json!({"bridge": BRIDGE, "network_name": net})),
         "give at most one of network_name, bridge, macvtap"),
        (base.clone(), lan(json!({"macvtap": BRIDGE, "macvtap_mode": "loop"})),
         "networks.lan.cloud_properties.macvtap_mode must be one of bridge, vepa, private, passthrough"),
        (base.clone(), lan(json!({"bridge": "br0'/><x"})),
         "networks.lan.cloud_properties.bridge must be a name"),
        (base.clone(),
         json!({"default": {"type": "manual", "ip": ip, "cloud_properties": {"nic_group": "g"}},
                "lan": {"type": "dynamic", "cloud_properties": {"bridge": BRIDGE, "nic_group": "g"}}}),
         "share nic_group 'g' but not their network_name/bridge/macvtap"),
        (base.clone(),
         json!({"default": manual, "v6": {"type": "manual", "ip": "fd00:253::10", "prefix": "64",
                                          "cloud_properties": {"network_name": v6.0}}}),
         "networks.v6.ip fd00:253::10 is not a usable address of libvirt network"),
    ];
    for (cp, nets, needle) in cases {
        let agent = format!("agent-shapes-bad-{}", uuid::Uuid::new_v4());
        let (kind, message) = err(
            config,
            "create_vm",
            json!([agent, sc.cid, cp, nets, [], {}]),
        );
        assert_eq!(kind, "VMCreationFailed", "{message}");
        assert!(message.contains(needle), "want {needle:?}, got: {message}");
        assert!(
            vm_domains_mentioning(tb, &format!(">{agent}<")).is_empty(),
            "a domain was made for {cp} / {nets}"
        );
        let hosts = all_dhcp_hosts(tb);
        assert!(
            !hosts.iter().any(|h| h.contains(&format!("'{ip}'"))),
            "a reservation of {ip} was made: {hosts:?}"
        );
        if let Some(at) = message.find("vm-") {
            let cid: String = message[at..].chars().take(39).collect();
            let vols: Vec<String> = tb
                .volumes()
                .into_iter()
                .filter(|v| v.starts_with(&cid))
                .collect();
            assert!(vols.is_empty(), "{vols:?}");
        }
    }

    // disk_types: persistent disks default to cache none, so native AIO
    // alone is fine (and recorded with that cache mode).
    let d = ok(config, "create_disk", json!([16, {"io": "native"}, null]));
    let d = d.as_str().unwrap().to_string();
    let meta = tb.virsh_ok(&[
        "vol-download",
        "--pool",
        &tb.pool_name(),
        &format!("{d}.meta"),
        "/dev/stdout",
    ]);
    ok(config, "delete_disk", json!([d]));
    assert!(
        meta.contains("\"cache\":\"none\"") && meta.contains("\"io\":\"native\""),
        "{meta}"
    );
    // The same options, checked before any volume is made.
    for (cp, needle) in [
        (
            json!({"bus": "ide"}),
            "cloud_properties.bus must be one of virtio, scsi",
        ),
        (
            json!({"cache": "fast"}),
            "cloud_properties.cache must be one of none",
        ),
        (
            json!({"io": "native", "cache": "writeback"}),
            "cloud_properties.io \"native\" needs",
        ),
        (
            json!({"discard": 1}),
            "cloud_properties.discard must be one of unmap, ignore",
        ),
    ] {
        let run = run_cpi_raw(
            Some(config),
            &director_request("create_disk", json!([16, cp, null])),
        );
        let e = &run.response["error"];
        assert_eq!(e["type"], "Bosh::Clouds::CloudError", "{}", run.response);
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
        assert!(
            !run.stderr.contains("disk-"),
            "a disk was made: {}",
            run.stderr
        );
    }
}
