//! Stemcell volumes in the dedicated pool (naming.md): the image `sc-<uuid>`
//! and its completion marker `sc-<uuid>.meta`, created only after the image
//! was uploaded and verified. A stemcell exists iff both volumes do, so a
//! crash mid-import can never leave something `create_vm` would accept.
//!
//! Leftovers are image volumes without a marker. The one being imported by a
//! live process is written to all the time, so its modification time stays
//! fresh; `sweep_partial_stemcells` only removes those whose file has not
//! changed for `PARTIAL_MAX_AGE_SECS`, judged against a timestamp taken on the
//! libvirt host itself (no clock skew between CPI and host).

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{is_not_found, lv_error, xml_escape, Libvirt};
use crate::cid::is_stemcell_cid;
use crate::error::{CpiError, Result};

/// A marker-less stemcell volume untouched this long is a leftover of a
/// killed import (a live upload writes continuously; keepalive ends a dead
/// connection within a minute).
pub const PARTIAL_MAX_AGE_SECS: f64 = 30.0 * 60.0;

pub fn marker_name(cid: &str) -> String {
    format!("{cid}.meta")
}

/// What libvirt reports about a volume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeFacts {
    pub path: String,
    pub format: Option<String>,
    pub capacity: u64,
    /// Size of the file (libvirt's "physical").
    pub physical: u64,
    pub backing_path: Option<String>,
    /// Modification time on the libvirt host, seconds since the epoch.
    pub mtime: Option<f64>,
}

impl Libvirt {
    /// The stemcell's image volume, only when the import completed (marker
    /// present). `None` for anything else, including a CID that is not ours.
    pub fn find_stemcell(&self, pool: &StoragePool, cid: &str) -> Result<Option<StorageVol>> {
        if !is_stemcell_cid(cid) {
            return Ok(None);
        }
        if self.find_volume(pool, &marker_name(cid))?.is_none() {
            return Ok(None);
        }
        self.find_volume(pool, cid)
    }

    /// Creates an empty volume (allocation 0: sparse, nothing preallocated).
    pub fn create_volume(
        &self,
        pool: &StoragePool,
        name: &str,
        format: &str,
        capacity: u64,
    ) -> Result<StorageVol> {
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
             <allocation unit='bytes'>0</allocation><target><format type='{}'/>\
             <permissions><mode>0644</mode></permissions></target></volume>",
            xml_escape(name),
            xml_escape(format)
        );
        StorageVol::create_xml(pool, &xml, 0).map_err(|e| {
            lv_error(
                format!("creating {format} volume {name} of {capacity} bytes"),
                e,
            )
        })
    }

    /// Deletes a volume; true if it was there. A volume that vanished in
    /// between (another process deleted it) counts as deleted.
    pub fn delete_volume_if_exists(&self, pool: &StoragePool, name: &str) -> Result<bool> {
        let Some(vol) = self.find_volume(pool, name)? else {
            return Ok(false);
        };
        match vol.delete(0) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(lv_error(format!("deleting volume {name}"), e)),
        }
    }

    /// Format, sizes, backing store and mtime, freshly read from the file
    /// (libvirt refreshes a volume's facts when its XML is asked for).
    pub fn volume_facts(&self, vol: &StorageVol, name: &str) -> Result<VolumeFacts> {
        let xml = vol
            .xml_desc(0)
            .map_err(|e| lv_error(format!("reading the XML of volume {name}"), e))?;
        let mut facts = parse_volume_xml(&xml)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of volume {name}: {e}")))?;
        let info = vol
            .info_flags(virt::sys::VIR_STORAGE_VOL_GET_PHYSICAL)
            .map_err(|e| lv_error(format!("reading the size of volume {name}"), e))?;
        facts.physical = info.allocation;
        Ok(facts)
    }

    /// Writes a small raw volume holding `content` (the completion marker).
    pub fn write_small_volume(&self, pool: &StoragePool, name: &str, content: &[u8]) -> Result<()> {
        let vol = self.create_volume(pool, name, "raw", content.len() as u64)?;
        let written = self
            .start_upload(&vol, content.len() as u64, false)
            .and_then(|mut up| {
                up.send(content)?;
                up.finish()
            });
        if let Err(e) = written {
            let _ = vol.delete(0);
            return Err(e.context(format!("writing volume {name}")));
        }
        Ok(())
    }

    /// Names of the volumes in the pool whose backing store is `path`.
    pub fn volumes_backed_by(&self, pool: &StoragePool, path: &str) -> Result<Vec<String>> {
        let mut users = Vec::new();
        for name in self.volume_names(pool)? {
            if is_stemcell_cid(&name) || name.ends_with(".meta") {
                continue;
            }
            let Some(vol) = self.find_volume(pool, &name)? else {
                continue;
            };
            let xml = match vol.xml_desc(0) {
                Ok(x) => x,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(lv_error(format!("reading the XML of volume {name}"), e)),
            };
            let facts = parse_volume_xml(&xml)
                .map_err(|e| CpiError::cloud(format!("parsing the XML of volume {name}: {e}")))?;
            if facts.backing_path.as_deref() == Some(path) {
                users.push(name);
            }
        }
        Ok(users)
    }

    pub fn volume_names(&self, pool: &StoragePool) -> Result<Vec<String>> {
        pool.list_volumes()
            .map_err(|e| lv_error("listing the volumes of the storage pool", e))
    }

    /// Removes stemcell leftovers: image volumes without a marker whose file
    /// has not changed for `max_age` seconds before `host_now` (a time read on
    /// the libvirt host), and markers whose image is gone. Never `keep`.
    /// Returns what it removed.
    pub fn sweep_partial_stemcells(
        &self,
        pool: &StoragePool,
        host_now: f64,
        max_age: f64,
        keep: &str,
    ) -> Result<Vec<String>> {
        let names = self.volume_names(pool)?;
        let has = |n: &str| names.iter().any(|x| x == n);
        let mut removed = Vec::new();
        for name in &names {
            if name == keep {
                continue;
            }
            if is_stemcell_cid(name) && !has(&marker_name(name)) {
                let Some(vol) = self.find_volume(pool, name)? else {
                    continue;
                };
                let facts = match self.volume_facts(&vol, name) {
                    Ok(f) => f,
                    // Deleted under our feet by another sweep or delete.
                    Err(_) if self.find_volume(pool, name)?.is_none() => continue,
                    Err(e) => return Err(e),
                };
                let Some(mtime) = facts.mtime else { continue };
                if host_now - mtime > max_age && self.delete_volume_if_exists(pool, name)? {
                    removed.push(name.clone());
                }
            } else if let Some(base) = name.strip_suffix(".meta") {
                // A marker is written after its image and deleted before it:
                // one without an image is garbage whatever its age.
                if is_stemcell_cid(base) && base != keep && !has(base) {
                    // Re-check: the listing may predate the image's creation.
                    if self.find_volume(pool, base)?.is_none()
                        && self.delete_volume_if_exists(pool, name)?
                    {
                        removed.push(name.clone());
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// Picks what we need out of a volume's XML.
pub fn parse_volume_xml(xml: &str) -> std::result::Result<VolumeFacts, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut facts = VolumeFacts::default();
    loop {
        let event = reader.read_event().map_err(|e| e.to_string())?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name == "format" && stack_is(&stack, &["volume", "target"]) {
                    for a in e.attributes().flatten() {
                        if a.key.as_ref() == b"type" {
                            facts.format = Some(String::from_utf8_lossy(&a.value).into_owned());
                        }
                    }
                }
                // Empty elements have no children and no End event.
                if matches!(event, Event::Start(_)) {
                    stack.push(name);
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| e.to_string())?.trim().to_string();
                if stack_is(&stack, &["volume", "capacity"]) {
                    facts.capacity = text
                        .parse()
                        .map_err(|_| format!("capacity '{text}' is not a number"))?;
                } else if stack_is(&stack, &["volume", "target", "path"]) {
                    facts.path = text;
                } else if stack_is(&stack, &["volume", "backingStore", "path"]) {
                    facts.backing_path = Some(text);
                } else if stack_is(&stack, &["volume", "target", "timestamps", "mtime"]) {
                    facts.mtime = text.parse().ok();
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(facts)
}

fn stack_is(stack: &[String], path: &[&str]) -> bool {
    stack.len() == path.len() && stack.iter().zip(path).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_xml_facts() {
        let xml = "<volume type='file'>\n  <name>vm-1-root</name>\n  <capacity unit='bytes'>1073741824</capacity>\n  <allocation unit='bytes'>200704</allocation>\n  <target>\n    <path>/pool/vm-1-root</path>\n    <format type='qcow2'/>\n    <timestamps>\n      <atime>1795372300.888159534</atime>\n      <mtime>1795372300.924159532</mtime>\n    </timestamps>\n  </target>\n  <backingStore>\n    <path>/pool/sc-x</path>\n    <format type='qcow2'/>\n  </backingStore>\n</volume>\n";
        let f = parse_volume_xml(xml).unwrap();
        assert_eq!(f.path, "/pool/vm-1-root");
        assert_eq!(f.format.as_deref(), Some("qcow2"));
        assert_eq!(f.capacity, 1 << 30);
        assert_eq!(f.backing_path.as_deref(), Some("/pool/sc-x"));
        assert!((f.mtime.unwrap() - 1_795_372_300.924).abs() < 0.001);
        let f = parse_volume_xml(
            "<volume><capacity>5</capacity><target><format type='raw'/></target></volume>",
        )
        .unwrap();
        assert_eq!((f.capacity, f.backing_path, f.mtime), (5, None, None));
        assert!(parse_volume_xml("<volume><capacity>x</capacity></volume>").is_err());
    }
}
