//! `StemcellHost` over the same connection and pool as `LibvirtHost`: the
//! upload stream of libvirt/upload.rs and the overlay scan of
//! libvirt/stemcell.rs, a volume handle looked up by name.

use super::host::LibvirtHost;
use super::upload::Upload;
use crate::error::Result;
use crate::host::{StemcellHost, VolumeUpload};

impl StemcellHost for LibvirtHost<'_> {
    fn start_upload(
        &self,
        name: &str,
        length: u64,
        sparse: bool,
    ) -> Result<Box<dyn VolumeUpload + '_>> {
        let vol = self.existing(name, "uploading into")?;
        let upload = self.libvirt()?.start_upload(&vol, length, sparse)?;
        Ok(Box::new(upload))
    }

    fn volumes_backed_by(&self, path: &str) -> Result<Vec<String>> {
        let (lv, pool) = self.parts()?;
        lv.volumes_backed_by(pool, path)
    }
}

impl VolumeUpload for Upload {
    fn sent(&self) -> u64 {
        Upload::sent(self)
    }

    fn send(&mut self, data: &[u8]) -> Result<()> {
        Upload::send(self, data)
    }

    fn send_hole(&mut self, len: u64) -> Result<()> {
        Upload::send_hole(self, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Upload::finish(*self)
    }
}
