//! Sidecar volumes: small JSON records kept in the pool beside the volumes
//! they describe (stemcells, disks, snapshots, VMs), and the markers that say
//! a volume is complete.

use serde::de::DeserializeOwned;
use serde::Serialize;
use virt::storage_pool::StoragePool;

use crate::error::{CpiError, Result};
use crate::libvirt::volume::MIB;
use crate::libvirt::Libvirt;
use crate::names::marker_name;

/// Sidecar volumes never need to be large; a bigger one is not ours to read.
const SIDECAR_MAX_BYTES: u64 = MIB;
const SIDECAR_BLOCK: usize = 4096;

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
        let size = bytes.len().div_ceil(SIDECAR_BLOCK) * SIDECAR_BLOCK;
        if size as u64 > SIDECAR_MAX_BYTES {
            return Err(CpiError::cloud(format!(
                "{name}: {} bytes of JSON is more than a sidecar may hold ({SIDECAR_MAX_BYTES})",
                bytes.len()
            )));
        }
        bytes.resize(size, b' ');
        // Most records are new: created first, looked up only when refused
        // (the record exists, or a concurrent writer of it won a race).
        let vol = match self.create_volume_staged(pool, name, &bytes) {
            Ok(_) => return Ok(()),
            Err(e) => self.find_volume(pool, name)?.ok_or(e)?,
        };
        // Replacing a sidecar's content uploads in place (a reader sees the
        // old or the new document); libvirt then re-reads the pool.
        let capacity = self.volume_facts(&vol, name)?.capacity;
        if capacity < size as u64 {
            self.resize_volume(&vol, name, size as u64)?;
        } else {
            bytes.resize(usize::try_from(capacity).unwrap_or(size), b' ');
        }
        self.write_volume(pool, &vol, name, &bytes)
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
        let capacity = self.volume_facts(&vol, name)?.capacity;
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
}
