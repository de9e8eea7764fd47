//! The hypervisor seam for stemcells, beside `DiskHost` (whose volumes,
//! markers and free space a stemcell uses as a disk does): what an import
//! adds is a stream of bytes into a new volume, and what a delete or the
//! sweep of killed imports adds is which volumes are overlays on an image
//! (a VM's root disk boots from its stemcell through one).
//!
//! `crate::libvirt::stemcell_host` implements it; handler tests run against
//! `fake::FakeHost`. No `virt` type here, no import of `crate::libvirt`.

use super::DiskHost;
use crate::error::Result;

/// Bytes streamed into a volume from its first byte on. Dropped without
/// `finish`, the upload is aborted: the host stops writing, and the caller
/// deletes the volume.
pub trait VolumeUpload {
    /// Bytes (data and holes) sent so far.
    fn sent(&self) -> u64;
    fn send(&mut self, data: &[u8]) -> Result<()>;
    /// Skips `len` bytes of zeros (sent as zeros unless the upload is sparse).
    fn send_hole(&mut self, len: u64) -> Result<()>;
    /// Completes the upload; the host confirms the bytes were written (on a
    /// full pool libvirt confirms writes that failed: callers verify).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// What the stemcell handlers need of the host beyond `DiskHost`.
pub trait StemcellHost: DiskHost {
    /// Starts writing `length` bytes into the existing volume `name`. With
    /// `sparse`, holes may be sent (the volume must read as zeros there
    /// already: a freshly created one does).
    fn start_upload(
        &self,
        name: &str,
        length: u64,
        sparse: bool,
    ) -> Result<Box<dyn VolumeUpload + '_>>;
    /// Names of the pool's volumes, other than stemcell images and markers,
    /// whose backing store is the file at `path`: the overlays on an image,
    /// such as the root disks VMs boot from.
    fn volumes_backed_by(&self, path: &str) -> Result<Vec<String>>;
}
