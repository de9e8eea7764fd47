//! Every name this CPI gives a libvirt object, and the parsers that recognise
//! them. Objects are named by kind so an operator can tell them apart and a
//! sweep can find them:
//!
//! | object                       | name                                        |
//! |------------------------------|---------------------------------------------|
//! | stemcell volume (CID)        | `sc-<uuid>`                                 |
//! | VM domain (CID)              | `vm-<uuid>`                                 |
//! | persistent disk volume (CID) | `disk-<15 hex>`: 20 characters, the part of a virtio serial a guest sees |
//! | snapshot volume (CID)        | `snap-<disk cid>-<YYYYMMDDTHHMMSS>-<6 hex>` |
//! | a VM's volumes               | `<vm cid>-root`, `-ephemeral`, `-config.iso` |
//! | marker of a stemcell, disk or snapshot | `<volume>.meta`                   |
//! | a disk's tags, holder        | `<disk cid>.tags`, `.holder`                |
//! | a disk's lock (staging pool) | `<disk cid>.lock`                           |
//! | DHCP host entries of a VM    | `<vm cid>` on a network, then `<vm cid>-<n>` |
//! | the ephemeral disk's serial  | `bosh-ephemeral` (how the agent finds it)   |
//! | the CPI's element in a domain's `<metadata>` | namespace `urn:bosh-libvirt-cpi:vm:1`, prefix `bosh` |

pub fn new_vm_cid() -> String {
    format!("vm-{}", uuid::Uuid::new_v4())
}

/// What every stemcell volume's name (and its marker's) starts with.
pub const STEMCELL_PREFIX: &str = "sc-";

pub fn new_stemcell_cid() -> String {
    format!("{STEMCELL_PREFIX}{}", uuid::Uuid::new_v4())
}

/// What every persistent disk volume's name starts with.
pub const DISK_PREFIX: &str = "disk-";

pub fn new_disk_cid() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{DISK_PREFIX}{}", &hex[..15])
}

fn is_uuid_cid(cid: &str, prefix: &str) -> bool {
    cid.strip_prefix(prefix)
        .is_some_and(|rest| uuid::Uuid::try_parse(rest).is_ok())
}

pub fn is_vm_cid(cid: &str) -> bool {
    is_uuid_cid(cid, "vm-")
}

pub fn is_stemcell_cid(cid: &str) -> bool {
    is_uuid_cid(cid, STEMCELL_PREFIX)
}

pub fn is_disk_cid(cid: &str) -> bool {
    cid.len() == 20
        && cid.strip_prefix(DISK_PREFIX).is_some_and(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

// ---------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------

/// What every snapshot volume's name starts with.
pub const SNAPSHOT_PREFIX: &str = "snap-";

/// A new snapshot CID of `disk_cid`, stamped with the current UTC time:
/// `snap-<disk cid>-<YYYYMMDDTHHMMSS>-<6 hex>` sorts by disk, then by time.
pub fn new_snapshot_cid(disk_cid: &str) -> String {
    let stamp: String = crate::log::timestamp()
        .chars()
        .take_while(|c| *c != '.')
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{stamp}-{}", snapshots_of(disk_cid), &hex[..6])
}

/// The prefix the names of all snapshots of `disk_cid` share.
pub fn snapshots_of(disk_cid: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{disk_cid}-")
}

pub fn is_snapshot_cid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix(SNAPSHOT_PREFIX) else {
        return false;
    };
    let parts: Vec<&str> = rest.rsplitn(3, '-').collect();
    let [hex, stamp, disk] = parts[..] else {
        return false;
    };
    is_disk_cid(disk)
        && stamp.len() == 15
        && stamp.bytes().enumerate().all(|(i, b)| {
            if i == 8 {
                b == b'T'
            } else {
                b.is_ascii_digit()
            }
        })
        && hex.len() == 6
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

// ---------------------------------------------------------------------------
// A VM's volumes
// ---------------------------------------------------------------------------

/// The VM's root disk: a qcow2 overlay on its stemcell.
pub fn root_volume(vm_cid: &str) -> String {
    format!("{vm_cid}-root")
}

pub fn ephemeral_volume(vm_cid: &str) -> String {
    format!("{vm_cid}-ephemeral")
}

/// The VM's config drive, holding the agent's settings.
pub fn config_drive_volume(vm_cid: &str) -> String {
    format!("{vm_cid}-config.iso")
}

/// The prefix the names of all of a VM's volumes share.
pub fn volumes_of_vm(vm_cid: &str) -> String {
    format!("{vm_cid}-")
}

/// The VM CID a volume belongs to when it is named `<vm_cid>-<suffix>`; None
/// for anything else (stemcells, persistent disks, snapshots, look-alikes).
pub fn vm_cid_of_volume(name: &str) -> Option<&str> {
    // "vm-" and a hyphenated UUID: 39 characters, then the '-' of the suffix.
    let cid = name.get(..39)?;
    (is_vm_cid(cid) && name[39..].starts_with('-')).then_some(cid)
}

// ---------------------------------------------------------------------------
// Sidecar volumes
// ---------------------------------------------------------------------------

const MARKER_SUFFIX: &str = ".meta";

/// The marker of a stemcell, disk or snapshot volume: a small sidecar that
/// records its facts and is written last and deleted first, so that a volume
/// without one is never taken for a complete one.
pub fn marker_name(volume: &str) -> String {
    format!("{volume}{MARKER_SUFFIX}")
}

/// The volume a marker belongs to; None when `name` is not a marker's.
pub fn volume_of_marker(name: &str) -> Option<&str> {
    name.strip_suffix(MARKER_SUFFIX)
}

/// A disk's tags (set_disk_metadata).
pub fn tags_name(disk_cid: &str) -> String {
    format!("{disk_cid}.tags")
}

/// The record of the VM a disk is attached to (see `handlers::holder`).
pub fn holder_name(disk_cid: &str) -> String {
    format!("{disk_cid}.holder")
}

/// The lock serialising changes of a disk's holder record.
pub fn lock_name(disk_cid: &str) -> String {
    format!("{disk_cid}.lock")
}

/// The serial the ephemeral disk carries, so the agent finds it by a stable
/// name on every bus (see `settings::ephemeral_path`).
pub const EPHEMERAL_SERIAL: &str = "bosh-ephemeral";

/// Namespace of the CPI's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "urn:bosh-libvirt-cpi:vm:1";
pub const METADATA_PREFIX: &str = "bosh";

// ---------------------------------------------------------------------------
// DHCP host entries
// ---------------------------------------------------------------------------

/// The name of a VM's `n`-th (from 0) DHCP reservation on one network.
pub fn dhcp_host_name(vm_cid: &str, n: usize) -> String {
    if n == 0 {
        vm_cid.to_string()
    } else {
        format!("{vm_cid}-{n}")
    }
}

/// The VM CID a DHCP host entry of this CPI is named after: `<vm_cid>` for a
/// VM's first reservation on a network, `<vm_cid>-<n>` for the next ones.
pub fn vm_cid_of_dhcp_name(name: &str) -> Option<&str> {
    if is_vm_cid(name) {
        return Some(name);
    }
    let (vm, n) = name.rsplit_once('-')?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && is_vm_cid(vm)).then_some(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_round_trip() {
        assert!(is_vm_cid(&new_vm_cid()));
        assert!(is_stemcell_cid(&new_stemcell_cid()));
        let d = new_disk_cid();
        assert_eq!(d.len(), 20);
        assert!(is_disk_cid(&d));
        assert!(!is_vm_cid("vm-../../etc"));
        assert!(!is_disk_cid("disk-0123456789ABCDE"));
        assert!(!is_stemcell_cid("sc-"));
    }

    #[test]
    fn volumes_name_their_vm() {
        let vm = new_vm_cid();
        for name in [
            root_volume(&vm),
            ephemeral_volume(&vm),
            config_drive_volume(&vm),
        ] {
            assert_eq!(vm_cid_of_volume(&name), Some(vm.as_str()));
            assert!(name.starts_with(&volumes_of_vm(&vm)));
        }
        assert_eq!(root_volume("vm-1"), "vm-1-root");
        assert_eq!(ephemeral_volume("vm-1"), "vm-1-ephemeral");
        assert_eq!(config_drive_volume("vm-1"), "vm-1-config.iso");
        let disk = new_disk_cid();
        let sc = new_stemcell_cid();
        for other in [
            vm.clone(),
            format!("{vm}x-root"),
            disk,
            sc,
            "snap-vm-x-root".into(),
            "vm-1-root".into(),
        ] {
            assert_eq!(vm_cid_of_volume(&other), None, "{other}");
        }
    }

    #[test]
    fn snapshot_cids_round_trip_and_reject_others() {
        let disk = new_disk_cid();
        let s = new_snapshot_cid(&disk);
        assert!(is_snapshot_cid(&s), "{s}");
        assert!(s.starts_with(&snapshots_of(&disk)));
        assert!(s.starts_with(&format!("snap-{disk}-")));
        assert_eq!(s.len(), 5 + 20 + 1 + 15 + 1 + 6);
        for bad in [
            "snap-",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdeg",
            "snap-disk-0f3a9c21b7e54d8-20260822X101900-abcdef",
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdef.meta",
            "snap-../etc-20260822T101900-abcdef",
            "disk-0f3a9c21b7e54d8",
        ] {
            assert!(!is_snapshot_cid(bad), "{bad}");
        }
        assert!(is_snapshot_cid(
            "snap-disk-0f3a9c21b7e54d8-20260822T101900-abcdef"
        ));
    }

    #[test]
    fn sidecars_round_trip() {
        let disk = new_disk_cid();
        let marker = marker_name(&disk);
        assert_eq!(marker, format!("{disk}.meta"));
        assert_eq!(volume_of_marker(&marker), Some(disk.as_str()));
        assert_eq!(volume_of_marker(&disk), None);
        assert_eq!(tags_name(&disk), format!("{disk}.tags"));
        assert_eq!(holder_name(&disk), format!("{disk}.holder"));
        assert_eq!(lock_name(&disk), format!("{disk}.lock"));
        // No sidecar is taken for a CID or a VM's volume.
        for sidecar in [
            marker,
            tags_name(&disk),
            holder_name(&disk),
            lock_name(&disk),
        ] {
            assert!(
                !is_disk_cid(&sidecar) && !is_snapshot_cid(&sidecar),
                "{sidecar}"
            );
            assert_eq!(vm_cid_of_volume(&sidecar), None);
        }
    }

    #[test]
    fn dhcp_names_round_trip() {
        let vm = "vm-0d8e4c4e-6f37-4d4b-9e51-4c1f1f2b9a10";
        assert_eq!(dhcp_host_name(vm, 0), vm);
        assert_eq!(dhcp_host_name(vm, 2), format!("{vm}-2"));
        for n in [0, 1, 12] {
            assert_eq!(vm_cid_of_dhcp_name(&dhcp_host_name(vm, n)), Some(vm));
        }
        assert_eq!(vm_cid_of_dhcp_name(&format!("{vm}-")), None);
        assert_eq!(vm_cid_of_dhcp_name(&format!("{vm}-x")), None);
        assert_eq!(vm_cid_of_dhcp_name(&format!("{vm}x")), None);
        assert_eq!(vm_cid_of_dhcp_name("squat-1"), None);
        assert_eq!(vm_cid_of_dhcp_name("vm-1"), None);
    }
}
