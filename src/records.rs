//! The JSON records the CPI keeps in sidecar volumes (named by
//! `crate::names`): one struct per kind, written and read only through these.
//!
//! Older versions wrote the same records with serde_json's `json!`, whose
//! maps sort their keys; the fields below are declared in that (alphabetical)
//! order and `None` options are written as `null` where the old writer wrote
//! `null`, so a record written now has exactly the old bytes. Reading
//! tolerates missing fields (`#[serde(default)]`): disks, stemcells and
//! snapshots made by older versions keep working; unknown fields are ignored.

use serde::{Deserialize, Serialize};

use crate::method::Object;
use crate::vm_spec::DiskOptions;

/// `<disk cid>.meta`: what create_disk decided, written once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskRecord {
    /// Attach options (`DiskOptions`); absent from records made before them.
    pub bus: Option<String>,
    pub cache: Option<String>,
    pub created_at: Option<String>,
    pub discard: Option<String>,
    /// "qcow2" or "raw": how the disk is read (never probed, see `disk_record`).
    pub format: Option<String>,
    /// The disk's holder is recorded in `<disk cid>.holder` (see `holder`);
    /// false for disks made before holder records existed.
    pub holder_record: bool,
    pub io: Option<String>,
    pub size_mib: Option<u64>,
    /// The snapshot the disk was made from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_snapshot: Option<String>,
}

impl DiskRecord {
    /// The record of a disk create_disk is making now.
    pub fn new(
        format: &str,
        size_mib: u64,
        source_snapshot: Option<&str>,
        options: &DiskOptions,
    ) -> DiskRecord {
        DiskRecord {
            bus: Some(options.bus.as_str().to_string()),
            cache: options.cache.clone(),
            created_at: Some(crate::log::timestamp()),
            discard: Some(options.discard.clone()),
            format: Some(format.to_string()),
            holder_record: true,
            io: options.io.clone(),
            size_mib: Some(size_mib),
            source_snapshot: source_snapshot.map(str::to_string),
        }
    }

    /// The attach options recorded; a record of an older CPI (no options)
    /// gives the defaults.
    pub fn options(&self) -> Result<DiskOptions, String> {
        let mut cp = Object::new();
        for (k, v) in [
            ("bus", &self.bus),
            ("cache", &self.cache),
            ("io", &self.io),
            ("discard", &self.discard),
        ] {
            if let Some(v) = v {
                cp.insert(k.to_string(), v.clone().into());
            }
        }
        DiskOptions::parse(&cp, "")
    }
}

/// `<disk cid>.tags`: the director's metadata, replaced by set_disk_metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TagsRecord {
    pub metadata: Object,
    pub updated_at: String,
}

/// `<disk cid>.holder`: the VM the disk is (being) attached to. `vm` must be
/// there: `null` means nobody, a record without it is unreadable (and the
/// holder is then looked for in every domain).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderRecord {
    #[serde(deserialize_with = "Option::deserialize")]
    pub vm: Option<String>,
}

/// `<stemcell cid>.meta`: what create_stemcell found in the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StemcellRecord {
    /// The stemcell's cloud_properties as the director gave them.
    pub cloud_properties: Object,
    /// How the image came ("gzipped tar", "tar", "bare image file").
    pub container: Option<String>,
    /// "qcow2" or "raw", as create_stemcell checked it.
    pub format: Option<String>,
    pub image_size: Option<u64>,
    pub stemcell_cid: Option<String>,
    /// The size a guest sees; absent: the volume's capacity.
    pub virtual_size: Option<u64>,
}

/// `<snapshot cid>.meta`: what snapshot_disk copied, and how.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotRecord {
    pub capacity_bytes: u64,
    /// "exact: ..." or "crash-consistent: ...".
    pub consistency: String,
    pub created_at: String,
    pub disk_cid: String,
    pub disk_format: String,
    /// The metadata the director passed to snapshot_disk.
    pub metadata: Object,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn bytes<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    /// What the older versions' `json!` wrote, byte for byte.
    #[test]
    fn records_keep_the_old_bytes() {
        let options = DiskOptions::default();
        let mut disk = DiskRecord::new("qcow2", 64, None, &options);
        disk.created_at = Some("2026-12-07T06:00:00.000Z".into());
        let mut old = json!({
            "format": "qcow2",
            "size_mib": 64,
            "created_at": "2026-12-07T06:00:00.000Z",
            "holder_record": true,
        });
        if let (Value::Object(r), Value::Object(o)) = (
            &mut old,
            json!({"bus": options.bus.as_str(), "cache": options.cache, "io": options.io, "discard": options.discard}),
        ) {
            r.extend(o);
        }
        assert_eq!(bytes(&disk), bytes(&old));
        disk.source_snapshot = Some("snap-x".into());
        old["source_snapshot"] = json!("snap-x");
        assert_eq!(bytes(&disk), bytes(&old));

        let meta: Object = json!({"director": "d", "n": 1})
            .as_object()
            .unwrap()
            .clone();
        let tags = TagsRecord {
            metadata: meta.clone(),
            updated_at: "t".into(),
        };
        assert_eq!(
            bytes(&tags),
            bytes(&json!({"metadata": meta, "updated_at": "t"}))
        );

        let holder = HolderRecord {
            vm: Some("vm-1".into()),
        };
        assert_eq!(bytes(&holder), bytes(&json!({ "vm": "vm-1" })));

        let sc = StemcellRecord {
            cloud_properties: meta.clone(),
            container: Some("gzipped tar".into()),
            format: Some("raw".into()),
            image_size: Some(5),
            stemcell_cid: Some("sc-1".into()),
            virtual_size: Some(7),
        };
        let old = json!({
            "stemcell_cid": "sc-1",
            "format": "raw",
            "virtual_size": 7,
            "image_size": 5,
            "container": "gzipped tar",
            "cloud_properties": meta,
        });
        assert_eq!(bytes(&sc), bytes(&old));

        let snap = SnapshotRecord {
            capacity_bytes: 9,
            consistency: "exact".into(),
            created_at: "t".into(),
            disk_cid: "disk-1".into(),
            disk_format: "raw".into(),
            metadata: meta.clone(),
        };
        let old = json!({
            "disk_cid": "disk-1",
            "disk_format": "raw",
            "capacity_bytes": 9,
            "created_at": "t",
            "consistency": "exact",
            "metadata": meta,
        });
        assert_eq!(bytes(&snap), bytes(&old));
    }

    #[test]
    fn records_of_older_versions_still_read() {
        // A disk made before attach options and holder records.
        let old: DiskRecord = serde_json::from_str(r#"{"format":"raw","size_mib":1}"#).unwrap();
        assert_eq!(old.format.as_deref(), Some("raw"));
        assert!(!old.holder_record);
        assert_eq!(old.options().unwrap(), DiskOptions::default());
        // The oldest form, an operator's hand-made record, and unknown fields.
        let bare: DiskRecord = serde_json::from_str(r#"{"format":"qcow2","x":1}"#).unwrap();
        assert_eq!(bare.format.as_deref(), Some("qcow2"));
        let options: DiskRecord =
            serde_json::from_str(r#"{"format":"raw","bus":"scsi","cache":"writeback","io":null}"#)
                .unwrap();
        let o = options.options().unwrap();
        assert_eq!(
            (o.bus.as_str(), o.cache.as_deref()),
            ("scsi", Some("writeback"))
        );
        // Options round-trip through the record.
        let o = DiskOptions::parse(
            json!({"bus": "scsi", "cache": "none", "io": "native", "discard": "ignore"})
                .as_object()
                .unwrap(),
            "",
        )
        .unwrap();
        assert_eq!(DiskRecord::new("raw", 1, None, &o).options().unwrap(), o);
        let sc: StemcellRecord = serde_json::from_str(r#"{"format":"qcow2"}"#).unwrap();
        assert_eq!(
            (sc.format.as_deref(), sc.virtual_size),
            (Some("qcow2"), None)
        );
        let snap: SnapshotRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(snap, SnapshotRecord::default());
    }

    #[test]
    fn a_holder_record_names_a_vm_nobody_or_is_unreadable() {
        let read = |s: &str| serde_json::from_str::<HolderRecord>(s).ok().map(|h| h.vm);
        assert_eq!(read(r#"{"vm":"vm-1"}"#), Some(Some("vm-1".into())));
        assert_eq!(read(r#"{"vm":null}"#), Some(None));
        assert_eq!(read("{}"), None);
        assert_eq!(read(r#"{"vm":5}"#), None);
    }
}
