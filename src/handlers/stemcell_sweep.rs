//! The sweep of what killed stemcell imports left: an image volume without a
//! valid marker (a marker whose write was killed holds zeros and is none)
//! whose file has not changed for `PARTIAL_MAX_AGE_SECS` by the host's
//! clock, and a marker whose image is gone. The image being imported by a
//! live process is written all the time, so its file stays young. An image
//! some volume is an overlay on is never swept, marker or not: a
//! delete_stemcell killed between removing the marker and finding a new
//! user leaves exactly that, and the VMs on it must keep booting.
//! Best effort: it never fails the import that runs it.

use super::sweep::{sweep, Leftovers};
use crate::error::Result;
use crate::host::StemcellHost;
use crate::log::Logger;
use crate::names::{is_stemcell_cid, marker_name, volume_of_marker, STEMCELL_PREFIX};

/// A marker-less stemcell volume untouched this long is a leftover of a
/// killed import (a live upload writes continuously; keepalive ends a dead
/// connection within a minute).
pub const PARTIAL_MAX_AGE_SECS: f64 = 30.0 * 60.0;

const WHAT: &str = "leftovers of interrupted stemcell imports";

/// Sweeps around `own`, the image volume this import just created (its
/// modification time is the host's clock; it is never swept).
pub(super) fn sweep_partial_imports(host: &dyn StemcellHost, log: &mut Logger, own: &str) {
    sweep(
        host,
        log,
        own,
        &Leftovers {
            prefix: STEMCELL_PREFIX,
            max_age_secs: PARTIAL_MAX_AGE_SECS,
            candidate: &|name, _| is_stemcell_cid(name),
            in_use: &|_, name| backs_any_volume(host, name),
            what: WHAT,
            at_most_every_secs: None,
        },
    );
    match remove_orphan_markers(host, own) {
        Ok(removed) if !removed.is_empty() => {
            log.info(format!("removed {WHAT}: {}", removed.join(", ")))
        }
        Ok(_) => {}
        Err(e) => log.warn(format!("not sweeping {WHAT}: {}", e.message)),
    }
}

/// Whether any volume is an overlay on volume `name`.
fn backs_any_volume(host: &dyn StemcellHost, name: &str) -> Result<bool> {
    let Some(facts) = host.volume(name)? else {
        return Ok(false);
    };
    Ok(!host.volumes_backed_by(&facts.path)?.is_empty())
}

/// A marker is written after its image and deleted before it: one without
/// an image is garbage whatever its age.
fn remove_orphan_markers(host: &dyn StemcellHost, own: &str) -> Result<Vec<String>> {
    let names = host.volume_names_with_prefix(STEMCELL_PREFIX)?;
    let mut removed = Vec::new();
    for name in &names {
        let Some(image) = volume_of_marker(name) else {
            continue;
        };
        if !is_stemcell_cid(image) || image == own || names.iter().any(|n| n == image) {
            continue;
        }
        // Re-check: the listing may predate the image's creation.
        if !host.volume_exists(image)? && host.delete_volume(&marker_name(image))? {
            removed.push(name.clone());
        }
    }
    Ok(removed)
}
