//! In-process writer of ISO 9660 images with Rock Ridge, for BOSH config drives.
//!
//! [`build_iso`] turns a volume label and a list of files into a complete image:
//! primary volume descriptor, terminator, L and M path tables, directories and
//! sector-aligned file data. Every directory record carries Rock Ridge (RRIP 1.09,
//! "RRIP_1991A") entries, so Linux and `isoinfo -R` show the names exactly as given
//! (`ec2/latest/meta-data.json`), while the plain ISO 9660 names underneath are
//! mangled to uppercase 8.3 (`META_DAT.JSO;1`), de-duplicated per directory.
//!
//! Limits, all deliberate for a small read-only settings disk: no Joliet, El Torito,
//! symlinks or multi-extent files (each file < 4 GiB); files are mode 0444 and
//! directories 0555, owned by root; every timestamp is 2000-01-01T00:00:00Z so the
//! same input always gives the same bytes; at most 8 directory levels (ISO 9660
//! 6.8.2.1) and 161 bytes per path component (a directory record is at most 255
//! bytes and the name has to fit in it beside the ISO name and the PX entry).

use std::collections::{HashMap, HashSet};
use std::fmt;

#[cfg(test)]
pub(crate) mod reader;

const SECTOR: usize = 2048;
/// Fixed part of a directory record, before the file identifier.
const RECORD_FIXED: usize = 33;
/// System-use bytes every child record carries besides the NM name: RR (5) + PX (36).
const RR_PX_LEN: usize = 5 + 36;
/// Longest Rock Ridge name: 255 minus the fixed part, the longest ISO identifier
/// plus its pad byte ("XXXXXXXX.XXX;1" + 1), RR, PX and the NM header.
const MAX_NAME: usize = 255 - RECORD_FIXED - 15 - RR_PX_LEN - 5;
/// ISO 9660 allows 8 directory levels, the root being the first.
const MAX_DEPTH: usize = 8;
/// Recording date of every directory record: 2000-01-01 00:00:00, GMT offset 0.
const DIR_DATE: [u8; 7] = [100, 1, 1, 0, 0, 0, 0];
/// The same instant in the volume descriptor's digit format.
const PVD_DATE: &[u8; 17] = b"2000010100000000\0";
/// "Not specified" in the volume descriptor's digit format.
const NO_DATE: &[u8; 17] = b"0000000000000000\0";
const RR_ID: &[u8] = b"RRIP_1991A";
const RR_DES: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const RR_SRC: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  \
SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// One file to put on the image; `path` is relative, '/'-separated, e.g. "ec2/latest/user-data".
pub struct IsoFile<'a> {
    pub path: &'a str,
    pub data: &'a [u8],
}

/// Why an image could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IsoError {
    /// The label is longer than 32 bytes or has a character outside [A-Za-z0-9_-].
    InvalidLabel(String),
    /// The path is empty, absolute, has an empty, "." or ".." component, a NUL, a
    /// component longer than 161 bytes, more than 8 levels, or puts a file where
    /// another path needs a directory.
    InvalidPath { path: String, reason: &'static str },
    /// Two files have the same path.
    DuplicatePath(String),
    /// A file or the whole image does not fit ISO 9660's 32-bit sizes.
    TooLarge,
}

impl fmt::Display for IsoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsoError::InvalidLabel(l) => write!(
                f,
                "invalid ISO volume label {l:?}: at most 32 characters from [A-Za-z0-9_-]"
            ),
            IsoError::InvalidPath { path, reason } => {
                write!(f, "invalid ISO file path {path:?}: {reason}")
            }
            IsoError::DuplicatePath(p) => write!(f, "duplicate ISO file path {p:?}"),
            IsoError::TooLarge => write!(f, "ISO image too large (4 GiB per file at most)"),
        }
    }
}

impl std::error::Error for IsoError {}

/// A directory (`data` None) or file of the tree being written.
struct Node<'a> {
    /// Rock Ridge name as given; empty for the root.
    name: &'a str,
    /// ISO name and extension, uppercase; also the ISO 9660 9.3 sort key.
    iso: (Vec<u8>, Vec<u8>),
    parent: usize,
    data: Option<&'a [u8]>,
    children: Vec<usize>,
    extent: u32,
    size: u32,
}

/// Builds a complete ISO 9660 image (2048-byte sectors) with Rock Ridge (SUSP "SP" and
/// "ER" in the root's "." record, "PX", "NM" and "RR" per RRIP 1.09) for these files;
/// intermediate directories are implied.
pub fn build_iso(volume_label: &str, files: &[IsoFile]) -> Result<Vec<u8>, IsoError> {
    build(volume_label, files, MAX_FILE)
}

/// ISO 9660 file sizes are 32-bit (a directory record's data length).
const MAX_FILE: u32 = u32::MAX;

/// [`build_iso`] with a smaller limit on a file's size, so the tests can reach
/// the limit without allocating 4 GiB.
fn build(volume_label: &str, files: &[IsoFile], max_file: u32) -> Result<Vec<u8>, IsoError> {
    if volume_label.len() > 32
        || !volume_label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(IsoError::InvalidLabel(volume_label.to_string()));
    }
    let mut nodes = vec![new_node("", 0, None)];
    add_files(&mut nodes, files)?;
    assign_iso_names(&mut nodes);

    // Directories in breadth-first order with children sorted by ISO name: exactly the
    // path table order ISO 9660 6.9.1 requires (level, then parent number, then name).
    let mut dirs = vec![0];
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i];
        dirs.extend(
            nodes[d]
                .children
                .iter()
                .filter(|&&c| nodes[c].data.is_none()),
        );
        i += 1;
    }
    let mut dir_no = vec![0u16; nodes.len()];
    for (n, &d) in dirs.iter().enumerate() {
        dir_no[d] = u16::try_from(n + 1).map_err(|_| IsoError::TooLarge)?;
    }

    // Record and table lengths do not depend on extents, so measure them before layout.
    for &d in &dirs {
        let len = pack(&dir_records(&nodes, d, 0)).len();
        nodes[d].size = u32::try_from(len).map_err(|_| IsoError::TooLarge)?;
    }
    let pt_len = path_table(&nodes, &dirs, &dir_no, false).len();
    let pt_secs = pt_len.div_ceil(SECTOR) as u64;

    // Layout: system area (0-15), PVD (16), terminator (17), L and M path tables, one
    // sector of continuation area for the root's ER entry, directories, file data.
    let l_table = 18u64;
    let m_table = l_table + pt_secs;
    let ce = m_table + pt_secs;
    let mut next = ce + 1;
    for &d in &dirs {
        nodes[d].extent = to_u32(next)?;
        next += u64::from(nodes[d].size) / SECTOR as u64;
    }
    for &d in &dirs {
        for c in nodes[d].children.clone() {
            if let Some(data) = nodes[c].data {
                // Empty files still get a real location: some readers drop extent 0.
                nodes[c].extent = to_u32(next)?;
                nodes[c].size = u32::try_from(data.len())
                    .ok()
                    .filter(|&n| n <= max_file)
                    .ok_or(IsoError::TooLarge)?;
                next += data.len().div_ceil(SECTOR) as u64;
            }
        }
    }
    let total = to_u32(next)?;
    let total_len = usize::try_from(next * SECTOR as u64).map_err(|_| IsoError::TooLarge)?;

    let mut img = vec![0u8; total_len];
    let mut put = |sector: u64, bytes: &[u8]| {
        let at = sector as usize * SECTOR;
        img[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(
        16,
        &primary_descriptor(&nodes[0], volume_label, total, pt_len, l_table, m_table),
    );
    put(17, &[255, b'C', b'D', b'0', b'0', b'1', 1]);
    put(l_table, &path_table(&nodes, &dirs, &dir_no, false));
    put(m_table, &path_table(&nodes, &dirs, &dir_no, true));
    put(ce, &extension_reference());
    for &d in &dirs {
        put(
            u64::from(nodes[d].extent),
            &pack(&dir_records(&nodes, d, ce as u32)),
        );
        for &c in &nodes[d].children {
            if let Some(data) = nodes[c].data {
                put(u64::from(nodes[c].extent), data);
            }
        }
    }
    Ok(img)
}

fn new_node<'a>(name: &'a str, parent: usize, data: Option<&'a [u8]>) -> Node<'a> {
    Node {
        name,
        iso: (Vec::new(), Vec::new()),
        parent,
        data,
        children: Vec::new(),
        extent: 0,
        size: 0,
    }
}

fn to_u32(v: u64) -> Result<u32, IsoError> {
    u32::try_from(v).map_err(|_| IsoError::TooLarge)
}

/// Validates the paths and builds the tree, creating implied directories.
fn add_files<'a>(nodes: &mut Vec<Node<'a>>, files: &[IsoFile<'a>]) -> Result<(), IsoError> {
    let mut index: HashMap<(usize, &str), usize> = HashMap::new();
    for f in files {
        let bad = |reason| IsoError::InvalidPath {
            path: f.path.to_string(),
            reason,
        };
        if f.path.is_empty() {
            return Err(bad("empty"));
        }
        if f.path.starts_with('/') {
            return Err(bad("must be relative"));
        }
        let parts: Vec<&str> = f.path.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(bad("more than 8 directory levels"));
        }
        let mut cur = 0;
        for (i, &part) in parts.iter().enumerate() {
            match part {
                "" => return Err(bad("empty component")),
                "." | ".." => return Err(bad("\".\" or \"..\" component")),
                _ if part.len() > MAX_NAME => return Err(bad("component too long")),
                _ if part.contains('\0') => return Err(bad("NUL character")),
                _ => {}
            }
            let last = i + 1 == parts.len();
            match index.get(&(cur, part)) {
                Some(&n) if last && nodes[n].data.is_some() => {
                    return Err(IsoError::DuplicatePath(f.path.to_string()))
                }
                Some(&n) if last || nodes[n].data.is_some() => {
                    return Err(bad("a file and a directory have the same path"))
                }
                Some(&n) => cur = n,
                None => {
                    let n = nodes.len();
                    nodes.push(new_node(part, cur, if last { Some(f.data) } else { None }));
                    nodes[cur].children.push(n);
                    index.insert((cur, part), n);
                    cur = n;
                }
            }
        }
    }
    Ok(())
}

/// Gives every node a unique (within its directory) ISO 8.3 name of d-characters
/// (A-Z, 0-9, _) and sorts each directory's children by it, as ISO 9660 9.3 requires.
fn assign_iso_names(nodes: &mut [Node]) {
    let clean = |s: &str, max: usize| -> Vec<u8> {
        let up = s.bytes().map(|b| b.to_ascii_uppercase());
        up.map(|b| if b.is_ascii_alphanumeric() { b } else { b'_' })
            .take(max)
            .collect()
    };
    for d in 0..nodes.len() {
        let mut taken = HashSet::new();
        for c in nodes[d].children.clone() {
            let name = nodes[c].name;
            let (base, ext) = match name.rsplit_once('.') {
                Some((b, e)) if nodes[c].data.is_some() && !b.is_empty() => {
                    (clean(b, 8), clean(e, 3))
                }
                _ => (clean(name, 8), Vec::new()),
            };
            // On a clash, end the base name with a counter: USER_DAT, USER_DA1, ...
            let mut key = (base.clone(), ext);
            let mut n = 0u64;
            while !taken.insert(key.clone()) {
                n += 1;
                let digits = n.to_string().into_bytes();
                key.0 = base[..base.len().min(8usize.saturating_sub(digits.len()))].to_vec();
                key.0.extend(digits);
            }
            nodes[c].iso = key;
        }
        // Tuple order equals 9.3's "pad the shorter with spaces": every d-character sorts after ' '.
        let mut children = std::mem::take(&mut nodes[d].children);
        children.sort_by(|&a, &b| nodes[a].iso.cmp(&nodes[b].iso));
        nodes[d].children = children;
    }
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// Appends one SUSP entry: signature, length, version 1, body.
fn susp(out: &mut Vec<u8>, sig: &[u8; 2], body: &[u8]) {
    out.extend_from_slice(sig);
    out.push((4 + body.len()) as u8);
    out.push(1);
    out.extend_from_slice(body);
}

/// RR (which RRIP entries follow; Linux ignores NM unless flagged here) and PX (mode,
/// links, uid 0, gid 0) for a node.
fn rr_px(out: &mut Vec<u8>, nodes: &[Node], n: usize, has_nm: bool) {
    const PX: u8 = 0x01;
    const NM: u8 = 0x08;
    susp(out, b"RR", &[if has_nm { PX | NM } else { PX }]);
    let (mode, links) = match nodes[n].data {
        Some(_) => (0o100_444, 1),
        None => {
            let subdirs = nodes[n]
                .children
                .iter()
                .filter(|&&c| nodes[c].data.is_none())
                .count();
            (0o040_555, 2 + subdirs as u32)
        }
    };
    let mut px = Vec::with_capacity(32);
    for v in [mode, links, 0, 0] {
        px.extend_from_slice(&both32(v));
    }
    susp(out, b"PX", &px);
}

/// One directory record (ECMA-119 9.1); `su` is its system use area.
fn dir_record(id: &[u8], node: &Node, su: &[u8]) -> Vec<u8> {
    // A pad byte after an even-length identifier keeps the system use area at an even offset.
    let pad = usize::from(id.len().is_multiple_of(2));
    let len = RECORD_FIXED + id.len() + pad + su.len();
    debug_assert!(len <= 255, "MAX_NAME keeps records within 255 bytes");
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&[len as u8, 0]);
    r.extend_from_slice(&both32(node.extent));
    r.extend_from_slice(&both32(node.size));
    r.extend_from_slice(&DIR_DATE);
    r.extend_from_slice(&[if node.data.is_none() { 2 } else { 0 }, 0, 0]);
    r.extend_from_slice(&both16(1)); // volume sequence number
    r.push(id.len() as u8);
    r.extend_from_slice(id);
    r.resize(r.len() + pad, 0);
    r.extend_from_slice(su);
    r
}

/// All records of directory `d`: ".", "..", then the sorted children. The root's "."
/// starts with SP (announcing SUSP) and points with CE to the ER entry at sector `ce`.
fn dir_records(nodes: &[Node], d: usize, ce: u32) -> Vec<Vec<u8>> {
    let mut su = Vec::new();
    if d == 0 {
        susp(&mut su, b"SP", &[0xBE, 0xEF, 0]);
    }
    rr_px(&mut su, nodes, d, false);
    if d == 0 {
        let mut body = both32(ce).to_vec();
        body.extend_from_slice(&both32(0));
        body.extend_from_slice(&both32(extension_reference().len() as u32));
        susp(&mut su, b"CE", &body);
    }
    let mut records = vec![dir_record(&[0], &nodes[d], &su)];
    let parent = nodes[d].parent;
    su.clear();
    rr_px(&mut su, nodes, parent, false);
    records.push(dir_record(&[1], &nodes[parent], &su));
    for &c in &nodes[d].children {
        let node = &nodes[c];
        let mut id = node.iso.0.clone();
        if node.data.is_some() {
            id.push(b'.');
            id.extend_from_slice(&node.iso.1);
            id.extend_from_slice(b";1");
        }
        su.clear();
        rr_px(&mut su, nodes, c, true);
        let mut nm = vec![0]; // flags: the whole name, no continuation
        nm.extend_from_slice(node.name.as_bytes());
        susp(&mut su, b"NM", &nm);
        records.push(dir_record(&id, node, &su));
    }
    records
}

/// Lays records into whole sectors; a record may not cross a sector boundary (6.8.1.1).
fn pack(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let used = out.len() % SECTOR;
        if used + r.len() > SECTOR {
            out.resize(out.len() + SECTOR - used, 0);
        }
        out.extend_from_slice(r);
    }
    out.resize(out.len().div_ceil(SECTOR) * SECTOR, 0);
    out
}

/// The L (little-endian) or M (big-endian) path table (ECMA-119 9.4).
fn path_table(nodes: &[Node], dirs: &[usize], dir_no: &[u16], big: bool) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dirs {
        let id: &[u8] = if d == 0 { &[0] } else { &nodes[d].iso.0 };
        let parent = dir_no[nodes[d].parent];
        t.extend_from_slice(&[id.len() as u8, 0]);
        if big {
            t.extend_from_slice(&nodes[d].extent.to_be_bytes());
            t.extend_from_slice(&parent.to_be_bytes());
        } else {
            t.extend_from_slice(&nodes[d].extent.to_le_bytes());
            t.extend_from_slice(&parent.to_le_bytes());
        }
        t.extend_from_slice(id);
        t.resize(t.len() + id.len() % 2, 0);
    }
    t
}

/// The ER entry naming RRIP 1.09. At 237 bytes it cannot share the root's "." record
/// with SP and PX, so it lives in a continuation area, as mkisofs puts it.
fn extension_reference() -> Vec<u8> {
    let mut body = vec![RR_ID.len() as u8, RR_DES.len() as u8, RR_SRC.len() as u8, 1];
    body.extend_from_slice(RR_ID);
    body.extend_from_slice(RR_DES);
    body.extend_from_slice(RR_SRC);
    let mut er = Vec::new();
    susp(&mut er, b"ER", &body);
    er
}

/// The primary volume descriptor (ECMA-119 8.4).
fn primary_descriptor(
    root: &Node,
    label: &str,
    total: u32,
    pt_len: usize,
    l: u64,
    m: u64,
) -> Vec<u8> {
    let mut p = vec![0u8; SECTOR];
    p[..8].copy_from_slice(&[1, b'C', b'D', b'0', b'0', b'1', 1, 0]);
    p[8..72].fill(b' '); // system and volume identifiers
    p[40..40 + label.len()].copy_from_slice(label.as_bytes()); // case kept: by-label/config-2
    p[80..88].copy_from_slice(&both32(total));
    p[120..124].copy_from_slice(&both16(1)); // volume set size
    p[124..128].copy_from_slice(&both16(1)); // volume sequence number
    p[128..132].copy_from_slice(&both16(SECTOR as u16));
    p[132..140].copy_from_slice(&both32(pt_len as u32));
    p[140..144].copy_from_slice(&(l as u32).to_le_bytes());
    p[148..152].copy_from_slice(&(m as u32).to_be_bytes());
    p[156..190].copy_from_slice(&dir_record(&[0], root, &[]));
    p[190..813].fill(b' '); // volume set, publisher, preparer, application, file ids
    p[813..830].copy_from_slice(PVD_DATE); // creation
    p[830..847].copy_from_slice(PVD_DATE); // modification
    p[847..864].copy_from_slice(NO_DATE); // expiration
    p[864..881].copy_from_slice(NO_DATE); // effective
    p[881] = 1; // file structure version
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use reader::{entries, volume_id};

    /// Borrows owned (path, content) pairs as the files to build.
    fn files_of(list: &[(String, Vec<u8>)]) -> Vec<IsoFile<'_>> {
        list.iter()
            .map(|(p, d)| IsoFile { path: p, data: d })
            .collect()
    }

    /// Builds and checks an image as a Linux guest reads it (Rock Ridge names):
    /// every file reads back byte for byte, exactly the files and their implied
    /// directories are there, and the structure is what a strict reader wants.
    fn check_with_reader(list: &[(String, Vec<u8>)]) -> Vec<u8> {
        let img = build_iso("config-2", &files_of(list)).unwrap();
        let found = entries(&img);
        for (path, data) in list {
            let got = found.iter().find(|e| e.path == *path);
            let got = got.and_then(|e| e.data.as_ref());
            assert!(got == Some(data), "{path}: read {got:?}");
        }
        let mut want: Vec<String> = Vec::new();
        for (path, _) in list {
            let mut prefix = String::new();
            for part in path.split('/') {
                prefix = format!("{prefix}/{part}");
                want.push(prefix[1..].to_string());
            }
        }
        want.sort();
        want.dedup();
        let mut listed: Vec<String> = found.into_iter().map(|e| e.path).collect();
        listed.sort();
        assert_eq!(listed, want);
        verify_structure(&img);
        img
    }

    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }

    /// A both-endian field: the two halves must agree.
    fn both(b: &[u8]) -> u32 {
        let be = u32::from_be_bytes(b[4..8].try_into().unwrap());
        assert_eq!(le32(b), be, "both-endian halves differ");
        be
    }

    /// (extent, size, is_dir, identifier) of each record of the directory at `extent`,
    /// checking that no record crosses a sector boundary.
    fn records(img: &[u8], extent: u32, size: u32) -> Vec<(u32, u32, bool, Vec<u8>)> {
        let dir = &img[extent as usize * SECTOR..][..size as usize];
        let (mut at, mut out) = (0, Vec::new());
        while at < dir.len() {
            let len = usize::from(dir[at]);
            if len == 0 {
                at = (at / SECTOR + 1) * SECTOR; // rest of the sector is padding
                continue;
            }
            assert!(at % SECTOR + len <= SECTOR, "record crosses a sector");
            let r = &dir[at..at + len];
            assert_eq!(r[28..32], [1, 0, 0, 1], "volume sequence number");
            let id = r[33..33 + usize::from(r[32])].to_vec();
            out.push((both(&r[2..]), both(&r[10..]), r[25] & 2 != 0, id));
            at += len;
        }
        out
    }

    fn dir_size(img: &[u8], iso_name: &str) -> u32 {
        let root = &img[16 * SECTOR + 156..];
        let recs = records(img, both(&root[2..]), both(&root[10..]));
        let found = recs
            .into_iter()
            .find(|r| r.3 == iso_name.to_uppercase().as_bytes());
        found.unwrap().1
    }

    /// Walks the image as a strict reader would: volume size, both-endian fields,
    /// ".", "..", ISO 9660 9.3 sort order, extents inside the volume, and L and M path
    /// tables equal to the directories found, in level/parent/name order.
    fn verify_structure(img: &[u8]) {
        let pvd = &img[16 * SECTOR..17 * SECTOR];
        let total = both(&pvd[80..]);
        assert_eq!(total as usize * SECTOR, img.len());
        let root = &pvd[156..190];
        // Linux takes Rock Ridge only from an SP entry opening the root's "." record.
        let dot = &img[both(&root[2..]) as usize * SECTOR..];
        assert_eq!(dot[34..41], *b"SP\x07\x01\xBE\xEF\x00");
        // Its CE entry leads to the ER entry naming RRIP 1.09.
        let ce = dot[34..usize::from(dot[0])]
            .windows(2)
            .position(|w| w == b"CE")
            .unwrap()
            + 34;
        let er = &img[both(&dot[ce + 4..]) as usize * SECTOR + both(&dot[ce + 12..]) as usize..];
        assert_eq!((&er[..2], &er[8..18]), (&b"ER"[..], &b"RRIP_1991A"[..]));
        // Breadth-first: (extent, size, parent number, identifier) = path table order.
        let mut dirs = vec![(both(&root[2..]), both(&root[10..]), 1u16, vec![0u8])];
        let mut n = 0;
        while n < dirs.len() {
            let (extent, size, _, _) = dirs[n];
            let recs = records(img, extent, size);
            assert_eq!((recs[0].0, recs[0].3.as_slice()), (extent, &[0u8][..]));
            assert_eq!(recs[1].3, [1]);
            let key = |id: &[u8]| {
                let s = String::from_utf8(id.to_vec()).unwrap();
                let s = s.trim_end_matches(";1").to_string();
                let (a, b) = s.split_once('.').unwrap_or((&s, ""));
                (a.to_string(), b.to_string())
            };
            for pair in recs[2..].windows(2) {
                assert!(key(&pair[0].3) < key(&pair[1].3), "unsorted: {pair:?}");
            }
            for (ext, len, is_dir, id) in recs.into_iter().skip(2) {
                assert!(u64::from(ext) * 2048 + u64::from(len) <= img.len() as u64);
                if is_dir {
                    dirs.push((ext, len, n as u16 + 1, id));
                }
            }
            n += 1;
        }
        let pt_len = both(&pvd[132..]) as usize;
        let l_at = le32(&pvd[140..]) as usize * SECTOR;
        let m_at = u32::from_be_bytes(pvd[148..152].try_into().unwrap()) as usize * SECTOR;
        let (l, m) = (&img[l_at..l_at + pt_len], &img[m_at..m_at + pt_len]);
        let mut at = 0;
        for (extent, _, parent, id) in &dirs {
            let id_len = usize::from(l[at]);
            assert_eq!((l[at], m[at]), (id.len() as u8, id.len() as u8));
            assert_eq!(le32(&l[at + 2..]), *extent);
            assert_eq!(
                u32::from_be_bytes(m[at + 2..at + 6].try_into().unwrap()),
                *extent
            );
            assert_eq!(u16::from_le_bytes([l[at + 6], l[at + 7]]), *parent);
            assert_eq!(u16::from_be_bytes([m[at + 6], m[at + 7]]), *parent);
            assert_eq!(
                (&l[at + 8..at + 8 + id_len], &m[at + 8..at + 8 + id_len]),
                (&id[..], &id[..])
            );
            at += 8 + id_len + id_len % 2;
        }
        assert_eq!(at, pt_len, "path table has more entries than directories");
    }

    fn config_drive() -> Vec<(String, Vec<u8>)> {
        let settings = br#"{"agent_id":"a1","vm":{"name":"vm-1"}}"#.to_vec();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sector: Vec<u8> = (0..2048u32).map(|i| (i % 256) as u8).collect();
        [
            (
                "ec2/latest/meta-data.json",
                br#"{"instance-id":"vm-1"}"#.to_vec(),
            ),
            ("ec2/latest/user-data", settings.clone()),
            (
                "openstack/latest/meta_data.json",
                br#"{"uuid":"vm-1"}"#.to_vec(),
            ),
            ("openstack/latest/user_data", settings),
            ("ec2/latest/big.bin", big),
            ("ec2/latest/one-sector", sector),
            ("ec2/latest/empty", Vec::new()),
        ]
        .into_iter()
        .map(|(p, d)| (p.to_string(), d))
        .collect()
    }

    #[test]
    fn config_drive_reads_back() {
        let img = check_with_reader(&config_drive());
        assert_eq!(volume_id(&img), "config-2");
        let found = entries(&img);
        let entry = |path: &str| found.iter().find(|e| e.path == path).unwrap();
        // Files read-only, directories searchable, as the builder promises.
        assert_eq!(entry("ec2/latest/user-data").mode, 0o100444);
        assert_eq!(entry("ec2/latest").mode, 0o40555);
        // Without Rock Ridge the mangled ISO names show instead.
        assert_eq!(
            entry("ec2/latest/meta-data.json").iso_name,
            "META_DAT.JSO;1"
        );
        assert_eq!(entry("ec2/latest/user-data").iso_name, "USER_DAT.;1");
    }

    /// What blkid needs to report LABEL="config-2" TYPE="iso9660", which is how
    /// the agent finds the drive: the "CD001" magic at byte 32769 and the volume
    /// identifier of the primary volume descriptor (util-linux,
    /// libblkid/src/superblocks/iso9660.c).
    #[test]
    fn blkid_finds_label_and_type() {
        let img = build_iso("config-2", &files_of(&config_drive())).unwrap();
        assert_eq!(&img[32769..32774], b"CD001");
        assert_eq!(img[16 * SECTOR], 1, "primary volume descriptor");
        assert_eq!(
            &img[16 * SECTOR + 40..16 * SECTOR + 72],
            format!("{:32}", "config-2").as_bytes()
        );
    }

    #[test]
    fn mangled_name_clashes_and_odd_names_stay_distinct() {
        let names = [
            "user-data",
            "user_data",
            "USER-DATA",
            "user-dat",
            "user-data.json",
            "user-data.jsonx",
            "a name with spaces.txt",
            ".hidden",
            "x.y.z",
            "\u{fc}mlaut",
            "...",
            "a.",
        ];
        let mut list: Vec<(String, Vec<u8>)> = names
            .iter()
            .enumerate()
            .map(|(n, name)| (format!("d/{name}"), format!("content {n}").into_bytes()))
            .collect();
        // A directory whose ISO name clashes with a file's, and the longest allowed name.
        list.push(("d/user.data/inner".to_string(), b"inner".to_vec()));
        list.push(("d/user_dat/x".to_string(), b"x".to_vec()));
        list.push(("d/".to_string() + &"n".repeat(MAX_NAME), b"long".to_vec()));
        check_with_reader(&list);
    }

    #[test]
    fn many_files_and_directories_span_sectors() {
        // 300 records overflow a directory sector; 300 directories overflow a path table sector.
        let mut list = Vec::new();
        for n in 0..300 {
            list.push((
                format!("flat/file-{n}.txt"),
                format!("flat {n}").into_bytes(),
            ));
            list.push((format!("tree/dir-{n}/f"), format!("tree {n}").into_bytes()));
        }
        list.push(("a/b/c/d/e/f/g/deepest".to_string(), b"deep".to_vec()));
        let img = check_with_reader(&list);
        let pt_len = le32(&img[16 * SECTOR + 132..]) as usize;
        assert!(pt_len > SECTOR && dir_size(&img, "flat") > SECTOR as u32);
    }

    #[test]
    fn output_is_deterministic_and_well_formed() {
        let list = config_drive();
        let a = build_iso("CONFIG-2", &files_of(&list)).unwrap();
        assert_eq!(a, build_iso("CONFIG-2", &files_of(&list)).unwrap());
        assert_eq!(a.len() % SECTOR, 0);
        assert_eq!(&a[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(
            &a[17 * SECTOR..17 * SECTOR + 7],
            &[255, b'C', b'D', b'0', b'0', b'1', 1]
        );
        let total = u32::from_le_bytes(a[16 * SECTOR + 80..16 * SECTOR + 84].try_into().unwrap());
        assert_eq!(total as usize * SECTOR, a.len());
        assert_eq!(
            &a[16 * SECTOR + 40..16 * SECTOR + 72],
            format!("{:32}", "CONFIG-2").as_bytes()
        );
        // An image with no files is still valid: just the root directory.
        assert!(build_iso("config-2", &[]).is_ok());
        assert!(build_iso(&"x".repeat(32), &[]).is_ok());
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(MAX_NAME, 161, "the docs state this limit");
        fn f(path: &str) -> IsoFile<'_> {
            IsoFile { path, data: b"x" }
        }
        let bad_path = |p: &str| match build_iso("config-2", &[f(p)]) {
            Err(IsoError::InvalidPath { path, .. }) => assert_eq!(path, p),
            other => panic!("{p:?}: {other:?}"),
        };
        let long = "n".repeat(MAX_NAME + 1);
        for p in [
            "",
            "/abs",
            "a/../b",
            "..",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
            &long,
            "1/2/3/4/5/6/7/8/9",
        ] {
            bad_path(p);
        }
        for label in ["config 2", "config.2", "c\u{f6}nfig", &"x".repeat(33)] {
            assert_eq!(
                build_iso(label, &[]),
                Err(IsoError::InvalidLabel(label.to_string()))
            );
        }
        let dup = build_iso("config-2", &[f("a/b"), f("a/b")]);
        assert_eq!(dup, Err(IsoError::DuplicatePath("a/b".to_string())));
        for pair in [[f("a"), f("a/b")], [f("a/b"), f("a")]] {
            assert!(matches!(
                build_iso("config-2", &pair),
                Err(IsoError::InvalidPath { .. })
            ));
        }
        let msg = build_iso("config-2", &[f("/x")]).unwrap_err().to_string();
        assert!(msg.contains("/x") && msg.contains("relative"), "{msg}");
        // build_iso's limit is ISO 9660's; reached here with a smaller one.
        assert_eq!(MAX_FILE, u32::MAX);
        let data = [0u8; 4097];
        let file = |n| {
            [IsoFile {
                path: "big",
                data: &data[..n],
            }]
        };
        assert!(build("config-2", &file(4096), 4096).is_ok());
        let r = build("config-2", &file(4097), 4096);
        assert_eq!(r, Err(IsoError::TooLarge));
    }
}
