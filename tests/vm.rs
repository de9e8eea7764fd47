//! VM methods through the built binary against the TLS test bed: create_vm
//! really boots the test stemcell with the agent settings on its config drive,
//! NICs with the MACs the settings name and DHCP reservations; delete_vm leaves
//! nothing of the VM but never a persistent disk; failures part-way leave
//! nothing behind; many concurrent creates and deletes stay consistent; the
//! leftovers of a killed create_vm are swept by a later one, nothing else is.
//!
//! Guest boots (TCG, slow) happen in one test only.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Nothing of `vm` left: no domain, no `<vm>-*` volume, no DHCP host named
/// after it or holding one of `macs`.
fn assert_no_trace(tb: &Testbed, vm: &str, macs: &[String]) {
    assert!(
        !tb.virsh(&["dominfo", vm]).status.success(),
        "domain {vm} still exists"
    );
    let vols: Vec<String> = tb
        .volumes()
        .into_iter()
        .filter(|v| v.starts_with(&format!("{vm}-")))
        .collect();
    assert!(vols.is_empty(), "volumes of {vm} left: {vols:?}");
    let hosts: Vec<_> = dhcp_hosts(tb, &net_name(tb))
        .into_iter()
        .filter(|(mac, name, _)| name.starts_with(vm) || macs.contains(mac))
        .collect();
    assert!(hosts.is_empty(), "DHCP hosts of {vm} left: {hosts:?}");
}

fn vm_cid_in(message: &str) -> Option<String> {
    let at = message.find("vm-")?;
    let cid: String = message[at..].chars().take(39).collect();
    (cid.len() == 39).then_some(cid)
}

/// No domain on the host carries this agent id in its metadata.
fn assert_no_domain_for_agent(tb: &Testbed, agent_id: &str) {
    let made = vm_domains_mentioning(tb, &format!(">{agent_id}<"));
    assert!(made.is_empty(), "domains made for {agent_id}: {made:?}");
}

#[test]
fn lifecycle_boots_with_settings_and_deletes_everything_but_the_persistent_disk() {
    let tb = testbed();
    let config = tb.config_with("vm-lifecycle", json!({"reboot_grace_seconds": 30}));
    let sc = Stemcell::import(tb);
    let agent_id = format!("agent-{}", uuid::Uuid::new_v4());
    let ip = free_ip(tb, 10, 20, &HashSet::new());
    let env = json!({"bosh": {"password": "$6$secret", "group": "g", "mbus": {"cert": {"ca": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"}}}});
    let networks = json!({
        "a-manual": manual(&ip),
        "b-dynamic": {"type": "dynamic", "dns": ["10.253.77.1"], "cloud_properties": {"network_name": net_name(tb)}},
        "c-vip": {"type": "vip", "ip": "203.0.113.7"},
    });

    let result = ok(
        &config,
        "create_vm",
        json!([agent_id, sc.cid, {"cpu": 1, "memory": 256, "ephemeral_disk": {"size": 512},
               "root_disk_size": 128, "flavor": "ignored"}, networks, [], env]),
    );
    let vm = result[0].as_str().unwrap().to_string();
    assert!(vm.starts_with("vm-") && vm.len() == 39, "{vm}");
    let returned = &result[1];
    let mac_a = returned["a-manual"]["mac"].as_str().unwrap().to_string();
    let mac_b = returned["b-dynamic"]["mac"].as_str().unwrap().to_string();
    assert_ne!(mac_a, mac_b);
    assert!(returned["c-vip"].get("mac").is_none(), "vip has no NIC");
    assert_eq!(ok(&config, "has_vm", json!([vm])), json!(true));

    // What libvirt holds: running domain, two NICs with those MACs, the
    // reservation, the volumes, thin root on the stemcell, metadata.
    assert!(tb.virsh_ok(&["domstate", &vm]).contains("running"));
    let xml = tb.virsh_ok(&["dumpxml", &vm, "--inactive"]);
    assert!(xml.contains(&format!("<mac address='{mac_a}'/>")), "{xml}");
    assert!(xml.contains(&format!("<mac address='{mac_b}'/>")), "{xml}");
    assert_eq!(xml.matches("<interface type='network'>").count(), 2);
    assert!(
        xml.contains(&format!("<bosh:agent_id>{agent_id}</bosh:agent_id>")),
        "{xml}"
    );
    assert!(xml.contains(&format!("<bosh:stemcell>{}</bosh:stemcell>", sc.cid)));
    assert!(
        !xml.contains("$6$secret"),
        "env must not reach the domain XML"
    );
    assert!(xml.contains("model='pcie-root-port'"));
    let hosts = dhcp_hosts(tb, &net_name(tb));
    assert!(
        hosts.contains(&(mac_a.clone(), vm.clone(), ip.clone())),
        "{ip} reserved for {mac_a}: {hosts:?}"
    );
    assert!(
        !hosts.iter().any(|h| h.0 == mac_b),
        "dynamic NICs get no reservation"
    );
    let vols = tb.volumes();
    for suffix in ["root", "ephemeral", "config.iso"] {
        assert!(
            vols.contains(&format!("{vm}-{suffix}")),
            "{suffix}: {vols:?}"
        );
    }
    let root = tb.virsh_ok(&[
        "vol-dumpxml",
        &format!("{vm}-root"),
        "--pool",
        &tb.pool_name(),
    ]);
    assert!(
        root.contains("<backingStore>") && root.contains(&sc.cid),
        "{root}"
    );
    assert!(
        root.contains("<capacity unit='bytes'>134217728</capacity>"),
        "{root}"
    );

    // set_vm_metadata: into the element and the title.
    ok(
        &config,
        "set_vm_metadata",
        json!([vm, {"director": "lab", "deployment": "dep", "job": "redis", "index": "0",
                    "name": "redis/0f1e", "created_at": "2026-01-01T00:00:00Z"}]),
    );
    let xml = tb.virsh_ok(&["dumpxml", &vm]);
    assert!(xml.contains("<title>redis/0f1e</title>"), "{xml}");
    assert!(
        xml.contains("<bosh:tag name=\"deployment\">dep</bosh:tag>"),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<bosh:agent_id>{agent_id}</bosh:agent_id>")),
        "kept: {xml}"
    );

    // The guest: settings from the config drive, its NICs' MACs.
    let console = console_path(tb, &vm);
    let lines = wait_console(&console, "CPITEST ready", Duration::from_secs(240), |l| {
        l.iter().any(|l| l == "ready")
    });
    let user_data = lines
        .iter()
        .find_map(|l| l.strip_prefix("userdata "))
        .unwrap_or_else(|| panic!("no userdata line: {lines:?}"));
    let settings: Value = serde_json::from_str(user_data).unwrap();
    assert_eq!(settings["agent_id"], json!(agent_id));
    assert_eq!(settings["vm"]["name"], json!(vm));
    assert_eq!(settings["env"], env, "env verbatim");
    assert_eq!(settings["disks"]["system"], "/dev/vda");
    assert_eq!(settings["disks"]["ephemeral"], json!({"path": "/dev/vdb"}));
    assert_eq!(settings["disks"]["persistent"], json!({}));
    assert_eq!(settings["mbus"], tb.config_json()["agent"]["mbus"]);
    let guest_macs: HashSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("mac "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_lowercase)
        .collect();
    for (name, net) in settings["networks"].as_object().unwrap() {
        match net["type"].as_str().unwrap() {
            "vip" => assert!(net.get("mac").is_none()),
            _ => {
                let mac = net["mac"].as_str().unwrap();
                assert!(
                    guest_macs.contains(mac),
                    "{name}: {mac} not among {guest_macs:?}"
                );
            }
        }
    }
    assert_eq!(guest_macs.len(), 2);
    let meta = lines
        .iter()
        .find_map(|l| l.strip_prefix("metadata "))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(meta).unwrap()["instance-id"],
        json!(vm)
    );

    // A persistent disk attached the way attach_disk will (and as create-env
    // leaves it at delete_vm): hot-plugged into a spare root port.
    let disk = format!("disk-{}", &uuid::Uuid::new_v4().simple().to_string()[..15]);
    let pool = tb.pool_name();
    tb.virsh_ok(&["vol-create-as", &pool, &disk, "16M", "--format", "raw"]);
    let disk_path = tb
        .virsh_ok(&["vol-path", &disk, "--pool", &pool])
        .trim()
        .to_string();
    tb.virsh_ok(&[
        "attach-disk",
        &vm,
        &disk_path,
        "vdc",
        "--targetbus",
        "virtio",
        "--serial",
        &disk,
        "--persistent",
    ]);
    wait_console(
        &console,
        "the hot-plugged disk",
        Duration::from_secs(60),
        |l| {
            l.iter()
                .any(|l| l.starts_with("disks ") && l.contains(&disk))
        },
    );

    // reboot_vm: the guest boots a second time (same console, new boot line).
    ok(&config, "reboot_vm", json!([vm]));
    wait_console(&console, "a second boot", Duration::from_secs(240), |l| {
        l.iter().filter(|l| l.starts_with("boot ")).count() >= 2
    });
    assert!(tb.virsh_ok(&["domstate", &vm]).contains("running"));

    // delete_vm: nothing of the VM left, the persistent disk untouched.
    ok(&config, "delete_vm", json!([vm]));
    assert_no_trace(tb, &vm, &[mac_a.clone(), mac_b.clone()]);
    assert!(
        tb.volumes().contains(&disk),
        "persistent disk {disk} must survive"
    );
    assert_eq!(ok(&config, "has_vm", json!([vm])), json!(false));
    // Already gone: still success.
    ok(&config, "delete_vm", json!([vm]));
    tb.virsh_ok(&["vol-delete", &disk, "--pool", &pool]);
}

#[test]
fn failures_before_and_part_way_leave_nothing_behind() {
    let tb = testbed();
    let config = &tb.config;
    let sc = Stemcell::import(tb);
    let agent_id = format!("agent-fail-{}", uuid::Uuid::new_v4());
    let ip = free_ip(tb, 60, 80, &HashSet::new());
    let nets = json!({"default": manual(&ip)});
    let create = |stemcell: &str, cp: Value, nets: &Value| {
        err(
            config,
            "create_vm",
            json!([agent_id, stemcell, cp, nets, [], {}]),
        )
    };
    let check_clean = |message: &str| {
        if let Some(vm) = vm_cid_in(message) {
            assert_no_trace(tb, &vm, &[]);
        }
        assert!(
            !dhcp_hosts(tb, &net_name(tb)).iter().any(|h| h.2 == ip),
            "{ip} still reserved after: {message}"
        );
    };

    // Missing stemcell.
    let missing = format!("sc-{}", uuid::Uuid::new_v4());
    let (t, m) = create(&missing, json!({"memory": 64}), &nets);
    assert_eq!(t, "VMCreationFailed");
    assert!(m.contains(&missing) && m.contains("not found"), "{m}");
    assert_eq!(
        call(
            config,
            "create_vm",
            json!([agent_id, missing, {}, nets, [], {}])
        )["error"]["ok_to_retry"],
        json!(false)
    );
    check_clean(&m);

    // A stemcell image without its .meta marker is not usable.
    tb.virsh_ok(&[
        "vol-delete",
        &format!("{}.meta", sc.cid),
        "--pool",
        &tb.pool_name(),
    ]);
    let (t, m) = create(&sc.cid, json!({"memory": 64}), &nets);
    assert_eq!(t, "VMCreationFailed", "{m}");
    assert!(m.contains("not found"), "{m}");
    drop(sc);
    let sc = Stemcell::import(tb);

    // Missing libvirt network named in cloud_properties.
    let ghost = format!("no-such-net-{}", uuid_like());
    let (t, m) = create(
        &sc.cid,
        json!({"memory": 64}),
        &json!({"default": {"type": "dynamic", "cloud_properties": {"network_name": ghost}}}),
    );
    assert_eq!(t, "VMCreationFailed");
    assert!(m.contains(&ghost) && m.contains("does not exist"), "{m}");
    check_clean(&m);

    // Manual IP outside the libvirt network, or reserved for another MAC.
    let (_, m) = create(
        &sc.cid,
        json!({"memory": 64}),
        &json!({"default": manual("10.99.0.5")}),
    );
    assert!(
        m.contains("10.99.0.5") && m.contains("10.253.77.0/24"),
        "{m}"
    );
    let squatter = format!("squat-{}", uuid_like());
    let squat_xml = format!("<host mac='52:54:00:ee:ee:01' name='{squatter}' ip='{ip}'/>");
    tb.virsh_ok(&[
        "net-update",
        &net_name(tb),
        "add",
        "ip-dhcp-host",
        &squat_xml,
        "--live",
        "--config",
    ]);
    let (t, m) = create(&sc.cid, json!({"memory": 64}), &nets);
    tb.virsh_ok(&[
        "net-update",
        &net_name(tb),
        "delete",
        "ip-dhcp-host",
        &squat_xml,
        "--live",
        "--config",
    ]);
    assert_eq!(t, "VMCreationFailed");
    assert!(
        m.contains("already reserved") && m.contains("52:54:00:ee:ee:01"),
        "{m}"
    );
    assert_no_domain_for_agent(tb, &agent_id);

    // Bad cloud_properties and a root disk smaller than the stemcell: refused up front.
    let (t, m) = create(&sc.cid, json!({"cpu": "two"}), &nets);
    assert_eq!(t, "VMCreationFailed");
    assert!(m.contains("cloud_properties.cpu"), "{m}");
    let (_, m) = create(&sc.cid, json!({"root_disk_size": 1}), &nets);
    assert!(m.contains("smaller than the stemcell"), "{m}");
    check_clean(&m);

    // Part-way: the ephemeral volume cannot be made (after the domain and
    // the root overlay exist; the DHCP entry comes with the start).
    let (t, m) = create(
        &sc.cid,
        json!({"memory": 64, "ephemeral_disk": 1u64 << 40}),
        &nets,
    );
    assert_eq!(t, "VMCreationFailed");
    assert!(m.contains("-ephemeral"), "{m}");
    let vm = vm_cid_in(&m).expect("the message names the VM");
    check_clean(&m);
    assert_no_trace(tb, &vm, &[]);

    // Part-way: the domain cannot be defined (after every volume exists).
    let r = call(
        config,
        "create_vm",
        json!([agent_id, sc.cid, {"memory": 64, "machine": "pc-q35-bogus"}, nets, [], {}]),
    );
    let m = r["error"]["message"].as_str().unwrap().to_string();
    assert!(
        m.contains("defining domain") && m.contains("pc-q35-bogus"),
        "{m}"
    );
    assert_eq!(
        r["error"]["ok_to_retry"],
        json!(false),
        "deterministic failure"
    );
    check_clean(&m);
    assert_no_domain_for_agent(tb, &agent_id);
}

#[test]
fn sixteen_concurrent_creates_then_deletes() {
    let tb = testbed();
    let config = tb.config.clone();
    let sc = Stemcell::import(tb);
    let net = net_name(tb);
    let mut ips = HashSet::new();
    for _ in 0..16 {
        let ip = free_ip(tb, 20, 60, &ips);
        ips.insert(ip);
    }
    let vols_before: BTreeSet<String> = tb.volumes().into_iter().collect();

    let handles: Vec<_> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let (config, sc, ip) = (config.clone(), sc.cid.clone(), ip.clone());
            std::thread::spawn(move || {
                let r = call(
                    &config,
                    "create_vm",
                    json!([format!("agent-many-{i}"), sc, {"memory": 64}, {"default": manual(&ip)}, [], {}]),
                );
                (ip, r)
            })
        })
        .collect();
    let results: Vec<(String, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut vms = Vec::new();
    let mut macs = HashSet::new();
    let mut failures = Vec::new();
    for (ip, r) in &results {
        if !r["error"].is_null() {
            failures.push(r["error"].to_string());
            continue;
        }
        let vm = r["result"][0].as_str().unwrap().to_string();
        let mac = r["result"][1]["default"]["mac"]
            .as_str()
            .unwrap()
            .to_string();
        macs.insert(mac.clone());
        vms.push((vm, mac, ip.clone()));
    }
    // Delete whatever was made before judging, so a failure leaves no VMs running.
    let hosts_during = dhcp_hosts(tb, &net);
    let deletes: Vec<_> = vms
        .iter()
        .map(|(vm, _, _)| {
            let (config, vm) = (config.clone(), vm.clone());
            std::thread::spawn(move || call(&config, "delete_vm", json!([vm])))
        })
        .collect();
    let delete_errors: Vec<String> = deletes
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|r| !r["error"].is_null())
        .map(|r| r["error"].to_string())
        .collect();

    assert!(failures.is_empty(), "create_vm failures: {failures:?}");
    assert!(
        delete_errors.is_empty(),
        "delete_vm failures: {delete_errors:?}"
    );
    assert_eq!(vms.len(), 16);
    assert_eq!(macs.len(), 16, "MACs must be distinct");
    for (vm, mac, ip) in &vms {
        assert!(
            hosts_during.contains(&(mac.clone(), vm.clone(), ip.clone())),
            "{vm}: {ip} not reserved for {mac}"
        );
    }
    // Pool and network as they were, as far as these VMs go (others share the test bed).
    let vols_after: BTreeSet<String> = tb.volumes().into_iter().collect();
    let new: Vec<_> = vols_after.difference(&vols_before).collect();
    for (vm, mac, _) in &vms {
        assert!(
            !new.iter().any(|v| v.starts_with(vm.as_str())),
            "{vm} left volumes: {new:?}"
        );
        assert_no_trace(tb, vm, std::slice::from_ref(mac));
    }
    let hosts_after = dhcp_hosts(tb, &net);
    assert!(
        !hosts_after
            .iter()
            .any(|h| ips.contains(&h.2) && vms.iter().any(|v| v.0 == h.1)),
        "reservations left: {hosts_after:?}"
    );
    assert!(vols_after.contains(&sc.cid), "the stemcell stays");
}

#[test]
fn missing_nat_network_is_created_by_concurrent_creators() {
    let tb = testbed();
    let n = uuid::Uuid::new_v4().as_bytes()[0] % 100 + 100;
    let name = format!("cpi-vmtest-net-{}", uuid_like());
    let config = tb.config_with(
        "vm-newnet",
        json!({"network": {"name": name, "subnet": format!("10.254.{n}.0/24")}}),
    );
    let sc = Stemcell::import(tb);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (config, sc) = (config.clone(), sc.cid.clone());
            let nets = if i % 2 == 0 {
                json!({"d": {"type": "dynamic"}})
            } else {
                json!({"m": {"type": "manual", "ip": format!("10.254.{n}.{}", 10 + i), "netmask": "255.255.255.0", "gateway": format!("10.254.{n}.1")}})
            };
            std::thread::spawn(move || call(&config, "create_vm", json!([format!("agent-net-{i}"), sc, {"memory": 64}, nets, [], {}])))
        })
        .collect();
    let results: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let vms: Vec<String> = results
        .iter()
        .filter_map(|r| r["result"][0].as_str().map(str::to_string))
        .collect();
    let info = tb.virsh(&["net-info", &name]);
    let net_xml = tb.virsh(&["net-dumpxml", &name]);
    for vm in &vms {
        ok(&config, "delete_vm", json!([vm]));
    }
    let _ = tb.virsh(&["net-destroy", &name]);
    let _ = tb.virsh(&["net-undefine", &name]);

    for r in &results {
        assert!(r["error"].is_null(), "create_vm failed: {r}");
    }
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Active:         yes") && info.contains("Autostart:      yes"),
        "{info}"
    );
    let net_xml = String::from_utf8_lossy(&net_xml.stdout);
    assert!(net_xml.contains("<forward mode='nat'"), "{net_xml}");
    assert!(
        net_xml.contains(&format!("address='10.254.{n}.1'")),
        "{net_xml}"
    );
    assert_eq!(net_xml.matches("<host ").count(), 2, "{net_xml}");
}

#[test]
fn delete_vm_of_a_vanished_vm_sweeps_its_leftovers() {
    let tb = testbed();
    let vm = format!("vm-{}", uuid::Uuid::new_v4());
    let pool = tb.pool_name();
    let net = net_name(tb);
    // What a create_vm killed half-way would leave: volumes and a reservation.
    tb.virsh_ok(&[
        "vol-create-as",
        &pool,
        &format!("{vm}-root"),
        "1M",
        "--format",
        "qcow2",
    ]);
    tb.virsh_ok(&["vol-create-as", &pool, &format!("{vm}-config.iso"), "1M"]);
    let ip = free_ip(tb, 80, 90, &HashSet::new());
    let host = format!("<host mac='52:54:00:ee:ee:02' name='{vm}' ip='{ip}'/>");
    tb.virsh_ok(&[
        "net-update",
        &net,
        "add",
        "ip-dhcp-host",
        &host,
        "--live",
        "--config",
    ]);
    // A look-alike that is not this VM's must survive.
    let other = format!("{vm}x-root");
    tb.virsh_ok(&["vol-create-as", &pool, &other, "1M"]);

    assert_eq!(ok(&tb.config, "has_vm", json!([vm])), json!(false));
    let r = call(&tb.config, "delete_vm", json!([vm]));
    assert!(r["error"].is_null(), "{r}");
    assert!(r["log"].as_str().unwrap().contains("already gone"), "{r}");
    assert_no_trace(tb, &vm, &["52:54:00:ee:ee:02".to_string()]);
    assert!(tb.volumes().contains(&other));
    tb.virsh_ok(&["vol-delete", &other, "--pool", &pool]);

    // Not a VM CID of ours: nothing is swept, success.
    ok(&tb.config, "delete_vm", json!(["disk"]));
}

#[test]
fn create_vm_answers_a_v1_caller_with_the_bare_vm_cid() {
    let tb = testbed();
    let sc = Stemcell::import(tb);
    let networks = json!({"default": {"type": "dynamic", "cloud_properties": {}}});
    let request = |api_version: u64| {
        serde_json::to_vec(&json!({"method": "create_vm",
            "arguments": ["agent-v1", sc.cid, {"memory": 256}, networks, [], {}],
            "context": {"director_uuid": DIRECTOR_UUID}, "api_version": api_version}))
        .unwrap()
    };
    let v1 = run_cpi_raw(Some(&tb.config), &request(1)).response;
    assert!(v1["error"].is_null(), "{v1}");
    let vm = v1["result"]
        .as_str()
        .expect("v1: a bare VM CID")
        .to_string();
    ok(&tb.config, "delete_vm", json!([vm]));

    let v2 = run_cpi_raw(Some(&tb.config), &request(2)).response;
    assert!(v2["error"].is_null(), "{v2}");
    let vm = v2["result"][0]
        .as_str()
        .expect("v2: [vm_cid, networks]")
        .to_string();
    assert!(v2["result"][1]["default"]["mac"].is_string(), "{v2}");
    ok(&tb.config, "delete_vm", json!([vm]));
}

#[test]
fn absent_vms_and_small_methods() {
    let tb = testbed();
    let config = &tb.config;
    let vm = format!("vm-{}", uuid::Uuid::new_v4());
    assert_eq!(ok(config, "has_vm", json!([vm])), json!(false));
    assert_eq!(ok(config, "has_vm", json!(["i-123"])), json!(false));
    let (t, m) = err(config, "reboot_vm", json!([vm]));
    assert_eq!(
        (t.as_str(), m),
        ("VMNotFound", format!("VM '{vm}' not found"))
    );
    let (t, _) = err(config, "set_vm_metadata", json!([vm, {"name": "x"}]));
    assert_eq!(t, "VMNotFound");
    assert_eq!(
        ok(
            config,
            "calculate_vm_cloud_properties",
            json!([{"cpu": 2, "ram": 4096, "ephemeral_disk_size": 10240}])
        ),
        json!({"cpu": 2, "memory": 4096, "ephemeral_disk": {"size": 10240}})
    );
    let (t, _) = err(
        config,
        "calculate_vm_cloud_properties",
        json!([{"cpu": 0, "ram": 1, "ephemeral_disk_size": 0}]),
    );
    assert_eq!(t, "CloudError");
}

#[test]
fn two_creates_racing_for_one_ip_one_wins_and_the_loser_leaves_nothing() {
    let tb = testbed();
    let sc = Stemcell::import(tb);
    let ip = free_ip(tb, 90, 100, &HashSet::new());
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (config, sc, ip) = (tb.config.clone(), sc.cid.clone(), ip.clone());
            std::thread::spawn(move || {
                call(
                    &config,
                    "create_vm",
                    json!([format!("agent-race-{i}"), sc, {"memory": 64}, {"default": manual(&ip)}, [], {}]),
                )
            })
        })
        .collect();
    let results: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<String> = results
        .iter()
        .filter_map(|r| r["result"][0].as_str().map(str::to_string))
        .collect();
    for vm in &winners {
        ok(&tb.config, "delete_vm", json!([vm]));
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one create_vm gets {ip}: {results:?}"
    );
    let loser = results.iter().find(|r| !r["error"].is_null()).unwrap();
    let m = loser["error"]["message"].as_str().unwrap();
    assert_eq!(loser["error"]["type"], "Bosh::Clouds::VMCreationFailed");
    assert!(m.contains(&ip) && m.contains("already reserved"), "{m}");
    if let Some(vm) = vm_cid_in(m) {
        assert_no_trace(tb, &vm, &[]);
    }
    assert_no_trace(tb, &winners[0], &[]);
}

#[test]
fn secrets_in_env_never_reach_the_logs() {
    let tb = testbed();
    let config = tb.config_with("vm-secrets", json!({"log_level": "debug"}));
    let sc = Stemcell::import(tb);
    let secret = format!("s3cret-{}", uuid::Uuid::new_v4().simple());
    let env = json!({"bosh": {"password": secret, "mbus": {"cert": {"private_key": secret}},
                     "blobstores": [{"provider": "dav", "options": {"password": secret}}]}});
    let run = run_cpi_raw(
        Some(&config),
        &director_request(
            "create_vm",
            json!(["agent-secrets", sc.cid, {"memory": 64}, {"d": {"type": "dynamic"}}, [], env]),
        ),
    );
    assert!(run.response["error"].is_null(), "{}", run.response);
    let vm = run.response["result"][0].as_str().unwrap().to_string();
    let xml = tb.virsh_ok(&["dumpxml", &vm, "--inactive"]);
    let iso = tb.virsh_ok(&[
        "vol-path",
        "--pool",
        &tb.pool_name(),
        &format!("{vm}-config.iso"),
    ]);
    let iso_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(iso.trim()).unwrap().permissions().mode()
    };
    ok(&config, "delete_vm", json!([vm]));
    assert_eq!(
        iso_mode & 0o077,
        0,
        "the config drive must be readable by its owner only: {iso_mode:o}"
    );
    assert!(
        !run.stderr.contains(&secret),
        "secret on stderr:\n{}",
        run.stderr
    );
    assert!(!run.response["log"].as_str().unwrap().contains(&secret));
    assert!(!xml.contains(&secret), "secret in the domain XML");
    assert!(
        run.stderr.contains("DEBUG"),
        "debug logging was on: {}",
        run.stderr
    );
}

/// What a create_vm killed after its config drive leaves: `<vm>-root`,
/// `<vm>-config.iso` and a DHCP reservation named after it, no domain.
fn killed_create(tb: &Testbed, ip: &str) -> (String, String) {
    let vm = format!("vm-{}", uuid::Uuid::new_v4());
    let pool = tb.pool_name();
    let root = format!("{vm}-root");
    tb.virsh_ok(&["vol-create-as", &pool, &root, "1M", "--format", "qcow2"]);
    tb.virsh_ok(&["vol-create-as", &pool, &format!("{vm}-config.iso"), "1M"]);
    let b = uuid::Uuid::new_v4().into_bytes();
    let mac = format!("52:54:00:ee:{:02x}:{:02x}", b[0], b[1]);
    let host = format!("<host mac='{mac}' name='{vm}' ip='{ip}'/>");
    tb.virsh_ok(&[
        "net-update",
        &net_name(tb),
        "add-last",
        "ip-dhcp-host",
        &host,
        "--live",
        "--config",
    ]);
    (vm, mac)
}

/// Sets a volume's file mtime two hours back, as if untouched since.
fn age_volume(tb: &Testbed, vol: &str) {
    let pool = tb.pool_name();
    let path = tb.virsh_ok(&["vol-path", vol, "--pool", &pool]);
    let out = std::process::Command::new("touch")
        .args(["-m", "-d", "2 hours ago", path.trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "touch {path}: {out:?}");
    // Best effort: a refresh fails while another process builds a volume.
    let _ = tb.virsh(&["pool-refresh", &pool]);
}

#[test]
fn create_vm_sweeps_what_killed_creates_left_and_nothing_else() {
    let tb = testbed();
    let sc = Stemcell::import(tb);
    let pool = tb.pool_name();
    let net = net_name(tb);
    let ip_old = free_ip(tb, 100, 120, &HashSet::new());
    let ip_fresh = free_ip(tb, 100, 120, &HashSet::from([ip_old.clone()]));
    let ip_held = free_ip(
        tb,
        100,
        120,
        &HashSet::from([ip_old.clone(), ip_fresh.clone()]),
    );

    // Killed long ago: every volume untouched for two hours.
    let (old, old_mac) = killed_create(tb, &ip_old);
    age_volume(tb, &format!("{old}-root"));
    age_volume(tb, &format!("{old}-config.iso"));
    // As old, but a domain under another name (defined, never started) uses
    // its root volume: still in use, never swept.
    let (held, held_mac) = killed_create(tb, &ip_held);
    age_volume(tb, &format!("{held}-root"));
    age_volume(tb, &format!("{held}-config.iso"));
    let holder = format!("held-{}", uuid::Uuid::new_v4());
    let held_root = tb.virsh_ok(&["vol-path", &format!("{held}-root"), "--pool", &pool]);
    let holder_xml = scratch_dir("held").join("domain.xml");
    std::fs::write(
        &holder_xml,
        format!(
            "<domain type='qemu'><name>{holder}</name><memory unit='MiB'>32</memory>\
             <os><type arch='x86_64'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            held_root.trim()
        ),
    )
    .unwrap();
    tb.virsh_ok(&["define", holder_xml.to_str().unwrap()]);
    // Could be a live create_vm that has not defined its domain yet.
    let (fresh, fresh_mac) = killed_create(tb, &ip_fresh);
    // One volume still being written: the CID is not abandoned.
    let mixed = format!("vm-{}", uuid::Uuid::new_v4());
    tb.virsh_ok(&["vol-create-as", &pool, &format!("{mixed}-root"), "1M"]);
    tb.virsh_ok(&["vol-create-as", &pool, &format!("{mixed}-ephemeral"), "1M"]);
    age_volume(tb, &format!("{mixed}-root"));
    // A detached persistent disk, as old: never a VM's leftover.
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let disk = format!("disk-{}", &hex[..15]);
    tb.virsh_ok(&["vol-create-as", &pool, &disk, "1M"]);
    age_volume(tb, &disk);

    let r = call(
        &tb.config,
        "create_vm",
        json!(["agent-sweep", sc.cid, {"memory": 64}, {"d": {"type": "dynamic"}}, [], {}]),
    );
    // Look at what is left, then clean up before judging.
    let vols = tb.volumes();
    let hosts = dhcp_hosts(tb, &net);
    if let Some(vm) = r["result"][0].as_str() {
        ok(&tb.config, "delete_vm", json!([vm]));
    }
    tb.virsh_ok(&["undefine", &holder]);
    for vm in [&old, &fresh, &mixed, &held] {
        ok(&tb.config, "delete_vm", json!([vm]));
    }
    tb.virsh_ok(&["vol-delete", &disk, "--pool", &pool]);

    assert!(r["error"].is_null(), "create_vm failed: {r}");
    let of = |vm: &str| -> Vec<&String> {
        vols.iter()
            .filter(|v| v.starts_with(&format!("{vm}-")))
            .collect()
    };
    let reserved = |vm: &str, mac: &str| hosts.iter().any(|h| h.1 == vm || h.0 == mac);
    assert!(
        of(&old).is_empty(),
        "abandoned volumes not swept: {:?}",
        of(&old)
    );
    assert!(
        !reserved(&old, &old_mac),
        "abandoned DHCP entry not swept: {hosts:?}"
    );
    assert_eq!(of(&fresh).len(), 2, "a fresh CID was swept: {vols:?}");
    assert!(
        reserved(&fresh, &fresh_mac),
        "a fresh CID's DHCP entry was swept"
    );
    assert_eq!(
        of(&mixed).len(),
        2,
        "a CID with a fresh volume was swept: {vols:?}"
    );
    assert!(vols.contains(&disk), "a persistent disk was swept");
    assert_eq!(
        of(&held).len(),
        2,
        "volumes a domain named {holder} uses were swept: {vols:?}"
    );
    assert!(
        reserved(&held, &held_mac),
        "the DHCP entry of a CID whose volume is in use was swept"
    );
    assert_no_trace(tb, &old, &[old_mac]);
    assert_no_trace(tb, &fresh, &[fresh_mac]);
    assert_no_trace(tb, &held, &[held_mac]);
}

/// Adds a DHCP host entry to the test network by hand.
fn add_host(tb: &Testbed, xml: &str) {
    tb.virsh_ok(&[
        "net-update",
        &net_name(tb),
        "add-last",
        "ip-dhcp-host",
        xml,
        "--live",
        "--config",
    ]);
}

#[test]
fn a_stale_reservation_of_a_killed_create_is_reclaimed_a_live_one_is_not() {
    let tb = testbed();
    let sc = Stemcell::import(tb);
    let pool = tb.pool_name();
    let net = net_name(tb);
    let ip_stale = free_ip(tb, 120, 127, &HashSet::new());
    let ip_live = free_ip(tb, 120, 127, &HashSet::from([ip_stale.clone()]));
    let b = uuid::Uuid::new_v4().into_bytes();

    // Killed between reserving and making its root disk: only the entry is left.
    let stale = format!("vm-{}", uuid::Uuid::new_v4());
    let stale_mac = format!("52:54:00:ee:{:02x}:{:02x}", b[0], b[1]);
    add_host(
        tb,
        &format!("<host mac='{stale_mac}' name='{stale}' ip='{ip_stale}'/>"),
    );
    // A create_vm that has its root disk but no domain yet: its entry is live.
    let live = format!("vm-{}", uuid::Uuid::new_v4());
    let live_mac = format!("52:54:00:ef:{:02x}:{:02x}", b[0], b[1]);
    add_host(
        tb,
        &format!("<host mac='{live_mac}' name='{live}' ip='{ip_live}'/>"),
    );
    tb.virsh_ok(&["vol-create-as", &pool, &format!("{live}-root"), "1M"]);

    let create = |ip: &str| {
        run_cpi_raw(
            Some(&tb.config),
            &director_request(
                "create_vm",
                json!(["agent-stale", sc.cid, {"memory": 64}, {"default": manual(ip)}, [], {}]),
            ),
        )
    };
    let on_stale = create(&ip_stale);
    let on_live = create(&ip_live);
    let hosts = dhcp_hosts(tb, &net);
    let new_vm = on_stale.response["result"][0].as_str().map(str::to_string);
    if let Some(vm) = &new_vm {
        ok(&tb.config, "delete_vm", json!([vm]));
    }
    if let Some(vm) = on_live.response["result"][0].as_str() {
        ok(&tb.config, "delete_vm", json!([vm]));
    }
    for vm in [&stale, &live] {
        ok(&tb.config, "delete_vm", json!([vm]));
    }

    let new_vm = new_vm.unwrap_or_else(|| panic!("create_vm on a stale IP: {}", on_stale.response));
    assert!(
        !hosts.iter().any(|h| h.1 == stale || h.0 == stale_mac),
        "stale entry left: {hosts:?}"
    );
    assert!(
        hosts.iter().any(|h| h.1 == new_vm && h.2 == ip_stale),
        "{new_vm} does not hold {ip_stale}: {hosts:?}"
    );
    assert!(
        on_stale.stderr.contains("removing stale DHCP host") && on_stale.stderr.contains(&stale),
        "no warning naming the removed entry:\n{}",
        on_stale.stderr
    );
    let e = &on_live.response["error"];
    assert_eq!(
        e["type"], "Bosh::Clouds::VMCreationFailed",
        "{}",
        on_live.response
    );
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("already reserved") && m.contains(&live), "{m}");
    assert!(
        hosts
            .iter()
            .any(|h| h.1 == live && h.0 == live_mac && h.2 == ip_live),
        "a live reservation was removed: {hosts:?}"
    );
    assert_no_trace(tb, &stale, &[stale_mac]);
    assert_no_trace(tb, &live, &[live_mac]);
    assert_no_trace(tb, &new_vm, &[]);
}

/// A small deterministic generator (the fault tests' kill moments are
/// seeded, so a failure can be replayed with FAULT_SEED=<seed>).
/// kill -9 of create_vm at seeded moments across its whole run, each time
/// followed by what the director does next: create_vm again with the same
/// manual IP. The retry must succeed every time (before the fix it failed
/// with "IP ... is already reserved" whenever the kill came after the
/// reservation), and in the end the pool holds only the stemcell, no domain
/// carries a killed call's agent id, and the IP is free again.
#[test]
fn a_killed_create_vm_never_blocks_the_retry_and_leaves_nothing() {
    const KILLS: usize = 20;
    let tb = testbed();
    let pool = PrivatePool::new("killcreate");
    let image = tb.stemcell_dir("qcow2").join("image");
    let sc = ok(
        &pool.config,
        "create_stemcell",
        json!([image, {"disk_format": "qcow2"}]),
    );
    let sc = sc.as_str().unwrap().to_string();
    let ip = free_ip(tb, 200, 230, &HashSet::new());
    let request = |agent: &str| {
        director_request(
            "create_vm",
            json!([agent, sc, {"memory": 64, "ephemeral_disk": {"size": 16}}, {"default": manual(&ip)}, [], {}]),
        )
    };
    let create = |agent: &str| -> String {
        let r = run_cpi_raw(Some(&pool.config), &request(agent)).response;
        assert!(r["error"].is_null(), "create_vm for {agent}: {r}");
        r["result"][0].as_str().unwrap().to_string()
    };

    let started = std::time::Instant::now();
    let vm = create("agent-baseline");
    let full = started.elapsed();
    ok(&pool.config, "delete_vm", json!([vm]));

    let mut rng = Lcg::from_env();
    let (mut finished, mut reclaimed, mut orphans) = (0, 0, 0);
    // This run's agents only: the test bed is shared.
    let run = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..KILLS {
        let agent = format!("agent-killed-{run}-{i}");
        let mut child = spawn_cpi(Some(&pool.config), &request(&agent));
        let delay = full.mul_f64(rng.below(110) as f64 / 100.0);
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        recover_libvirtd();
        if let Ok(r) = serde_json::from_slice::<Value>(&out.stdout) {
            // It finished before the kill: the director has its CID.
            finished += 1;
            if let Some(vm) = r["result"][0].as_str() {
                ok(&pool.config, "delete_vm", json!([vm]));
            }
        } else {
            // Killed in the last milliseconds, after its VM was complete (the
            // creator record dropped, the guest running) and before its
            // answer: a complete orphan the director never learned of, as on
            // any IaaS, and no sweep may take it for a leftover
            // (tests/faults.rs `settle_orphans` counts these the same way).
            // (Another test's create_vm may be sweeping it meanwhile: a
            // domain gone between the listing and the look is no orphan.)
            for vm in vm_domains_mentioning(tb, &format!(">{agent}<")) {
                let look = |args: &[&str]| {
                    let out = tb.virsh(args);
                    out.status
                        .success()
                        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
                };
                let (Some(xml), Some(state)) = (look(&["dumpxml", &vm]), look(&["domstate", &vm]))
                else {
                    continue;
                };
                if state.contains("running") && !xml.contains(":creating>") {
                    orphans += 1;
                    ok(&pool.config, "delete_vm", json!([vm]));
                }
            }
        }
        let retry = run_cpi_raw(Some(&pool.config), &request(&format!("agent-retry-{i}")));
        assert!(
            retry.response["error"].is_null(),
            "kill {i} after {delay:?}: the retry failed: {}\n{}",
            retry.response,
            retry.stderr
        );
        if retry.stderr.contains("ended before it finished") {
            reclaimed += 1;
        }
        let vm = retry.response["result"][0].as_str().unwrap().to_string();
        ok(&pool.config, "delete_vm", json!([vm]));
        assert_no_domain_for_agent(tb, &agent);
    }
    eprintln!(
        "create_vm: {KILLS} kills over {full:?}, {finished} had finished, {orphans} complete orphans, {reclaimed} leftovers reclaimed by the retry, {} libvirtd deadlocks survived",
        libvirtd_restarts()
    );
    // The last kill's leftovers (a domain that never started) go with the
    // next create_vm's sweep, as they would on a real host.
    let vm = create("agent-final");
    ok(&pool.config, "delete_vm", json!([vm]));
    let mut left = pool.volumes();
    left.sort();
    assert_eq!(left, vec![sc.clone(), format!("{sc}.meta")], "volumes left");
    let left = vm_domains_mentioning(tb, &format!("agent-killed-{run}"));
    assert!(
        left.is_empty(),
        "domains of killed create_vm calls: {left:?}"
    );
    assert!(
        !dhcp_hosts(tb, &net_name(tb)).iter().any(|h| h.2 == ip),
        "{ip} still reserved"
    );
    ok(&pool.config, "delete_stemcell", json!([sc]));
}
