//! Every transport of libvirt's URIs, through the built binary, against the
//! test bed: ssh to the test bed's own sshd (127.0.0.1:2222, key auth only,
//! host key pinned in a known_hosts file), plain TCP (127.0.0.1:16509), and
//! the hints a failed connection gets for each transport.
//!
//! libvirt's `qemu+ssh` runs the `ssh` binary, which ignores `known_hosts=`
//! (measured: a correct pinned file still gives "Host key verification
//! failed"), so a pinned host key means `qemu+libssh` (or `+libssh2`), where
//! libvirt itself checks the key against the file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SSH_PORT: u16 = 2222;
const TCP_PORT: u16 = 16509;

fn ssh_dir(tb: &Testbed) -> PathBuf {
    tb.dir.join("ssh")
}

/// A config whose URI reaches the test bed through its sshd with libvirt's
/// libssh client, the key and the known_hosts file copied beside cpi.json
/// (0600, as the job renders them) and named by RELATIVE paths, the way the
/// job writes the URI. `known_hosts` picks the test bed's file to copy.
fn ssh_config(name: &str, known_hosts: &str, extra: &str, patch: Value) -> PathBuf {
    let tb = testbed();
    let mut uri = format!(
        "qemu+libssh://root@127.0.0.1:{SSH_PORT}/system?keyfile=ssh/private_key&known_hosts=ssh/known_hosts"
    );
    uri.push_str(extra);
    let mut patch = patch;
    patch["libvirt"]["uri"] = json!(uri);
    let config = tb.config_with(name, patch);
    let dir = config.parent().unwrap().join("ssh");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (from, to) in [
        (ssh_dir(tb).join("client/id_ed25519"), "private_key"),
        (ssh_dir(tb).join(known_hosts), "known_hosts"),
    ] {
        std::fs::copy(&from, dir.join(to)).unwrap();
        std::fs::set_permissions(dir.join(to), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    config
}

/// How many logins the test bed's sshd has let in so far.
fn sshd_logins(tb: &Testbed) -> usize {
    std::fs::read_to_string(ssh_dir(tb).join("sshd.log"))
        .unwrap_or_default()
        .matches("Accepted publickey for root")
        .count()
}

fn volumes_of(tb: &Testbed, pool: &str) -> Vec<String> {
    let _ = tb.virsh(&["pool-refresh", pool]);
    tb.virsh_ok(&["vol-list", pool])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// What a test made through a config, deleted through it on drop.
struct Made<'a> {
    config: &'a Path,
    vms: Vec<String>,
    disks: Vec<String>,
    stemcells: Vec<String>,
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        for vm in &self.vms {
            let _ = call(self.config, "delete_vm", json!([vm]));
        }
        for d in &self.disks {
            let _ = call(self.config, "delete_disk", json!([d]));
        }
        for s in &self.stemcells {
            let _ = call(self.config, "delete_stemcell", json!([s]));
        }
    }
}

/// The create-env path over ssh: stemcell import (a streamed volume upload
/// through the ssh channel), create_vm, a persistent disk attached to it, and
/// everything deleted again, each call a fresh process that logs in anew.
#[test]
fn over_ssh_a_stemcell_is_imported_a_vm_created_and_a_disk_attached() {
    let tb = testbed();
    let pool = tb.pool_name();
    let config = ssh_config("ssh-e2e", "known_hosts", "", json!({}));
    let logins_before = sshd_logins(tb);
    let mut made = Made {
        config: &config,
        vms: vec![],
        disks: vec![],
        stemcells: vec![],
    };

    let sc = ok(
        &config,
        "create_stemcell",
        json!([tb.stemcell_dir("qcow2").join("image"),
               {"name": "bosh-libvirt-test", "version": "1.0", "disk": 64, "disk_format": "qcow2"}]),
    );
    let sc = sc.as_str().unwrap().to_string();
    made.stemcells.push(sc.clone());
    assert!(volumes_of(tb, &pool).contains(&sc), "{sc} not in {pool}");

    let agent = format!("agent-ssh-{}", uuid_like());
    let result = ok(
        &config,
        "create_vm",
        json!([agent, sc, {"cpu": 1, "memory": 256},
               {"default": {"type": "dynamic", "cloud_properties": {}}}, [], {}]),
    );
    let vm = result[0].as_str().unwrap().to_string();
    made.vms.push(vm.clone());
    assert!(
        tb.virsh_ok(&["domstate", &vm]).contains("running"),
        "{vm} should run"
    );
    assert_eq!(ok(&config, "has_vm", json!([vm])), json!(true));

    let disk = ok(&config, "create_disk", json!([64, {}, vm]));
    let disk = disk.as_str().unwrap().to_string();
    made.disks.push(disk.clone());
    let hint = ok(&config, "attach_disk", json!([vm, disk]));
    assert!(hint["path"].is_string(), "attach_disk hint: {hint}");
    let live = tb.virsh_ok(&["dumpxml", &vm]);
    assert!(
        live.contains(&format!("<serial>{disk}</serial>")),
        "{disk} not attached to {vm}: {live}"
    );
    assert_eq!(ok(&config, "get_disks", json!([vm])), json!([disk.clone()]));

    // create-env deletes the VM with the disk still attached; the disk stays.
    ok(&config, "delete_vm", json!([vm]));
    made.vms.clear();
    assert_eq!(ok(&config, "has_vm", json!([vm])), json!(false));
    assert_eq!(ok(&config, "has_disk", json!([disk])), json!(true));
    ok(&config, "delete_disk", json!([disk]));
    made.disks.clear();
    ok(&config, "delete_stemcell", json!([sc]));
    made.stemcells.clear();
    assert!(!volumes_of(tb, &pool).contains(&sc));

    // 11 calls, each its own process and its own ssh login (the sshd log may
    // lag a little behind the last one).
    let mut logins = 0;
    for _ in 0..20 {
        logins = sshd_logins(tb) - logins_before;
        if logins >= 11 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        logins >= 11,
        "only {logins} ssh logins for 11 calls: did the calls go through the sshd?"
    );
}

#[test]
fn over_ssh_a_changed_or_unknown_host_key_is_refused() {
    let absent = json!(["vm-00000000-0000-4000-8000-000000000000"]);
    // The host presents another key than the one pinned for it.
    let config = ssh_config("ssh-changed", "known_hosts.changed", "", json!({}));
    let (t, m) = err(&config, "has_vm", absent.clone());
    assert_eq!(t, "CloudError", "{m}");
    assert!(
        m.starts_with("connecting to libvirt at qemu+libssh://")
            && m.contains("HOST KEY VERIFICATION FAILED")
            && m.contains("not the one known_hosts="),
        "{m}"
    );
    // Nothing is pinned for the host: refused, not trusted on first use.
    let config = ssh_config("ssh-unknown", "known_hosts", "", json!({}));
    std::fs::write(config.parent().unwrap().join("ssh/known_hosts"), "").unwrap();
    let (t, m) = err(&config, "has_vm", absent.clone());
    assert_eq!(t, "CloudError", "{m}");
    assert!(
        m.contains("Can't verify the session host key") && m.contains("is not in known_hosts="),
        "{m}"
    );
    // ... and the empty file stays empty (no key was recorded).
    assert_eq!(
        std::fs::read_to_string(config.parent().unwrap().join("ssh/known_hosts")).unwrap(),
        ""
    );
    // A key the host does not authorize.
    let config = ssh_config("ssh-wrongkey", "known_hosts", "", json!({}));
    let key = config.parent().unwrap().join("ssh/private_key");
    let _ = std::fs::remove_file(&key);
    let gen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(gen.status.success());
    let (t, m) = err(&config, "has_vm", absent);
    assert_eq!(t, "CloudError", "{m}");
    assert!(m.contains("refused the key"), "{m}");
}

#[test]
fn over_ssh_turning_host_key_checks_off_needs_the_insecure_setting() {
    let absent = json!(["vm-00000000-0000-4000-8000-000000000000"]);
    for extra in ["&no_verify=1", "&known_hosts_verify=ignore"] {
        let config = ssh_config("ssh-noverify", "known_hosts", extra, json!({}));
        let (t, m) = err(&config, "has_vm", absent.clone());
        assert_eq!(t, "CloudError", "{m}");
        assert!(
            m.contains("turns verification of the ssh server off")
                && m.contains("insecure_skip_tls_verify"),
            "{extra}: {m}"
        );
    }
    // With the setting, each is accepted. (With libssh, no_verify alone does
    // not accept an unknown key; known_hosts_verify=ignore accepts any.)
    let insecure = json!({"libvirt": {"insecure_skip_tls_verify": true}});
    let config = ssh_config(
        "ssh-noverify-ok",
        "known_hosts",
        "&no_verify=1",
        insecure.clone(),
    );
    assert_eq!(ok(&config, "has_vm", absent.clone()), json!(false));
    let config = ssh_config(
        "ssh-ignore-ok",
        "known_hosts.changed",
        "&known_hosts_verify=ignore",
        insecure,
    );
    assert_eq!(ok(&config, "has_vm", absent.clone()), json!(false));
    // A request context (a director's cpi-config) cannot turn it off at all.
    let config = ssh_config("ssh-ctx", "known_hosts", "", json!({}));
    let kh = config.parent().unwrap().join("ssh/known_hosts.changed");
    std::fs::copy(ssh_dir(testbed()).join("known_hosts.changed"), &kh).unwrap();
    let uri = format!(
        "qemu+libssh://root@127.0.0.1:{SSH_PORT}/system?keyfile=ssh/private_key&known_hosts={}&no_verify=1",
        kh.display()
    );
    let request = json!({"method": "has_vm", "arguments": absent, "api_version": 2,
        "context": {"director_uuid": DIRECTOR_UUID, "request_id": "cpi-000001", "libvirt": {"uri": uri}}});
    let r = run_cpi_raw(Some(&config), &serde_json::to_vec(&request).unwrap()).response;
    let m = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("invalid request context") && m.contains("no_verify"),
        "{r}"
    );
}

#[test]
fn qemu_ssh_with_known_hosts_is_refused_because_libvirt_would_ignore_it() {
    let tb = testbed();
    let s = ssh_dir(tb);
    let uri = format!(
        "qemu+ssh://root@127.0.0.1:{SSH_PORT}/system?keyfile={}&known_hosts={}&no_tty=1",
        s.join("client/id_ed25519").display(),
        s.join("known_hosts").display()
    );
    let config = tb.config_with("ssh-binary", json!({"libvirt": {"uri": uri}}));
    let (t, m) = err(&config, "has_vm", json!(["vm-x"]));
    assert_eq!(t, "CloudError");
    assert!(
        m.contains("ignores known_hosts=") && m.contains("qemu+libssh://"),
        "{m}"
    );
}

fn tcp_listener_exists() -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], TCP_PORT).into(), Duration::from_secs(2))
        .is_ok()
}

/// qemu+tcp: no encryption, no authentication here (auth_tcp = "none" on the
/// loopback address only). A test bed libvirtd started before ci/testbed had
/// the listener lacks it until restarted: then this test says so and passes,
/// except in CI, where the test bed is started fresh and must have it.
#[test]
fn over_plain_tcp_disks_are_made_and_found() {
    let tb = testbed();
    if !tcp_listener_exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "no libvirtd TCP listener on 127.0.0.1:{TCP_PORT}, which ci/testbed up starts"
        );
        eprintln!(
            "NOTE: no TCP listener on 127.0.0.1:{TCP_PORT} (the shared libvirtd predates it; \
             `ci/testbed down && ci/testbed up` adds it): qemu+tcp not tested"
        );
        return;
    }
    let config = tb.config_with(
        "tcp",
        json!({"libvirt": {"uri": format!("qemu+tcp://127.0.0.1:{TCP_PORT}/system")}}),
    );
    assert_eq!(
        ok(
            &config,
            "has_vm",
            json!(["vm-00000000-0000-4000-8000-000000000000"])
        ),
        json!(false)
    );
    let disk = ok(&config, "create_disk", json!([16, {}, null]));
    let disk = disk.as_str().unwrap().to_string();
    let found = call(&config, "has_disk", json!([disk]));
    let deleted = call(&config, "delete_disk", json!([disk]));
    assert_eq!(found["result"], json!(true), "{found}");
    assert!(deleted["error"].is_null(), "{deleted}");
    assert_eq!(ok(&tb.config, "has_disk", json!([disk])), json!(false));
}

/// A connection that fails gets a hint for ITS transport: the port libvirtd
/// listens on for TLS or TCP, sshd for ssh, the socket for a local URI.
#[test]
fn connection_hints_follow_the_transport() {
    let tb = testbed();
    let s = ssh_dir(tb);
    let absent = json!(["vm-00000000-0000-4000-8000-000000000000"]);
    for (name, uri, expect) in [
        (
            "hint-tls",
            tb.uri.replace("localhost/system", "localhost:1/system"),
            "listening for TLS on port 1 ".to_string(),
        ),
        (
            "hint-tcp",
            "qemu+tcp://127.0.0.1:1/system".to_string(),
            "listening for plain TCP (listen_tcp) on port 1 ".to_string(),
        ),
        (
            "hint-ssh",
            format!(
                "qemu+libssh://root@127.0.0.1:1/system?keyfile={}&known_hosts={}",
                s.join("client/id_ed25519").display(),
                s.join("known_hosts").display()
            ),
            "is sshd listening on port 1 ".to_string(),
        ),
        (
            "hint-unix",
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock".to_string(),
            "may this user open its socket (/nonexistent/libvirt-sock)".to_string(),
        ),
    ] {
        let config = tb.config_with(name, json!({"libvirt": {"uri": uri}}));
        let (t, m) = err(&config, "has_vm", absent.clone());
        assert_eq!(t, "CloudError", "{name}: {m}");
        assert!(m.contains(&expect), "{name}: expected {expect:?} in: {m}");
        if name != "hint-tls" {
            assert!(!m.contains("16514"), "{name}: {m}");
        }
    }
}
