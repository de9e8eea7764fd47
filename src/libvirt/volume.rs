//! Volumes in the dedicated pool, whatever they hold: creating, reading what
//! libvirt reports about them, growing, copying, deleting.
//!
//! For a `dir` pool libvirt PROBES a volume's format and backing store from
//! the file's first bytes; for a raw volume those bytes are the guest's, so
//! callers never trust the probed format over their own record.
//!
//! A VM's root disk is a qcow2 overlay whose backing store is the stemcell
//! volume, named with the stemcell's recorded format (never probed): no copy,
//! milliseconds whatever the stemcell's size.

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::xmltree::Element;
use super::xmlwrite::El;
use super::{is_not_found, lv_error, not_found_as_none, Libvirt};
use crate::error::{CpiError, ErrorKind, Result};
pub use crate::image::DiskFormat;
use crate::names;

pub use crate::host::{VolumeFacts, MIB};

fn volume_xml(name: &str, capacity: u64, format: DiskFormat) -> String {
    El::new("volume")
        .text_child("name", name)
        .child(El::new("capacity").attr("unit", "bytes").text(capacity))
        .child(El::new("allocation").attr("unit", "bytes").text(0))
        .child(
            El::new("target")
                .child(El::new("format").attr("type", format.as_str()))
                .child(El::new("permissions").text_child("mode", volume_mode(name))),
        )
        .to_compact()
}

/// Stemcells are public OS images that many VMs' overlays read: 0644. Every
/// other volume may hold secrets (the config drive carries the agent's
/// credentials) or a deployment's data: readable by its owner only (libvirt
/// hands a VM's images to the QEMU user when it starts the VM).
fn volume_mode(name: &str) -> &'static str {
    let base = names::volume_of_marker(name).unwrap_or(name);
    if names::is_stemcell_cid(base) {
        "0644"
    } else {
        "0600"
    }
}

impl Libvirt {
    /// A new, empty volume (allocation 0: sparse, nothing preallocated).
    pub fn create_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<StorageVol> {
        StorageVol::create_xml(pool, &volume_xml(name, capacity, format), 0).map_err(|e| {
            lv_error(
                format!(
                    "creating {format} volume {name} of {} MiB",
                    capacity.div_ceil(MIB)
                ),
                e,
            )
        })
    }

    /// A new volume holding a copy of `from` (libvirt copies raw to raw itself
    /// and runs `qemu-img convert` otherwise, taking the input format from its
    /// own probe of `from`: callers check that first).
    pub fn clone_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        from: &StorageVol,
        from_name: &str,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<StorageVol> {
        StorageVol::create_xml_from(pool, &volume_xml(name, capacity, format), from, 0).map_err(
            |e| {
                lv_error(
                    format!("copying volume {from_name} to new volume {name}"),
                    e,
                )
            },
        )
    }

    /// Format, sizes, backing store and mtime, freshly read from the file
    /// (libvirt refreshes a volume's facts when its XML is asked for; the
    /// XML holds the same allocation and file size as virStorageVolGetInfo
    /// and its VIR_STORAGE_VOL_GET_PHYSICAL variant): one round trip.
    pub fn volume_facts(&self, vol: &StorageVol, name: &str) -> Result<VolumeFacts> {
        self.xml_facts(vol, name)?.ok_or_else(|| {
            CpiError::cloud(format!("reading the XML of volume {name}: it was deleted"))
        })
    }

    /// The facts of volume `name` (a lookup and `volume_facts`); `None` when
    /// there is no such volume, also when it is deleted between the two (a
    /// disk's lock being released).
    pub fn find_volume_facts(&self, pool: &StoragePool, name: &str) -> Result<Option<VolumeFacts>> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(None);
        };
        self.xml_facts(&vol, name)
    }

    /// The facts in `vol`'s XML; `None` when it is gone.
    fn xml_facts(&self, vol: &StorageVol, name: &str) -> Result<Option<VolumeFacts>> {
        let doing = format!("reading the XML of volume {name}");
        let Some(xml) = not_found_as_none(vol.xml_desc(0), doing)? else {
            return Ok(None);
        };
        parse_volume_xml(&xml)
            .map(Some)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of volume {name}: {e}")))
    }

    /// Whether the file of volume `name` has not changed for more than
    /// `max_age` seconds before `host_now`, a time read on the libvirt host
    /// (the mtime of a volume the caller just created: no clock skew between
    /// CPI and host). False when libvirt reports no mtime or the volume is
    /// gone (deleted meanwhile by another process): a sweep then leaves it.
    pub fn volume_untouched_for(
        &self,
        pool: &StoragePool,
        name: &str,
        max_age: f64,
        host_now: f64,
    ) -> Result<bool> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(false);
        };
        // Asking for the XML makes libvirt re-read the file's timestamps.
        let xml = match vol.xml_desc(0) {
            Ok(x) => x,
            Err(_) if self.find_volume(pool, name)?.is_none() => return Ok(false),
            Err(e) => return Err(lv_error(format!("reading the XML of volume {name}"), e)),
        };
        let facts = parse_volume_xml(&xml)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of volume {name}: {e}")))?;
        Ok(facts.mtime.is_some_and(|m| host_now - m > max_age))
    }

    pub fn resize_volume(&self, vol: &StorageVol, name: &str, capacity: u64) -> Result<()> {
        vol.resize(capacity, 0).map_err(|e| {
            lv_error(
                format!("growing volume {name} to {} MiB", capacity.div_ceil(MIB)),
                e,
            )
        })
    }

    /// Deletes a volume; true if it was there. A volume that vanished in
    /// between (another process deleted it) counts as deleted.
    pub fn delete_volume(&self, pool: &StoragePool, name: &str) -> Result<bool> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(false);
        };
        match vol.delete(0) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(lv_error(format!("deleting volume {name}"), e)),
        }
    }

    /// Every volume in the pool. libvirt's plain name listing
    /// (`virStoragePoolListVolumes`, the `virt` crate's `list_volumes`) stops
    /// at 1,024 names; whatever decides what to keep or delete must see them
    /// all, so this uses the complete object listing.
    pub fn volume_names(&self, pool: &StoragePool) -> Result<Vec<String>> {
        let doing = "listing the volumes of the storage pool";
        pool.list_all_volumes(0)
            .map_err(|e| lv_error(doing, e))?
            .iter()
            .map(|v| v.name().map_err(|e| lv_error(doing, e)))
            .collect()
    }

    /// Free bytes in the pool. With `recount` the pool is refreshed first, so
    /// space used by others is counted (a refresh re-reads every volume, and
    /// fails while another CPI builds a volume in the pool: the last known
    /// figure is then good enough).
    pub fn pool_available(&self, pool: &StoragePool, recount: bool) -> Result<u64> {
        if recount {
            let _ = pool.refresh(0);
        }
        let info = pool
            .info()
            .map_err(|e| lv_error("reading storage pool info", e))?;
        Ok(info.available)
    }
}

/// What a failed write of `data` to volume `name` was doing, for its error.
fn writing(name: &str, data: &[u8]) -> String {
    format!("writing {} bytes to volume {name}", data.len())
}

/// A qcow2 overlay of `capacity` bytes on the volume at `backing_path`.
pub fn overlay_xml(
    name: &str,
    backing_path: &str,
    backing_format: DiskFormat,
    capacity: u64,
) -> String {
    El::new("volume")
        .text_child("name", name)
        .child(El::new("capacity").attr("unit", "bytes").text(capacity))
        .child(El::new("target").child(El::new("format").attr("type", "qcow2")))
        .child(
            El::new("backingStore")
                .text_child("path", backing_path)
                .child(El::new("format").attr("type", backing_format.as_str())),
        )
        .to_compact()
}

impl Libvirt {
    /// A thin qcow2 overlay on `backing_path`, whose format is given (so the
    /// backing image is never probed).
    pub fn create_overlay(
        &self,
        pool: &StoragePool,
        name: &str,
        backing_path: &str,
        backing_format: DiskFormat,
        capacity: u64,
    ) -> Result<StorageVol> {
        let xml = overlay_xml(name, backing_path, backing_format, capacity);
        StorageVol::create_xml(pool, &xml, 0).map_err(|e| {
            lv_error(
                format!(
                    "creating root overlay {name} on {backing_path} ({} MiB)",
                    capacity.div_ceil(MIB)
                ),
                e,
            )
        })
    }

    /// Replaces the first `data.len()` bytes of `vol` with `data`, and reads
    /// them back (`verify_written`).
    pub fn write_volume(
        &self,
        pool: &StoragePool,
        vol: &StorageVol,
        name: &str,
        data: &[u8],
    ) -> Result<()> {
        self.upload_bytes(vol, name, data)?;
        self.verify_written(pool, vol, name, data)
    }

    /// Uploads `data` over the first bytes of `vol`.
    pub(super) fn upload_bytes(&self, vol: &StorageVol, name: &str, data: &[u8]) -> Result<()> {
        let doing = || writing(name, data);
        let mut upload = self
            .start_upload(vol, data.len() as u64, false)
            .map_err(|e| e.context(doing()))?;
        upload.send(data).map_err(|e| e.context(doing()))?;
        upload.finish().map_err(|e| e.context(doing()))
    }

    /// Whether `vol` reads back as `data`: on a full pool libvirt confirms an
    /// upload whose writes failed, leaving zeros where the record should be.
    /// A record only counts once it reads back as written.
    pub(super) fn verify_written(
        &self,
        pool: &StoragePool,
        vol: &StorageVol,
        name: &str,
        data: &[u8],
    ) -> Result<()> {
        let back = self.read_volume(vol, name, data.len() as u64)?;
        if back != data {
            let free = self.pool_available(pool, true).unwrap_or(0);
            let message = format!(
                "{}: the volume does not read back what was written ({free} bytes free in the pool)",
                writing(name, data)
            );
            return Err(if free < MIB {
                CpiError::new(ErrorKind::NoDiskSpace, message)
            } else {
                CpiError::cloud(message)
            });
        }
        Ok(())
    }

    /// The first `length` bytes of `vol`.
    pub fn read_volume(&self, vol: &StorageVol, name: &str, length: u64) -> Result<Vec<u8>> {
        let doing = || format!("reading volume {name}");
        let stream = Stream::new(self.conn(), 0).map_err(|e| lv_error(doing(), e))?;
        vol.download(&stream, 0, length, 0)
            .map_err(|e| lv_error(doing(), e))?;
        let mut out = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n as usize]),
                Ok(_) => {
                    let _ = stream.abort();
                    return Err(CpiError::cloud(format!("{}: stream error", doing())));
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(lv_error(doing(), e));
                }
            }
            if out.len() as u64 > length {
                let _ = stream.abort();
                return Err(CpiError::cloud(format!(
                    "{}: more data than asked for",
                    doing()
                )));
            }
        }
        stream.finish().map_err(|e| lv_error(doing(), e))?;
        Ok(out)
    }

    /// The volume's path on the libvirt host.
    pub fn volume_path(&self, vol: &StorageVol, name: &str) -> Result<String> {
        vol.path()
            .map_err(|e| lv_error(format!("reading the path of volume {name}"), e))
    }

    /// Names of the pool's volumes that start with `prefix`.
    pub fn volume_names_with_prefix(
        &self,
        pool: &StoragePool,
        prefix: &str,
    ) -> Result<Vec<String>> {
        Ok(self
            .volume_names(pool)?
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect())
    }
}

/// Picks what we need out of a volume's XML. The format is the `<target>`'s:
/// the one inside `<backingStore>` describes the backing image.
pub fn parse_volume_xml(xml: &str) -> std::result::Result<VolumeFacts, String> {
    let root = Element::parse(xml)?;
    if root.name != "volume" {
        return Ok(VolumeFacts::default());
    }
    // Sizes are in bytes (libvirt writes unit='bytes'); an absent one is 0.
    let bytes = |name: &str| match root.text_at(&[name]) {
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| format!("{name} '{text}' is not a number")),
        None => Ok(0),
    };
    let capacity = bytes("capacity")?;
    Ok(VolumeFacts {
        path: root
            .text_at(&["target", "path"])
            .unwrap_or_default()
            .to_string(),
        format: root
            .at(&["target", "format"])
            .and_then(|f| f.attr("type"))
            .map(str::to_string),
        capacity,
        allocation: bytes("allocation")?,
        physical: bytes("physical")?,
        backing_path: root.text_at(&["backingStore", "path"]).map(str::to_string),
        mtime: root
            .text_at(&["target", "timestamps", "mtime"])
            .and_then(|t| t.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_xml_facts() {
        let xml = "<volume type='file'>\n  <name>vm-1-root</name>\n  <capacity unit='bytes'>1073741824</capacity>\n  <allocation unit='bytes'>200704</allocation>\n  <physical unit='bytes'>196616</physical>\n  <target>\n    <path>/pool/vm-1-root</path>\n    <format type='qcow2'/>\n    <timestamps>\n      <atime>1795372300.888159534</atime>\n      <mtime>1795372300.924159532</mtime>\n    </timestamps>\n  </target>\n  <backingStore>\n    <path>/pool/sc-x</path>\n    <format type='qcow2'/>\n  </backingStore>\n</volume>\n";
        let f = parse_volume_xml(xml).unwrap();
        assert_eq!(f.path, "/pool/vm-1-root");
        assert_eq!(f.format.as_deref(), Some("qcow2"));
        assert_eq!(f.capacity, 1 << 30);
        assert_eq!(f.backing_path.as_deref(), Some("/pool/sc-x"));
        assert!((f.mtime.unwrap() - 1_795_372_300.924).abs() < 0.001);
        assert_eq!((f.allocation, f.physical), (200704, 196616));
        let f = parse_volume_xml(
            "<volume><capacity>5</capacity><target><format type='raw'/></target></volume>",
        )
        .unwrap();
        assert_eq!((f.capacity, f.backing_path, f.mtime), (5, None, None));
        assert!(parse_volume_xml("<volume><capacity>x</capacity></volume>").is_err());
    }

    #[test]
    fn overlays_name_their_backing_format() {
        let xml = overlay_xml("vm-1-root", "/p/sc-1", DiskFormat::Raw, 128 << 20);
        let f = parse_volume_xml(&xml.replace("<target>", "<target><path>/p/vm-1-root</path>"))
            .unwrap();
        assert_eq!(f.format.as_deref(), Some("qcow2"));
        assert_eq!(f.backing_path.as_deref(), Some("/p/sc-1"));
        assert_eq!(f.capacity, 128 << 20);
        assert!(xml.contains("<format type='raw'/></backingStore>"), "{xml}");
    }

    #[test]
    fn only_stemcells_are_world_readable() {
        let sc = "sc-2f7d3c9e-8a41-4c55-b6f0-0a9e3d12c4b7";
        assert_eq!(volume_mode(sc), "0644");
        assert_eq!(volume_mode(&format!("{sc}.meta")), "0644");
        for name in [
            "vm-1-config.iso",
            "vm-1-ephemeral",
            "disk-0f3a9c21b7e54d8",
            "disk-0f3a9c21b7e54d8.tags",
            "snap-x",
        ] {
            assert_eq!(volume_mode(name), "0600", "{name}");
        }
        assert!(volume_xml("vm-1-config.iso", 1, DiskFormat::Raw).contains("<mode>0600</mode>"));
    }

    #[test]
    fn the_format_is_the_targets_not_the_backing_stores() {
        let xml = "<volume type='file'><name>d</name><target><path>/p/d</path>\
                   <format type='qcow2'/></target><backingStore><path>/etc/hostname</path>\
                   <format type='raw'/></backingStore></volume>";
        let f = parse_volume_xml(xml).unwrap();
        assert_eq!(f.format.as_deref(), Some("qcow2"));
        assert_eq!(f.backing_path.as_deref(), Some("/etc/hostname"));
        let plain = "<volume><target><format type='raw'/></target><backingStore/></volume>";
        let f = parse_volume_xml(plain).unwrap();
        assert_eq!((f.format.as_deref(), f.backing_path), (Some("raw"), None));
    }

    #[test]
    fn hostile_names_and_paths_stay_values() {
        for v in crate::libvirt::xmlwrite::HOSTILE {
            let root = Element::parse(&volume_xml(v, 1, DiskFormat::Raw)).unwrap();
            assert_eq!(root.child("name").unwrap().text, *v);
            let names: Vec<_> = root.children.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, ["name", "capacity", "allocation", "target"]);
            let root = Element::parse(&overlay_xml(v, v, DiskFormat::Raw, 1)).unwrap();
            assert_eq!(root.child("name").unwrap().text, *v);
            assert_eq!(root.at(&["backingStore", "path"]).unwrap().text, *v);
            assert_eq!(
                root.at(&["backingStore", "format"]).unwrap().attr("type"),
                Some("raw")
            );
            assert_eq!(root.children.len(), 4);
        }
    }
}
