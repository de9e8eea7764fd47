//! The fault suite: kill -9 of the CPI at seeded moments of each mutating
//! method, then what the director really does next, then a check that the
//! host holds exactly what it should: no leaked volume, sidecar record,
//! domain or DHCP host, and every persistent disk's bytes unchanged.
//!
//! Kill moments are drawn from 0-110 % of the measured duration of an
//! unkilled call of the same method, from `Lcg::from_env` (FAULT_SEED, printed
//! by each test). Each test prints a row `FAULTS method kills finished leaks
//! data-lost complete-orphans` (run with `--nocapture` to see them) and fails
//! on any leak or data loss. "finished" counts kills that came after the
//! response was written (the director got the result); a "complete orphan"
//! is an object the call made completely (volume and valid record) whose
//! response the kill swallowed: the director never learned its CID, and no
//! CPI can tell it from an object the director knows, so it is counted, not
//! swept.
//!
//! What the director does after a failed (killed) call, read from
//! cloudfoundry/bosh src/bosh-director/lib/bosh/director (96f9135):
//! * the CPI dies -> empty stdout -> `ExternalCpi::InvalidResponse`, the task
//!   fails (clouds/external_cpi.rb); the operator runs the task again, which
//!   repeats the same call: there is no CPI-level rollback of these methods.
//! * create_stemcell: jobs/update_stemcell.rb stores the CID only from a
//!   successful response, so a retry uploads anew (new CID).
//! * delete_stemcell: jobs/helpers/stemcell_deleter.rb destroys the record
//!   only after delete_stemcell succeeded: a retry deletes the same CID.
//! * create_disk: disk_manager.rb `create_disk` creates the PersistentDisk
//!   record only from the returned CID: a retry creates a new disk.
//! * attach_disk / detach_disk / resize_disk: disk_manager.rb and
//!   deployment_plan/steps/{attach,detach}_disk_step.rb call them again on the
//!   same VM and disk CIDs; a DiskNotAttached from the repeated detach of a
//!   disk no longer attached is what detach_disk_step.rb rescues.
//! * delete_vm, delete_disk, delete_snapshot: vm_deleter.rb,
//!   orphan_disk_manager.rb and api/snapshot_manager.rb keep their records
//!   until the call succeeded: a retry deletes the same CID.
//! * set_vm_metadata / set_disk_metadata: metadata_updater.rb, repeated by
//!   the next deploy with the current metadata.
//! * snapshot_disk: api/snapshot_manager.rb `take_snapshot` saves a Snapshot
//!   record only from a returned CID: the next snapshot is a new one.
//!
//! create_vm kills are in tests/vm.rs
//! (`a_killed_create_vm_never_blocks_the_retry_and_leaves_nothing`).
//!
//! The calls run against a libvirtd of the test's own: libvirtd 11.3 can
//! deadlock when a client dies with stream data in flight (every sidecar
//! record is an upload or a download), which must never hang the shared test
//! bed; the suite restarts its own libvirtd when that happens and counts it.
//! Nothing runs on the shared test bed's libvirtd: the suite's own runs in
//! its own network namespace too, so delete_vm's VMs get the NAT network and
//! DHCP reservations of the test-bed config without touching the host's.
//! VMs boot a blank stemcell: firmware only, no guest, nothing writing to
//! disks.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KILLS: usize = 20;
const MIB: usize = 1 << 20;
/// Size of the persistent disks whose bytes are checked.
const DISK_MIB: usize = 1;

// ---- where a scenario runs ---------------------------------------------------

struct Host {
    config: PathBuf,
    uri: String,
    pool: String,
    path: PathBuf,
    lvd: RefCell<Option<PrivateLibvirtd>>,
    restarts: Cell<usize>,
}

impl Host {
    /// A libvirtd of the test's own with an empty pool.
    fn storage(tag: &str) -> Host {
        let lvd = PrivateLibvirtd::start(tag);
        let config = lvd.config();
        // The CPI makes the pool on first use: not part of any measured call.
        ok(&config, "has_disk", json!(["disk-000000000000000"]));
        Host {
            config,
            uri: lvd.uri(),
            pool: "fault".into(),
            path: lvd.dir.join("pool"),
            lvd: RefCell::new(Some(lvd)),
            restarts: Cell::new(0),
        }
    }

    fn virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new("timeout")
            .args(["60", "virsh", "-c", &self.uri])
            .args(args)
            .output()
            .unwrap()
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pool's volumes, and the disks' locks in its staging pool's
    /// directory (src/libvirt/staging.rs): a disk's lock left behind counts
    /// like any volume left behind. (The staging pool's own `copying.lock`
    /// of a killed call goes with the next copy: src/libvirt/copy_lock.rs.)
    fn volumes(&self) -> BTreeSet<String> {
        let _ = self.virsh(&["pool-refresh", &self.pool]);
        let locks = std::fs::read_dir(self.path.join(".staging"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("disk-") && n.ends_with(".lock"));
        vol_list_names(&self.virsh(&["vol-list", &self.pool]))
            .into_iter()
            .chain(locks)
            .collect()
    }

    fn download(&self, vol: &str) -> Vec<u8> {
        let f = scratch_dir("faults-down").join("data");
        self.virsh_ok(&[
            "vol-download",
            "--pool",
            &self.pool,
            vol,
            f.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&f).unwrap();
        let _ = std::fs::remove_dir_all(f.parent().unwrap());
        bytes
    }

    fn upload(&self, vol: &str, bytes: &[u8]) {
        let f = scratch_dir("faults-up").join("data");
        std::fs::write(&f, bytes).unwrap();
        self.virsh_ok(&["vol-upload", "--pool", &self.pool, vol, f.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(f.parent().unwrap());
    }

    /// What a guest reads from a qcow2 volume.
    fn qcow2_content(&self, vol: &str) -> Vec<u8> {
        let dir = scratch_dir("faults-qcow2");
        let (q, raw) = (dir.join("q"), dir.join("raw"));
        std::fs::write(&q, self.download(vol)).unwrap();
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw"], &q, &raw);
        let bytes = std::fs::read(&raw).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    /// A sidecar record's JSON document; `None` when absent or not JSON.
    fn record(&self, vol: &str) -> Option<Value> {
        let f = scratch_dir("faults-rec").join("data");
        let out = self.virsh(&[
            "vol-download",
            "--pool",
            &self.pool,
            vol,
            f.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&f).unwrap_or_default();
        let _ = std::fs::remove_dir_all(f.parent().unwrap());
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&bytes);
        serde_json::from_str(text.trim_end_matches([' ', '\n', '\0'])).ok()
    }

    /// Whether `vol` has a `.meta` record holding a JSON object.
    fn complete(&self, vol: &str) -> bool {
        self.record(&format!("{vol}.meta"))
            .is_some_and(|v| v.is_object())
    }

    /// Sets the files' mtime two hours back, as if untouched since; the
    /// markers of the last sweeps too (`swept-*` in the staging pool's
    /// directory, src/libvirt/staging.rs), as two hours would have let a
    /// sweep run again.
    fn age(&self, names: &BTreeSet<String>) {
        let staging = self.path.join(".staging");
        let markers = std::fs::read_dir(&staging)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("swept-"))
            .map(|e| e.path());
        for path in names.iter().map(|n| self.path.join(n)).chain(markers) {
            let _ = Command::new("touch")
                .args(["-m", "-d", "2 hours ago"])
                .arg(path)
                .status();
        }
        let _ = self.virsh(&["pool-refresh", &self.pool]);
    }

    /// After a kill: the test's own libvirtd must still answer. One that
    /// deadlocked (see the module doc) is killed and started again.
    /// True when it had to be restarted.
    fn ensure_alive(&self) -> bool {
        let mut lvd = self.lvd.borrow_mut();
        let Some(lvd) = lvd.as_mut() else {
            return false;
        };
        let out = Command::new("timeout")
            .args(["15", "virsh", "-c", &self.uri, "version"])
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("the suite's libvirtd does not answer: restarting it");
            lvd.kill();
            lvd.run();
            self.restarts.set(self.restarts.get() + 1);
            return true;
        }
        false
    }

    /// One call as the director makes it. libvirtd 11.3 can also die a
    /// moment after a killed client (not only deadlock), in the middle of
    /// the next call: that call answers a retryable error, systemd restarts
    /// libvirtd on a real host and the director retries. Here the suite
    /// restarts its daemon (counted) and repeats the call once.
    fn call(&self, method: &str, args: Value) -> Value {
        let r = call(&self.config, method, args.clone());
        if r["error"]["ok_to_retry"] == json!(true) && self.ensure_alive() {
            return call(&self.config, method, args);
        }
        r
    }

    /// `call` of a method that must succeed; returns its result.
    fn ok(&self, method: &str, args: Value) -> Value {
        let r = self.call(method, args.clone());
        assert!(
            r["error"].is_null(),
            "{method} {args} failed: {}",
            r["error"]
        );
        r["result"].clone()
    }

    /// Runs `method` unkilled; returns its result and how long it took.
    fn timed(&self, method: &str, args: Value) -> (Value, Duration) {
        let start = Instant::now();
        let r = self.ok(method, args);
        (r, start.elapsed())
    }

    /// Starts the call and kills it with SIGKILL after `delay`; the response
    /// when it finished first.
    fn kill_after(&self, method: &str, args: Value, delay: Duration) -> Option<Value> {
        let mut child = spawn_cpi(Some(&self.config), &director_request(method, args));
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = wait_with_timeout(child, CPI_CALL_TIMEOUT);
        self.ensure_alive();
        serde_json::from_slice::<Value>(&out.stdout).ok()
    }
}

fn qemu_img(args: &[&str], from: &Path, to: &Path) {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

/// Deterministic bytes, different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Lcg::new(seed);
    (0..len).map(|_| rng.below(256) as u8).collect()
}

/// A short checksum for messages.
fn sum(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

// ---- counting ------------------------------------------------------------------

/// Kill moments across 0-110 % of an unkilled call's duration.
struct Moments {
    rng: Lcg,
    full: Duration,
}

impl Moments {
    fn new(full: Duration) -> Moments {
        Moments {
            rng: Lcg::from_env(),
            full,
        }
    }

    fn next(&mut self) -> Duration {
        self.full.mul_f64(self.rng.below(110) as f64 / 100.0)
    }
}

#[derive(Default)]
struct Row {
    method: &'static str,
    kills: usize,
    finished: usize,
    leaks: Vec<String>,
    lost: Vec<String>,
    orphans: usize,
    started: Option<Instant>,
    /// Live copies of killed snapshot_disk calls the next call ended.
    copies_ended: usize,
    /// Retryable "still copying" answers before that.
    busy_retries: usize,
}

impl Row {
    fn new(method: &'static str) -> Row {
        Row {
            method,
            started: Some(Instant::now()),
            ..Default::default()
        }
    }

    /// Starts `method` and kills it at the next of the moments `at`; counts
    /// the kill, and the call as finished when it answered first. The
    /// answer, if any.
    fn kill(&mut self, host: &Host, at: &mut Moments, method: &str, args: Value) -> Option<Value> {
        let r = host.kill_after(method, args, at.next());
        self.kills += 1;
        if r.is_some() {
            self.finished += 1;
        }
        r
    }

    fn leak(&mut self, what: String) {
        eprintln!("{}: LEAK {what}", self.method);
        self.leaks.push(what);
    }

    fn lost(&mut self, what: String) {
        eprintln!("{}: DATA LOST {what}", self.method);
        self.lost.push(what);
    }

    /// Prints the row and fails on any leak or data loss.
    fn finish(self, host: &Host) {
        eprintln!(
            "FAULTS {:<26} {:>5} {:>8} {:>5} {:>9} {:>16} {:>17} {:>5}",
            "method",
            "kills",
            "finished",
            "leaks",
            "data-lost",
            "complete-orphans",
            "libvirtd-restarts",
            "secs"
        );
        eprintln!(
            "FAULTS {:<26} {:>5} {:>8} {:>5} {:>9} {:>16} {:>17} {:>5}",
            self.method,
            self.kills,
            self.finished,
            self.leaks.len(),
            self.lost.len(),
            self.orphans,
            host.restarts.get(),
            self.started.map_or(0, |t| t.elapsed().as_secs())
        );
        if self.copies_ended + self.busy_retries > 0 {
            eprintln!(
                "FAULTS {}: {} abandoned live copies ended by the next call ({} retryable \"being copied\" answers first)",
                self.method, self.copies_ended, self.busy_retries
            );
        }
        assert!(
            self.leaks.is_empty() && self.lost.is_empty(),
            "{}: leaks {:?}, data lost {:?}",
            self.method,
            self.leaks,
            self.lost
        );
    }
}

/// `known` plus their `.meta` records (and `.tags` and `.holder` when
/// present; never a `.lock`, which the next call on a disk must remove).
fn with_sidecars(host_vols: &BTreeSet<String>, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for k in known {
        all.insert(k.clone());
        all.insert(format!("{k}.meta"));
        for sidecar in [format!("{k}.tags"), format!("{k}.holder")] {
            if host_vols.contains(&sidecar) {
                all.insert(sidecar);
            }
        }
    }
    all
}

/// For methods that create objects the director may never learn of: ages
/// everything unknown, runs `sweeper` (the next call of the same method,
/// whose sweep removes what killed calls left), then sorts what is left
/// beyond `known` into complete orphans (removed with `delete_method`) and
/// leaks. `prefix` selects the objects of this kind.
fn settle_orphans(
    host: &Host,
    row: &mut Row,
    known: &mut BTreeSet<String>,
    other: &BTreeSet<String>,
    prefix: &str,
    sweeper: impl Fn() -> String,
    delete_method: &str,
) {
    let vols = host.volumes();
    let unknown: BTreeSet<String> = vols
        .difference(&with_sidecars(&vols, known))
        .filter(|v| !other.contains(*v))
        .cloned()
        .collect();
    host.age(&unknown);
    known.insert(sweeper());
    let vols = host.volumes();
    let left: BTreeSet<String> = vols
        .difference(&with_sidecars(&vols, known))
        .filter(|v| !other.contains(*v))
        .cloned()
        .collect();
    for v in &left {
        if v.ends_with(".meta") && left.contains(v.trim_end_matches(".meta")) {
            continue; // judged with its object
        }
        if v.starts_with(prefix) && !v.contains('.') && host.complete(v) {
            row.orphans += 1;
            eprintln!("{}: complete orphan {v}", row.method);
            host.ok(delete_method, json!([v]));
        } else {
            row.leak(format!("{v} left after the sweep"));
        }
    }
}

// ---- stemcells -------------------------------------------------------------------

fn stemcell_args() -> Value {
    json!([testbed().stemcell_dir("qcow2").join("image"), {"disk_format": "qcow2"}])
}

#[test]
fn killed_create_stemcell() {
    let host = Host::storage("f-csc");
    killed_create(
        &host,
        "create_stemcell",
        stemcell_args,
        "sc-",
        "delete_stemcell",
    );
}

/// kill -9 of a create method at seeded moments, each followed by the
/// director's retry (update_stemcell.rb / disk_manager.rb call it again);
/// then the killed calls' leftovers are swept or complete orphans, every
/// object the director learned of is complete, and deleting those empties
/// the pool.
fn killed_create(
    host: &Host,
    method: &'static str,
    args: impl Fn() -> Value,
    prefix: &str,
    delete: &str,
) {
    let mut row = Row::new(method);
    let (first, full) = host.timed(method, args());
    let mut known = BTreeSet::from([first.as_str().unwrap().to_string()]);
    let mut at = Moments::new(full);
    for _ in 0..KILLS {
        let r = row.kill(host, &mut at, method, args());
        if let Some(cid) = r.as_ref().and_then(|r| r["result"].as_str()) {
            known.insert(cid.to_string());
        }
        let retry = host.ok(method, args());
        known.insert(retry.as_str().unwrap().to_string());
    }
    settle_orphans(
        host,
        &mut row,
        &mut known,
        &BTreeSet::new(),
        prefix,
        || host.ok(method, args()).as_str().unwrap().to_string(),
        delete,
    );
    for cid in &known {
        if !host.complete(cid) {
            row.leak(format!("known {cid} is not complete (no valid record)"));
        }
        host.ok(delete, json!([cid]));
    }
    let left = host.volumes();
    if !left.is_empty() {
        row.leak(format!("after {delete} of every known one: {left:?}"));
    }
    row.finish(host);
}

/// `method` (a delete) of what `make(i)` made, killed at a random moment,
/// then the director's retry: nothing of it may be left.
fn killed_delete(host: &Host, method: &'static str, make: impl Fn(u64) -> String) {
    let mut row = Row::new(method);
    let (_, full) = host.timed(method, json!([make(KILLS as u64)]));
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        let cid = make(i as u64);
        row.kill(host, &mut at, method, json!([cid]));
        host.ok(method, json!([cid]));
        let left = host.volumes();
        if !left.is_empty() {
            row.leak(format!("kill {i}: after deleting {cid}: {left:?}"));
        }
    }
    row.finish(host);
}

#[test]
fn killed_delete_stemcell() {
    let host = Host::storage("f-dsc");
    killed_delete(&host, "delete_stemcell", |_| {
        let sc = host.ok("create_stemcell", stemcell_args());
        sc.as_str().unwrap().to_string()
    });
}

/// delete_stemcell of a stemcell a root overlay still uses, killed: the
/// retry refuses as the unkilled call does, and neither the kill nor a later
/// import's sweep ever removes the image or its record.
#[test]
fn killed_delete_stemcell_in_use() {
    let host = Host::storage("f-dscu");
    let mut row = Row::new("delete_stemcell (in use)");
    let sc = host.ok("create_stemcell", stemcell_args());
    let sc = sc.as_str().unwrap().to_string();
    let path = host.virsh_ok(&["vol-path", "--pool", &host.pool, &sc]);
    let overlay = format!("vm-{}-root", uuid::Uuid::new_v4());
    host.virsh_ok(&[
        "vol-create-as",
        &host.pool,
        &overlay,
        "64M",
        "--format",
        "qcow2",
        "--backing-vol",
        path.trim(),
        "--backing-vol-format",
        "qcow2",
    ]);
    let image = host.download(&sc);
    let start = Instant::now();
    let (kind, _) = err(&host.config, "delete_stemcell", json!([sc]));
    assert_eq!(kind, "CloudError");
    let mut at = Moments::new(start.elapsed());
    let expected = BTreeSet::from([sc.clone(), format!("{sc}.meta"), overlay.clone()]);
    for i in 0..KILLS {
        row.kill(&host, &mut at, "delete_stemcell", json!([sc]));
        let (kind, msg) = err(&host.config, "delete_stemcell", json!([sc]));
        if kind != "CloudError" || !msg.contains(overlay.trim_end_matches("-root")) {
            row.leak(format!("kill {i}: the retry answered {kind}: {msg}"));
        }
        check_stemcell_kept(&host, &mut row, &sc, &image, &expected, i);
    }
    // A later import's sweep, with everything aged, keeps it too.
    host.age(&expected);
    let other = host.ok("create_stemcell", stemcell_args());
    host.ok("delete_stemcell", json!([other]));
    check_stemcell_kept(&host, &mut row, &sc, &image, &expected, KILLS);
    host.virsh_ok(&["vol-delete", "--pool", &host.pool, &overlay]);
    host.ok("delete_stemcell", json!([sc]));
    row.finish(&host);
}

fn check_stemcell_kept(
    host: &Host,
    row: &mut Row,
    sc: &str,
    image: &[u8],
    expected: &BTreeSet<String>,
    i: usize,
) {
    let vols = host.volumes();
    if !vols.contains(sc) || !host.complete(sc) {
        row.lost(format!(
            "kill {i}: stemcell {sc} in use lost its image or record"
        ));
    } else if host.download(sc) != image {
        row.lost(format!("kill {i}: stemcell {sc} in use changed"));
    }
    if &vols != expected {
        row.leak(format!("kill {i}: volumes {vols:?}"));
    }
}

// ---- disks on the suite's own libvirtd -------------------------------------------

/// A raw disk holding a known pattern; returns (cid, bytes).
fn patterned_disk(host: &Host, seed: u64) -> (String, Vec<u8>) {
    let cid = host.ok("create_disk", json!([DISK_MIB, {"format": "raw"}, null]));
    let cid = cid.as_str().unwrap().to_string();
    let bytes = pattern(seed, DISK_MIB * MIB);
    host.upload(&cid, &bytes);
    (cid, bytes)
}

/// The disk's bytes are still `bytes` (and its record still valid).
fn check_disk(host: &Host, row: &mut Row, disk: &str, bytes: &[u8], when: &str) {
    if !host.complete(disk) {
        row.lost(format!("{when}: disk {disk} or its record is gone"));
        return;
    }
    let now = host.download(disk);
    if now.get(..bytes.len()) != Some(bytes) {
        row.lost(format!(
            "{when}: disk {disk} holds {} instead of {}",
            sum(&now),
            sum(bytes)
        ));
    }
}

#[test]
fn killed_create_disk() {
    let host = Host::storage("f-cd");
    killed_create(
        &host,
        "create_disk",
        || json!([DISK_MIB, {}, null]),
        "disk-",
        "delete_disk",
    );
}

#[test]
fn killed_delete_disk() {
    let host = Host::storage("f-dd");
    killed_delete(&host, "delete_disk", |i| {
        let (d, _) = patterned_disk(&host, i);
        host.ok("set_disk_metadata", json!([d, {"deployment": "faults"}]));
        d
    });
}

#[test]
fn killed_set_disk_metadata() {
    let host = Host::storage("f-sdm");
    let mut row = Row::new("set_disk_metadata");
    let (d, bytes) = patterned_disk(&host, 7);
    let md = |round: String| json!([d, {"deployment": "faults", "round": round}]);
    let (_, full) = host.timed("set_disk_metadata", md("first".into()));
    let expected = BTreeSet::from([d.clone(), format!("{d}.meta"), format!("{d}.tags")]);
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        row.kill(&host, &mut at, "set_disk_metadata", md(format!("kill-{i}")));
        host.ok("set_disk_metadata", md(format!("retry-{i}")));
        let tags = host.record(&format!("{d}.tags"));
        let round = tags.as_ref().map(|t| t["metadata"]["round"].clone());
        if round != Some(json!(format!("retry-{i}"))) {
            row.leak(format!("kill {i}: the tags hold {tags:?}"));
        }
        let vols = host.volumes();
        if vols != expected {
            row.leak(format!("kill {i}: volumes {vols:?}"));
        }
        check_disk(&host, &mut row, &d, &bytes, &format!("kill {i}"));
    }
    host.ok("delete_disk", json!([d]));
    row.finish(&host);
}

/// A qcow2 disk (libvirt runs `qemu-img resize` for it) grown one MiB per
/// kill; the retry grows it to the same size.
#[test]
fn killed_resize_disk() {
    let host = Host::storage("f-rd");
    let mut row = Row::new("resize_disk");
    let d = host.ok("create_disk", json!([DISK_MIB, {}, null]));
    let d = d.as_str().unwrap().to_string();
    let bytes = pattern(11, DISK_MIB * MIB);
    let dir = scratch_dir("faults-rd");
    std::fs::write(dir.join("raw"), &bytes).unwrap();
    qemu_img(
        &["convert", "-f", "raw", "-O", "qcow2"],
        &dir.join("raw"),
        &dir.join("q"),
    );
    host.virsh_ok(&[
        "vol-upload",
        "--pool",
        &host.pool,
        &d,
        dir.join("q").to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let (_, full) = host.timed("resize_disk", json!([d, DISK_MIB + 1]));
    let expected = BTreeSet::from([d.clone(), format!("{d}.meta")]);
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        let size = DISK_MIB + 2 + i;
        row.kill(&host, &mut at, "resize_disk", json!([d, size]));
        host.ok("resize_disk", json!([d, size]));
        let content = host.qcow2_content(&d);
        if content.len() != size * MIB {
            row.leak(format!(
                "kill {i}: {d} is {} bytes, not {size} MiB",
                content.len()
            ));
        }
        if content.get(..bytes.len()) != Some(&bytes[..])
            || content[bytes.len().min(content.len())..]
                .iter()
                .any(|b| *b != 0)
        {
            row.lost(format!("kill {i}: {d} holds {}", sum(&content)));
        }
        let vols = host.volumes();
        if vols != expected {
            row.leak(format!("kill {i}: volumes {vols:?}"));
        }
    }
    host.ok("delete_disk", json!([d]));
    row.finish(&host);
}

/// snapshot_disk of a detached disk (libvirt copies the volume).
#[test]
fn killed_snapshot_of_a_detached_disk() {
    let host = Host::storage("f-sd");
    let mut row = Row::new("snapshot_disk (detached)");
    let (d, bytes) = patterned_disk(&host, 3);
    snapshot_kills(&host, &mut row, &d, &bytes, 10, &BTreeSet::new());
    host.ok("delete_disk", json!([d]));
    row.finish(&host);
}

/// `kills` killed snapshot_disk calls of `disk`, each followed by a new one;
/// then the next snapshot's sweep, and every snapshot the director learned
/// of must hold the disk's bytes. `other` are the volumes of anything else
/// in the pool (never judged).
fn snapshot_kills(
    host: &Host,
    row: &mut Row,
    disk: &str,
    bytes: &[u8],
    kills: usize,
    other: &BTreeSet<String>,
) {
    let (first, full) = host.timed("snapshot_disk", json!([disk, {}]));
    let mut known = BTreeSet::from([first.as_str().unwrap().to_string()]);
    let mut at = Moments::new(full);
    for i in 0..kills {
        let r = row.kill(host, &mut at, "snapshot_disk", json!([disk, {}]));
        if let Some(cid) = r.as_ref().and_then(|r| r["result"].as_str()) {
            known.insert(cid.to_string());
        }
        // A kill mid live copy leaves QEMU copying: until the copy is in
        // sync the next call answers a retryable error; the director's next
        // attempt (the task run again) then ends the abandoned copy.
        let deadline = Instant::now() + Duration::from_secs(60);
        let retry = loop {
            let run = run_cpi_raw(
                Some(&host.config),
                &director_request("snapshot_disk", json!([disk, {}])),
            );
            if run.stderr.contains("abandoned live copy") {
                row.copies_ended += 1;
            }
            let busy = run.response["error"]["ok_to_retry"] == json!(true);
            if !busy || Instant::now() > deadline {
                break run.response;
            }
            row.busy_retries += 1;
            std::thread::sleep(Duration::from_millis(500));
        };
        let Some(cid) = retry["result"].as_str() else {
            row.leak(format!(
                "kill {i}: the next snapshot failed: {}",
                retry["error"]
            ));
            continue;
        };
        known.insert(cid.to_string());
        check_disk(host, row, disk, bytes, &format!("kill {i}"));
    }
    let mut keep = other.clone();
    keep.extend(with_sidecars(
        &host.volumes(),
        &BTreeSet::from([disk.to_string()]),
    ));
    let config = host.config.clone();
    let d = disk.to_string();
    settle_orphans(
        host,
        row,
        &mut known,
        &keep,
        "snap-",
        || {
            ok(&config, "snapshot_disk", json!([d, {}]))
                .as_str()
                .unwrap()
                .to_string()
        },
        "delete_snapshot",
    );
    for s in &known {
        if !host.complete(s) {
            row.leak(format!("known snapshot {s} has no valid record"));
        } else if host.qcow2_content(s).get(..bytes.len()) != Some(bytes) {
            row.lost(format!("snapshot {s} does not hold the disk's bytes"));
        }
        host.ok("delete_snapshot", json!([s]));
    }
}

#[test]
fn killed_delete_snapshot() {
    let host = Host::storage("f-ds");
    let mut row = Row::new("delete_snapshot");
    let (d, bytes) = patterned_disk(&host, 5);
    let s = host.ok("snapshot_disk", json!([d, {}]));
    let (_, full) = host.timed("delete_snapshot", json!([s]));
    let expected = BTreeSet::from([d.clone(), format!("{d}.meta")]);
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        let s = host.ok("snapshot_disk", json!([d, {}]));
        row.kill(&host, &mut at, "delete_snapshot", json!([s]));
        host.ok("delete_snapshot", json!([s]));
        let vols = host.volumes();
        if vols != expected {
            row.leak(format!("kill {i}: volumes {vols:?}"));
        }
        check_disk(&host, &mut row, &d, &bytes, &format!("kill {i}"));
    }
    host.ok("delete_disk", json!([d]));
    row.finish(&host);
}

// ---- VMs on the shared test bed ----------------------------------------------------

/// A host with a blank stemcell: its VMs run firmware only (nothing to
/// boot, nothing writing to attached disks). VMs made here are deleted on
/// drop (before a private libvirtd goes).
struct VmHost {
    host: Host,
    stemcell: String,
    vms: RefCell<Vec<String>>,
}

impl VmHost {
    fn new(host: Host) -> VmHost {
        let image = scratch_dir("faults-blank").join("blank.raw");
        std::fs::write(&image, vec![0u8; 4 * MIB]).unwrap();
        let sc = host.ok("create_stemcell", json!([image, {"disk_format": "raw"}]));
        VmHost {
            host,
            stemcell: sc.as_str().unwrap().to_string(),
            vms: RefCell::new(Vec::new()),
        }
    }

    /// A running VM; with `ip` on the test bed's network (a DHCP
    /// reservation), else without a NIC.
    fn vm(&self, agent: &str, ip: Option<&str>) -> String {
        let networks = match ip {
            Some(ip) => json!({"default": manual(ip)}),
            None => json!({}),
        };
        let r = self.host.ok(
            "create_vm",
            json!([agent, self.stemcell, {"memory": 64}, networks, [], {}]),
        );
        let vm = r[0].as_str().unwrap().to_string();
        self.vms.borrow_mut().push(vm.clone());
        vm
    }

    fn xml(&self, vm: &str, inactive: bool) -> String {
        let mut args = vec!["dumpxml", vm];
        if inactive {
            args.push("--inactive");
        }
        String::from_utf8_lossy(&self.host.virsh(&args).stdout).into_owned()
    }

    fn domain_exists(&self, vm: &str) -> bool {
        self.host.virsh(&["dominfo", vm]).status.success()
    }
}

impl Drop for VmHost {
    fn drop(&mut self) {
        for vm in self.vms.borrow().iter() {
            let _ = call(&self.host.config, "delete_vm", json!([vm]));
        }
        let _ = call(&self.host.config, "delete_stemcell", json!([self.stemcell]));
    }
}

/// How often `serial` appears as a disk serial in a domain XML.
fn serial_count(xml: &str, serial: &str) -> usize {
    xml.matches(&format!("<serial>{serial}</serial>")).count()
}

#[test]
fn killed_delete_vm() {
    let vh = VmHost::new(Host::storage("f-dvm"));
    let host = &vh.host;
    let mut row = Row::new("delete_vm");
    let (d, bytes) = patterned_disk(host, 21);
    // The suite's libvirtd has the NAT network to itself: fixed IPs, below
    // the network's DHCP range.
    let ip_of = |i: usize| format!("10.253.77.{}", 20 + i);
    let vm = vh.vm("agent-faults-dvm", Some(&ip_of(KILLS)));
    host.ok("attach_disk", json!([vm, d]));
    let (_, full) = host.timed("delete_vm", json!([vm]));
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        let ip = ip_of(i);
        let vm = vh.vm(&format!("agent-faults-dvm-{i}"), Some(&ip));
        host.ok("attach_disk", json!([vm, d]));
        row.kill(host, &mut at, "delete_vm", json!([vm]));
        host.ok("delete_vm", json!([vm]));
        if vh.domain_exists(&vm) {
            row.leak(format!("kill {i}: domain {vm} left"));
        }
        // Only the stemcell and the disk stay. The disk's holder record may
        // still name the deleted VM: by design (src/handlers/holder.rs) a
        // stale record costs one lookup and goes with the disk.
        let mut allowed = with_sidecars(
            &BTreeSet::new(),
            &BTreeSet::from([vh.stemcell.clone(), d.clone()]),
        );
        allowed.insert(format!("{d}.holder"));
        let vols: Vec<String> = host
            .volumes()
            .into_iter()
            .filter(|v| !allowed.contains(v))
            .collect();
        if !vols.is_empty() {
            row.leak(format!("kill {i}: volumes {vols:?}"));
        }
        let net = host.virsh_ok(&["net-dumpxml", "cpi-testbed-net"]);
        let hosts: Vec<&str> = net
            .lines()
            .filter(|l| l.contains("<host ") && (l.contains(&vm) || l.contains(&format!("'{ip}'"))))
            .collect();
        if !hosts.is_empty() {
            row.leak(format!("kill {i}: DHCP hosts {hosts:?}"));
        }
        check_disk(host, &mut row, &d, &bytes, &format!("kill {i}"));
    }
    host.ok("delete_disk", json!([d]));
    row.finish(host);
}

#[test]
fn killed_set_vm_metadata() {
    let vh = VmHost::new(Host::storage("f-svm"));
    let host = &vh.host;
    let mut row = Row::new("set_vm_metadata");
    let vm = vh.vm("agent-faults-svm", None);
    let md = |round: String| json!([vm, {"deployment": "faults", "round": round}]);
    let (_, full) = host.timed("set_vm_metadata", md("first".into()));
    let before = host.volumes();
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        row.kill(host, &mut at, "set_vm_metadata", md(format!("kill-{i}")));
        host.ok("set_vm_metadata", md(format!("retry-{i}")));
        for inactive in [false, true] {
            let xml = vh.xml(&vm, inactive);
            if !xml.contains(&format!("retry-{i}")) || xml.contains(&format!("kill-{i}<")) {
                row.leak(format!(
                    "kill {i}: the {} definition does not hold the retry's metadata",
                    if inactive { "persistent" } else { "live" }
                ));
            }
        }
        let vols = host.volumes();
        if vols != before {
            row.leak(format!("kill {i}: volumes {vols:?}"));
        }
    }
    host.ok("delete_vm", json!([vm]));
    row.finish(host);
}

/// Hot-plug into a running VM, killed; the retry must leave the disk in the
/// live and the persistent definition exactly once. Between kills the VM is
/// powered off, the disk detached (persistent definition only: the firmware
/// cannot release a hot-plugged disk) and the VM started again.
#[test]
fn killed_attach_disk() {
    let vh = VmHost::new(Host::storage("f-ad"));
    let host = &vh.host;
    let mut row = Row::new("attach_disk");
    let (d, bytes) = patterned_disk(host, 31);
    let vm = vh.vm("agent-faults-ad", None);
    let reset = || {
        host.virsh_ok(&["destroy", &vm]);
        host.ok("detach_disk", json!([vm, d]));
        host.virsh_ok(&["start", &vm]);
    };
    let (_, full) = host.timed("attach_disk", json!([vm, d]));
    reset();
    // Attached, the disk's holder record is there too; never a lock.
    let detached = host.volumes();
    let mut attached = detached.clone();
    attached.insert(format!("{d}.holder"));
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        row.kill(host, &mut at, "attach_disk", json!([vm, d]));
        host.ok("attach_disk", json!([vm, d]));
        let (live, config) = (vh.xml(&vm, false), vh.xml(&vm, true));
        let counts = (serial_count(&live, &d), serial_count(&config, &d));
        if counts != (1, 1) {
            row.leak(format!(
                "kill {i}: {d} appears {counts:?} times (live, persistent)"
            ));
        }
        check_disk(host, &mut row, &d, &bytes, &format!("kill {i}"));
        let vols = host.volumes();
        if vols != attached {
            row.leak(format!("kill {i}: attached, the pool holds {vols:?}"));
        }
        reset();
        let vols = host.volumes();
        if vols != detached {
            row.leak(format!("kill {i}: detached again, the pool holds {vols:?}"));
        }
    }
    host.ok("delete_vm", json!([vm]));
    host.ok("delete_disk", json!([d]));
    row.finish(host);
}

/// Detach from a powered-off VM (the firmware-only guest could not release
/// a hot-plugged disk), killed; the retry succeeds or answers DiskNotAttached
/// (the first call had finished), and the disk is in no definition.
#[test]
fn killed_detach_disk() {
    let vh = VmHost::new(Host::storage("f-dt"));
    let host = &vh.host;
    let mut row = Row::new("detach_disk");
    let (d, bytes) = patterned_disk(host, 41);
    let vm = vh.vm("agent-faults-dt", None);
    host.virsh_ok(&["destroy", &vm]);
    host.ok("attach_disk", json!([vm, d]));
    let (_, full) = host.timed("detach_disk", json!([vm, d]));
    // Detached: no holder record, no lock.
    let detached = host.volumes();
    let mut at = Moments::new(full);
    for i in 0..KILLS {
        host.ok("attach_disk", json!([vm, d]));
        row.kill(host, &mut at, "detach_disk", json!([vm, d]));
        let retry = host.call("detach_disk", json!([vm, d]));
        let kind = retry["error"]["type"].as_str().unwrap_or("");
        if !retry["error"].is_null() && kind != "Bosh::Clouds::DiskNotAttached" {
            row.leak(format!("kill {i}: the retry failed: {}", retry["error"]));
        }
        let n = serial_count(&vh.xml(&vm, true), &d);
        if n != 0 {
            row.leak(format!("kill {i}: {d} still in the definition {n} times"));
        }
        let vols = host.volumes();
        if vols != detached {
            row.leak(format!("kill {i}: detached, the pool holds {vols:?}"));
        }
        check_disk(host, &mut row, &d, &bytes, &format!("kill {i}"));
    }
    host.ok("delete_vm", json!([vm]));
    host.ok("delete_disk", json!([d]));
    row.finish(host);
}

/// snapshot_disk of a disk attached to a running VM (a live block copy),
/// killed; the next snapshot_disk ends an abandoned copy and must succeed.
#[test]
fn killed_live_snapshot() {
    let vh = VmHost::new(Host::storage("f-ls"));
    let host = &vh.host;
    let mut row = Row::new("snapshot_disk (live)");
    let (d, bytes) = patterned_disk(host, 51);
    let vm = vh.vm("agent-faults-ls", None);
    host.ok("attach_disk", json!([vm, d]));
    let vm_vols: BTreeSet<String> = host
        .volumes()
        .into_iter()
        .filter(|v| v.starts_with(&vm) || v.starts_with(&vh.stemcell))
        .collect();
    let probe = host.ok("snapshot_disk", json!([d, {}]));
    let probe = probe.as_str().unwrap();
    let how = host.record(&format!("{probe}.meta")).unwrap()["consistency"].clone();
    assert!(
        how.as_str().unwrap_or("").contains("live copy"),
        "not a live snapshot: {how}"
    );
    host.ok("delete_snapshot", json!([probe]));
    snapshot_kills(host, &mut row, &d, &bytes, KILLS, &vm_vols);
    if vh.xml(&vm, false).contains("<mirror") {
        row.leak("a block copy is left on the VM".into());
    }
    host.ok("delete_vm", json!([vm]));
    host.ok("delete_disk", json!([d]));
    row.finish(host);
}

// ---- records whose write was killed --------------------------------------------

/// What a kill between creating a record's volume and writing it leaves: a
/// complete-looking object whose `.meta` holds only zeros. Every sweep takes
/// such a record for none (before, each of these leftovers stayed forever:
/// the sweeps only asked whether the `.meta` volume existed), and leaves
/// objects with valid records alone, however old.
#[test]
fn objects_whose_record_is_zeros_are_swept_valid_ones_kept() {
    let host = Host::storage("f-zero");
    let cfg = &host.config;
    let sc = ok(cfg, "create_stemcell", stemcell_args());
    let (d, bytes) = patterned_disk(&host, 61);
    let snap = ok(cfg, "snapshot_disk", json!([d, {}]));
    let (sc, snap) = (sc.as_str().unwrap(), snap.as_str().unwrap());

    let zero_sc = format!("sc-{}", uuid::Uuid::new_v4());
    host.virsh_ok(&[
        "vol-create-as",
        &host.pool,
        &zero_sc,
        "64M",
        "--format",
        "qcow2",
    ]);
    let zero_disk = format!("disk-{}", &uuid::Uuid::new_v4().simple().to_string()[..15]);
    host.virsh_ok(&["vol-create-as", &host.pool, &zero_disk, "1M"]);
    let zero_snap = format!(
        "snap-{d}-20200101T000000-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    host.virsh_ok(&[
        "vol-create-as",
        &host.pool,
        &zero_snap,
        "1M",
        "--format",
        "qcow2",
    ]);
    for v in [&zero_sc, &zero_disk, &zero_snap] {
        host.virsh_ok(&["vol-create-as", &host.pool, &format!("{v}.meta"), "4096"]);
    }
    host.age(&host.volumes());

    let sc2 = ok(cfg, "create_stemcell", stemcell_args());
    let d2 = ok(cfg, "create_disk", json!([1, {}, null]));
    let snap2 = ok(cfg, "snapshot_disk", json!([d, {}]));
    let left = host.volumes();
    let kept: Vec<&String> = [&zero_sc, &zero_disk, &zero_snap]
        .into_iter()
        .filter(|v| left.contains(v.as_str()) || left.contains(&format!("{v}.meta")))
        .collect();
    assert!(
        kept.is_empty(),
        "not swept though their records are zeros: {kept:?}"
    );
    for v in [sc, d.as_str(), snap] {
        assert!(host.complete(v), "{v} (valid record) was swept");
    }
    assert!(host.download(&d) == bytes, "the disk's bytes changed");
    for s in [snap, snap2.as_str().unwrap()] {
        ok(cfg, "delete_snapshot", json!([s]));
    }
    for d in [d.as_str(), d2.as_str().unwrap()] {
        ok(cfg, "delete_disk", json!([d]));
    }
    for s in [sc, sc2.as_str().unwrap()] {
        ok(cfg, "delete_stemcell", json!([s]));
    }
}
