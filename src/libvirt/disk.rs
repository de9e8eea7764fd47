//! Persistent disks as libvirt sees them. Boundary: no BOSH semantics here.
//! "Not found" is a value (`None`, `false`); the handlers (handlers/disk.rs,
//! handlers/snapshot.rs) decide which BOSH error a situation becomes.
//! Everything else is a `CloudError` naming what was being done and
//! libvirt's reason.
//!
//! - `records`: the JSON sidecar volumes and markers;
//! - `xml`: `<disk>` devices written and read;
//! - `hotplug`: which domains hold a disk, attach, confirmed detach;
//! - `block_copy`: live copies of attached disks (snapshots).

mod block_copy;
mod hotplug;
mod records;
mod xml;

use std::time::Duration;

pub use self::xml::{disk_device_xml, driver_element, parse_domain_disks};
pub use crate::host::{next_free_target, DiskDevice, DiskRef, DomainDisks, Holder};

/// How often a domain's live XML is re-read while waiting for the guest.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
