//! libvirtd killed (SIGKILL) in the middle of a disk hot-plug, then what
//! the director does next: attach_disk again. Issue 11, item 7: the kill
//! leaves QEMU holding the disk's block node, and with it the guest device,
//! that the restarted libvirtd no longer knows (its status XML predates
//! them: libvirt src/qemu/qemu_hotplug.c qemuDomainAttachDiskGeneric adds
//! the nodes and the device before virDomainDiskInsert records the disk).
//! Before the fix every later attach of that disk failed until the VM was
//! powered off: first "Duplicate nodes with node-name='libvirt-4-storage'",
//! then "Duplicate device ID 'virtio-disk1'", and a detach_disk answered
//! DiskNotAttached.
//!
//! The guest is the real test stemcell (ci/build-test-stemcells): it
//! releases an unplugged device, as a Linux guest whose agent never mounted
//! the disk does, and reports the disks it sees on its console. Everything
//! runs on a libvirtd of the test's own (tests/common `PrivateLibvirtd`),
//! killed and restarted once per round. The kill comes a seeded 0-8 ms after
//! QEMU opened the disk's file (`blockdev-add` done), the window before
//! libvirt records the disk; each round prints what the restarted libvirtd
//! left in QEMU. Then the retry must succeed at once, the disk be in the
//! live and persistent definitions once, seen by the guest once, held by no
//! node libvirt does not know, and its bytes unchanged; a detach_disk (the
//! guest releases it) ends the round.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ROUNDS: usize = 12;
const MIB: usize = 1 << 20;
/// A TCG boot of the test stemcell on 2 shared cores, with margin.
const BOOT: Duration = Duration::from_secs(150);

/// One CPI call against the private libvirtd (never the shared test bed's
/// recovery, which `call` falls back on when libvirtd seems lost).
/// Returns the response and the CPI's log (stderr).
fn cpi(config: &Path, method: &str, args: Value) -> (Value, String) {
    let out = wait_with_timeout(
        spawn_cpi(Some(config), &director_request(method, args)),
        CPI_CALL_TIMEOUT,
    );
    (
        assert_director_response(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cpi_ok(config: &Path, method: &str, args: Value) -> Value {
    let (r, _) = cpi(config, method, args.clone());
    assert!(r["error"].is_null(), "{method} {args}: {}", r["error"]);
    r["result"].clone()
}

/// The VM, seen through the private libvirtd (which may be restarted).
struct Guest {
    uri: String,
    dir: PathBuf,
    vm: String,
}

impl Guest {
    fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "virsh", "-c", &self.uri])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn qmp(&self, command: &str, arguments: Value) -> Value {
        let cmd = json!({"execute": command, "arguments": arguments}).to_string();
        let reply = self.virsh(&["qemu-monitor-command", &self.vm, &cmd]);
        serde_json::from_str::<Value>(&reply).unwrap()["return"].clone()
    }

    fn qemu_pid(&self) -> u32 {
        let f = self.dir.join("run/qemu").join(format!("{}.pid", self.vm));
        std::fs::read_to_string(&f).unwrap().trim().parse().unwrap()
    }

    /// (block nodes on `path`, ids of the QEMU devices using them); each
    /// node or device libvirt's live XML does not know is marked `?`.
    fn qemu_view(&self, path: &Path) -> (Vec<String>, Vec<String>) {
        let live = self.virsh(&["dumpxml", &self.vm]);
        let path = path.to_str().unwrap();
        // libvirt names a disk's nodes after its source's index:
        // `<source file='...' index='5'/>` -> libvirt-5-storage/-format.
        let known_prefix = live
            .lines()
            .find(|l| l.contains(&format!("file='{path}'")))
            .and_then(|l| l.split("index='").nth(1))
            .and_then(|r| r.split('\'').next())
            .map(|i| format!("libvirt-{i}-"));
        let mark = |name: &str, known: bool| {
            if known {
                name.to_string()
            } else {
                format!("{name}?")
            }
        };
        let nodes: Vec<String> = self
            .qmp("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["file"].as_str() == Some(path))
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect();
        let devices = self
            .qmp("query-block", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| {
                b["inserted"]["node-name"]
                    .as_str()
                    .is_some_and(|n| nodes.iter().any(|x| x == n))
            })
            .map(|b| {
                let id = b["qdev"].as_str().unwrap().split('/').nth(3).unwrap_or("");
                mark(id, live.contains(&format!("<alias name='{id}'/>")))
            })
            .collect();
        let nodes = nodes
            .iter()
            .map(|n| mark(n, known_prefix.as_ref().is_some_and(|p| n.starts_with(p))))
            .collect();
        (nodes, devices)
    }

    fn serials(&self, inactive: bool) -> usize {
        let mut args = vec!["dumpxml", self.vm.as_str()];
        if inactive {
            args.push("--inactive");
        }
        self.virsh(&args).matches("<serial>").count()
    }

    /// Waits until the guest's current disk set (its latest `CPITEST disks`
    /// line) holds `serial` `times` times.
    fn wait_guest_sees(&self, serial: &str, times: usize) -> String {
        let console = console_path(testbed(), &self.vm);
        let lines = wait_console(
            &console,
            &format!("{serial} {times} times in the guest's disks"),
            Duration::from_secs(60),
            |l| {
                l.iter()
                    .rev()
                    .find(|l| l.starts_with("disks"))
                    .is_some_and(|l| {
                        l.split_whitespace()
                            .filter(|w| w.ends_with(&format!("={serial}")))
                            .count()
                            == times
                    })
            },
        );
        lines
            .iter()
            .rev()
            .find(|l| l.starts_with("disks"))
            .cloned()
            .unwrap_or_default()
    }
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path))
}

fn download(uri: &str, vol: &str) -> Vec<u8> {
    let f = scratch_dir("hotplug-down").join("data");
    let out = Command::new("timeout")
        .args([
            "60",
            "virsh",
            "-c",
            uri,
            "vol-download",
            "--pool",
            "fault",
            vol,
        ])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&f).unwrap();
    let _ = std::fs::remove_dir_all(f.parent().unwrap());
    bytes
}

#[test]
fn a_libvirtd_killed_mid_hot_plug_never_blocks_the_retry() {
    let started = Instant::now();
    let mut lvd = PrivateLibvirtd::start("hotplug");
    let config = lvd.config();
    let uri = lvd.uri();
    let image = testbed().stemcell_dir("qcow2").join("image");
    let sc = cpi_ok(
        &config,
        "create_stemcell",
        json!([image, {"disk_format": "qcow2"}]),
    );
    let r = cpi_ok(
        &config,
        "create_vm",
        json!(["agent-hotplug-faults", sc, {"cpu": 1, "memory": 256}, {}, [], {}]),
    );
    let guest = Guest {
        uri: uri.clone(),
        dir: lvd.dir.clone(),
        vm: r[0].as_str().unwrap().to_string(),
    };
    let vm = guest.vm.clone();
    // A raw disk holding a pattern (one block node) and a qcow2 one, the
    // default (a format node over a file node), used in turns; the bytes of
    // each volume's file must never change (the test guest only lists
    // its disks, it never writes to them).
    let mut disks = Vec::new();
    for (seed, format) in [(71, "raw"), (72, "qcow2")] {
        let d = cpi_ok(&config, "create_disk", json!([1, {"format": format}, null]));
        let d = d.as_str().unwrap().to_string();
        if format == "raw" {
            let mut rng = Lcg::new(seed);
            let bytes: Vec<u8> = (0..MIB).map(|_| rng.below(256) as u8).collect();
            let data = scratch_dir("hotplug-up").join("data");
            std::fs::write(&data, &bytes).unwrap();
            guest.virsh(&["vol-upload", "--pool", "fault", &d, data.to_str().unwrap()]);
        }
        let path = PathBuf::from(guest.virsh(&["vol-path", "--pool", "fault", &d]).trim());
        let bytes = download(&uri, &d);
        disks.push((d, path, bytes));
    }
    wait_console(&console_path(testbed(), &vm), "CPITEST ready", BOOT, |l| {
        l.iter().any(|l| l == "ready")
    });

    let mut rng = Lcg::from_env();
    let (mut kills, mut finished, mut orphaned, mut cleaned, mut recovered) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let (d, path, bytes) = &disks[round % disks.len()];
        let qemu_pid = guest.qemu_pid();
        let delay = Duration::from_micros(rng.below(9) * 1000);
        let child = spawn_cpi(
            Some(&config),
            &director_request("attach_disk", json!([vm, d])),
        );
        let t = Instant::now();
        while !has_open(qemu_pid, path) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(delay);
        lvd.kill();
        kills += 1;
        let killed = wait_with_timeout(child, CPI_CALL_TIMEOUT);
        let killed: Value = serde_json::from_slice(&killed.stdout).unwrap_or(Value::Null);
        if killed["error"].is_null() {
            finished += 1;
        }
        lvd.run();
        let left = guest.qemu_view(path);
        if left.0.iter().chain(&left.1).any(|x| x.ends_with('?')) {
            orphaned += 1;
        }
        eprintln!(
            "round {round}: libvirtd killed {delay:?} after QEMU opened the disk; the call answered {}; \
             QEMU then held nodes {:?}, devices {:?} (? = unknown to libvirt)",
            killed["error"]["message"], left.0, left.1
        );

        // The director's retry.
        let (retry, log) = cpi(&config, "attach_disk", json!([vm, d]));
        if !retry["error"].is_null() {
            // The director's next attempt, to show whether it stays blocked.
            let (again, _) = cpi(&config, "attach_disk", json!([vm, d]));
            failures.push(format!(
                "round {round}: the retry failed: {}; and the one after it: {}",
                retry["error"]["message"], again["error"]["message"]
            ));
            break;
        }
        recovered += 1;
        if let Some(l) = log.lines().find(|l| l.contains("removed what")) {
            cleaned += 1;
            eprintln!("round {round}: the retry logged: {l}");
        }
        let counts = (guest.serials(false), guest.serials(true));
        // The root disk has no serial: only the persistent disk counts.
        if counts != (1, 1) {
            failures.push(format!(
                "round {round}: {d} appears {counts:?} times (live, persistent)"
            ));
        }
        let view = guest.qemu_view(path);
        if view.1.len() != 1 || view.0.iter().chain(&view.1).any(|x| x.ends_with('?')) {
            failures.push(format!(
                "round {round}: after the retry QEMU holds nodes {:?}, devices {:?}",
                view.0, view.1
            ));
        }
        let seen = guest.wait_guest_sees(d, 1);
        eprintln!("round {round}: the guest sees {seen}");
        if download(&uri, d) != *bytes {
            failures.push(format!("round {round}: the disk's bytes changed"));
        }
        // End of round: the director's detach_disk; the guest releases it.
        cpi_ok(&config, "detach_disk", json!([vm, d]));
        guest.wait_guest_sees(d, 0);
        if !failures.is_empty() {
            break;
        }
    }
    eprintln!(
        "HOTPLUG kills {kills} finished-before-kill {finished} orphans-left {orphaned} \
         removed-by-retry {cleaned} recovered-by-retry {recovered} secs {}",
        started.elapsed().as_secs()
    );
    cpi_ok(&config, "delete_vm", json!([vm]));
    for (d, _, _) in &disks {
        cpi_ok(&config, "delete_disk", json!([d]));
    }
    cpi_ok(&config, "delete_stemcell", json!([sc]));
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        orphaned > 0,
        "no kill left anything in QEMU: the defect was not reproduced"
    );
}
