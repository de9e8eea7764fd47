//! qcow2 images judged from their bytes: the header and its extensions
//! (`Qcow2Header`, from the first cluster) and the L1/L2 tables as they
//! stream past (`Qcow2Walk`).

use std::collections::BTreeSet;

/// Incompatible feature bits (qcow2 spec, "incompatible_features").
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN_SAFE: u64 = INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types that make QEMU read more than the image.
const EXT_END: u32 = 0;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Persistent dirty bitmaps (QCOW2_EXT_MAGIC_BITMAPS in QEMU's block/qcow2.c).
const EXT_BITMAPS: u32 = 0x2385_2875;

/// Host offsets in L1/L2 entries (bits 9..55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
/// QEMU's own limit on the L1 table (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub incompatible_features: u64,
    pub header_length: u32,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Qcow2Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entry_size(&self) -> u64 {
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            16
        } else {
            8
        }
    }

    /// Parses and checks the header. `p` is the image's first
    /// `min(PREFIX_LEN, image_size)` bytes.
    pub fn parse(p: &[u8], image_size: u64) -> Result<Qcow2Header, String> {
        let corrupt = |what: String| format!("corrupt qcow2 image: {what}");
        if p.len() < 72 {
            return Err(format!(
                "truncated qcow2 image: {} bytes, shorter than a qcow2 header",
                p.len()
            ));
        }
        let version = be32(p, 4);
        if version != 2 && version != 3 {
            return Err(format!(
                "unsupported qcow2 version {version} (only 2 and 3 exist)"
            ));
        }
        let backing_file_offset = be64(p, 8);
        let backing_file_size = be32(p, 16);
        let cluster_bits = be32(p, 20);
        let size = be64(p, 24);
        let crypt_method = be32(p, 32);
        let l1_size = be32(p, 36);
        let l1_table_offset = be64(p, 40);
        let refcount_table_offset = be64(p, 48);
        let refcount_table_clusters = be32(p, 56);
        let nb_snapshots = be32(p, 60);
        let snapshots_offset = be64(p, 64);

        let (incompatible_features, refcount_order, header_length) = if version == 3 {
            if p.len() < 104 {
                return Err(format!(
                    "truncated qcow2 image: {} bytes, shorter than a version 3 header",
                    p.len()
                ));
            }
            (be64(p, 72), be32(p, 96), be32(p, 100))
        } else {
            (0, 4, 72)
        };

        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} outside 9..21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if version == 3 && (header_length < 104 || header_length % 8 != 0) {
            return Err(corrupt(format!("header_length {header_length}")));
        }
        if u64::from(header_length) > cluster_size {
            return Err(corrupt(format!(
                "header_length {header_length} larger than a cluster ({cluster_size})"
            )));
        }

        // What would make QEMU read something other than this image.
        if backing_file_offset != 0 || backing_file_size != 0 {
            let name = usize::try_from(backing_file_offset)
                .ok()
                .and_then(|o| p.get(o..o.checked_add(backing_file_size as usize)?))
                .map(|b| format!(" '{}'", String::from_utf8_lossy(b)))
                .unwrap_or_default();
            return Err(format!(
                "qcow2 image has a backing file{name}: a stemcell must be self-contained"
            ));
        }
        if incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(
                "qcow2 image keeps its data in an external data file: a stemcell must be self-contained"
                    .into(),
            );
        }
        match crypt_method {
            0 => {}
            1 => {
                return Err("qcow2 image is encrypted (AES): a stemcell must not need a key".into())
            }
            2 => {
                return Err(
                    "qcow2 image is encrypted (LUKS): a stemcell must not need a key".into(),
                )
            }
            m => return Err(format!("qcow2 image is encrypted (unknown method {m})")),
        }
        if incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err("qcow2 image is marked corrupt by QEMU".into());
        }
        if incompatible_features & INCOMPAT_DIRTY != 0 {
            return Err(
                "qcow2 image is marked dirty (its refcounts may be inconsistent; repair it with qemu-img check -r all)"
                    .into(),
            );
        }
        let unknown = incompatible_features
            & !(INCOMPAT_KNOWN_SAFE | INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE);
        if unknown != 0 {
            return Err(format!(
                "qcow2 image uses unknown incompatible features (bits {unknown:#x})"
            ));
        }
        // The compression type and its feature bit go together both ways
        // (QEMU's validate_compression_type): zlib, the default when the
        // header has no such field, with the bit set is refused too.
        let compression_type = if version == 3 && header_length > 104 {
            p.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        if compression_type > 1 {
            return Err(format!(
                "qcow2 image uses unknown compression type {compression_type}"
            ));
        }
        if (compression_type != 0) != (incompatible_features & INCOMPAT_COMPRESSION != 0) {
            return Err(corrupt(
                "compression type and its incompatible feature bit disagree".into(),
            ));
        }
        // Extended L2 entries split a cluster in 32 subclusters, which QEMU
        // wants to be at least 512 bytes ("Unsupported subcluster size").
        if incompatible_features & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
            return Err(corrupt(format!(
                "extended L2 entries with {cluster_size}-byte clusters (subclusters under 512 bytes)"
            )));
        }
        check_extensions(p, header_length as usize, cluster_size, image_size)?;

        if refcount_order > 6 {
            return Err(corrupt(format!("refcount_order {refcount_order}")));
        }
        // QEMU sees whole sectors only (total_sectors = size / 512 in
        // qcow2_do_open) and qemu-img only makes such sizes: anything else
        // is hand-made, and the volume would claim more than the guest gets.
        if size == 0 || !size.is_multiple_of(512) {
            return Err(corrupt(format!(
                "virtual size {size} is not a positive whole number of 512-byte sectors"
            )));
        }
        let header = Qcow2Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            incompatible_features,
            header_length,
        };

        // Tables must fit in the image: a cut-off image fails here first.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {l1_size} entries is too large"
            )));
        }
        let l2_entries = cluster_size / header.l2_entry_size();
        let needed_l1 = size.div_ceil(cluster_size * l2_entries);
        if u64::from(l1_size) < needed_l1 {
            return Err(corrupt(format!(
                "L1 table of {l1_size} entries is too small for a virtual size of {size} bytes"
            )));
        }
        let within = |what: &str, offset: u64, len: u64| -> Result<(), String> {
            if !offset.is_multiple_of(cluster_size) {
                return Err(corrupt(format!(
                    "{what} at offset {offset} is not cluster-aligned"
                )));
            }
            match offset.checked_add(len) {
                Some(end) if end <= image_size => Ok(()),
                _ => Err(format!(
                    "truncated qcow2 image: its {what} ({offset}+{len}) lies beyond the end of the image ({image_size} bytes)"
                )),
            }
        };
        // QEMU's qcow2_do_open checks every table with qcow2_validate_table
        // (block/qcow2.c), which wants a cluster-aligned offset even for a
        // table of no entries: an image that breaks this, QEMU cannot open.
        // It also wants offset + size to fit in an int64_t.
        let qemu_valid = |what: &str, offset: u64, bytes: u64| -> Result<(), String> {
            if offset > (i64::MAX as u64).saturating_sub(bytes) {
                Err(corrupt(format!("{what} offset {offset} is invalid")))
            } else if offset.is_multiple_of(cluster_size) {
                Ok(())
            } else {
                Err(corrupt(format!(
                    "{what} at offset {offset} is not cluster-aligned"
                )))
            }
        };
        qemu_valid("L1 table", l1_table_offset, l1_bytes)?;
        qemu_valid(
            "snapshot table",
            snapshots_offset,
            u64::from(nb_snapshots) * 40,
        )?;
        if l1_size > 0 {
            within("L1 table", l1_table_offset, l1_bytes)?;
        }
        if refcount_table_clusters == 0 {
            return Err(corrupt("no refcount table".into()));
        }
        within(
            "refcount table",
            refcount_table_offset,
            u64::from(refcount_table_clusters) * cluster_size,
        )?;
        // Internal snapshots are other disk states (and maybe a VM's memory)
        // riding along in the stemcell, which every VM's overlay would carry
        // and QEMU could be asked to revert to: a stemcell is one disk.
        if nb_snapshots > 0 {
            return Err(format!(
                "qcow2 image holds {nb_snapshots} internal snapshot(s): a stemcell must be a single disk state (remove them with qemu-img snapshot -d, or qemu-img convert the image)"
            ));
        }
        Ok(header)
    }
}

/// Walks the header extensions from the end of the header to the end of the
/// first cluster, as QEMU's qcow2_read_extensions (block/qcow2.c) does: an
/// extension whose length runs past the first cluster makes QEMU refuse the
/// image ("Header extension too large"), so it is refused here too. Past the
/// end of a small file QEMU reads zeros, which end the list.
fn check_extensions(
    p: &[u8],
    mut at: usize,
    cluster_size: u64,
    image_size: u64,
) -> Result<(), String> {
    let end = usize::try_from(cluster_size).unwrap_or(usize::MAX);
    while at < end {
        if at as u64 >= image_size {
            return Ok(());
        }
        if at + 8 > p.len() {
            return Err("truncated qcow2 image: header extensions cut off".into());
        }
        let kind = be32(p, at);
        let len = be32(p, at + 4) as usize;
        at += 8;
        if at > end || len > end - at {
            return Err(format!(
                "corrupt qcow2 image: header extension {kind:#x} of {len} bytes runs past the first cluster"
            ));
        }
        match kind {
            EXT_END => return Ok(()),
            EXT_CRYPTO => {
                return Err(
                    "qcow2 image carries a disk encryption header: a stemcell must not need a key"
                        .into(),
                )
            }
            // Bitmaps belong to one disk's history of writes; opened as a
            // read-only backing file QEMU cannot keep them consistent (it
            // wants to rewrite the header), and they mean nothing to a new VM.
            EXT_BITMAPS => {
                return Err(
                    "qcow2 image carries persistent dirty bitmaps: a stemcell must be a plain disk image (remove them with qemu-img bitmap --remove, or qemu-img convert the image)"
                        .into(),
                )
            }
            EXT_DATA_FILE => {
                let name = p
                    .get(at..at + len)
                    .map(|b| format!(" '{}'", String::from_utf8_lossy(b)))
                    .unwrap_or_default();
                return Err(format!(
                    "qcow2 image names an external data file{name}: a stemcell must be self-contained"
                ));
            }
            _ => {}
        }
        at += len.div_ceil(8) * 8;
    }
    Ok(())
}

/// Checks a qcow2 image's L1 and L2 tables while its bytes stream past in
/// order: every L2 table and data cluster they point to must lie inside the
/// image. Tables that appear in the stream before the entry pointing to them
/// cannot be checked (qemu-img writes metadata first, so this is rare); the
/// header check already covers the L1 and refcount tables themselves.
pub struct Qcow2Walk {
    cluster_bits: u32,
    l2_entry_size: u64,
    image_size: u64,
    pos: u64,
    l1: (u64, u64),
    l1_buf: Vec<u8>,
    /// Offsets of L2 tables not yet reached by the stream.
    pending_l2: BTreeSet<u64>,
    /// L2 tables being collected: (offset, bytes so far).
    active_l2: Vec<(u64, Vec<u8>)>,
}

impl Qcow2Walk {
    pub fn new(h: &Qcow2Header, image_size: u64) -> Qcow2Walk {
        Qcow2Walk {
            cluster_bits: h.cluster_bits,
            l2_entry_size: h.l2_entry_size(),
            image_size,
            pos: 0,
            l1: (h.l1_table_offset, u64::from(h.l1_size) * 8),
            l1_buf: Vec::new(),
            pending_l2: BTreeSet::new(),
            active_l2: Vec::new(),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The next bytes of the image, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        let start = self.pos;
        let end = start + chunk.len() as u64;
        let slice = |from: u64, to: u64| &chunk[(from - start) as usize..(to - start) as usize];

        let (l1_off, l1_len) = self.l1;
        if l1_len > 0 && start < l1_off + l1_len && end > l1_off {
            let from = start.max(l1_off);
            let to = end.min(l1_off + l1_len);
            self.l1_buf.extend_from_slice(slice(from, to));
            if self.l1_buf.len() as u64 == l1_len {
                let l1 = std::mem::take(&mut self.l1_buf);
                self.check_l1(&l1, to)?;
            }
        }

        while let Some(&off) = self.pending_l2.first() {
            if off >= end {
                break;
            }
            self.pending_l2.remove(&off);
            self.active_l2.push((off, Vec::new()));
        }
        let cs = self.cluster_size();
        let mut done = Vec::new();
        for (i, (off, buf)) in self.active_l2.iter_mut().enumerate() {
            let from = start.max(*off);
            let to = end.min(*off + cs);
            if from < to {
                buf.extend_from_slice(slice(from, to));
            }
            if buf.len() as u64 == cs {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let (off, table) = self.active_l2.swap_remove(i);
            self.check_l2(off, &table)?;
        }
        self.pos = end;
        Ok(())
    }

    /// After the last byte: everything pointed to was seen.
    pub fn finish(self) -> Result<(), String> {
        if self.pos != self.image_size {
            return Err(format!(
                "qcow2 image ended after {} of {} bytes",
                self.pos, self.image_size
            ));
        }
        if !self.active_l2.is_empty() || !self.pending_l2.is_empty() {
            return Err("truncated qcow2 image: an L2 table is cut off".into());
        }
        Ok(())
    }

    /// `seen_up_to`: the stream position just after the L1 table.
    fn check_l1(&mut self, l1: &[u8], seen_up_to: u64) -> Result<(), String> {
        let cs = self.cluster_size();
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let off = be64(e, 0) & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(format!(
                    "corrupt qcow2 image: L1 entry {i} points to an unaligned L2 table at {off}"
                ));
            }
            if off.checked_add(cs).is_none_or(|e| e > self.image_size) {
                return Err(format!(
                    "truncated qcow2 image: L2 table at {off} lies beyond the end of the image ({} bytes)",
                    self.image_size
                ));
            }
            if off >= seen_up_to {
                self.pending_l2.insert(off);
            }
        }
        Ok(())
    }

    fn check_l2(&self, table_offset: u64, table: &[u8]) -> Result<(), String> {
        // Compressed cluster descriptors: offset in the low 62 - (cluster_bits - 8) bits.
        let compressed_offset_bits = 62 - (self.cluster_bits - 8);
        for e in table.chunks_exact(self.l2_entry_size as usize) {
            let entry = be64(e, 0);
            let off = if entry & L2_COMPRESSED != 0 {
                entry & ((1u64 << compressed_offset_bits) - 1)
            } else {
                entry & OFFSET_MASK
            };
            if off != 0 && off >= self.image_size {
                return Err(format!(
                    "truncated qcow2 image: the L2 table at {table_offset} points to data at {off}, beyond the end of the image ({} bytes)",
                    self.image_size
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_fixtures::{check, v3};

    #[test]
    fn hostile_headers_are_refused() {
        let mut h = v3();
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        h[512..523].copy_from_slice(b"/etc/shadow");
        let e = check(&h).unwrap_err();
        assert!(e.contains("backing file '/etc/shadow'"), "{e}");

        let mut h = v3();
        h[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert!(check(&h).unwrap_err().contains("external data file"));

        let mut h = v3();
        // data-file extension without the feature bit is refused too
        h[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        h[116..120].copy_from_slice(&4u32.to_be_bytes());
        h[120..124].copy_from_slice(b"/dev");
        assert!(check(&h).unwrap_err().contains("external data file '/dev'"));

        for (m, what) in [(1u32, "AES"), (2, "LUKS"), (7, "unknown method 7")] {
            let mut h = v3();
            h[32..36].copy_from_slice(&m.to_be_bytes());
            assert!(check(&h).unwrap_err().contains(what));
        }
        let mut h = v3();
        h[112..116].copy_from_slice(&EXT_CRYPTO.to_be_bytes());
        assert!(check(&h).unwrap_err().contains("encryption header"));

        let mut h = v3();
        h[72..80].copy_from_slice(&(1u64 << 20).to_be_bytes());
        assert!(check(&h)
            .unwrap_err()
            .contains("unknown incompatible features (bits 0x100000)"));
        let mut h = v3();
        h[72..80].copy_from_slice(&(INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION).to_be_bytes());
        h[104] = 1; // zstd
        check(&h).unwrap();
        h[104] = 0; // zlib with the bit set: QEMU refuses that
        assert!(check(&h).unwrap_err().contains("disagree"));
        for bit in [INCOMPAT_DIRTY, INCOMPAT_CORRUPT] {
            let mut h = v3();
            h[72..80].copy_from_slice(&bit.to_be_bytes());
            assert!(check(&h).is_err());
        }
    }

    #[test]
    fn corrupt_and_truncated_qcow2() {
        let h = v3();
        assert!(check(&h[..50]).unwrap_err().contains("truncated"));
        // cut before the L1 table
        assert!(check(&h[..3 * 65536]).unwrap_err().contains("L1 table"));
        let mut bad = v3();
        bad[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(check(&bad).unwrap_err().contains("version 4"));
        let mut bad = v3();
        bad[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(check(&bad).unwrap_err().contains("cluster_bits"));
        let mut bad = v3();
        bad[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(check(&bad).unwrap_err().contains("too small"));
    }

    #[test]
    fn tables_must_be_cluster_aligned_even_when_empty_as_qemu_requires() {
        // A snapshot table offset QEMU's qcow2_validate_table refuses, with
        // no snapshots at all.
        let mut h = v3();
        h[64..72].copy_from_slice(&1000u64.to_be_bytes());
        let e = check(&h).unwrap_err();
        assert!(
            e.contains("snapshot table at offset 1000 is not cluster-aligned"),
            "{e}"
        );
    }

    /// info` cannot open ("Header extension too large"), or sees smaller.
    #[test]
    fn what_qemu_would_not_open_as_declared_is_refused() {
        // Even the end-of-extensions marker: QEMU checks every extension's
        // length before it looks at the type.
        for kind in [EXT_END, 0x1234_5678] {
            let mut h = v3();
            h[112..116].copy_from_slice(&kind.to_be_bytes());
            h[116..120].copy_from_slice(&131_072u32.to_be_bytes());
            let e = check(&h).unwrap_err();
            assert!(e.contains("runs past the first cluster"), "{e}");
        }
        // A snapshot table (of no snapshots) at an offset past int64_t.
        let mut h = v3();
        h[64..72].copy_from_slice(&(1u64 << 63).to_be_bytes());
        let e = check(&h).unwrap_err();
        assert!(
            e.contains("snapshot table offset 9223372036854775808 is invalid"),
            "{e}"
        );
        let mut h = v3();
        h[24..32].copy_from_slice(&((1u64 << 20) - 2).to_be_bytes());
        let e = check(&h).unwrap_err();
        assert!(
            e.contains("not a positive whole number of 512-byte sectors"),
            "{e}"
        );
    }

    #[test]
    fn internal_snapshots_and_bitmaps_are_refused() {
        let mut h = v3();
        h[60..64].copy_from_slice(&1u32.to_be_bytes());
        h[64..72].copy_from_slice(&(2u64 * 65536).to_be_bytes());
        let e = check(&h).unwrap_err();
        assert!(e.contains("1 internal snapshot"), "{e}");
        let mut h = v3();
        h[88..96].copy_from_slice(&1u64.to_be_bytes());
        h[112..116].copy_from_slice(&EXT_BITMAPS.to_be_bytes());
        h[116..120].copy_from_slice(&24u32.to_be_bytes());
        let e = check(&h).unwrap_err();
        assert!(e.contains("persistent dirty bitmaps"), "{e}");
    }

    #[test]
    fn walk_finds_pointers_past_the_end() {
        let mut img = v3();
        // L1[0] -> L2 at cluster 2; L2[0] -> data at cluster 9 (beyond 4 clusters)
        img[3 * 65536..3 * 65536 + 8].copy_from_slice(&(2u64 * 65536).to_be_bytes());
        let hdr = Qcow2Header::parse(&img, img.len() as u64).unwrap();
        img[2 * 65536..2 * 65536 + 8].copy_from_slice(&(9u64 * 65536).to_be_bytes());
        // the L2 table precedes the L1 table in this layout: not checkable
        let mut w = Qcow2Walk::new(&hdr, img.len() as u64);
        for c in img.chunks(1000) {
            w.feed(c).unwrap();
        }
        w.finish().unwrap();

        // put L1 at cluster 1 and refcounts at 3, L2 at 2: now it is seen
        let mut img = v3();
        img[40..48].copy_from_slice(&65536u64.to_be_bytes());
        img[48..56].copy_from_slice(&(3u64 * 65536).to_be_bytes());
        img[65536..65536 + 8].copy_from_slice(&(2u64 * 65536).to_be_bytes());
        img[2 * 65536 + 8..2 * 65536 + 16].copy_from_slice(&(9u64 * 65536).to_be_bytes());
        let hdr = Qcow2Header::parse(&img, img.len() as u64).unwrap();
        let mut w = Qcow2Walk::new(&hdr, img.len() as u64);
        let e = img.chunks(777).try_for_each(|c| w.feed(c)).unwrap_err();
        assert!(e.contains("beyond the end"), "{e}");
    }
}
