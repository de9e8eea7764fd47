//! `create_stemcell` and `delete_stemcell`.
//!
//! Import pipeline: a reader thread gunzips and untars `root.img` in flight
//! (image::archive) into a bounded channel; this thread judges the first
//! bytes (image::inspect) before any volume exists, then creates the volume
//! and streams the rest into libvirt's upload (sparse for raw images), checks
//! the qcow2 tables as they pass, verifies what libvirt holds, and only then
//! writes the completion marker `sc-<uuid>.meta`. Any failure after the volume
//! was created deletes it again; a killed process leaves a marker-less volume
//! that no caller accepts and the next import sweeps.
//!
//! A stemcell that still backs a VM's root disk is not deleted: the call
//! fails naming the VMs (deleting the file under a running overlay would
//! break those VMs, and deferring the deletion would need state outside
//! libvirt).

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use serde_json::Value;
use virt::storage_pool::StoragePool;

use super::Call;
use crate::error::{CpiError, ErrorKind, Result};
use crate::image::archive::{self, Container, Event};
use crate::image::{self, DiskFormat, Qcow2Walk, RootImage, Segment, PREFIX_LEN};
use crate::libvirt::stemcell::PARTIAL_MAX_AGE_SECS;
use crate::libvirt::volume::MIB;
use crate::libvirt::Libvirt;
use crate::log::Logger;
use crate::method::Object;
use crate::names::{is_stemcell_cid, is_vm_cid, marker_name, new_stemcell_cid};
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
const SPACE_MARGIN: u64 = 8 * MIB;

pub fn create_stemcell(
    call: &mut Call,
    image_path: &str,
    cloud_properties: &Object,
) -> Result<Value> {
    let declared = declared_format(cloud_properties)?;
    let (lv, log, config) = call.parts()?;
    let pool = lv.pool(&config.pool)?;
    let cid = new_stemcell_cid();
    let import = Import {
        lv,
        pool: &pool,
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
        config.pool.name
    ));
    Ok(Value::String(cid))
}

pub fn delete_stemcell(call: &mut Call, cid: &str) -> Result<Value> {
    if !is_stemcell_cid(cid) {
        call.log.summary(format!(
            "{cid} is not a stemcell CID of this CPI: nothing to delete"
        ));
        return Ok(Value::Null);
    }
    let (lv, log, config) = call.parts()?;
    let pool = lv.pool(&config.pool)?;
    let in_use = |users: Vec<String>| {
        let names: Vec<String> = users.iter().map(|v| user_name(v)).collect();
        CpiError::cloud(format!(
            "stemcell {cid} is still in use: it backs the root disk of {}; delete those VMs first",
            names.join(", ")
        ))
    };
    let image_path = match lv.find_volume(&pool, cid)? {
        Some(vol) => Some(lv.volume_path(&vol, cid)?),
        None => None,
    };
    let marker_doc = match &image_path {
        Some(path) => {
            let users = lv.volumes_backed_by(&pool, path)?;
            if !users.is_empty() {
                return Err(in_use(users));
            }
            // Kept as it is (any fields), to be put back unchanged.
            lv.read_json_volume::<Value>(&pool, &marker_name(cid))
                .ok()
                .flatten()
        }
        None => None,
    };
    // Marker first: from then on the stemcell is incomplete, and a crash
    // before the image goes leaves a leftover the sweep removes.
    let marker = lv.delete_volume(&pool, &marker_name(cid))?;
    // A create_vm that found the marker before it went may have made its
    // overlay since (it re-checks the marker after making it): look again,
    // and put the marker back if it did.
    if let Some(path) = &image_path {
        let users = lv.volumes_backed_by(&pool, path)?;
        if !users.is_empty() {
            if let Some(doc) = &marker_doc {
                lv.write_json_volume(&pool, &marker_name(cid), doc)?;
            }
            return Err(in_use(users));
        }
    }
    let image = lv.delete_volume(&pool, cid)?;
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
    lv: &'a Libvirt,
    pool: &'a StoragePool,
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
        let vol = self
            .lv
            .create_volume(self.pool, self.cid, root.virtual_size, root.format)?;
        log.info(format!(
            "created {} volume {} ({} bytes virtual)",
            root.format, self.cid, root.virtual_size
        ));
        let outcome = self
            .sweep(&vol, log)
            .and_then(|()| self.upload(&vol, &root, held, ended, &chunks))
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

    /// Best effort: leftovers of killed imports go, judged by the host's
    /// clock as read from the volume we just created.
    fn sweep(&self, vol: &virt::storage_vol::StorageVol, log: &mut Logger) -> Result<()> {
        let host_now = match self.lv.volume_facts(vol, self.cid) {
            Ok(f) => f.mtime,
            Err(e) => {
                log.warn(format!("not sweeping stemcell leftovers: {}", e.message));
                None
            }
        };
        if let Some(now) = host_now {
            match self
                .lv
                .sweep_partial_stemcells(self.pool, now, PARTIAL_MAX_AGE_SECS, self.cid)
            {
                Ok(removed) if !removed.is_empty() => log.info(format!(
                    "removed leftovers of interrupted stemcell imports: {}",
                    removed.join(", ")
                )),
                Ok(_) => {}
                Err(e) => log.warn(format!("sweeping stemcell leftovers: {}", e.message)),
            }
        }
        Ok(())
    }

    fn upload(
        &self,
        vol: &virt::storage_vol::StorageVol,
        root: &RootImage,
        held: Vec<Vec<u8>>,
        ended: bool,
        chunks: &Chunks,
    ) -> Result<()> {
        let doing = format!("uploading stemcell image to volume {}", self.cid);
        let sparse = root.format == DiskFormat::Raw;
        let mut up = self
            .lv
            .start_upload(vol, root.image_size, sparse)
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
        let free = self.lv.pool_available(self.pool)?;
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
        let vol = self.lv.find_volume(self.pool, self.cid)?.ok_or_else(|| {
            CpiError::cloud(format!("{doing}: the volume disappeared during the upload"))
        })?;
        let facts = self
            .lv
            .volume_facts(&vol, self.cid)
            .map_err(|e| e.context(&doing))?;
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
        self.lv
            .create_volume_with(self.pool, &marker_name(self.cid), &bytes)
            .map(|_| ())
    }

    /// Removes what this import created; the original error stays the
    /// message, with a note if the cleanup failed too.
    fn clean_up(&self, error: CpiError, log: &mut Logger) -> CpiError {
        let mut problems = Vec::new();
        for name in [marker_name(self.cid), self.cid.to_string()] {
            if let Err(e) = self.lv.delete_volume(self.pool, &name) {
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
