//! Volumes a VM owns, in the dedicated pool: the root disk as a thin qcow2
//! overlay on the stemcell (no copy, whatever the stemcell's size), a sparse
//! raw ephemeral disk, the config-drive ISO (created and uploaded from
//! memory), and deleting volumes by name or by name prefix.
//!
//! Every error says which volume and what was being done; errors a retry may
//! cure carry `ok_to_retry` (see `classified_error`).

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::domain::classified_error;
use super::xmltree::Element;
use super::{xml_escape, Libvirt};
use crate::error::{CpiError, Result};

/// What a volume's XML says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    pub path: String,
    /// `qcow2`, `raw`, ...
    pub format: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Path of the backing store, for overlays.
    pub backing_path: Option<String>,
}

impl VolumeFacts {
    pub fn from_xml(xml: &str) -> std::result::Result<VolumeFacts, String> {
        let root = Element::parse(xml)?;
        let path = root
            .at(&["target", "path"])
            .map(|p| p.text_trimmed().to_string())
            .ok_or("volume XML has no target path")?;
        let format = root
            .at(&["target", "format"])
            .and_then(|f| f.attr("type"))
            .unwrap_or("raw")
            .to_string();
        let capacity_el = root.child("capacity").ok_or("volume XML has no capacity")?;
        let capacity = scaled_bytes(capacity_el.text_trimmed(), capacity_el.attr("unit"))?;
        let backing_path = root
            .at(&["backingStore", "path"])
            .map(|p| p.text_trimmed().to_string());
        Ok(VolumeFacts {
            path,
            format,
            capacity,
            backing_path,
        })
    }
}

fn scaled_bytes(value: &str, unit: Option<&str>) -> std::result::Result<u64, String> {
    let n: u64 = value
        .parse()
        .map_err(|_| format!("volume size '{value}' is not an integer"))?;
    let factor: u64 = match unit.unwrap_or("bytes") {
        "b" | "bytes" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        other => return Err(format!("unexpected volume size unit '{other}'")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("volume size {value} {unit:?} overflows"))
}

pub fn overlay_xml(name: &str, backing: &VolumeFacts, capacity: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <target><format type='qcow2'/></target>\
         <backingStore><path>{}</path><format type='{}'/></backingStore></volume>",
        xml_escape(name),
        xml_escape(&backing.path),
        xml_escape(&backing.format)
    )
}

pub fn raw_volume_xml(name: &str, capacity: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>",
        xml_escape(name)
    )
}

/// Upload chunk size: libvirt's RPC messages carry at most 256 KiB of stream data.
const UPLOAD_CHUNK: usize = 256 * 1024;

impl Libvirt {
    pub fn volume_facts(&self, vol: &StorageVol, name: &str) -> Result<VolumeFacts> {
        let xml = vol
            .xml_desc(0)
            .map_err(|e| classified_error(format!("reading volume {name}"), e))?;
        VolumeFacts::from_xml(&xml)
            .map_err(|e| CpiError::cloud(format!("parsing volume {name}: {e}")))
    }

    /// A qcow2 overlay whose backing store is `backing` (named with its format,
    /// so the image is never probed), `capacity` bytes large.
    pub fn create_overlay(
        &self,
        pool: &StoragePool,
        name: &str,
        backing: &VolumeFacts,
        capacity: u64,
    ) -> Result<StorageVol> {
        StorageVol::create_xml(pool, &overlay_xml(name, backing, capacity), 0).map_err(|e| {
            classified_error(
                format!(
                    "creating root overlay {name} on {} ({} bytes)",
                    backing.path, capacity
                ),
                e,
            )
        })
    }

    /// A sparse raw volume (allocates nothing up front).
    pub fn create_raw_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        capacity: u64,
    ) -> Result<StorageVol> {
        StorageVol::create_xml(pool, &raw_volume_xml(name, capacity), 0).map_err(|e| {
            classified_error(format!("creating raw volume {name} ({capacity} bytes)"), e)
        })
    }

    /// Writes `data` into the volume from offset 0 through a libvirt stream,
    /// so the libvirt host may be remote.
    pub fn upload_volume(&self, vol: &StorageVol, name: &str, data: &[u8]) -> Result<()> {
        let doing = || format!("uploading {} bytes to volume {name}", data.len());
        let stream = Stream::new(self.conn(), 0).map_err(|e| classified_error(doing(), e))?;
        vol.upload(&stream, 0, data.len() as u64, 0)
            .map_err(|e| classified_error(doing(), e))?;
        let mut sent = 0;
        while sent < data.len() {
            let end = (sent + UPLOAD_CHUNK).min(data.len());
            match stream.send(&data[sent..end]) {
                Ok(n) if n > 0 => sent += n as usize,
                Ok(_) => {
                    let _ = stream.abort();
                    return Err(CpiError::cloud(format!(
                        "{}: the stream accepted no data",
                        doing()
                    )));
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(classified_error(doing(), e));
                }
            }
        }
        stream.finish().map_err(|e| classified_error(doing(), e))
    }

    /// Deletes the named volume. Ok(false) when it does not exist.
    pub fn delete_volume_named(&self, pool: &StoragePool, name: &str) -> Result<bool> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(false);
        };
        match vol.delete(0) {
            Ok(()) => Ok(true),
            Err(e) if super::is_not_found(&e) => Ok(false),
            Err(e) => Err(classified_error(format!("deleting volume {name}"), e)),
        }
    }

    /// Names of the pool's volumes that start with `prefix`, as libvirt knows them.
    pub fn volume_names_with_prefix(
        &self,
        pool: &StoragePool,
        prefix: &str,
    ) -> Result<Vec<String>> {
        let names = pool
            .list_volumes()
            .map_err(|e| classified_error("listing the pool's volumes", e))?;
        Ok(names
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_volume_facts() {
        let xml = "<volume type='file'><name>sc-1</name><key>/p/sc-1</key>\
            <capacity unit='bytes'>67108864</capacity><allocation unit='bytes'>1</allocation>\
            <target><path>/p/sc-1</path><format type='qcow2'/></target></volume>";
        let f = VolumeFacts::from_xml(xml).unwrap();
        assert_eq!(f.path, "/p/sc-1");
        assert_eq!(f.format, "qcow2");
        assert_eq!(f.capacity, 64 << 20);
        assert_eq!(f.backing_path, None);
        let ov = overlay_xml("vm-1-root", &f, 128 << 20);
        let back =
            VolumeFacts::from_xml(&ov.replace("<target>", "<target><path>/p/vm-1-root</path>"))
                .unwrap();
        assert_eq!(back.backing_path.as_deref(), Some("/p/sc-1"));
        assert_eq!(back.capacity, 128 << 20);
        assert!(ov.contains("<format type='qcow2'/></backingStore>"));
        assert_eq!(scaled_bytes("2", Some("GiB")).unwrap(), 2 << 30);
        assert!(scaled_bytes("1", Some("PiB")).is_err());
    }
}
