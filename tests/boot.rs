//! The test stemcell's disk really boots under libvirt (a plain domain, no CPI
//! involved) and its console says so: the ground every VM test stands on.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Waits until `path` has a line starting with `prefix`; returns that line.
pub fn wait_for_console_line(
    path: &std::path::Path,
    prefix: &str,
    timeout: Duration,
) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(line) = text
                .lines()
                .find(|l| l.trim_start_matches('\r').starts_with(prefix))
            {
                return Some(line.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

struct Booting {
    kind: &'static str,
    name: String,
    console: std::path::PathBuf,
}

/// Starts a transient domain on a thin overlay of the stemcell's root.img,
/// as the CPI does, so the stemcell stays pristine.
fn start(tb: &Testbed, kind: &'static str) -> Booting {
    let root = tb.stemcell_dir(kind).join("root.img");
    assert!(root.exists(), "{} is missing", root.display());
    let dir = scratch_dir(&format!("boot-{kind}"));
    let overlay = dir.join("overlay.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", kind, "-b"])
        .arg(&root)
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = format!("boot-test-{kind}-{}", uuid_like());
    let console = tb.dir.join("consoles").join(format!("{name}.log"));
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='file'><source path='{}'/></serial></devices></domain>",
        overlay.display(),
        console.display()
    );
    let xml_path = dir.join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    tb.virsh_ok(&["create", xml_path.to_str().unwrap()]);
    Booting {
        kind,
        name,
        console,
    }
}

#[test]
fn the_test_stemcells_boot_in_a_plain_domain() {
    let tb = testbed();
    let guests: Vec<Booting> = ["qcow2", "raw"].into_iter().map(|k| start(tb, k)).collect();
    for g in &guests {
        let ready = wait_for_console_line(&g.console, "CPITEST ready", Duration::from_secs(150));
        let boot = wait_for_console_line(&g.console, "CPITEST boot ", Duration::from_secs(1));
        let drive =
            wait_for_console_line(&g.console, "CPITEST configdrive", Duration::from_secs(1));
        let _ = tb.virsh(&["destroy", &g.name]);
        let _ = std::fs::remove_file(&g.console);
        let kind = g.kind;
        assert!(boot.is_some(), "{kind}: no boot line on the console");
        assert!(ready.is_some(), "{kind}: the guest did not get ready");
        assert_eq!(
            drive.as_deref(),
            Some("CPITEST configdrive none"),
            "{kind}: no config drive was attached"
        );
    }
}
