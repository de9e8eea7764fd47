//! Persistent disks as libvirt sees them: disk and sidecar volumes in the pool,
//! the `<disk>` devices in domain XML, which domains hold a disk, hot-plug and
//! confirmed unplug, and live block copies (snapshots of attached disks).
//!
//! Boundary: no BOSH semantics here. "Not found" is a value (`None`, `false`);
//! the handlers (handlers/disk.rs, handlers/snapshot.rs) decide which BOSH
//! error a situation becomes. Everything else is a `CloudError` naming what
//! was being done and libvirt's reason.

use std::ffi::CString;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::sys;

use super::volume::{DiskFormat, MIB};
use super::xmltree::Element;
use super::{lv_error, not_found_as_none, xml_escape, Libvirt};
use crate::error::{CpiError, Result};
pub use crate::host::{next_free_target, DiskDevice, DiskRef, DomainDisks, Holder};
use crate::names::{marker_name, SNAPSHOT_PREFIX};
use crate::vm_spec::DiskOptions;

/// How often a domain's live XML is re-read while waiting for the guest.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A copy in sync this long has nobody to end it (see end_abandoned_copy).
const ABANDONED_COPY_AFTER: Duration = Duration::from_secs(3);

/// Sidecar volumes never need to be large; a bigger one is not ours to read.
const SIDECAR_MAX_BYTES: u64 = MIB;
const SIDECAR_BLOCK: usize = 4096;

impl DomainDisks {
    /// From the domain's live XML (while it runs) and persistent XML.
    fn parse(name: &str, running: bool, live: Option<&str>, config: &str) -> Result<DomainDisks> {
        let parse = |xml: &str| {
            parse_domain_disks(xml)
                .map_err(|e| CpiError::cloud(format!("parsing the XML of domain {name}: {e}")))
        };
        Ok(DomainDisks {
            running,
            live: live.map(parse).transpose()?.unwrap_or_default(),
            config: parse(config)?,
        })
    }
}

/// The device the CPI attaches for a persistent disk: on its disk_type's
/// bus (virtio-blk, or a disk of the domain's virtio-scsi controller), with
/// its cache/io/discard options, and `<serial>` = CID either way (how the
/// agent finds it). Without a disk_type cache mode, `cache='none'` (O_DIRECT
/// on the host: no double caching, guest flushes reach the disk), which
/// works under both TCG and KVM on the local filesystems a `dir` pool lives on.
pub fn disk_device_xml(
    path: &str,
    format: DiskFormat,
    target: &str,
    serial: &str,
    options: &DiskOptions,
) -> String {
    let mut options = options.clone();
    options.cache.get_or_insert_with(|| "none".to_string());
    format!(
        "<disk type='file' device='disk'>\
         <driver name='qemu' type='{}'{}/>\
         <source file='{}'/><target dev='{}' bus='{}'/><serial>{}</serial></disk>",
        format.as_str(),
        options.driver_attrs(),
        xml_escape(path),
        xml_escape(target),
        options.bus.as_str(),
        xml_escape(serial)
    )
}

/// Enough of a device for libvirt to find it again (it matches disks by target).
fn detach_xml(d: &DiskDevice) -> String {
    let source = match (&d.kind[..], &d.source_path) {
        ("file", Some(p)) => format!("<source file='{}'/>", xml_escape(p)),
        ("block", Some(p)) => format!("<source dev='{}'/>", xml_escape(p)),
        _ => String::new(),
    };
    let bus = if d.bus.is_empty() {
        String::new()
    } else {
        format!(" bus='{}'", xml_escape(&d.bus))
    };
    format!(
        "<disk type='{}' device='{}'>{source}<target dev='{}'{bus}/></disk>",
        xml_escape(&d.kind),
        xml_escape(&d.device),
        xml_escape(&d.target)
    )
}

// ---- XML reading --------------------------------------------------------------

/// The `<disk>` devices of a domain XML document (live or inactive). Only a
/// disk's own children count: the `<source>` inside `<backingStore>` or
/// `<mirror>` describes another image.
pub fn parse_domain_disks(xml: &str) -> std::result::Result<Vec<DiskDevice>, String> {
    let root = Element::parse(xml)?;
    if root.name != "domain" {
        return Ok(Vec::new());
    }
    Ok(root
        .children_named("devices")
        .flat_map(|devices| devices.children_named("disk"))
        .map(disk_device)
        .collect())
}

fn disk_device(el: &Element) -> DiskDevice {
    let owned = |v: Option<&str>| v.map(str::to_string);
    let mut d = DiskDevice {
        kind: el.attr("type").unwrap_or_default().to_string(),
        device: el.attr("device").unwrap_or("disk").to_string(),
        ..Default::default()
    };
    // A later element of the same name overrides an earlier one.
    for c in &el.children {
        match c.name.as_str() {
            "serial" if !c.text.is_empty() => {
                d.serial.get_or_insert_with(String::new).push_str(&c.text);
            }
            "target" => {
                d.target = c.attr("dev").unwrap_or_default().to_string();
                d.bus = c.attr("bus").unwrap_or_default().to_string();
            }
            "source" => {
                d.source_path = owned(c.attr("file").or_else(|| c.attr("dev")));
                if let (Some(p), Some(v)) = (c.attr("pool"), c.attr("volume")) {
                    d.source_volume = Some((p.to_string(), v.to_string()));
                }
            }
            "driver" => d.driver_type = owned(c.attr("type")),
            "mirror" => {
                d.mirror_ready = Some(c.attr("ready") == Some("yes"));
                d.mirror_path = owned(
                    c.attr("file")
                        .or_else(|| c.child("source").and_then(|s| s.attr("file"))),
                );
            }
            _ => {}
        }
    }
    if let Some(s) = &mut d.serial {
        *s = s.trim().to_string();
    }
    d
}

/// Whether a domain XML document's root carries an `id`: libvirt writes one
/// for an active domain only (`<domain type='qemu' id='3'>`; shut off, or
/// asked for the inactive definition, it has none).
fn has_domain_id(xml: &str) -> std::result::Result<bool, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                return Ok(e.attributes().flatten().any(|a| a.key.as_ref() == b"id"));
            }
            quick_xml::events::Event::Eof => return Err("no root element".into()),
            _ => {}
        }
    }
}

// ---- libvirt operations ---------------------------------------------------------

impl Libvirt {
    /// Replaces the content of a small sidecar volume with `value` as JSON,
    /// creating the volume when missing. The JSON is padded with spaces to the
    /// volume's whole size and written in one upload, so a reader sees either
    /// the old or the new document, never a mix of the two lengths.
    pub fn write_json_volume<T: Serialize>(
        &self,
        pool: &StoragePool,
        name: &str,
        value: &T,
    ) -> Result<()> {
        let mut bytes = serde_json::to_vec(value)
            .map_err(|e| CpiError::cloud(format!("serializing {name}: {e}")))?;
        bytes.push(b'\n');
        let mut size = bytes.len().div_ceil(SIDECAR_BLOCK) * SIDECAR_BLOCK;
        if size as u64 > SIDECAR_MAX_BYTES {
            return Err(CpiError::cloud(format!(
                "{name}: {} bytes of JSON is more than a sidecar may hold ({SIDECAR_MAX_BYTES})",
                bytes.len()
            )));
        }
        let (vol, created) = match self.find_volume(pool, name)? {
            Some(vol) => (vol, false),
            None => match self.create_volume(pool, name, size as u64, DiskFormat::Raw) {
                Ok(vol) => (vol, true),
                // Lost a race with a concurrent writer of the same sidecar.
                Err(e) => (self.find_volume(pool, name)?.ok_or(e)?, false),
            },
        };
        // A volume made just now has the size asked for.
        let capacity = if created {
            size as u64
        } else {
            self.volume_capacity(&vol, name)?
        };
        if capacity < size as u64 {
            self.resize_volume(&vol, name, size as u64)?;
        } else {
            size = usize::try_from(capacity).unwrap_or(size);
        }
        bytes.resize(size, b' ');
        let written = self.write_volume(pool, &vol, name, &bytes);
        if written.is_err() && created {
            let _ = vol.delete(0);
        }
        written
    }

    /// Writes `record` as the marker of `volume`. Without its marker the
    /// volume is not usable, so a failure deletes both.
    pub fn mark_complete<T: Serialize>(
        &self,
        pool: &StoragePool,
        volume: &str,
        record: &T,
    ) -> Result<()> {
        let marker = marker_name(volume);
        if let Err(e) = self.write_json_volume(pool, &marker, record) {
            let _ = self.delete_volume(pool, &marker);
            let _ = self.delete_volume(pool, volume);
            return Err(e);
        }
        Ok(())
    }

    /// The JSON document in a sidecar volume, as a `T` (a `crate::records`
    /// record, or a plain `Value`); `None` when the volume is absent.
    pub fn read_json_volume<T: DeserializeOwned>(
        &self,
        pool: &StoragePool,
        name: &str,
    ) -> Result<Option<T>> {
        let Some(text) = self.read_sidecar_text(pool, name)? else {
            return Ok(None);
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            CpiError::cloud(format!(
                "volume {name} does not hold the JSON record expected: {e}"
            ))
        })
    }

    /// Whether `volume`'s marker exists and holds a JSON object. A marker
    /// whose write was killed or failed part-way holds zeros (its volume is
    /// created before the upload) or a torn document: for a sweep that is no
    /// marker, or the leftover would look complete forever.
    pub fn has_valid_marker(&self, pool: &StoragePool, volume: &str) -> Result<bool> {
        let Some(text) = self.read_sidecar_text(pool, &marker_name(volume))? else {
            return Ok(false);
        };
        Ok(matches!(
            serde_json::from_str::<serde_json::Value>(&text),
            Ok(serde_json::Value::Object(_))
        ))
    }

    /// A sidecar's text without its padding; `None` when the volume is absent.
    fn read_sidecar_text(&self, pool: &StoragePool, name: &str) -> Result<Option<String>> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(None);
        };
        let capacity = self.volume_capacity(&vol, name)?;
        if capacity > SIDECAR_MAX_BYTES {
            return Err(CpiError::cloud(format!(
                "reading volume {name}: {capacity} bytes is more than a sidecar may hold ({SIDECAR_MAX_BYTES})"
            )));
        }
        let bytes = self.read_volume(&vol, name, capacity)?;
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim_end_matches(|c: char| c.is_whitespace() || c == '\0');
        Ok(Some(text.to_string()))
    }

    /// The disks of a domain; `None` when the domain vanished meanwhile.
    pub fn domain_disks(&self, domain: &Domain, name: &str) -> Result<Option<DomainDisks>> {
        let Some((running, live, config)) = self.domain_xmls(domain, name)? else {
            return Ok(None);
        };
        DomainDisks::parse(name, running, live.as_deref(), &config).map(Some)
    }

    /// (running, live XML while running, persistent XML): one round trip
    /// for a domain that is shut off, two for one that runs.
    #[allow(clippy::type_complexity)]
    fn domain_xmls(
        &self,
        domain: &Domain,
        name: &str,
    ) -> Result<Option<(bool, Option<String>, String)>> {
        let Some(current) = not_found_as_none(
            domain.xml_desc(0),
            format!("reading the XML of domain {name}"),
        )?
        else {
            return Ok(None);
        };
        // An active (running or paused) domain's XML carries its id; a shut
        // off one's is its persistent definition.
        if !has_domain_id(&current)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of domain {name}: {e}")))?
        {
            return Ok(Some((false, None, current)));
        }
        let Some(config) = not_found_as_none(
            domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE),
            format!("reading the persistent XML of domain {name}"),
        )?
        else {
            return Ok(None);
        };
        Ok(Some((true, Some(current), config)))
    }

    /// Every domain (running or not, ours or not) whose live or persistent
    /// definition refers to the disk. The domains' XML is the only record of
    /// attachments, so this is how the CPI knows where a disk is.
    pub fn disk_holders(&self, r: &DiskRef) -> Result<Vec<Holder>> {
        let domains = self
            .conn()
            .list_all_domains(0)
            .map_err(|e| lv_error("listing domains", e))?;
        let path = r.path.map(xml_escape);
        let mut holders = Vec::new();
        for domain in domains {
            let Some(name) = not_found_as_none(domain.name(), "reading a domain name")? else {
                continue;
            };
            let Some((running, live, config)) = self.domain_xmls(&domain, &name)? else {
                continue;
            };
            let mentions =
                |xml: &str| xml.contains(r.cid) || path.as_deref().is_some_and(|p| xml.contains(p));
            if !(mentions(&config) || live.as_deref().is_some_and(mentions)) {
                continue;
            }
            let disks = DomainDisks::parse(&name, running, live.as_deref(), &config)?;
            if disks.holds(r) {
                holders.push(Holder {
                    domain: name,
                    disks,
                });
            }
        }
        Ok(holders)
    }

    /// Adds a device to the running domain (`live`) and/or its persistent
    /// definition (`config`).
    pub fn attach_disk_device(
        &self,
        domain: &Domain,
        name: &str,
        xml: &str,
        live: bool,
        config: bool,
    ) -> Result<()> {
        let mut flags = 0;
        if live {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if config {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        let what = match (live, config) {
            (true, true) => "live and persistent",
            (true, false) => "live",
            _ => "persistent",
        };
        domain
            .attach_device_flags(xml, flags)
            .map_err(|e| lv_error(format!("attaching disk to domain {name} ({what})"), e))
    }

    /// Removes a device from the persistent definition. A device already gone
    /// counts as removed.
    pub fn detach_disk_config(&self, domain: &Domain, name: &str, dev: &DiskDevice) -> Result<()> {
        match domain.detach_device_flags(&detach_xml(dev), sys::VIR_DOMAIN_AFFECT_CONFIG) {
            Ok(()) => Ok(()),
            Err(e) => {
                let still_there = self
                    .domain_disks(domain, name)?
                    .is_some_and(|d| d.config.iter().any(|c| c.target == dev.target));
                if still_there {
                    Err(lv_error(
                        format!(
                            "removing disk {} from the persistent definition of domain {name}",
                            dev.target
                        ),
                        e,
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Asks the guest to release a hot-plugged disk and waits until libvirt's
    /// live XML no longer shows it. libvirt itself may return "success" while
    /// the device is still there (the guest has not let go yet), so only the
    /// re-read XML counts.
    pub fn detach_disk_live(
        &self,
        domain: &Domain,
        name: &str,
        dev: &DiskDevice,
        r: &DiskRef,
        timeout: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let gone = |this: &Self| -> Result<bool> {
            Ok(match this.domain_disks(domain, name)? {
                None => true,
                Some(d) => !d.running || d.live_ref(r).is_none(),
            })
        };
        if let Err(e) = domain.detach_device_flags(&detach_xml(dev), sys::VIR_DOMAIN_AFFECT_LIVE) {
            if gone(self)? {
                return Ok(());
            }
            // A detach requested earlier (a previous attempt) is still pending:
            // keep waiting for it; anything else is a real failure.
            if !e.message().contains("in the process of unplug") {
                return Err(lv_error(
                    format!("detaching disk {} from running domain {name}", dev.target),
                    e,
                ));
            }
        }
        loop {
            if gone(self)? {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(CpiError::cloud(format!(
                    "disk {} ({}) is still attached to running domain {name} after {} s: \
                     the guest has not released it (is the disk still mounted or the guest hung?); \
                     the detach request stays pending, retry later",
                    r.cid,
                    dev.target,
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Ends a block copy of disk `target` that nobody watches any more: the
    /// live copy of a snapshot_disk that was killed (only the process that
    /// starts a copy ends it, and until then every snapshot and detach of the
    /// disk fails with "already in active block job"). A live snapshot_disk
    /// ends its copy within one poll of it being in sync; one that stays in
    /// sync for `ABANDONED_COPY_AFTER` is abandoned, and is cancelled here
    /// (the guest stays on its disk), and its destination is deleted when it
    /// is a snapshot volume of `pool` without a marker (a snapshot that never
    /// completed). Returns what was removed. A copy still in progress is an
    /// error the caller may retry.
    pub fn end_abandoned_copy(
        &self,
        pool: &StoragePool,
        domain: &Domain,
        name: &str,
        target: &str,
    ) -> Result<Option<String>> {
        let mirror = |this: &Self| -> Result<Option<DiskDevice>> {
            Ok(this.domain_disks(domain, name)?.and_then(|d| {
                d.live
                    .into_iter()
                    .find(|d| d.target == target && d.mirror_ready.is_some())
            }))
        };
        if mirror(self)?.is_none() {
            return Ok(None);
        }
        let deadline = Instant::now() + ABANDONED_COPY_AFTER;
        loop {
            std::thread::sleep(POLL_INTERVAL);
            let Some(dev) = mirror(self)? else {
                return Ok(None); // its owner ended it
            };
            if dev.mirror_ready != Some(true) {
                return Err(CpiError::cloud(format!(
                    "disk {target} of domain {name} is being copied (a snapshot_disk in progress, or one killed mid-copy whose copy this CPI ends once it completes); retry"
                ))
                .retryable(true));
            }
            if Instant::now() >= deadline {
                let c_target = CString::new(target).map_err(|e| CpiError::cloud(e.to_string()))?;
                // SAFETY: valid domain pointer and C string for the call.
                let rc =
                    unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), c_target.as_ptr(), 0) };
                if rc < 0 && mirror(self)?.is_some() {
                    return Err(lv_error(
                        format!("ending the abandoned copy of disk {target} of domain {name}"),
                        virt::error::Error::last_error(),
                    ));
                }
                return self.remove_unfinished_snapshot(pool, dev.mirror_path.as_deref());
            }
        }
    }

    fn remove_unfinished_snapshot(
        &self,
        pool: &StoragePool,
        path: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(vol_name) = path.and_then(|p| p.rsplit('/').next()) else {
            return Ok(None);
        };
        if !vol_name.starts_with(SNAPSHOT_PREFIX)
            || self.find_volume(pool, &marker_name(vol_name))?.is_some()
        {
            return Ok(None);
        }
        match self.find_volume(pool, vol_name)? {
            Some(vol) if Some(self.volume_path(&vol, vol_name)?.as_str()) == path => {
                self.delete_volume(pool, vol_name)?;
                Ok(Some(vol_name.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Copies a disk of a running domain into the existing, empty qcow2 volume
    /// at `dest_path` with a block copy (QEMU drive-mirror), then cancels the
    /// job once the copy is in sync: the destination then holds the disk as it
    /// was at that instant (crash-consistent, like pulling the plug), while the
    /// guest keeps running on the original. Gives up when the copy makes no
    /// progress for `stall_timeout`.
    pub fn live_block_copy(
        &self,
        domain: &Domain,
        name: &str,
        target: &str,
        dest_path: &str,
        stall_timeout: Duration,
    ) -> Result<()> {
        let doing = || format!("live copy of disk {target} of domain {name}");
        let dest_xml = format!(
            "<disk type='file'><source file='{}'/><driver type='qcow2'/></disk>",
            xml_escape(dest_path)
        );
        let c_target = CString::new(target).map_err(|e| CpiError::cloud(e.to_string()))?;
        let c_xml = CString::new(dest_xml).map_err(|e| CpiError::cloud(e.to_string()))?;
        let flags = sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
        // SAFETY: the domain pointer is valid for the life of `domain`; the
        // strings live until the call returns; no typed parameters are passed.
        let rc = unsafe {
            sys::virDomainBlockCopy(
                domain.as_ptr(),
                c_target.as_ptr(),
                c_xml.as_ptr(),
                std::ptr::null_mut(),
                0,
                flags,
            )
        };
        if rc < 0 {
            return Err(lv_error(doing(), virt::error::Error::last_error()));
        }
        let result = self.wait_mirror_ready(domain, name, target, &c_target, stall_timeout);
        // Cancelling (no pivot) leaves the guest on its original disk; after
        // "ready" QEMU finishes the copy as of this instant.
        // SAFETY: as above.
        let rc = unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), c_target.as_ptr(), 0) };
        let abort_error = (rc < 0).then(virt::error::Error::last_error);
        result?;
        if let Some(e) = abort_error {
            return Err(lv_error(format!("{}: ending the copy job", doing()), e));
        }
        // The job must be gone, or the copy is not known to be complete.
        let disks = self.domain_disks(domain, name)?.unwrap_or_default();
        if disks
            .live
            .iter()
            .any(|d| d.target == target && d.mirror_ready.is_some())
        {
            return Err(CpiError::cloud(format!(
                "{}: the copy job did not end",
                doing()
            )));
        }
        Ok(())
    }

    fn wait_mirror_ready(
        &self,
        domain: &Domain,
        name: &str,
        target: &str,
        c_target: &CString,
        stall_timeout: Duration,
    ) -> Result<()> {
        let mut last_progress = Instant::now();
        let mut last_cur = 0;
        loop {
            let mut info = sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // SAFETY: valid domain and string; `info` is a plain C struct we own.
            let rc = unsafe {
                sys::virDomainGetBlockJobInfo(domain.as_ptr(), c_target.as_ptr(), &mut info, 0)
            };
            if rc < 0 {
                return Err(lv_error(
                    format!("watching the live copy of disk {target} of domain {name}"),
                    virt::error::Error::last_error(),
                ));
            }
            if rc == 0 {
                return Err(CpiError::cloud(format!(
                    "the live copy of disk {target} of domain {name} ended before it was complete"
                )));
            }
            let ready = self
                .domain_disks(domain, name)?
                .unwrap_or_default()
                .live
                .iter()
                .any(|d| d.target == target && d.mirror_ready == Some(true));
            if ready {
                return Ok(());
            }
            if info.cur != last_cur {
                last_cur = info.cur;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= stall_timeout {
                return Err(CpiError::cloud(format!(
                    "the live copy of disk {target} of domain {name} made no progress for {} s \
                     ({} of {} bytes)",
                    stall_timeout.as_secs(),
                    info.cur,
                    info.end
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>vm-1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/vm-1-root' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/pool/sc-1'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/pool/vm-1-config.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/pool/disk-0f3a9c21b7e54d8' index='4'/>
      <backingStore/>
      <target dev='vdc' bus='virtio'/>
      <serial>disk-0f3a9c21b7e54d8</serial>
      <mirror type='file' file='/pool/snap' format='qcow2' job='copy' ready='yes'>
        <format type='qcow2'/>
        <source file='/pool/snap' index='5'/>
      </mirror>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='bosh' volume='disk-aaaaaaaaaaaaaaa'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
  </devices>
</domain>"#;

    #[test]
    fn parses_disks_ignoring_nested_sources() {
        let d = parse_domain_disks(LIVE).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].source_path.as_deref(), Some("/pool/vm-1-root"));
        assert_eq!(d[0].serial, None);
        assert_eq!(d[1].device, "cdrom");
        assert_eq!(d[2].serial.as_deref(), Some("disk-0f3a9c21b7e54d8"));
        assert_eq!(
            d[2].source_path.as_deref(),
            Some("/pool/disk-0f3a9c21b7e54d8")
        );
        assert_eq!(d[2].driver_type.as_deref(), Some("raw"));
        assert_eq!(d[2].mirror_ready, Some(true));
        assert_eq!(d[0].mirror_ready, None);
        assert_eq!(
            d[3].source_volume,
            Some(("bosh".into(), "disk-aaaaaaaaaaaaaaa".into()))
        );
    }

    #[test]
    fn disks_are_found_by_serial_path_or_volume() {
        let d = parse_domain_disks(LIVE).unwrap();
        let by_serial = DiskRef {
            cid: "disk-0f3a9c21b7e54d8",
            path: None,
            pool: "bosh",
        };
        assert!(d[2].refers_to(&by_serial));
        assert!(!d[0].refers_to(&by_serial));
        let by_path = DiskRef {
            cid: "disk-bbbbbbbbbbbbbbb",
            path: Some("/pool/vm-1-root"),
            pool: "bosh",
        };
        assert!(d[0].refers_to(&by_path));
        let by_volume = DiskRef {
            cid: "disk-aaaaaaaaaaaaaaa",
            path: Some("/elsewhere"),
            pool: "bosh",
        };
        assert!(d[3].refers_to(&by_volume));
        let other_pool = DiskRef {
            pool: "other",
            ..by_volume
        };
        assert!(!d[3].refers_to(&other_pool));
    }

    #[test]
    fn only_an_active_domains_xml_carries_an_id() {
        assert_eq!(has_domain_id(LIVE), Ok(true));
        let inactive = LIVE.replace(" id='3'", "");
        assert_eq!(has_domain_id(&inactive), Ok(false));
        // Only the root's own attributes count.
        let nested = "<domain type='qemu'><devices><disk id='1'/></devices></domain>";
        assert_eq!(has_domain_id(nested), Ok(false));
        assert!(has_domain_id("").is_err());
    }

    #[test]
    fn escaped_serials_and_bad_xml() {
        let xml = "<domain><devices><disk type='file' device='disk'><target dev='vdb'/>\
                   <serial>a&amp;b</serial></disk></devices></domain>";
        assert_eq!(
            parse_domain_disks(xml).unwrap()[0].serial.as_deref(),
            Some("a&b")
        );
        assert!(parse_domain_disks("<domain><devices><disk></devices>").is_err());
    }

    #[test]
    fn device_xml_round_trips() {
        let defaults = DiskOptions::default();
        let xml = disk_device_xml("/p/disk-1", DiskFormat::Raw, "vdc", "disk-1", &defaults);
        assert!(xml.contains("cache='none' discard='unmap'"), "{xml}");
        let scsi = DiskOptions {
            bus: crate::vm_spec::DiskBus::Scsi,
            cache: Some("writeback".into()),
            ..defaults.clone()
        };
        let s = disk_device_xml("/p/disk-1", DiskFormat::Raw, "sdd", "disk-1", &scsi);
        assert!(
            s.contains("cache='writeback'") && s.contains("bus='scsi'"),
            "{s}"
        );
        let wrapped = format!("<domain><devices>{xml}</devices></domain>");
        let d = &parse_domain_disks(&wrapped).unwrap()[0];
        assert_eq!(
            (
                d.kind.as_str(),
                d.target.as_str(),
                d.serial.as_deref(),
                d.driver_type.as_deref()
            ),
            ("file", "vdc", Some("disk-1"), Some("raw"))
        );
        let detach = format!("<domain><devices>{}</devices></domain>", detach_xml(d));
        assert_eq!(parse_domain_disks(&detach).unwrap()[0].target, "vdc");
    }
}
