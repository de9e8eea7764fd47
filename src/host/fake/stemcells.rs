//! `StemcellHost` for `FakeHost`: an upload writes into the volume's bytes
//! and takes its data (not its holes) from the pool's free space, as a
//! sparse file does; it can be made to fail once a number of bytes went
//! through (`fail_upload_after`). Overlays are volumes with a backing path
//! (`put_overlay`), and one can be made to appear right after the next scan
//! for them (`overlay_after_next_scan`: a create_vm racing a delete).

use super::{missing, FakeHost};
use crate::error::{CpiError, Result};
use crate::host::{StemcellHost, VolumeUpload};
use crate::names::{is_stemcell_cid, volume_of_marker};

#[derive(Default)]
pub(super) struct State {
    /// An upload fails with this error once it would pass this many bytes.
    fail_after: Option<(u64, CpiError)>,
    /// (overlay, backing volume) made right after the next `volumes_backed_by`.
    overlay_after_scan: Option<(String, String)>,
}

impl FakeHost {
    /// Volume `name`, a qcow2 overlay on volume `backing` (a VM's root disk).
    pub fn put_overlay(&self, name: &str, backing: &str) {
        self.put_volume(name, 1 << 30, "qcow2", b"");
        let path = self.facts(backing).map(|f| f.path);
        if let Some(v) = self.s.borrow_mut().volumes.get_mut(name) {
            v.facts.backing_path = path;
        }
    }

    /// The next upload fails with `error` when it would pass `bytes`.
    pub fn fail_upload_after(&self, bytes: u64, error: CpiError) {
        self.s.borrow_mut().stemcells.fail_after = Some((bytes, error));
    }

    /// Right after the next scan for overlays, `name` appears on `backing`.
    pub fn overlay_after_next_scan(&self, name: &str, backing: &str) {
        self.s.borrow_mut().stemcells.overlay_after_scan =
            Some((name.to_string(), backing.to_string()));
    }

    /// The bytes of a volume.
    pub fn data(&self, name: &str) -> Option<Vec<u8>> {
        self.s.borrow().volumes.get(name).map(|v| v.data.clone())
    }
}

struct FakeUpload<'a> {
    host: &'a FakeHost,
    name: String,
    sparse: bool,
    data: Vec<u8>,
}

impl FakeUpload<'_> {
    fn write(&mut self, bytes: &[u8], hole: bool) -> Result<()> {
        let mut s = self.host.s.borrow_mut();
        let end = self.data.len() as u64 + bytes.len() as u64;
        if let Some((limit, _)) = &s.stemcells.fail_after {
            if end > *limit {
                let (_, error) = s.stemcells.fail_after.take().expect("just seen");
                return Err(error);
            }
        }
        if !hole {
            let need = bytes.len() as u64;
            if need > s.available {
                return Err(CpiError::cloud(format!(
                    "writing to volume {}: No space left on device",
                    self.name
                )));
            }
            s.available -= need;
        }
        self.data.extend_from_slice(bytes);
        Ok(())
    }
}

impl VolumeUpload for FakeUpload<'_> {
    fn sent(&self) -> u64 {
        self.data.len() as u64
    }

    fn send(&mut self, data: &[u8]) -> Result<()> {
        self.write(data, false)
    }

    fn send_hole(&mut self, len: u64) -> Result<()> {
        let zeros = vec![0u8; usize::try_from(len).expect("a small hole")];
        self.write(&zeros, self.sparse)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.host.enter("finish_upload", &self.name)?;
        let mut s = self.host.s.borrow_mut();
        let now = s.now;
        let v = s
            .volumes
            .get_mut(&self.name)
            .ok_or_else(|| missing("uploading into", &self.name))?;
        v.facts.physical = self.data.len() as u64;
        v.facts.mtime = Some(now);
        v.data = self.data;
        Ok(())
    }
}

impl StemcellHost for FakeHost {
    fn start_upload(
        &self,
        name: &str,
        _length: u64,
        sparse: bool,
    ) -> Result<Box<dyn VolumeUpload + '_>> {
        self.enter("start_upload", name)?;
        if !self.exists(name) {
            return Err(missing("uploading into", name));
        }
        Ok(Box::new(FakeUpload {
            host: self,
            name: name.to_string(),
            sparse,
            data: Vec::new(),
        }))
    }

    fn volumes_backed_by(&self, path: &str) -> Result<Vec<String>> {
        self.enter("volumes_backed_by", path)?;
        let users = self
            .s
            .borrow()
            .volumes
            .iter()
            .filter(|(name, v)| {
                !is_stemcell_cid(name)
                    && volume_of_marker(name).is_none()
                    && v.facts.backing_path.as_deref() == Some(path)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let appearing = self.s.borrow_mut().stemcells.overlay_after_scan.take();
        if let Some((overlay, backing)) = appearing {
            self.put_overlay(&overlay, &backing);
        }
        Ok(users)
    }
}
