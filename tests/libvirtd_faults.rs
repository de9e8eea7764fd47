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
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

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
