//! `create_stemcell` (`delete_stemcell` is in stemcell_delete.rs, the sweep of
//! killed imports in stemcell_sweep.rs).
//!
//! Import pipeline: a reader thread gunzips and untars `root.img` in flight
//! (image::archive) into a bounded channel; this thread judges the first
//! bytes (image::inspect) before any volume exists, then creates the volume
//! and streams the rest into the host's upload (sparse for raw images), checks
//! the qcow2 tables as they pass, verifies what the host holds, and only then
//! writes the completion marker `sc-<uuid>.meta`. Any failure after the volume
//! was created deletes it again; a killed process leaves a marker-less volume
//! that no caller accepts and the next import sweeps.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use serde_json::Value;

use super::stemcell_sweep::sweep_partial_imports;
use crate::error::{CpiError, ErrorKind, Result};
use crate::host::{StemcellHost, MIB};
use crate::image::archive::{self, Container, Event};
use crate::image::{self, DiskFormat, Qcow2Walk, RootImage, Segment, PREFIX_LEN};
use crate::log::Logger;
use crate::method::Object;
use crate::names::{marker_name, new_stemcell_cid};
use crate::records::StemcellRecord;

/// Chunks of root.img in flight between the reader thread and the upload:
/// memory stays at about CHUNK * (DEPTH + 3) whatever the image size. Half a
/// MiB keeps the import's peak RSS under 32 MiB (a light call alone is ~21
/// MiB, libvirt's libraries) at no cost in speed (ci/bench-stemcell).
const CHUNK: usize = 512 << 10;
const DEPTH: usize = 8;

/// Free space is checked before the volume is made and again after every
/// this many bytes of data, and must leave `SPACE_MARGIN` to spare: an upload
/// that hits ENOSPC kills libvirtd 11.3 (double free), and small writes into a
/// full pool are confirmed as if they had landed.
const SPACE_STEP: u64 = 128 * MIB;
pub(super) const SPACE_MARGIN: u64 = 8 * MIB;

pub fn create_stemcell(
    host: &dyn StemcellHost,
    log: &mut Logger,
    image_path: &str,
    cloud_properties: &Object,
) -> Result<Value> {
    let declared = declared_format(cloud_properties)?;
    let cid = new_stemcell_cid();
    let import = Import {
        host,
        cid: &cid,
        image_path,
        declared,
        cloud_properties,
    };
    let done = import.run(log)?;
    log.summary(format!(
        "imported root.img ({}, {} MiB virtual, {} bytes) from a {} into pool {} as {cid}",
        done.format,
        done.virtual_size >> 20,
        done.image_size,
        done.container.describe(),
        host.pool_name()
    ));
    Ok(Value::String(cid))
}

fn declared_format(cloud_properties: &Object) -> Result<Option<DiskFormat>> {
    match cloud_properties.get("disk_format") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DiskFormat::parse(s).map(Some).ok_or_else(|| {
            CpiError::cloud(format!(
                "unsupported stemcell disk_format '{s}': this CPI imports qcow2 and raw"
            ))
        }),
        Some(other) => Err(CpiError::cloud(format!(
            "stemcell cloud_properties.disk_format must be a string, got {other}"
        ))),
    }
}

struct Import<'a> {
    host: &'a dyn StemcellHost,
    cid: &'a str,
    image_path: &'a str,
    declared: Option<DiskFormat>,
    cloud_properties: &'a Object,
}

struct Imported {
    format: DiskFormat,
    container: Container,
    image_size: u64,
    virtual_size: u64,
}

/// The reader thread's side of the pipeline, as seen from the upload.
struct Chunks {
    rx: Receiver<std::result::Result<Event, String>>,
    recycle: Sender<Vec<u8>>,
    path: String,
}

impl Chunks {
    fn next(&self) -> Result<Event> {
        match self.rx.recv() {
            Ok(Ok(event)) => Ok(event),
            Ok(Err(message)) => Err(CpiError::cloud(format!(
                "stemcell image {}: {message}",
                self.path
            ))),
            Err(_) => Err(CpiError::cloud(format!(
                "stemcell image {}: the reader stopped without a reason",
                self.path
            ))),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        // The reader may have finished already; then the buffer is just freed.
        let _ = self.recycle.send(buf);
    }
}

impl Import<'_> {
    fn run(&self, log: &mut Logger) -> Result<Imported> {
        let (tx, rx) = mpsc::sync_channel(DEPTH);
        let (recycle, recycled) = mpsc::channel();
        let path = Path::new(self.image_path);
        std::thread::scope(|s| {
            s.spawn(move || archive::read_root_image(path, CHUNK, tx, recycled));
            let chunks = Chunks {
                rx,
                recycle,
                path: self.image_path.to_string(),
            };
            // Returning drops `chunks`, which stops the reader if it is still going.
            self.pipeline(chunks, log)
        })
    }

    fn pipeline(&self, chunks: Chunks, log: &mut Logger) -> Result<Imported> {
        let (container, size) = match chunks.next()? {
            Event::Found { container, size } => (container, size),
            _ => {
                return Err(CpiError::cloud(
                    "stemcell image reader sent data before finding root.img",
                ))
            }
        };
        log.info(format!(
            "reading root.img ({size} bytes) from a {} at {}",
            container.describe(),
            self.image_path
        ));

        // Judge the first bytes before anything is created.
        let want = usize::try_from(size).unwrap_or(usize::MAX).min(PREFIX_LEN);
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut have = 0;
        let mut ended = false;
        while have < want {
            match chunks.next()? {
                Event::Data(d) => {
                    have += d.len();
                    held.push(d);
                }
                Event::End => {
                    ended = true;
                    break;
                }
                Event::Found { .. } => {
                    return Err(CpiError::cloud("image reader found root.img twice"))
                }
            }
        }
        let mut prefix = Vec::with_capacity(want);
        for d in &held {
            prefix.extend_from_slice(&d[..d.len().min(want - prefix.len())]);
        }
        let root = image::inspect(&prefix, size).map_err(|m| {
            CpiError::cloud(format!("refusing stemcell image {}: {m}", self.image_path))
        })?;
        drop(prefix);
        if let Some(declared) = self.declared {
            if declared != root.format {
                return Err(CpiError::cloud(format!(
                    "stemcell declares disk_format '{declared}' but its root.img is a {} image",
                    root.format
                )));
            }
        }

        // A qcow2 image is written whole; a raw one only where it holds data,
        // which the guard during the upload then follows step by step.
        let first_need = match root.format {
            DiskFormat::Qcow2 => root.image_size,
            DiskFormat::Raw => root.image_size.min(SPACE_STEP),
        };
        self.ensure_space(first_need)?;
        self.host
            .create_volume(self.cid, root.virtual_size, root.format)?;
        log.info(format!(
            "created {} volume {} ({} bytes virtual)",
            root.format, self.cid, root.virtual_size
        ));
        // Best effort: leftovers of killed imports go, judged by the host's
        // clock as read from the volume just created.
        sweep_partial_imports(self.host, log, self.cid);
        let outcome = self
            .upload(&root, held, ended, &chunks)
            .and_then(|()| self.verify(&root))
            .and_then(|()| self.write_marker(&root, container));
        if let Err(e) = outcome {
            return Err(self.clean_up(e, log));
        }
        Ok(Imported {
            format: root.format,
            container,
            image_size: root.image_size,
            virtual_size: root.virtual_size,
        })
    }

    fn upload(
        &self,
        root: &RootImage,
        held: Vec<Vec<u8>>,
        ended: bool,
        chunks: &Chunks,
    ) -> Result<()> {
        let doing = format!("uploading stemcell image to volume {}", self.cid);
        let sparse = root.format == DiskFormat::Raw;
        let mut up = self
            .host
            .start_upload(self.cid, root.image_size, sparse)
            .map_err(|e| e.context(&doing))?;
        let mut walk = root
            .qcow2
            .as_ref()
            .map(|h| Qcow2Walk::new(h, root.image_size));
        let mut since_check = 0u64;
        let mut feed = |buf: &[u8]| -> Result<()> {
            // Re-check free space as data lands: another writer may be
            // filling the pool, and libvirtd dies when an upload hits ENOSPC.
            if since_check >= SPACE_STEP {
                since_check = 0;
                self.ensure_space(root.image_size.saturating_sub(up.sent()).min(SPACE_STEP))?;
            }
            if let Some(w) = walk.as_mut() {
                w.feed(buf).map_err(|m| {
                    CpiError::cloud(format!("refusing stemcell image {}: {m}", self.image_path))
                })?;
            }
            if sparse {
                for seg in image::segments(buf) {
                    match seg {
                        Segment::Data(a, b) => {
                            since_check += (b - a) as u64;
                            up.send(&buf[a..b])
                        }
                        Segment::Hole(n) => up.send_hole(n as u64),
                    }
                    .map_err(|e| e.context(&doing))?;
                }
                Ok(())
            } else {
                since_check += buf.len() as u64;
                up.send(buf).map_err(|e| e.context(&doing))
            }
        };
        for d in held {
            feed(&d)?;
            chunks.give_back(d);
        }
        if !ended {
            loop {
                match chunks.next()? {
                    Event::Data(d) => {
                        feed(&d)?;
                        chunks.give_back(d);
                    }
                    Event::End => break,
                    Event::Found { .. } => {
                        return Err(CpiError::cloud("image reader found root.img twice"))
                    }
                }
            }
        }
        if up.sent() != root.image_size {
            return Err(CpiError::cloud(format!(
                "{doing}: sent {} of {} bytes",
                up.sent(),
                root.image_size
            )));
        }
        if let Some(w) = walk {
            w.finish().map_err(|m| {
                CpiError::cloud(format!("refusing stemcell image {}: {m}", self.image_path))
            })?;
        }
        up.finish().map_err(|e| e.context(&doing))
    }

    /// Fails with NoDiskSpace, before anything is written, when the pool
    /// cannot take `need` more bytes with `SPACE_MARGIN` to spare.
    fn ensure_space(&self, need: u64) -> Result<()> {
        // Recounted: what this import has written so far is not in libvirt's count.
        let free = self.host.available_bytes(true)?;
        if free < need.saturating_add(SPACE_MARGIN) {
            return Err(CpiError::new(
                ErrorKind::NoDiskSpace,
                format!(
                    "importing stemcell {} needs {} MiB more in the storage pool (plus {} MiB to spare), which has {} MiB free",
                    self.cid,
                    need.div_ceil(MIB),
                    SPACE_MARGIN / MIB,
                    free / MIB
                ),
            ));
        }
        Ok(())
    }

    /// What libvirt now holds must be what we meant to import.
    fn verify(&self, root: &RootImage) -> Result<()> {
        let doing = format!("verifying volume {} after the upload", self.cid);
        let facts = self
            .host
            .volume(self.cid)
            .map_err(|e| e.context(&doing))?
            .ok_or_else(|| {
                CpiError::cloud(format!("{doing}: the volume disappeared during the upload"))
            })?;
        let mut wrong = Vec::new();
        if facts.format.as_deref() != Some(root.format.as_str()) {
            wrong.push(format!(
                "format {:?}, expected {}",
                facts.format, root.format
            ));
        }
        if facts.capacity != root.virtual_size {
            wrong.push(format!(
                "capacity {}, expected {}",
                facts.capacity, root.virtual_size
            ));
        }
        if facts.physical < root.image_size {
            wrong.push(format!(
                "file size {}, expected at least {}",
                facts.physical, root.image_size
            ));
        }
        if let Some(b) = &facts.backing_path {
            wrong.push(format!("backing store {b}, expected none"));
        }
        if !wrong.is_empty() {
            return Err(CpiError::cloud(format!(
                "{doing}: libvirt reports {}",
                wrong.join("; ")
            )));
        }
        Ok(())
    }

    fn write_marker(&self, root: &RootImage, container: Container) -> Result<()> {
        let meta = StemcellRecord {
            cloud_properties: self.cloud_properties.clone(),
            container: Some(container.describe().to_string()),
            format: Some(root.format.as_str().to_string()),
            image_size: Some(root.image_size),
            stemcell_cid: Some(self.cid.to_string()),
            virtual_size: Some(root.virtual_size),
        };
        let bytes = serde_json::to_vec(&meta)
            .map_err(|e| CpiError::cloud(format!("encoding the stemcell marker: {e}")))?;
        self.host.create_volume_with(&marker_name(self.cid), &bytes)
    }

    /// Removes what this import created; the original error stays the
    /// message, with a note if the cleanup failed too.
    fn clean_up(&self, error: CpiError, log: &mut Logger) -> CpiError {
        let mut problems = Vec::new();
        for name in [marker_name(self.cid), self.cid.to_string()] {
            if let Err(e) = self.host.delete_volume(&name) {
                problems.push(e.message);
            }
        }
        if problems.is_empty() {
            log.info(format!("import failed; removed volume {}", self.cid));
            error
        } else {
            let note = format!(
                "; removing the partial volume failed too ({}): it has no marker, so no VM can use it, and a later create_stemcell removes it",
                problems.join("; ")
            );
            let mut error = error;
            error.message.push_str(&note);
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declared_formats() {
        let props = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(declared_format(&props(json!({}))).unwrap(), None);
        assert_eq!(
            declared_format(&props(json!({"disk_format": "qcow2"}))).unwrap(),
            Some(DiskFormat::Qcow2)
        );
        let e = declared_format(&props(json!({"disk_format": "vmdk"}))).unwrap_err();
        assert!(e
            .message
            .contains("unsupported stemcell disk_format 'vmdk'"));
        assert!(declared_format(&props(json!({"disk_format": 3}))).is_err());
    }
}
