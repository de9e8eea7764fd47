//! An in-memory `DiskHost` that behaves like libvirt where the handlers care:
//! a volume name is taken once (a second create is refused, retryable, as
//! libvirt's StorageVolExist is), absent volumes and VMs are `None`, a
//! sidecar holds bytes that must parse as JSON, deleting an absent volume is
//! `false`. Every call is logged (`calls`), and any operation can be made to
//! fail once (`fail_next`, `fail_next_on`), before it has any effect.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::error::{CpiError, Result};
use crate::host::{
    DiskAttachment, DiskDevice, DiskFormat, DiskHost, DiskRef, DomainDisks, Holder, VolumeFacts,
};

mod stemcells;
mod vms;

pub const POOL: &str = "fake-pool";

struct Volume {
    facts: VolumeFacts,
    data: Vec<u8>,
}

struct Failure {
    op: &'static str,
    name: Option<String>,
    error: CpiError,
}

#[derive(Default)]
struct State {
    available: u64,
    /// What the host last counted as free, when that differs from the truth.
    counted: Option<u64>,
    /// When a sweep of each prefix was last claimed (host clock).
    sweeps: BTreeMap<String, f64>,
    now: f64,
    volumes: BTreeMap<String, Volume>,
    /// Disks' locks, by name (beside the volumes, as on the real host).
    locks: BTreeMap<String, Vec<u8>>,
    vms: BTreeMap<String, DomainDisks>,
    failures: Vec<Failure>,
    calls: Vec<String>,
    /// What a killed hot-plug left in QEMU, by VM (see remove_orphan_block_nodes).
    orphans: BTreeMap<String, String>,
    stemcells: stemcells::State,
    /// VMs as `VmHost` sees them, networks and reservations (see vms.rs).
    machines: vms::Machines,
}

pub struct FakeHost {
    s: RefCell<State>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHost {
    /// An empty pool with 100 GiB free, its clock at 1,000,000 s.
    pub fn new() -> Self {
        FakeHost {
            s: RefCell::new(State {
                available: 100 << 30,
                now: 1_000_000.0,
                ..Default::default()
            }),
        }
    }

    pub fn set_available(&self, bytes: u64) {
        self.s.borrow_mut().available = bytes;
    }

    /// Makes the host's last count of free bytes `bytes`, whatever is free
    /// (space others used or freed since), until a recount.
    pub fn set_counted(&self, bytes: u64) {
        self.s.borrow_mut().counted = Some(bytes);
    }

    /// Moves the host's clock (the mtime of volumes made from now on).
    pub fn advance_clock(&self, secs: f64) {
        self.s.borrow_mut().now += secs;
    }

    /// The next call of `op` (a `DiskHost` method name) fails with `error`.
    pub fn fail_next(&self, op: &'static str, error: CpiError) {
        self.s.borrow_mut().failures.push(Failure {
            op,
            name: None,
            error,
        });
    }

    /// The next call of `op` on volume (or VM) `name` fails with `error`.
    pub fn fail_next_on(&self, op: &'static str, name: &str, error: CpiError) {
        self.s.borrow_mut().failures.push(Failure {
            op,
            name: Some(name.to_string()),
            error,
        });
    }

    /// A volume as another program (or an earlier call) left it.
    pub fn put_volume(&self, name: &str, capacity: u64, format: &str, data: &[u8]) {
        let mut s = self.s.borrow_mut();
        let now = s.now;
        s.volumes
            .insert(name.to_string(), volume(name, capacity, format, data, now));
    }

    /// A sidecar holding `value` as JSON.
    pub fn put_json(&self, name: &str, value: &Value) {
        let bytes = serde_json::to_vec(value).expect("JSON");
        self.put_volume(name, 4096, "raw", &bytes);
    }

    pub fn set_mtime(&self, name: &str, mtime: f64) {
        if let Some(v) = self.s.borrow_mut().volumes.get_mut(name) {
            v.facts.mtime = Some(mtime);
        }
    }

    /// Changes what the host probes a volume as (a guest wrote a header).
    pub fn set_probed_format(&self, name: &str, format: &str) {
        if let Some(v) = self.s.borrow_mut().volumes.get_mut(name) {
            v.facts.format = Some(format.to_string());
        }
    }

    /// A VM; `devices` are in its persistent definition, and live too when it runs.
    pub fn put_vm(&self, vm_cid: &str, running: bool, devices: Vec<DiskDevice>) {
        let live = if running { devices.clone() } else { Vec::new() };
        self.s.borrow_mut().vms.insert(
            vm_cid.to_string(),
            DomainDisks {
                running,
                live,
                config: devices,
            },
        );
    }

    /// QEMU holds what a hot-plug into `vm_cid` that libvirtd did not live to record left.
    pub fn put_orphans(&self, vm_cid: &str, what: &str) {
        self.s
            .borrow_mut()
            .orphans
            .insert(vm_cid.to_string(), what.to_string());
    }

    pub fn vm(&self, vm_cid: &str) -> Option<DomainDisks> {
        self.s.borrow().vms.get(vm_cid).cloned()
    }

    /// The device the CPI attaches for a disk (found by its serial).
    pub fn disk_device(disk_cid: &str, target: &str) -> DiskDevice {
        DiskDevice {
            kind: "file".into(),
            device: "disk".into(),
            target: target.into(),
            bus: "virtio".into(),
            serial: Some(disk_cid.into()),
            source_path: Some(format!("/{POOL}/{disk_cid}")),
            ..Default::default()
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.s.borrow().volumes.keys().cloned().collect()
    }

    /// A lock as an earlier (maybe killed) call left it.
    pub fn put_lock(&self, name: &str, owner: &[u8]) {
        self.s
            .borrow_mut()
            .locks
            .insert(name.to_string(), owner.to_vec());
    }

    pub fn lock_exists(&self, name: &str) -> bool {
        self.s.borrow().locks.contains_key(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.s.borrow().volumes.contains_key(name)
    }

    pub fn facts(&self, name: &str) -> Option<VolumeFacts> {
        self.s.borrow().volumes.get(name).map(|v| v.facts.clone())
    }

    pub fn json(&self, name: &str) -> Option<Value> {
        let s = self.s.borrow();
        let v = s.volumes.get(name)?;
        serde_json::from_str(sidecar_text(&v.data)).ok()
    }

    /// Every call so far, as "op name".
    pub fn calls(&self) -> Vec<String> {
        self.s.borrow().calls.clone()
    }

    /// Logs the call and fails it when a failure was injected for it.
    fn enter(&self, op: &'static str, name: &str) -> Result<()> {
        let mut s = self.s.borrow_mut();
        s.calls.push(format!("{op} {name}").trim_end().to_string());
        let hit = s
            .failures
            .iter()
            .position(|f| f.op == op && f.name.as_deref().is_none_or(|n| n == name));
        match hit {
            Some(i) => Err(s.failures.remove(i).error),
            None => Ok(()),
        }
    }

    fn create(&self, name: &str, capacity: u64, format: &str, data: &[u8]) -> Result<()> {
        let mut s = self.s.borrow_mut();
        if s.volumes.contains_key(name) {
            return Err(CpiError::cloud(format!(
                "creating volume {name}: storage volume '{name}' exists already"
            ))
            .retryable(true));
        }
        let now = s.now;
        s.volumes
            .insert(name.to_string(), volume(name, capacity, format, data, now));
        Ok(())
    }
}

fn volume(name: &str, capacity: u64, format: &str, data: &[u8], now: f64) -> Volume {
    Volume {
        facts: VolumeFacts {
            path: format!("/{POOL}/{name}"),
            format: Some(format.to_string()),
            capacity: capacity.max(data.len() as u64),
            mtime: Some(now),
            ..Default::default()
        },
        data: data.to_vec(),
    }
}

/// A sidecar's text without its padding (spaces, NULs).
fn sidecar_text(data: &[u8]) -> &str {
    std::str::from_utf8(data)
        .unwrap_or("")
        .trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
}

fn missing(doing: &str, name: &str) -> CpiError {
    CpiError::cloud(format!("{doing} volume {name}: it does not exist"))
}

impl DiskHost for FakeHost {
    fn pool_name(&self) -> &str {
        POOL
    }

    fn available_bytes(&self, recount: bool) -> Result<u64> {
        self.enter("available_bytes", if recount { "recount" } else { "" })?;
        let mut s = self.s.borrow_mut();
        if recount {
            s.counted = None;
        }
        Ok(s.counted.unwrap_or(s.available))
    }

    fn claim_sweep(&self, prefix: &str, every_secs: f64, host_now: f64) -> Result<bool> {
        self.enter("claim_sweep", prefix)?;
        let mut s = self.s.borrow_mut();
        if s.sweeps
            .get(prefix)
            .is_some_and(|t| host_now - t <= every_secs)
        {
            return Ok(false);
        }
        s.sweeps.insert(prefix.to_string(), host_now);
        Ok(true)
    }

    fn volume_exists(&self, name: &str) -> Result<bool> {
        self.enter("volume_exists", name)?;
        Ok(self.exists(name))
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeFacts>> {
        self.enter("volume", name)?;
        Ok(self.facts(name))
    }

    fn volume_names_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        self.enter("volume_names_with_prefix", prefix)?;
        Ok(self
            .names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    fn volume_untouched_for(&self, name: &str, max_age_secs: f64, host_now: f64) -> Result<bool> {
        self.enter("volume_untouched_for", name)?;
        Ok(self
            .facts(name)
            .and_then(|f| f.mtime)
            .is_some_and(|m| host_now - m > max_age_secs))
    }

    fn create_volume(&self, name: &str, capacity: u64, format: DiskFormat) -> Result<()> {
        self.enter("create_volume", name)?;
        self.create(name, capacity, format.as_str(), &[])
    }

    fn create_volume_with(&self, name: &str, data: &[u8]) -> Result<()> {
        self.enter("create_volume_with", name)?;
        self.create(name, data.len() as u64, "raw", data)
    }

    fn create_lock(&self, name: &str, owner: &[u8]) -> Result<()> {
        self.enter("create_lock", name)?;
        let mut s = self.s.borrow_mut();
        if s.locks.contains_key(name) {
            return Err(CpiError::cloud(format!(
                "creating volume {name}: storage volume '{name}' exists already"
            ))
            .retryable(true));
        }
        s.locks.insert(name.to_string(), owner.to_vec());
        Ok(())
    }

    fn read_lock(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.enter("read_lock", name)?;
        Ok(self.s.borrow().locks.get(name).cloned())
    }

    fn remove_lock(&self, name: &str) -> Result<bool> {
        self.enter("remove_lock", name)?;
        Ok(self.s.borrow_mut().locks.remove(name).is_some())
    }

    fn copy_volume(&self, name: &str, from: &str, capacity: u64, format: DiskFormat) -> Result<()> {
        self.enter("copy_volume", name)?;
        let source = self.facts(from).ok_or_else(|| missing("copying", from))?;
        // Like libvirt's copy of a qcow2 image: the source's size, whatever was asked.
        let _ = capacity;
        self.create(name, source.capacity, format.as_str(), &[])
    }

    fn resize_volume(&self, name: &str, capacity: u64) -> Result<()> {
        self.enter("resize_volume", name)?;
        let mut s = self.s.borrow_mut();
        let v = s
            .volumes
            .get_mut(name)
            .ok_or_else(|| missing("growing", name))?;
        if capacity < v.facts.capacity {
            return Err(CpiError::cloud(format!(
                "growing volume {name}: shrinking is not allowed"
            )));
        }
        v.facts.capacity = capacity;
        Ok(())
    }

    fn delete_volume(&self, name: &str) -> Result<bool> {
        self.enter("delete_volume", name)?;
        Ok(self.s.borrow_mut().volumes.remove(name).is_some())
    }

    fn read_volume(&self, name: &str, length: u64) -> Result<Vec<u8>> {
        self.enter("read_volume", name)?;
        let s = self.s.borrow();
        let v = s
            .volumes
            .get(name)
            .ok_or_else(|| missing("reading", name))?;
        let n = usize::try_from(length)
            .unwrap_or(usize::MAX)
            .min(v.data.len());
        Ok(v.data[..n].to_vec())
    }

    fn read_json(&self, name: &str) -> Result<Option<Value>> {
        self.enter("read_json", name)?;
        let s = self.s.borrow();
        let Some(v) = s.volumes.get(name) else {
            return Ok(None);
        };
        serde_json::from_str(sidecar_text(&v.data))
            .map(Some)
            .map_err(|e| {
                CpiError::cloud(format!(
                    "volume {name} does not hold the JSON record expected: {e}"
                ))
            })
    }

    fn write_json(&self, name: &str, value: &Value) -> Result<()> {
        self.enter("write_json", name)?;
        let bytes = serde_json::to_vec(value).expect("JSON");
        if !self.exists(name) {
            self.create(name, 4096, "raw", &[])?;
        }
        let mut s = self.s.borrow_mut();
        if let Some(v) = s.volumes.get_mut(name) {
            v.data = bytes;
        }
        Ok(())
    }

    fn has_valid_marker(&self, volume: &str) -> Result<bool> {
        let marker = crate::names::marker_name(volume);
        self.enter("has_valid_marker", &marker)?;
        Ok(matches!(self.json(&marker), Some(Value::Object(_))))
    }

    fn vm_exists(&self, vm_cid: &str) -> Result<bool> {
        self.enter("vm_exists", vm_cid)?;
        Ok(self.s.borrow().vms.contains_key(vm_cid))
    }

    fn vm_disks(&self, vm_cid: &str) -> Result<Option<DomainDisks>> {
        self.enter("vm_disks", vm_cid)?;
        Ok(self.s.borrow().vms.get(vm_cid).cloned())
    }

    fn disk_holders(&self, r: &DiskRef) -> Result<Vec<Holder>> {
        self.enter("disk_holders", r.cid)?;
        Ok(self
            .s
            .borrow()
            .vms
            .iter()
            .filter(|(_, d)| d.holds(r))
            .map(|(vm, d)| Holder {
                domain: vm.clone(),
                disks: d.clone(),
            })
            .collect())
    }

    fn attach_disk_device(
        &self,
        vm_cid: &str,
        d: &DiskAttachment,
        live: bool,
        config: bool,
    ) -> Result<()> {
        self.enter("attach_disk_device", vm_cid)?;
        let mut s = self.s.borrow_mut();
        let vm = s.vms.get_mut(vm_cid).ok_or_else(|| vanished(vm_cid))?;
        if live && !vm.running {
            return Err(CpiError::cloud(format!(
                "attaching disk to domain {vm_cid} (live): domain is not running"
            )));
        }
        let device = DiskDevice {
            kind: "file".into(),
            device: "disk".into(),
            target: d.target.into(),
            bus: d.options.bus.as_str().into(),
            serial: Some(d.serial.into()),
            source_path: Some(d.path.into()),
            driver_type: Some(d.format.as_str().into()),
            ..Default::default()
        };
        for (wanted, list) in [(live, &mut vm.live), (config, &mut vm.config)] {
            if wanted {
                if list.iter().any(|x| x.target == device.target) {
                    return Err(CpiError::cloud(format!(
                        "target {} already exists in domain {vm_cid}",
                        device.target
                    )));
                }
                list.push(device.clone());
            }
        }
        Ok(())
    }

    fn detach_disk_live(
        &self,
        vm_cid: &str,
        dev: &DiskDevice,
        _r: &DiskRef,
        _timeout: Duration,
    ) -> Result<()> {
        self.enter("detach_disk_live", vm_cid)?;
        let mut s = self.s.borrow_mut();
        if let Some(vm) = s.vms.get_mut(vm_cid) {
            vm.live.retain(|d| d.target != dev.target);
        }
        Ok(())
    }

    fn detach_disk_config(&self, vm_cid: &str, dev: &DiskDevice) -> Result<()> {
        self.enter("detach_disk_config", vm_cid)?;
        let mut s = self.s.borrow_mut();
        if let Some(vm) = s.vms.get_mut(vm_cid) {
            vm.config.retain(|d| d.target != dev.target);
        }
        Ok(())
    }

    fn remove_orphan_block_nodes(
        &self,
        vm_cid: &str,
        _path: &str,
        _timeout: Duration,
    ) -> Result<Option<String>> {
        self.enter("remove_orphan_block_nodes", vm_cid)?;
        Ok(self.s.borrow_mut().orphans.remove(vm_cid))
    }

    fn end_abandoned_copy(&self, vm_cid: &str, target: &str) -> Result<Option<String>> {
        self.enter("end_abandoned_copy", vm_cid)?;
        let mut s = self.s.borrow_mut();
        let vm = s.vms.get_mut(vm_cid).ok_or_else(|| vanished(vm_cid))?;
        let Some(dev) = vm.live.iter_mut().find(|d| d.target == target) else {
            return Ok(None);
        };
        match dev.mirror_ready {
            None => Ok(None),
            Some(false) => Err(CpiError::cloud(format!(
                "disk {target} of domain {vm_cid} is being copied; retry"
            ))
            .retryable(true)),
            Some(true) => {
                dev.mirror_ready = None;
                let dest = dev
                    .mirror_path
                    .take()
                    .and_then(|p| p.rsplit('/').next().map(str::to_string));
                let unfinished = dest.filter(|d| {
                    d.starts_with(crate::names::SNAPSHOT_PREFIX)
                        && !s.volumes.contains_key(&crate::names::marker_name(d))
                });
                Ok(unfinished.filter(|d| s.volumes.remove(d).is_some()))
            }
        }
    }

    fn live_copy(
        &self,
        vm_cid: &str,
        target: &str,
        dest: &str,
        _stall_timeout: Duration,
    ) -> Result<()> {
        self.enter("live_copy", vm_cid)?;
        let s = self.s.borrow();
        let vm = s.vms.get(vm_cid).ok_or_else(|| vanished(vm_cid))?;
        if !vm.running || !vm.live.iter().any(|d| d.target == target) {
            return Err(CpiError::cloud(format!(
                "live copy of disk {target} of domain {vm_cid}: no such running device"
            )));
        }
        if !s.volumes.contains_key(dest) {
            return Err(missing("copying into", dest));
        }
        Ok(())
    }
}

fn vanished(vm_cid: &str) -> CpiError {
    CpiError::vanished(format_args!("VM {vm_cid}"))
}
