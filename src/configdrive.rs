//! The config drive the BOSH agent reads its settings from (cpi-contract.md
//! 4.1/4.2): an ISO 9660 + Rock Ridge image labelled `config-2` holding
//! `ec2/latest/meta-data.json` and `ec2/latest/user-data` (the settings JSON),
//! plus the OpenStack-style mirrors some tools look for. Built in memory
//! (no temporary file, no external tool) and uploaded as a volume.

use serde_json::Value;

use crate::error::{CpiError, Result};
use crate::iso9660::{build_iso, IsoFile};

pub const LABEL: &str = "config-2";
pub const USER_DATA: &str = "ec2/latest/user-data";
pub const META_DATA: &str = "ec2/latest/meta-data.json";

/// The ISO image for these settings and meta-data.
pub fn build(settings: &Value, meta_data: &Value) -> Result<Vec<u8>> {
    let user_data = serde_json::to_vec(settings)
        .map_err(|e| CpiError::cloud(format!("serialising agent settings: {e}")))?;
    let meta = serde_json::to_vec(meta_data)
        .map_err(|e| CpiError::cloud(format!("serialising config-drive meta-data: {e}")))?;
    let files = [
        IsoFile {
            path: META_DATA,
            data: &meta,
        },
        IsoFile {
            path: USER_DATA,
            data: &user_data,
        },
        IsoFile {
            path: "openstack/latest/meta_data.json",
            data: &meta,
        },
        IsoFile {
            path: "openstack/latest/user_data",
            data: &user_data,
        },
    ];
    build_iso(LABEL, &files).map_err(|e| CpiError::cloud(format!("building the config drive: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_is_labelled_and_holds_the_settings_bytes() {
        let settings = json!({"agent_id": "agent-xyz", "env": {"bosh": {"password": "p"}}});
        let iso = build(&settings, &json!({"instance-id": "vm-1"})).unwrap();
        assert_eq!(iso.len() % 2048, 0);
        // Primary volume descriptor at sector 16: "CD001", volume id at offset 40.
        assert_eq!(&iso[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
        assert_eq!(&iso[16 * 2048 + 40..16 * 2048 + 48], b"config-2");
        // As the guest reads it: every file by its Rock Ridge path.
        let files = crate::iso9660::reader::entries(&iso);
        let read = |path: &str| {
            let file = files.iter().find(|e| e.path == path);
            let data = file.and_then(|e| e.data.as_deref());
            serde_json::from_slice::<Value>(data.unwrap_or_else(|| panic!("no {path}"))).unwrap()
        };
        assert_eq!(read(USER_DATA), settings);
        assert_eq!(read("openstack/latest/user_data"), settings);
        assert_eq!(read(META_DATA), json!({"instance-id": "vm-1"}));
        assert_eq!(
            read("openstack/latest/meta_data.json"),
            json!({"instance-id": "vm-1"})
        );
    }
}
