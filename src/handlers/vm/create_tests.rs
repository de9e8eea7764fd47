//! create_vm's decisions against `FakeHost`: the journal's undo (newest
//! first, nothing left), `ok_to_retry`, IPs held by live VMs and by killed
//! creates, the sweeps of killed creates. Hermetic, milliseconds; what
//! libvirt itself does is proven by tests/vm.rs and tests/faults.rs.

use serde_json::{json, Value};

use super::test_support::*;
use crate::creator::Creator;
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::fake::{FakeHost, POOL};
use crate::host::{DhcpHost, DiskDevice, DiskHost, VmMetadata};
use crate::names;

/// create_vm with one manual network at `ip` and a 1 GiB ephemeral disk.
fn create(host: &FakeHost, ip: &str) -> Result<Value> {
    create_with(host, manual(ip), json!({"ephemeral_disk": 1024}), Some(3))
}

/// The undo of a create that made everything before its failure, newest first.
const UNDO_ALL: [&str; 6] = [
    "release",
    "delete_volume iso",
    "delete_volume ephemeral",
    "delete_volume root",
    "destroy_vm",
    "undefine_vm",
];

/// The undo of a create that failed before it had its reservation.
const UNDO_ALL_BUT_THE_RESERVATION: [&str; 5] = [
    "delete_volume iso",
    "delete_volume ephemeral",
    "delete_volume root",
    "destroy_vm",
    "undefine_vm",
];

fn failure(r: Result<Value>) -> CpiError {
    let e = r.expect_err("create_vm should fail");
    assert_eq!(e.kind, ErrorKind::VmCreationFailed, "{}", e.message);
    e
}

/// What create_vm may leave after a failure: nothing but the stemcell and
/// what the test put there itself.
fn assert_nothing_left(host: &FakeHost) {
    assert_eq!(host.domain_names(), Vec::<String>::new());
    assert_eq!(host.names(), vec![SC.to_string(), names::marker_name(SC)]);
    assert_eq!(host.reservations(NET), vec![]);
}

/// The calls that undid a failed create, in order (after the failure).
fn undo_calls(host: &FakeHost) -> Vec<String> {
    let calls = host.calls();
    let undo_ops = ["destroy_vm", "undefine_vm", "delete_volume", "release"];
    calls
        .into_iter()
        .filter(|c| undo_ops.iter().any(|op| c.split(' ').next() == Some(*op)))
        .map(|c| {
            c.split(' ').next().unwrap().to_string()
                + match c.rsplit('-').next() {
                    Some("root") => " root",
                    Some("ephemeral") => " ephemeral",
                    Some("config.iso") => " iso",
                    _ => "",
                }
        })
        .collect()
}

fn retryable(message: &str) -> CpiError {
    CpiError::cloud(message).retryable(true)
}

// ---- what a create makes --------------------------------------------------------

#[test]
fn a_vm_runs_with_its_volumes_and_reservation_and_the_v2_result_carries_the_mac() {
    let host = fake();
    let out = create(&host, "10.0.16.10").unwrap();
    let vm = out[0].as_str().unwrap().to_string();
    assert!(names::is_vm_cid(&vm));
    let mac = out[1]["private"]["mac"].as_str().unwrap().to_string();
    assert_eq!(out[1]["private"]["ip"], json!("10.0.16.10"));

    let d = host.domain(&vm).unwrap();
    assert!(d.running);
    assert_eq!(
        d.metadata.creating, None,
        "the creator record is dropped once it runs"
    );
    assert_eq!(d.metadata.agent_id, "agent-1");
    assert_eq!(
        d.metadata.networks[0].dhcp_host.as_deref(),
        Some(vm.as_str())
    );
    for v in [
        names::root_volume(&vm),
        names::ephemeral_volume(&vm),
        names::config_drive_volume(&vm),
    ] {
        assert!(host.exists(&v), "{v}");
    }
    assert_eq!(
        host.facts(&names::root_volume(&vm)).unwrap().backing_path,
        Some(format!("/{POOL}/{SC}"))
    );
    assert_eq!(
        host.reservations(NET),
        vec![DhcpHost {
            mac: Some(mac),
            name: Some(vm.clone()),
            ip: Some("10.0.16.10".into()),
        }]
    );
}

/// The reservation is made while the VM starts paused, after everything
/// else, and the guest runs only once it exists.
#[test]
fn the_guest_runs_only_once_its_reservation_exists() {
    let host = fake();
    let out = create(&host, "10.0.16.10").unwrap();
    let vm = out[0].as_str().unwrap();
    let calls = host.calls();
    let at = |op: &str| {
        calls
            .iter()
            .position(|c| c.split(' ').next() == Some(op))
            .unwrap_or_else(|| panic!("no {op}: {calls:?}"))
    };
    assert!(at("create_volume_with") < at("start_vm"), "{calls:?}");
    assert!(at("start_vm") < at("reserve"), "{calls:?}");
    assert!(at("reserve") < at("resume_vm"), "{calls:?}");
    let d = host.domain(vm).unwrap();
    assert!(d.running && !d.paused);
}

#[test]
fn a_vm_without_reservations_starts_unpaused() {
    let host = fake();
    let dynamic = json!({"d": {"type": "dynamic", "cloud_properties": {}}});
    let out = create_with(&host, dynamic, json!({}), Some(3)).unwrap();
    let d = host.domain(out[0].as_str().unwrap()).unwrap();
    assert!(d.running && !d.paused);
    assert!(!host
        .calls()
        .iter()
        .any(|c| c.starts_with("reserve") || c.starts_with("resume_vm")));
}

/// A MAC somebody else reserved first: the reservation is made with a new
/// one, and the VM and its config drive carry it before the guest runs.
#[test]
fn a_taken_mac_is_replaced_in_the_vm_and_its_config_drive_before_the_guest_runs() {
    let host = fake();
    host.take_next_mac();
    let out = create(&host, "10.0.16.10").unwrap();
    let vm = out[0].as_str().unwrap();
    let mac = out[1]["private"]["mac"].as_str().unwrap().to_string();
    let held = host.reservations(NET);
    assert_eq!(held.len(), 2, "{held:?}");
    let taken = held[0].mac.clone().unwrap();
    assert_eq!(held[1].mac.as_deref(), Some(mac.as_str()));
    assert_ne!(taken, mac);
    let d = host.domain(vm).unwrap();
    assert!(d.running && !d.paused);
    assert_eq!(d.spec.nics[0].0, mac);
    let iso =
        String::from_utf8_lossy(&host.data(&names::config_drive_volume(vm)).unwrap()).into_owned();
    assert!(iso.contains(&mac) && !iso.contains(&taken), "{iso}");
    assert!(!host.calls().iter().any(|c| c.starts_with("resume_vm")));
}

#[test]
fn without_an_ephemeral_disk_there_is_no_ephemeral_volume() {
    let host = fake();
    let out = create_with(&host, manual("10.0.16.10"), json!({}), None).unwrap();
    let vm = out[0].as_str().unwrap();
    assert!(!host.exists(&names::ephemeral_volume(vm)));
    assert!(host.domain(vm).unwrap().spec.ephemeral_disk.is_none());
}

#[test]
fn a_stemcell_without_registry_support_is_refused_before_the_host_is_asked() {
    let host = fake();
    let e = failure(create_with(&host, manual("10.0.16.10"), json!({}), Some(1)));
    assert!(e.message.contains("api_version 1"), "{}", e.message);
    assert!(host.calls().is_empty(), "{:?}", host.calls());
}

#[test]
fn an_unknown_stemcell_is_a_creation_failure_and_nothing_is_made() {
    let host = fake();
    host.delete_volume(&names::marker_name(SC)).unwrap();
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("not found"), "{}", e.message);
    assert!(!host.calls().iter().any(|c| c.starts_with("define_vm")));
    assert!(!e.ok_to_retry);
}

#[test]
fn networks_of_one_nic_group_share_one_nic_and_one_reservation() {
    let host = fake();
    let networks = json!({
        "a": {"type": "manual", "ip": "10.0.16.10", "netmask": "255.255.255.0",
              "cloud_properties": {"nic_group": "g"}},
        "b": {"type": "manual", "ip": "10.0.16.11", "netmask": "255.255.255.0",
              "cloud_properties": {"nic_group": "g"}},
        "d": {"type": "dynamic", "cloud_properties": {}},
        "v": {"type": "vip", "ip": "203.0.113.5", "cloud_properties": {}}
    });
    let out = create_with(&host, networks, json!({}), None).unwrap();
    let vm = out[0].as_str().unwrap();
    let mac = |n: &str| out[1][n]["mac"].as_str().map(str::to_string);
    assert_eq!(mac("a"), mac("b"), "b rides on a's NIC");
    assert_ne!(mac("a"), mac("d"));
    assert_eq!(mac("v"), None, "a vip network has no NIC");
    assert_eq!(host.domain(vm).unwrap().spec.nics.len(), 2);
    let r = host.reservations(NET);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].ip.as_deref(), Some("10.0.16.10"));
}

#[test]
fn a_missing_bridge_or_network_fails_before_anything_is_made() {
    let host = fake();
    for cp in [json!({"bridge": "br9"}), json!({"network_name": "nowhere"})] {
        let networks = json!({"p": {"type": "dynamic", "cloud_properties": cp}});
        let e = failure(create_with(&host, networks, json!({}), None));
        assert!(!e.ok_to_retry, "{}", e.message);
    }
    host.put_interface("br9");
    let networks = json!({"p": {"type": "dynamic", "cloud_properties": {"bridge": "br9"}}});
    create_with(&host, networks, json!({}), None).unwrap();
    assert_eq!(
        host.calls()
            .iter()
            .filter(|c| c.starts_with("define_vm"))
            .count(),
        1
    );
}

#[test]
fn an_address_outside_the_network_or_taken_twice_is_refused() {
    let host = fake();
    for ip in ["10.0.17.10", "10.0.16.0", "10.0.16.1", "10.0.16.255"] {
        let e = failure(create(&host, ip));
        assert!(
            e.message.contains("not a usable address"),
            "{ip}: {}",
            e.message
        );
    }
    let twice = json!({
        "a": {"type": "manual", "ip": "10.0.16.10", "netmask": "255.255.255.0"},
        "b": {"type": "manual", "ip": "10.0.16.10", "netmask": "255.255.255.0"}
    });
    let e = failure(create_with(&host, twice, json!({}), None));
    assert!(e.message.contains("asked for twice"), "{}", e.message);
    assert!(!host.calls().iter().any(|c| c.starts_with("define_vm")));
}

// ---- undo of each step ----------------------------------------------------------

#[test]
fn a_failed_define_leaves_nothing_and_is_retryable_when_the_failure_is() {
    let host = fake();
    host.fail_next("define_vm", retryable("defining: connection reset"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.ok_to_retry, "nothing was made, the failure is transient");
    assert_eq!(undo_calls(&host), Vec::<String>::new());
    assert_nothing_left(&host);
}

#[test]
fn a_failed_root_overlay_undoes_the_domain() {
    let host = fake();
    host.fail_next("create_overlay", retryable("creating root overlay: busy"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.ok_to_retry);
    assert_eq!(undo_calls(&host), vec!["destroy_vm", "undefine_vm"]);
    assert_nothing_left(&host);
}

#[test]
fn a_failed_ephemeral_volume_undoes_root_and_domain_newest_first() {
    let host = fake();
    host.fail_next("create_volume", retryable("creating volume: busy"));
    failure(create(&host, "10.0.16.10"));
    assert_eq!(
        undo_calls(&host),
        vec!["delete_volume root", "destroy_vm", "undefine_vm"]
    );
    assert_nothing_left(&host);
}

#[test]
fn a_failed_config_drive_is_itself_undone_with_everything_before_it() {
    let host = fake();
    host.fail_next("create_volume_with", retryable("uploading: stream error"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.ok_to_retry);
    assert_eq!(undo_calls(&host), UNDO_ALL_BUT_THE_RESERVATION);
    assert_nothing_left(&host);
}

#[test]
fn a_failed_start_undoes_everything_and_reserves_nothing() {
    let host = fake();
    host.fail_next("start_vm", CpiError::cloud("starting domain: no KVM"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(!e.ok_to_retry);
    assert!(e.message.contains("no KVM"), "{}", e.message);
    assert!(!host.calls().iter().any(|c| c.starts_with("reserve")));
    assert_eq!(undo_calls(&host), UNDO_ALL_BUT_THE_RESERVATION);
    assert_nothing_left(&host);
}

#[test]
fn a_failed_reservation_undoes_the_paused_vm_and_everything_before_it() {
    let host = fake();
    host.fail_next(
        "reserve",
        CpiError::cloud("adding DHCP host: internal error"),
    );
    let e = failure(create(&host, "10.0.16.10"));
    assert!(!e.ok_to_retry, "a non-transient failure is not retried");
    assert!(!host.calls().iter().any(|c| c.starts_with("resume_vm")));
    assert_eq!(undo_calls(&host), UNDO_ALL_BUT_THE_RESERVATION);
    assert_nothing_left(&host);
}

#[test]
fn a_failed_resume_undoes_everything() {
    let host = fake();
    host.fail_next("resume_vm", retryable("resuming domain: timeout"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.ok_to_retry);
    assert_eq!(undo_calls(&host), UNDO_ALL);
    assert_nothing_left(&host);
}

#[test]
fn a_failure_after_the_start_destroys_the_running_vm_too() {
    let host = fake();
    host.fail_next("set_vm_metadata", retryable("setting metadata: timeout"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.ok_to_retry);
    assert_nothing_left(&host);
}

#[test]
fn an_incomplete_undo_is_never_retryable_and_says_what_is_left() {
    let host = fake();
    host.fail_next("resume_vm", retryable("resuming domain: busy"));
    host.fail_next("release", CpiError::cloud("removing DHCP host: denied"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(
        !e.ok_to_retry,
        "something is left: a retry could clash with it"
    );
    assert!(
        e.message
            .contains("cleanup left things behind: removing DHCP host: denied"),
        "{}",
        e.message
    );
    // The rest of the undo still ran.
    assert_eq!(host.domain_names(), Vec::<String>::new());
    assert_eq!(host.reservations(NET).len(), 1);
}

// ---- IPs already reserved -------------------------------------------------------

#[test]
fn an_ip_reserved_by_something_else_fails_before_anything_is_made() {
    let host = fake();
    host.put_reservation(NET, entry("02:00:00:00:00:01", "router", "10.0.16.10"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("already reserved"), "{}", e.message);
    assert!(!host.calls().iter().any(|c| c.starts_with("define_vm")));
}

#[test]
fn an_ip_held_by_a_live_vm_is_refused_and_that_vm_is_untouched() {
    let host = fake();
    host.put_domain(OTHER_VM, true, VmMetadata::default());
    host.put_volume(&names::root_volume(OTHER_VM), 1 << 30, "qcow2", b"");
    let held = entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10");
    host.put_reservation(NET, held.clone());
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("already reserved"), "{}", e.message);
    assert!(host.domain(OTHER_VM).is_some());
    assert!(host.exists(&names::root_volume(OTHER_VM)));
    assert_eq!(host.reservations(NET), vec![held]);
}

#[test]
fn an_ip_held_by_a_create_still_at_work_is_refused() {
    let host = fake();
    let live = Creator::this_process().expect("/proc");
    host.put_domain(OTHER_VM, false, creating(&live));
    host.put_reservation(NET, entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("already reserved"), "{}", e.message);
    assert!(host.domain(OTHER_VM).is_some());
}

#[test]
fn an_ip_held_by_a_killed_create_is_reclaimed() {
    let host = fake();
    host.put_domain(OTHER_VM, true, creating(&dead_creator()));
    host.put_volume(&names::root_volume(OTHER_VM), 1 << 30, "qcow2", b"");
    host.put_reservation(NET, entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10"));
    let out = create(&host, "10.0.16.10").unwrap();
    let vm = out[0].as_str().unwrap();
    assert!(
        host.domain(OTHER_VM).is_none(),
        "the killed create's VM is gone"
    );
    assert!(!host.exists(&names::root_volume(OTHER_VM)));
    let r = host.reservations(NET);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].name.as_deref(), Some(vm));
}

#[test]
fn an_ip_held_by_a_vm_with_nothing_left_is_reclaimed_after_the_recheck() {
    let host = fake();
    host.put_reservation(NET, entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10"));
    let out = create(&host, "10.0.16.10").unwrap();
    assert!(
        host.calls().contains(&"pause 2".to_string()),
        "{:?}",
        host.calls()
    );
    let r = host.reservations(NET);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].name.as_deref(), out[0].as_str());
}

#[test]
fn an_ip_held_by_a_create_that_has_volumes_but_no_domain_yet_is_refused() {
    let host = fake();
    host.put_volume(&names::root_volume(OTHER_VM), 1 << 30, "qcow2", b"");
    host.put_reservation(NET, entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("already reserved"), "{}", e.message);
    assert!(host.exists(&names::root_volume(OTHER_VM)));
    assert_eq!(host.reservations(NET).len(), 1);
}

// ---- the sweeps every create runs -----------------------------------------------

#[test]
fn a_create_removes_vms_of_dead_creators_whose_guest_never_ran_only() {
    let host = fake();
    let dead_stopped = names::new_vm_cid();
    let dead_paused = names::new_vm_cid();
    let dead_running = names::new_vm_cid();
    let live_stopped = names::new_vm_cid();
    let finished = names::new_vm_cid();
    host.put_domain(&dead_stopped, false, creating(&dead_creator()));
    host.put_volume(&names::root_volume(&dead_stopped), 1, "qcow2", b"");
    host.put_paused_domain(&dead_paused, creating(&dead_creator()));
    host.put_domain(&dead_running, true, creating(&dead_creator()));
    let live = Creator::this_process().unwrap();
    host.put_domain(&live_stopped, false, creating(&live));
    host.put_domain(&finished, false, VmMetadata::default());
    host.put_domain("someone-elses", false, creating(&dead_creator()));

    create(&host, "10.0.16.10").unwrap();
    assert!(host.domain(&dead_stopped).is_none());
    assert!(host.domain(&dead_paused).is_none());
    assert!(!host.exists(&names::root_volume(&dead_stopped)));
    for kept in [&dead_running, &live_stopped, &finished, "someone-elses"] {
        assert!(host.domain(kept).is_some(), "{kept}");
    }
}

/// A VM a killed create_vm made from another pool on the same libvirtd
/// (another CPI config): only that config can delete its volumes, so this
/// one leaves it, also when it needs its IP.
#[test]
fn a_dead_create_of_another_pool_is_left_to_its_own_config() {
    let host = fake();
    let elsewhere = VmMetadata {
        stemcell: "sc-00000000-0000-4000-8000-000000000000".into(),
        ..creating(&dead_creator())
    };
    host.put_domain(OTHER_VM, false, elsewhere.clone());
    let stopped = names::new_vm_cid();
    host.put_domain(&stopped, false, elsewhere);
    host.put_reservation(NET, entry("02:00:00:00:00:01", OTHER_VM, "10.0.16.10"));
    let e = failure(create(&host, "10.0.16.10"));
    assert!(e.message.contains("already reserved"), "{}", e.message);
    assert!(host.domain(OTHER_VM).is_some());
    assert!(host.domain(&stopped).is_some());
    // Its root disk in this pool makes it this pool's again.
    host.put_volume(&names::root_volume(OTHER_VM), 1 << 30, "qcow2", b"");
    create(&host, "10.0.16.10").unwrap();
    assert!(host.domain(OTHER_VM).is_none());
}

#[test]
fn a_vm_whose_creator_ran_on_another_machine_is_removed_only_once_that_is_old() {
    let host = fake();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let elsewhere = |since| Creator {
        boot_id: "another-machine".into(),
        pid: 1,
        start: 1,
        since,
    };
    let recent = names::new_vm_cid();
    let old = names::new_vm_cid();
    host.put_domain(&recent, false, creating(&elsewhere(now - 60)));
    host.put_domain(&old, false, creating(&elsewhere(now - 31 * 60)));
    create(&host, "10.0.16.10").unwrap();
    assert!(host.domain(&recent).is_some(), "it may still be at work");
    assert!(host.domain(&old).is_none());
}

#[test]
fn a_create_sweeps_domainless_volumes_only_once_they_are_old_and_unused() {
    let host = fake();
    let old = names::new_vm_cid();
    let used = names::new_vm_cid();
    for vm in [&old, &used] {
        host.put_volume(&names::root_volume(vm), 1, "qcow2", b"");
        host.put_volume(&names::config_drive_volume(vm), 1, "raw", b"");
    }
    // Another domain (of any name) uses one of `used`'s volumes.
    host.put_vm(
        "renamed",
        false,
        vec![DiskDevice {
            source_path: Some(format!("/{POOL}/{}", names::root_volume(&used))),
            ..Default::default()
        }],
    );
    host.advance_clock(31.0 * 60.0);
    let young = names::new_vm_cid();
    host.put_volume(&names::root_volume(&young), 1, "qcow2", b"");

    create(&host, "10.0.16.10").unwrap();
    assert!(!host.exists(&names::root_volume(&old)));
    assert!(!host.exists(&names::config_drive_volume(&old)));
    assert!(host.exists(&names::root_volume(&used)));
    assert!(host.exists(&names::root_volume(&young)));
}

#[test]
fn a_failing_sweep_never_fails_the_create() {
    let host = fake();
    host.fail_next("stopped_vm_names", CpiError::cloud("listing: busy"));
    host.fail_next("vm_names", CpiError::cloud("listing: busy"));
    host.put_volume(&names::root_volume(OTHER_VM), 1, "qcow2", b"");
    host.advance_clock(31.0 * 60.0);
    create(&host, "10.0.16.10").unwrap();
}

fn dead_creator() -> Creator {
    let mut c = Creator::this_process().expect("/proc");
    c.start += 1;
    c
}

/// The metadata of a VM made from `SC` (in this pool) by `c`, still creating.
fn creating(c: &Creator) -> VmMetadata {
    VmMetadata {
        stemcell: SC.to_string(),
        creating: Some(c.to_string()),
        ..Default::default()
    }
}
