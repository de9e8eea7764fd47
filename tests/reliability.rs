//! Nothing a user owns is lost on a bad day: a pool with more volumes than
//! libvirt's plain listing returns, a full pool, a stemcell left without its
//! marker by a killed delete_stemcell. Each test runs the built binary against
//! the TLS test bed, in a private pool, and checks what libvirt holds after.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn import(config: &Path) -> String {
    let image = testbed().stemcell_dir("qcow2").join("image");
    ok(
        config,
        "create_stemcell",
        json!([image, {"disk_format": "qcow2"}]),
    )
    .as_str()
    .unwrap()
    .to_string()
}

/// A qcow2 overlay named like a VM's root disk on stemcell `cid`, as
/// create_vm makes it (no domain needed: the pool is what is judged).
fn overlay(pool: &PrivatePool, cid: &str) -> String {
    let vm = format!("vm-{}", uuid::Uuid::new_v4());
    testbed().virsh_ok(&[
        "vol-create-as",
        &pool.name,
        &format!("{vm}-root"),
        "1G",
        "--format",
        "qcow2",
        "--backing-vol",
        cid,
        "--backing-vol-format",
        "qcow2",
    ]);
    vm
}

fn age(pool: &PrivatePool, volume: &str) {
    let st = Command::new("touch")
        .args(["-m", "-d", "2 hours ago"])
        .arg(pool.path.join(volume))
        .status()
        .unwrap();
    assert!(st.success());
}

fn empty(pool: &PrivatePool) {
    let tb = testbed();
    for v in pool.volumes() {
        tb.virsh_ok(&["vol-delete", "--pool", &pool.name, &v]);
    }
}

/// libvirt's plain volume listing stops at 1,024 names. With 3,000 volumes
/// in the pool, each volume below was missed with a chance of about 2/3 by
/// that listing (libvirt lists in hash order): before the fix this test
/// failed on its first assertions (checked by running it against the old
/// `list_volumes` code).
#[test]
fn every_decision_sees_all_volumes_of_a_crowded_pool() {
    let tb = testbed();
    let pool = PrivatePool::new("crowded");
    let idle = import(&pool.config);
    let used = import(&pool.config);
    let vms: Vec<String> = (0..4).map(|_| overlay(&pool, &used)).collect();
    // What a VM whose domain vanished leaves: delete_vm sweeps it by name.
    let gone = format!("vm-{}", uuid::Uuid::new_v4());
    for suffix in ["root", "ephemeral", "config.iso"] {
        tb.virsh_ok(&[
            "vol-create-as",
            &pool.name,
            &format!("{gone}-{suffix}"),
            "1M",
        ]);
    }
    // 3,000 unrelated files, made on the host and picked up by a refresh.
    for i in 0..3000 {
        std::fs::write(pool.path.join(format!("filler-{i:04}")), b"").unwrap();
    }
    tb.virsh_ok(&["pool-refresh", &pool.name]);
    assert!(pool.volumes().len() > 3000);

    // delete_stemcell must see every overlay of the stemcell.
    let (t, message) = err(&pool.config, "delete_stemcell", json!([used]));
    assert_eq!(t, "CloudError", "{message}");
    for vm in &vms {
        assert!(message.contains(vm.as_str()), "{vm} not named: {message}");
    }
    // An import's sweep must see the marker of a complete, old stemcell.
    age(&pool, &idle);
    age(&pool, &format!("{idle}.meta"));
    let third = import(&pool.config);
    let names = pool.volumes();
    for cid in [&idle, &used] {
        assert!(names.contains(cid), "complete stemcell {cid} was swept");
        assert!(names.contains(&format!("{cid}.meta")), "{cid}'s marker");
    }
    // delete_vm of a vanished VM must find all of its volumes.
    ok(&pool.config, "delete_vm", json!([gone]));
    let left: Vec<String> = pool
        .volumes()
        .into_iter()
        .filter(|v| v.starts_with(&gone))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "delete_vm left volumes");

    for i in 0..3000 {
        let _ = std::fs::remove_file(pool.path.join(format!("filler-{i:04}")));
    }
    let _ = (third, tb.virsh(&["pool-refresh", &pool.name]));
    empty(&pool);
}

/// A delete_stemcell killed after it removed the marker, while a VM still
/// boots from the image, leaves a marker-less image that backs an overlay.
/// The next import's sweep must not delete it, however old it is (before the
/// fix it did: the VM could not start again).
#[test]
fn the_sweep_never_removes_an_image_a_vm_boots_from() {
    let tb = testbed();
    let pool = PrivatePool::new("sweepinuse");
    let cid = import(&pool.config);
    let vm = overlay(&pool, &cid);
    tb.virsh_ok(&["vol-delete", "--pool", &pool.name, &format!("{cid}.meta")]);
    age(&pool, &cid);
    let other = import(&pool.config);
    let names = pool.volumes();
    assert!(
        names.contains(&cid),
        "the image under {vm} was swept: {names:?}"
    );
    // Without users, the same leftover goes at the next import.
    tb.virsh_ok(&["vol-delete", "--pool", &pool.name, &format!("{vm}-root")]);
    let third = import(&pool.config);
    assert!(!pool.volumes().contains(&cid), "an unused leftover stays");
    for c in [other, third] {
        ok(&pool.config, "delete_stemcell", json!([c]));
    }
    assert_eq!(pool.volumes(), Vec::<String>::new());
}

/// A pool on a small tmpfs, filled to the last byte by another tenant:
/// create_stemcell is refused with NoDiskSpace before it writes (an upload
/// that hits ENOSPC kills libvirtd 11.3), and small records that cannot land
/// are errors, never "successful" files of zeros (before the fix
/// set_disk_metadata answered success and left a tags volume of zeros).
#[test]
fn a_full_pool_is_refused_and_records_are_never_zeros() {
    let tb = testbed();
    let pool = PrivatePool::new("full");
    std::fs::create_dir_all(&pool.path).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "cpitest-full"])
        .arg(&pool.path)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs for the pool");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&pool.path);

    // A disk made while there is room (4 MiB of qcow2 metadata at most).
    let disk = ok(&pool.config, "create_disk", json!([4, {}, Value::Null]));
    let disk = disk.as_str().unwrap();
    // Another tenant fills the file system.
    let filler = pool.path.join("zz-filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    tb.virsh_ok(&["pool-refresh", &pool.name]);
    let before = pool.volumes();

    let image = tb.stemcell_dir("qcow2").join("image");
    let (t, message) = err(
        &pool.config,
        "create_stemcell",
        json!([image, {"disk_format": "qcow2"}]),
    );
    assert_eq!(t, "NoDiskSpace", "{message}");
    let (t, message) = err(
        &pool.config,
        "set_disk_metadata",
        json!([disk, {"deployment": "d", "instance_group": "g"}]),
    );
    assert!(t == "NoDiskSpace" || t == "CloudError", "{t}: {message}");
    assert!(message.contains("read back"), "{message}");
    let (t, message) = err(&pool.config, "create_disk", json!([4, {}, Value::Null]));
    assert!(t == "NoDiskSpace" || t == "CloudError", "{t}: {message}");
    assert_eq!(pool.volumes(), before, "a refused call left a volume");
    // libvirtd is alive and the disk still answers.
    assert_eq!(ok(&pool.config, "has_disk", json!([disk])), json!(true));

    std::fs::remove_file(&filler).unwrap();
    tb.virsh_ok(&["pool-refresh", &pool.name]);
    ok(&pool.config, "delete_disk", json!([disk]));
    assert_eq!(pool.volumes(), Vec::<String>::new());
    tb.virsh_ok(&["pool-destroy", &pool.name]);
}

/// create_vm and delete_vm never make libvirt re-read the pool (an upload
/// into a `dir` pool does: src/libvirt/staging.rs; the config drive is staged
/// too): a file put into the pool directory behind libvirt's back stays
/// unlisted through both, and is listed once the pool is refreshed.
#[test]
fn create_vm_and_delete_vm_never_make_libvirt_reread_the_pool() {
    let tb = testbed();
    let pool = PrivatePool::new("vmreread");
    let stemcell = import(&pool.config);
    let sentinel = "put-there-behind-libvirts-back";
    std::fs::write(pool.path.join(sentinel), b"not a volume of libvirt's yet").unwrap();
    let listed = || vol_list_names(&tb.virsh(&["vol-list", &pool.name]));
    let network = json!({"default": {"type": "dynamic", "cloud_properties": {}}});
    let made = ok(
        &pool.config,
        "create_vm",
        json!(["agent-reread", stemcell, {"memory": 64}, network, [], {}]),
    );
    let vm = made[0].as_str().unwrap().to_string();
    ok(&pool.config, "delete_vm", json!([vm]));
    let names = listed();
    assert!(
        !names.iter().any(|n| n == sentinel),
        "libvirt re-read the pool: {names:?}"
    );
    tb.virsh_ok(&["pool-refresh", &pool.name]);
    assert!(listed().iter().any(|n| n == sentinel));
    std::fs::remove_file(pool.path.join(sentinel)).unwrap();
    tb.virsh_ok(&["pool-refresh", &pool.name]);
    ok(&pool.config, "delete_stemcell", json!([stemcell]));
    assert_eq!(pool.volumes(), Vec::<String>::new());
}
