//! The sweep of volumes that killed calls left half-made (a disk without its
//! record, a snapshot copy without its marker): best effort, it never fails
//! the call that runs it.

use crate::error::Result;
use crate::host::DiskHost;
use crate::log::Logger;
use crate::names::marker_name;

/// What a sweep looks for among the volumes named `prefix*`.
pub(super) struct Leftovers<'p> {
    pub prefix: &'p str,
    /// Untouched for this long (by the host's clock) a half-made volume is
    /// abandoned: its call was killed, the director never learned its CID.
    pub max_age_secs: f64,
    /// Without a connection: whether `name`, among `all` the listed names,
    /// may be a leftover (its name is a CID, no sidecar marks it as known).
    pub candidate: &'p dyn Fn(&str, &[String]) -> bool,
    /// Whether `name` is in use (a domain holds it): then it stays.
    pub in_use: &'p dyn Fn(&dyn DiskHost, &str) -> Result<bool>,
    /// At most one sweep per this many seconds (host clock), for a sweep
    /// that runs on a frequent call: its listing of the pool grows with the
    /// pool, the leftovers it looks for are rare and wait `max_age_secs`.
    pub at_most_every_secs: Option<f64>,
    /// For the log: "disks that killed create_disk calls left unrecorded".
    pub what: &'p str,
}

/// Removes each candidate other than `own` (just made: its modification time
/// is the host's clock) that is old enough, has no valid marker (a marker
/// whose write was killed holds zeros and is none) and is not in use: the
/// volume first, then its marker, so a half-removed one never looks complete.
pub(super) fn sweep(host: &dyn DiskHost, log: &mut Logger, own: &str, l: &Leftovers) {
    let swept = (|| -> Result<Vec<String>> {
        let Some(now) = host.volume(own)?.and_then(|f| f.mtime) else {
            return Ok(Vec::new());
        };
        if let Some(every) = l.at_most_every_secs {
            if !host.claim_sweep(l.prefix, every, now)? {
                return Ok(Vec::new());
            }
        }
        let found = host.volume_names_with_prefix(l.prefix)?;
        let mut removed = Vec::new();
        for name in &found {
            if name == own
                || !(l.candidate)(name, &found)
                || !host.volume_untouched_for(name, l.max_age_secs, now)?
                || host.has_valid_marker(name)?
                || (l.in_use)(host, name)?
            {
                continue;
            }
            for v in [name.clone(), marker_name(name)] {
                if host.delete_volume(&v)? {
                    removed.push(v);
                }
            }
        }
        Ok(removed)
    })();
    match swept {
        Ok(removed) if !removed.is_empty() => {
            log.info(format!("removed {}: {}", l.what, removed.join(", ")))
        }
        Ok(_) => {}
        Err(e) => log.warn(format!("not sweeping {}: {}", l.what, e.message)),
    }
}
