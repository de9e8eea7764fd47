//! Streaming bytes into a volume through libvirt's upload stream, the only
//! path to a remote host's pool. Sparse uploads send zero runs as holes
//! (`virStreamSendHole`, which the `virt` crate does not wrap), so a mostly
//! empty raw image costs only its data in transfer.
//!
//! An `Upload` that is dropped without `finish` is aborted: libvirt then
//! stops writing, and the caller deletes the volume.

use std::os::raw::c_char;

use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::{lv_error, Libvirt};
use crate::error::Result;

/// libvirt sends at most this much per stream message
/// (VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX rounded down).
const MAX_SEND: usize = 256 << 10;

pub struct Upload {
    stream: Option<Stream>,
    sparse: bool,
    sent: u64,
}

impl Libvirt {
    /// Starts uploading `length` bytes into `vol` from offset 0. With
    /// `sparse`, holes may be sent (the volume must read as zeros there
    /// already: a freshly created volume does).
    pub fn start_upload(&self, vol: &StorageVol, length: u64, sparse: bool) -> Result<Upload> {
        let stream =
            Stream::new(self.conn(), 0).map_err(|e| lv_error("opening an upload stream", e))?;
        let flags = if sparse {
            virt::sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
        } else {
            0
        };
        vol.upload(&stream, 0, length, flags)
            .map_err(|e| lv_error("starting the volume upload", e))?;
        Ok(Upload {
            stream: Some(stream),
            sparse,
            sent: 0,
        })
    }
}

impl Upload {
    fn stream(&self) -> &Stream {
        // Only `finish` and `drop` take the stream out, and both consume self.
        self.stream
            .as_ref()
            .expect("upload stream is open until finish")
    }

    /// Bytes (data and holes) sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn send(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = data.len().min(MAX_SEND);
            let ptr = unsafe { self.stream().as_ptr() };
            // SAFETY: the stream is open and `data[..n]` is valid for reads.
            let rc = unsafe { virt::sys::virStreamSend(ptr, data.as_ptr() as *const c_char, n) };
            if rc <= 0 {
                return Err(lv_error(
                    format!("sending data at byte {}", self.sent),
                    virt::error::Error::last_error(),
                ));
            }
            let rc = rc as usize;
            data = &data[rc..];
            self.sent += rc as u64;
        }
        Ok(())
    }

    /// Skips `len` bytes of zeros (sparse uploads only; plain ones send them).
    pub fn send_hole(&mut self, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.sparse {
            let zeros = vec![0u8; MAX_SEND];
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(MAX_SEND).min(MAX_SEND);
                self.send(&zeros[..n])?;
                left -= n as u64;
            }
            return Ok(());
        }
        let ptr = unsafe { self.stream().as_ptr() };
        let len_i64 = i64::try_from(len).unwrap_or(i64::MAX);
        // SAFETY: the stream is open.
        let rc = unsafe { virt::sys::virStreamSendHole(ptr, len_i64, 0) };
        if rc < 0 {
            return Err(lv_error(
                format!("sending a hole of {len} bytes at byte {}", self.sent),
                virt::error::Error::last_error(),
            ));
        }
        self.sent += len;
        Ok(())
    }

    /// Completes the upload; libvirt confirms the bytes were written.
    pub fn finish(mut self) -> Result<()> {
        match self.stream.take() {
            Some(stream) => stream
                .finish()
                .map_err(|e| lv_error("finishing the upload", e)),
            None => Ok(()),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Abort errors mean the stream is already dead: nothing to add.
            let _ = stream.abort();
        }
    }
}
