//! Stemcell root disks judged from their bytes: which format (qcow2 or raw),
//! what capacity the volume needs, and whether the image is safe to hand to
//! QEMU. Pure logic, no I/O: `archive` (below) reads the image file.
//!
//! A qcow2 image is refused when QEMU would read anything but the image itself
//! (a backing file, an external data file), when it cannot be used without a
//! key (encryption), when it carries an incompatible feature we do not know,
//! internal snapshots or persistent bitmaps (a stemcell is one plain disk),
//! when a table is not cluster-aligned (QEMU would not open it) and when its
//! header or tables point past the end of the image (truncated or corrupt).
//! Raw is what is left: never a compressed file or an archive, always whole
//! 512-byte sectors. The header checks need only the first cluster, so they run
//! before any volume exists; `Qcow2Walk` checks the L1 and L2 tables while the
//! bytes stream past on their way to libvirt.

pub mod archive;
mod qcow2;
mod segments;

pub use qcow2::{Qcow2Header, Qcow2Walk};
pub use segments::{segments, Segment, MIN_HOLE};

use std::fmt;

/// The most bytes `inspect` needs to see: a qcow2 header and its extensions
/// live in the first cluster, and clusters are at most 2 MiB.
pub const PREFIX_LEN: usize = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    /// The stemcell manifest's `cloud_properties.disk_format`.
    pub fn parse(s: &str) -> Option<DiskFormat> {
        match s {
            "qcow2" => Some(DiskFormat::Qcow2),
            "raw" => Some(DiskFormat::Raw),
            _ => None,
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the root disk is, as far as its header tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    pub format: DiskFormat,
    /// Bytes of the image file (what is uploaded).
    pub image_size: u64,
    /// The disk size a guest sees: the volume's capacity.
    pub virtual_size: u64,
    pub qcow2: Option<Qcow2Header>,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Judges the image from its first bytes. `prefix` holds the first
/// `min(PREFIX_LEN, image_size)` bytes; `image_size` is the whole image's.
pub fn inspect(prefix: &[u8], image_size: u64) -> Result<RootImage, String> {
    if image_size == 0 {
        return Err("root.img is empty".into());
    }
    if prefix.starts_with(QCOW2_MAGIC) {
        let header = Qcow2Header::parse(prefix, image_size)?;
        return Ok(RootImage {
            format: DiskFormat::Qcow2,
            image_size,
            virtual_size: header.size,
            qcow2: Some(header),
        });
    }
    if let Some(other) = foreign_format(prefix) {
        return Err(format!(
            "root.img is a {other} image; only qcow2 and raw stemcells are supported"
        ));
    }
    if let Some(other) = packed_format(prefix) {
        return Err(format!(
            "root.img is {other}, not a disk image; unpack it first (only qcow2 and raw stemcells are supported)"
        ));
    }
    // Whatever else a file is, a disk is whole sectors: this catches what
    // has no magic number to tell (a tar cut inside its first header, text).
    if !image_size.is_multiple_of(512) {
        return Err(format!(
            "root.img is neither qcow2 nor a raw disk image: {image_size} bytes is not a whole number of 512-byte sectors (a truncated or compressed file?)"
        ));
    }
    Ok(RootImage {
        format: DiskFormat::Raw,
        image_size,
        virtual_size: image_size,
        qcow2: None,
    })
}

/// Image formats QEMU (or libvirt's format probing) would recognise, which a
/// raw stemcell must therefore not look like.
fn foreign_format(p: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| p.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfd") {
        Some("QED")
    } else if at(0, b"QFI") {
        Some("qcow (version 1)")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") || at(0, b"COWD") {
        Some("VMDK")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("VDI")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(0, b"conectix") {
        Some("VHD")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS-encrypted")
    } else if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        Some("Parallels")
    } else if at(0, b"Bochs Virtual HD Image") {
        Some("Bochs")
    } else if at(0, b"#!/bin/sh\n#V2.0 Format") {
        Some("cloop")
    } else {
        None
    }
}

/// Compressed files and archives, which become raw stemcells holding
/// garbage if taken for disks (`disk_format` absent lets the bytes decide).
/// Magic numbers from each format's specification.
fn packed_format(p: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| p.get(off..off + magic.len()) == Some(magic);
    if at(0, &[0x1f, 0x8b]) {
        Some("gzip-compressed")
    } else if at(0, b"BZh") && p.get(3).is_some_and(|d| (b'1'..=b'9').contains(d)) {
        Some("bzip2-compressed")
    } else if at(0, b"\xfd7zXZ\x00") {
        Some("xz-compressed")
    } else if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd-compressed")
    } else if at(0, b"PK\x03\x04") || at(0, b"PK\x05\x06") {
        Some("a zip archive")
    } else if at(0, b"7z\xbc\xaf\x27\x1c") {
        Some("a 7-zip archive")
    } else if at(257, b"ustar") {
        Some("a tar archive")
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod test_fixtures {
    use super::*;

    /// A minimal valid qcow2 v3 header: 64 KiB clusters, 1 MiB virtual,
    /// refcount table at cluster 1, L1 at cluster 3, image 4 clusters.
    pub fn v3() -> Vec<u8> {
        let mut h = vec![0u8; 4 * 65536];
        h[0..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 * 65536).to_be_bytes());
        h[48..56].copy_from_slice(&65536u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    pub fn check(img: &[u8]) -> Result<RootImage, String> {
        inspect(&img[..img.len().min(PREFIX_LEN)], img.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::test_fixtures::*;
    use super::*;

    #[test]
    fn valid_qcow2_and_raw() {
        let r = check(&v3()).unwrap();
        assert_eq!(r.format, DiskFormat::Qcow2);
        assert_eq!(r.virtual_size, 1 << 20);
        let raw = vec![0u8; 1 << 20];
        let r = check(&raw).unwrap();
        assert_eq!((r.format, r.virtual_size), (DiskFormat::Raw, 1 << 20));
        assert!(check(&[]).unwrap_err().contains("empty"));
    }

    #[test]
    fn compressed_and_archived_files_are_not_raw() {
        let sector_multiple = |magic: &[u8], at: usize| {
            let mut v = vec![7u8; 8192];
            v[at..at + magic.len()].copy_from_slice(magic);
            v
        };
        for (magic, at, what) in [
            (&b"BZh91AY&SY"[..], 0, "bzip2"),
            (b"\xfd7zXZ\x00\x00", 0, "xz"),
            (b"PK\x03\x04", 0, "zip"),
            (&[0x28, 0xb5, 0x2f, 0xfd], 0, "zstd"),
            (&[0x1f, 0x8b, 8], 0, "gzip"),
            (b"ustar\x0000", 257, "tar"),
        ] {
            let e = check(&sector_multiple(magic, at)).unwrap_err();
            assert!(
                e.contains(what) && e.contains("unpack it first"),
                "{what}: {e}"
            );
        }
        // A tar cut inside its first header has no magic to see; nor does
        // a text file. Neither is a whole number of sectors.
        let mut cut_tar = b"root.img".to_vec();
        cut_tar.resize(300, 0);
        let e = check(&cut_tar).unwrap_err();
        assert!(e.contains("not a whole number of 512-byte sectors"), "{e}");
        // An MBR boot sector is fine.
        let mut disk = vec![0u8; 1 << 20];
        disk[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        disk[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(check(&disk).unwrap().format, DiskFormat::Raw);
    }

    #[test]
    fn foreign_formats_are_not_raw() {
        let mut v = vec![0u8; 4096];
        v[..4].copy_from_slice(b"KDMV");
        assert!(check(&v).unwrap_err().contains("VMDK"));
        v[..6].copy_from_slice(b"LUKS\xba\xbe");
        assert!(check(&v).unwrap_err().contains("LUKS"));
    }
}
