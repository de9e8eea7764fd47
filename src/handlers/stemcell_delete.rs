//! `delete_stemcell`. A stemcell that still backs a VM's root disk is not
//! deleted: the call fails naming the VMs (deleting the file under a running
//! overlay would break those VMs, and deferring the deletion would need state
//! outside libvirt).

use serde_json::Value;

use crate::error::{CpiError, Result};
use crate::host::StemcellHost;
use crate::log::Logger;
use crate::names::{is_stemcell_cid, is_vm_cid, marker_name};

pub fn delete_stemcell(host: &dyn StemcellHost, log: &mut Logger, cid: &str) -> Result<Value> {
    if !is_stemcell_cid(cid) {
        log.summary(format!(
            "{cid} is not a stemcell CID of this CPI: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    let in_use = |users: Vec<String>| {
        let names: Vec<String> = users.iter().map(|v| user_name(v)).collect();
        CpiError::cloud(format!(
            "stemcell {cid} is still in use: it backs the root disk of {}; delete those VMs first",
            names.join(", ")
        ))
    };
    let image_path = host.volume(cid)?.map(|f| f.path);
    let marker_doc = match &image_path {
        Some(path) => {
            let users = host.volumes_backed_by(path)?;
            if !users.is_empty() {
                return Err(in_use(users));
            }
            // Kept as it is (any fields), to be put back unchanged.
            host.read_json(&marker_name(cid)).ok().flatten()
        }
        None => None,
    };
    // Marker first: from then on the stemcell is incomplete, and a crash
    // before the image goes leaves a leftover the sweep removes.
    let marker = host.delete_volume(&marker_name(cid))?;
    // A create_vm that found the marker before it went may have made its
    // overlay since (it re-checks the marker after making it): look again,
    // and put the marker back if it did.
    if let Some(path) = &image_path {
        let users = host.volumes_backed_by(path)?;
        if !users.is_empty() {
            if let Some(doc) = &marker_doc {
                host.write_json(&marker_name(cid), doc)?;
            }
            return Err(in_use(users));
        }
    }
    let image = host.delete_volume(cid)?;
    log.summary(match (marker, image) {
        (_, true) => format!("deleted stemcell {cid}"),
        (true, false) => format!("{cid} had a marker but no image; marker deleted"),
        (false, false) => format!("stemcell {cid} does not exist: nothing to delete"),
    });
    Ok(Value::Null)
}

/// `vm-<uuid>-root` -> `vm-<uuid>`; any other volume by its name.
fn user_name(volume: &str) -> String {
    match volume.get(..39) {
        Some(vm) if is_vm_cid(vm) => vm.to_string(),
        _ => format!("volume {volume}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_users_are_named_by_vm() {
        assert_eq!(
            user_name("vm-8d2f6a10-7c3e-4b59-a1d4-93e0f5b2c7aa-root"),
            "vm-8d2f6a10-7c3e-4b59-a1d4-93e0f5b2c7aa"
        );
        assert_eq!(
            user_name("someone-elses.qcow2"),
            "volume someone-elses.qcow2"
        );
    }
}
