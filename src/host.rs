//! The hypervisor seam for persistent disks and snapshots, in CPI vocabulary:
//! volumes of the CPI's one storage pool (found by name, never by handle),
//! the JSON records kept in sidecar volumes, and the VMs as far as a disk
//! cares (which devices a VM's definition holds, which VMs hold a disk).
//!
//! `crate::libvirt::host` implements it over a libvirt connection; handler
//! tests run against `fake::FakeHost`. Nothing here names a `virt` type, and
//! this module imports nothing from `crate::libvirt` (which imports it).
//!
//! "Not found" is a value here (`Option`, `false`), never an error: the
//! handlers decide which BOSH error a situation becomes.
//!
//! `StemcellHost` (stemcells.rs) and `VmHost` (vms.rs: VMs, networks, DHCP
//! reservations) extend `DiskHost` the same way.

pub mod facts;
#[cfg(test)]
pub mod fake;
mod stemcells;
mod vms;
pub use vms::*;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{CpiError, Result};
pub use crate::image::DiskFormat;
use crate::names::marker_name;
use crate::vm_spec::{DiskBus, DiskOptions};
pub use stemcells::{StemcellHost, VolumeUpload};

pub const MIB: u64 = 1 << 20;

/// What the host reports about a volume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeFacts {
    pub path: String,
    /// The format the host probes from the file's first bytes: for a raw
    /// volume those are the guest's, so never trusted over the CPI's record.
    pub format: Option<String>,
    pub capacity: u64,
    /// Bytes the file really uses on the host.
    pub allocation: u64,
    /// Size of the file (libvirt's "physical").
    pub physical: u64,
    pub backing_path: Option<String>,
    /// Modification time on the host, seconds since the epoch.
    pub mtime: Option<f64>,
}

/// One `<disk>` device of a VM's definition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskDevice {
    /// The `type` attribute: file, block, volume, network.
    pub kind: String,
    /// The `device` attribute: disk, cdrom, ...
    pub device: String,
    pub target: String,
    pub bus: String,
    pub serial: Option<String>,
    /// `<source file=...>` or `<source dev=...>`.
    pub source_path: Option<String>,
    /// `<source pool=... volume=...>`.
    pub source_volume: Option<(String, String)>,
    pub driver_type: Option<String>,
    /// A block job's `<mirror>`: `Some(ready)` while one runs.
    pub mirror_ready: Option<bool>,
    /// Where that job copies to.
    pub mirror_path: Option<String>,
}

/// How a persistent disk can show up in a VM: by its serial (the CID, how
/// the CPI attaches it), by its file path, or as a pool volume reference.
#[derive(Debug, Clone, Copy)]
pub struct DiskRef<'a> {
    pub cid: &'a str,
    pub path: Option<&'a str>,
    pub pool: &'a str,
}

impl DiskDevice {
    pub fn refers_to(&self, r: &DiskRef) -> bool {
        self.serial.as_deref() == Some(r.cid)
            || (r.path.is_some() && self.source_path.as_deref() == r.path)
            || self
                .source_volume
                .as_ref()
                .is_some_and(|(pool, vol)| pool == r.pool && vol == r.cid)
    }
}

/// A VM's disks, live (only while it runs) and persistent.
#[derive(Debug, Clone, Default)]
pub struct DomainDisks {
    pub running: bool,
    pub live: Vec<DiskDevice>,
    pub config: Vec<DiskDevice>,
}

impl DomainDisks {
    pub fn live_ref(&self, r: &DiskRef) -> Option<&DiskDevice> {
        self.live.iter().find(|d| d.refers_to(r))
    }

    pub fn config_ref(&self, r: &DiskRef) -> Option<&DiskDevice> {
        self.config.iter().find(|d| d.refers_to(r))
    }

    pub fn holds(&self, r: &DiskRef) -> bool {
        self.live_ref(r).is_some() || self.config_ref(r).is_some()
    }

    /// Target names in use in either definition.
    pub fn used_targets(&self) -> Vec<String> {
        self.live
            .iter()
            .chain(&self.config)
            .map(|d| d.target.clone())
            .collect()
    }
}

/// A VM that holds a given disk.
#[derive(Debug, Clone)]
pub struct Holder {
    pub domain: String,
    pub disks: DomainDisks,
}

/// A persistent disk's device as the CPI attaches it: the disk's file in
/// the recorded format, on its disk_type's bus and options, with the CID as
/// its serial (how the agent finds it).
#[derive(Debug, Clone)]
pub struct DiskAttachment<'a> {
    pub path: &'a str,
    pub format: DiskFormat,
    pub target: &'a str,
    pub serial: &'a str,
    pub options: &'a DiskOptions,
}

/// The first target name of the bus (`vdX` for virtio, `sdX` for scsi;
/// a..z, aa..) not in `used`.
pub fn next_free_target(used: &[String], bus: DiskBus) -> String {
    let prefix = match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Scsi => "sd",
    };
    (0..)
        .map(|i| format!("{prefix}{}", drive_letters(i)))
        .find(|t| !used.iter().any(|u| u == t))
        .unwrap_or_default()
}

/// 0 -> a, 25 -> z, 26 -> aa: the kernel's and libvirt's disk naming.
fn drive_letters(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// What the disk and snapshot handlers need of the host. Every volume is one
/// of the CPI's pool, named by the caller (see `crate::names`).
pub trait DiskHost {
    /// The pool's name, as a VM's definition may refer to its volumes.
    fn pool_name(&self) -> &str;
    /// Free bytes in the pool. Without `recount`, as libvirt last counted
    /// them (no cost, but blind to what was written behind its back since);
    /// with it, counted now, which re-reads every volume of the pool.
    fn available_bytes(&self, recount: bool) -> Result<u64>;

    /// Whether there is a volume of that name (one lookup, no facts).
    fn volume_exists(&self, name: &str) -> Result<bool>;
    /// The volume's facts, freshly read; `None` when there is no such volume.
    fn volume(&self, name: &str) -> Result<Option<VolumeFacts>>;
    /// Names of the pool's volumes that start with `prefix` (all of them,
    /// however many).
    fn volume_names_with_prefix(&self, prefix: &str) -> Result<Vec<String>>;
    /// Whether volume `name` has not changed for more than `max_age_secs`
    /// before `host_now` (a time read on the host: a just-made volume's
    /// mtime). False when it is gone or has no mtime.
    fn volume_untouched_for(&self, name: &str, max_age_secs: f64, host_now: f64) -> Result<bool>;
    /// Whether a sweep of the volumes named `prefix*` is due: none was
    /// claimed in the last `every_secs` before `host_now` (the host's clock:
    /// a just-made volume's mtime). True claims this one, so concurrent and
    /// later calls skip theirs until `every_secs` passed.
    fn claim_sweep(&self, prefix: &str, every_secs: f64, host_now: f64) -> Result<bool>;
    /// A new, empty, sparse volume. A name in use is refused.
    fn create_volume(&self, name: &str, capacity: u64, format: DiskFormat) -> Result<()>;
    /// A new raw volume holding exactly `data`; nothing is left on failure.
    /// A name in use is refused.
    fn create_volume_with(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Takes lock `name`, holding `owner`: only one caller can create it (a
    /// name in use is refused); nothing is left on failure. Locks live beside
    /// the pool's volumes, not among them (libvirt/staging.rs).
    fn create_lock(&self, name: &str, owner: &[u8]) -> Result<()>;
    /// What lock `name` holds (zeros or nothing when its write was killed);
    /// `None` when there is no such lock.
    fn read_lock(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Removes lock `name`; true if it was there.
    fn remove_lock(&self, name: &str) -> Result<bool>;
    /// A new volume `name` holding a copy of volume `from`, converted to `format`.
    fn copy_volume(&self, name: &str, from: &str, capacity: u64, format: DiskFormat) -> Result<()>;
    fn resize_volume(&self, name: &str, capacity: u64) -> Result<()>;
    /// Deletes a volume; true if it was there.
    fn delete_volume(&self, name: &str) -> Result<bool>;
    /// The first `length` bytes of a volume.
    fn read_volume(&self, name: &str, length: u64) -> Result<Vec<u8>>;

    /// The JSON document in sidecar volume `name`; `None` when the volume is
    /// absent, an error when it holds no JSON (use `read_record`).
    fn read_json(&self, name: &str) -> Result<Option<Value>>;
    /// Replaces sidecar volume `name`'s document (creating the volume when
    /// missing); a reader sees the old or the new one, never a mix (use
    /// `write_record`).
    fn write_json(&self, name: &str, value: &Value) -> Result<()>;
    /// Whether `volume`'s marker exists and holds a JSON object (one whose
    /// write was killed holds zeros or a torn document: no marker).
    fn has_valid_marker(&self, volume: &str) -> Result<bool>;

    /// Whether there is a VM of that CID (one lookup).
    fn vm_exists(&self, vm_cid: &str) -> Result<bool>;
    /// The disks of VM `vm_cid`; `None` when there is no such VM.
    fn vm_disks(&self, vm_cid: &str) -> Result<Option<DomainDisks>>;
    /// Every VM (ours or not) whose live or persistent definition refers to the disk.
    fn disk_holders(&self, r: &DiskRef) -> Result<Vec<Holder>>;

    /// Adds the device to running VM `vm_cid` (`live`) and/or to its
    /// persistent definition (`config`).
    fn attach_disk_device(
        &self,
        vm_cid: &str,
        device: &DiskAttachment,
        live: bool,
        config: bool,
    ) -> Result<()>;
    /// Asks the guest to release a hot-plugged disk and waits until the VM's
    /// live definition no longer shows it, `timeout` at most.
    fn detach_disk_live(
        &self,
        vm_cid: &str,
        dev: &DiskDevice,
        r: &DiskRef,
        timeout: Duration,
    ) -> Result<()>;
    /// Removes the device from the VM's persistent definition (gone already: done).
    fn detach_disk_config(&self, vm_cid: &str, dev: &DiskDevice) -> Result<()>;
    /// Removes what a hot-plug of the file at `path` that libvirtd did not
    /// live to record left in QEMU (see libvirt/orphan_nodes.rs); a
    /// description of what was removed, `None` when there was nothing.
    fn remove_orphan_block_nodes(
        &self,
        vm_cid: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<String>>;

    /// Ends a block copy of device `target` of VM `vm_cid` that nobody
    /// watches any more (the live copy of a killed snapshot_disk), deleting
    /// its destination when that is an unfinished snapshot; returns what was
    /// deleted. A copy still in progress is a retryable error.
    fn end_abandoned_copy(&self, vm_cid: &str, target: &str) -> Result<Option<String>>;
    /// Copies device `target` of running VM `vm_cid` into the existing, empty
    /// qcow2 volume `dest` as it is at one instant (crash-consistent), the
    /// guest staying on its disk; gives up after `stall_timeout` without progress.
    fn live_copy(
        &self,
        vm_cid: &str,
        target: &str,
        dest: &str,
        stall_timeout: Duration,
    ) -> Result<()>;
}

impl dyn DiskHost + '_ {
    /// The record in sidecar volume `name`, as a `crate::records` record.
    pub fn read_record<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(value) = self.read_json(name)? else {
            return Ok(None);
        };
        serde_json::from_value(value).map(Some).map_err(|e| {
            CpiError::cloud(format!(
                "volume {name} does not hold the JSON record expected: {e}"
            ))
        })
    }

    pub fn write_record<T: Serialize>(&self, name: &str, record: &T) -> Result<()> {
        let value = serde_json::to_value(record)
            .map_err(|e| CpiError::cloud(format!("serializing {name}: {e}")))?;
        self.write_json(name, &value)
    }

    /// Writes `record` as the marker of `volume`. Without its marker the
    /// volume is not usable, so a failure deletes both.
    pub fn mark_complete<T: Serialize>(&self, volume: &str, record: &T) -> Result<()> {
        let marker = marker_name(volume);
        if let Err(e) = self.write_record(&marker, record) {
            let _ = self.delete_volume(&marker);
            let _ = self.delete_volume(volume);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_fill_the_first_gap() {
        let used = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let v = DiskBus::Virtio;
        assert_eq!(next_free_target(&used(&[]), v), "vda");
        assert_eq!(next_free_target(&used(&["vda", "vdb", "sda"]), v), "vdc");
        assert_eq!(next_free_target(&used(&["vda", "vdc"]), v), "vdb");
        assert_eq!(
            next_free_target(&used(&["vda", "vdb", "sda"]), DiskBus::Scsi),
            "sdb"
        );
        let all: Vec<String> = (0..26).map(|i| format!("vd{}", drive_letters(i))).collect();
        assert_eq!(all[25], "vdz");
        assert_eq!(next_free_target(&all, v), "vdaa");
        assert_eq!(drive_letters(27), "ab");
        assert_eq!(drive_letters(26 * 27), "aaa");
    }
}
