//! A libvirtd that dies or freezes under the CPI. The test bed's libvirtd is
//! shared by every test, so these tests start a libvirtd of their own: a
//! copy of the binary under another name (so `ci/testbed` never takes it for
//! a system libvirtd), in a private mount namespace whose /run/libvirt,
//! /var/lib/libvirt, /etc/libvirt and /var/cache/libvirt are its own
//! directories, answering on a unix socket the CPI reaches from outside. It
//! only serves storage here: no domain runs on it.
//!
//! What must hold: the CPI answers (one JSON response, exit 0) within a
//! bounded time with a retryable CloudError, never hangs, and what it left
//! is handled by the next calls once libvirtd is back.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

struct PrivateLibvirtd {
    dir: PathBuf,
    daemon: Option<Child>,
}

impl PrivateLibvirtd {
    fn start(tag: &str) -> PrivateLibvirtd {
        testbed(); // packages installed, as for every test
        let dir = scratch_dir(&format!("libvirtd-{tag}"));
        for d in ["sock", "run", "lib", "etc", "cache", "pool"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy("/usr/sbin/libvirtd", dir.join("lvd-fault")).unwrap();
        std::fs::write(
            dir.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{d}/sock\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{d}/libvirtd.log\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut me = PrivateLibvirtd { dir, daemon: None };
        me.run();
        me
    }

    /// (Re)starts the daemon on the same directories and waits for it.
    fn run(&mut self) {
        let d = self.dir.display();
        let script = format!(
            "mount --bind {d}/run /run/libvirt && mount --bind {d}/lib /var/lib/libvirt && \
             mount --bind {d}/etc /etc/libvirt && mount --bind {d}/cache /var/cache/libvirt && \
             exec {d}/lvd-fault -f {d}/libvirtd.conf -p {d}/pid"
        );
        let _ = std::fs::remove_file(self.dir.join("sock/libvirt-sock"));
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("virsh")
                .args(["-c", &self.uri(), "version"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private libvirtd did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}/sock/libvirt-sock",
            self.dir.display()
        )
    }

    fn pid(&self) -> String {
        self.daemon.as_ref().unwrap().id().to_string()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.daemon.take().unwrap().wait();
    }

    /// A CPI config for this libvirtd, with a pool of its own.
    fn config(&self) -> PathBuf {
        testbed().config_with(
            "private-libvirtd",
            json!({"libvirt": {"uri": self.uri()},
                   "pool": {"name": "fault", "path": self.dir.join("pool"), "create": true}}),
        )
    }

    fn volumes(&self) -> Vec<String> {
        vol_list_names(
            &Command::new("virsh")
                .args(["-c", &self.uri(), "vol-list", "fault"])
                .output()
                .unwrap(),
        )
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A create_stemcell reading a FIFO this test feeds: a tar declaring a
/// 64 MiB root.img, then data on demand. Returns the CPI process and the
/// writing end.
fn import_from_fifo(config: &Path, dir: &Path) -> (Child, std::fs::File) {
    let fifo = dir.join("image");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let child = spawn_cpi(
        Some(config),
        &director_request("create_stemcell", json!([fifo, {"disk_format": "raw"}])),
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("root.img").unwrap();
    h.set_size(64 * MIB);
    h.set_mode(0o644);
    h.set_cksum();
    f.write_all(h.as_bytes()).unwrap();
    (child, f)
}

fn feed(f: &mut std::fs::File, mib: usize) -> bool {
    let block: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 + 1) as u8).collect();
    (0..mib).all(|_| f.write_all(&block).is_ok())
}

fn wait_for_volume(lvd: &PrivateLibvirtd) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = lvd.volumes().into_iter().find(|v| v.starts_with("sc-")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the import never made its volume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The CPI's response once it ends by itself, within `limit`.
fn response_within(child: Child, limit: Duration) -> (Value, Duration) {
    let started = Instant::now();
    let out = wait_with_timeout(child, limit);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (assert_director_response(&out.stdout), started.elapsed())
}

/// kill -9 of libvirtd in the middle of a stemcell upload: before the fix the
/// CPI said only "Broken pipe" and ok_to_retry was false, so nothing told the
/// director that trying again could work.
#[test]
fn a_libvirtd_killed_mid_upload_is_a_retryable_error_and_recovers() {
    let mut lvd = PrivateLibvirtd::start("killed");
    let config = lvd.config();
    let dir = scratch_dir("killed-fifo");
    let (cpi, mut fifo) = import_from_fifo(&config, &dir);
    assert!(feed(&mut fifo, 4));
    let partial = wait_for_volume(&lvd);
    lvd.kill();
    // The CPI notices on its next write to the dead connection.
    let _ = feed(&mut fifo, 8);
    drop(fifo);
    let (r, took) = response_within(cpi, Duration::from_secs(120));
    let e = &r["error"];
    assert_eq!(e["type"], "Bosh::Clouds::CloudError", "{r}");
    assert_eq!(
        e["ok_to_retry"],
        json!(true),
        "a lost libvirtd is worth a retry: {r}"
    );
    eprintln!(
        "killed libvirtd: the CPI answered in {took:?}: {}",
        e["message"]
    );

    // libvirtd is back: the partial is no stemcell, deleting it works, and a
    // new import succeeds.
    lvd.run();
    assert!(lvd.volumes().contains(&partial), "{:?}", lvd.volumes());
    assert_eq!(
        ok(&config, "has_disk", json!(["disk-000000000000000"])),
        json!(false)
    );
    ok(&config, "delete_stemcell", json!([partial]));
    let image = testbed().stemcell_dir("qcow2").join("image");
    let sc = ok(
        &config,
        "create_stemcell",
        json!([image, {"disk_format": "qcow2"}]),
    );
    ok(&config, "delete_stemcell", json!([sc]));
    assert_eq!(lvd.volumes(), Vec::<String>::new());
}

/// A libvirtd that stops answering (SIGSTOP) while a call runs, and one that
/// is frozen before the CPI connects: the CPI must answer in bounded time
/// (keepalive closes a silent connection in about 30 s; connecting gives up
/// after 60 s) instead of holding the director, which has no timeout, forever.
#[test]
fn a_frozen_libvirtd_never_hangs_the_cpi() {
    let lvd = PrivateLibvirtd::start("frozen");
    let config = lvd.config();
    let dir = scratch_dir("frozen-fifo");
    let (cpi, mut fifo) = import_from_fifo(&config, &dir);
    assert!(feed(&mut fifo, 4));
    wait_for_volume(&lvd);
    lvd.signal("-STOP");
    let feeder = std::thread::spawn(move || {
        let _ = feed(&mut fifo, 60);
    });
    let (r, took) = response_within(cpi, Duration::from_secs(150));
    assert_eq!(r["error"]["ok_to_retry"], json!(true), "{r}");
    assert!(took < Duration::from_secs(120), "{took:?}");
    eprintln!(
        "frozen mid-call: the CPI answered in {took:?}: {}",
        r["error"]["message"]
    );
    let _ = feeder.join();

    // Frozen before the CPI connects.
    let started = Instant::now();
    let child = spawn_cpi(
        Some(&config),
        &director_request("has_disk", json!(["disk-000000000000000"])),
    );
    let (r, _) = response_within(child, Duration::from_secs(150));
    let took = started.elapsed();
    assert_eq!(r["error"]["ok_to_retry"], json!(true), "{r}");
    assert!(took < Duration::from_secs(120), "{took:?}");
    eprintln!(
        "frozen before connecting: the CPI answered in {took:?}: {}",
        r["error"]["message"]
    );
    lvd.signal("-CONT");
}
