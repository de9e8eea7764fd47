//! VM methods: create_vm, delete_vm, has_vm, reboot_vm, set_vm_metadata,
//! calculate_vm_cloud_properties, against the host seam (`VmHost`).
//!
//! create_vm validates everything it can before it makes anything, then makes
//! objects in the order domain (defined, not started, recording the process
//! that creates it), root overlay, ephemeral disk, config drive, start (paused
//! while the DHCP reservations are made beside QEMU's launch, then resumed),
//! and records each in a journal; any failure undoes the journal before
//! `VMCreationFailed` goes back (`ok_to_retry` only when the undo was complete
//! and the failure looks transient). Once the VM runs, the creator record is
//! dropped.
//!
//! delete_vm removes only what belongs to the VM: the domain, volumes named
//! `<vm_cid>-*` (never a persistent disk, attached or not, never a stemcell)
//! and its DHCP host entries. It reports success only when it saw them gone.
//!
//! A create_vm killed mid-way (kill -9, host crash, libvirtd dying under it)
//! never runs its journal, and the director never learned that CID. Its
//! domain still records a creator that is gone: a create_vm that needs an IP
//! it holds removes it at once, and every create_vm removes such domains
//! whose guest never ran. Leftovers of older CPI versions (volumes without a
//! domain) are judged by age: every create_vm, once it has its root overlay,
//! also sweeps VM CIDs that have volumes but no domain and whose volumes all
//! have been untouched for 30 minutes by the host's clock (read from the
//! overlay just made) and are used by no domain of any name (live or
//! persistent XML), with delete_vm's own sweep; a DHCP entry whose VM has
//! neither domain nor volumes is removed when a create_vm needs its IP and
//! it is still so 2 s after the clash was seen (janitor.rs).
//!
//! create.rs: create_vm (validation, journal, make, undo); plan.rs: the NICs
//! planned before anything is made; delete.rs: delete_vm and its sweep;
//! janitor.rs: leftovers of killed create_vm calls; ops.rs: the rest.

mod create;
#[cfg(test)]
mod create_tests;
mod delete;
#[cfg(test)]
mod delete_tests;
mod janitor;
mod ops;
mod plan;
#[cfg(test)]
mod test_support;

pub use create::{create_vm, CreateVm};
pub use delete::delete_vm;
pub use ops::{calculate_vm_cloud_properties, has_vm, reboot_vm, set_vm_metadata};

use crate::error::{CpiError, ErrorKind};

fn creation_failed(message: impl Into<String>) -> CpiError {
    CpiError::new(ErrorKind::VmCreationFailed, message)
}
