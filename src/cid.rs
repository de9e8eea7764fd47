//! Cloud IDs. Every libvirt object the CPI makes is named by kind prefix, so an
//! operator can tell them apart and a sweep can find them: `sc-<uuid>`
//! (stemcell volume), `vm-<uuid>` (domain), `disk-<15 hex>` (persistent disk:
//! exactly 20 characters, the part of a virtio serial a guest sees).

pub fn new_vm_cid() -> String {
    format!("vm-{}", uuid::Uuid::new_v4())
}

pub fn new_stemcell_cid() -> String {
    format!("sc-{}", uuid::Uuid::new_v4())
}

pub fn new_disk_cid() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("disk-{}", &hex[..15])
}

fn is_uuid_cid(cid: &str, prefix: &str) -> bool {
    cid.strip_prefix(prefix)
        .is_some_and(|rest| uuid::Uuid::try_parse(rest).is_ok())
}

pub fn is_vm_cid(cid: &str) -> bool {
    is_uuid_cid(cid, "vm-")
}

pub fn is_stemcell_cid(cid: &str) -> bool {
    is_uuid_cid(cid, "sc-")
}

pub fn is_disk_cid(cid: &str) -> bool {
    cid.len() == 20
        && cid.strip_prefix("disk-").is_some_and(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// The VM CID a volume belongs to when it is named `<vm_cid>-<suffix>`
/// (naming.md); None for anything else (stemcells, persistent disks,
/// snapshots, look-alikes).
pub fn vm_cid_of_volume(name: &str) -> Option<&str> {
    // "vm-" and a hyphenated UUID: 39 characters, then the '-' of the suffix.
    let cid = name.get(..39)?;
    (is_vm_cid(cid) && name[39..].starts_with('-')).then_some(cid)
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
        for suffix in ["-root", "-ephemeral", "-config.iso"] {
            assert_eq!(
                vm_cid_of_volume(&format!("{vm}{suffix}")),
                Some(vm.as_str())
            );
        }
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
}
