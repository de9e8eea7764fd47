//! A reader of the images [`super::build_iso`] writes, for the unit tests: so
//! they check what a Linux guest would see without isoinfo or blkid. It walks
//! the directories from the primary volume descriptor's root record (ECMA-119
//! 8.4, 9.1) and takes each name from its Rock Ridge NM entry and mode from its
//! PX entry (RRIP 1.09 4.1.1, 4.1.4), as Linux's isofs does (fs/isofs/rock.c).
//! Only what build_iso writes: no CE continuation outside the root's ".", no
//! NM continuation, no multi-extent files.

use super::SECTOR;

/// One file or directory on the image.
#[derive(Debug)]
pub struct Entry {
    /// Rock Ridge path from the root, "/"-separated, no leading "/".
    pub path: String,
    /// The plain ISO 9660 identifier, e.g. "META_DAT.JSO;1".
    pub iso_name: String,
    /// POSIX mode from the PX entry, file type bits included.
    pub mode: u32,
    /// The file's bytes; None for a directory.
    pub data: Option<Vec<u8>>,
}

fn both32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// The primary volume descriptor's volume identifier, trailing spaces removed.
pub fn volume_id(img: &[u8]) -> String {
    let pvd = &img[16 * SECTOR..17 * SECTOR];
    assert_eq!(&pvd[..6], b"\x01CD001", "no primary volume descriptor");
    String::from_utf8(pvd[40..72].to_vec())
        .unwrap()
        .trim_end()
        .to_string()
}

/// Every file and directory under the root, depth first, in record order.
pub fn entries(img: &[u8]) -> Vec<Entry> {
    let root = &img[16 * SECTOR + 156..16 * SECTOR + 190];
    let mut out = Vec::new();
    walk(img, both32(&root[2..]), both32(&root[10..]), "", &mut out);
    out
}

fn walk(img: &[u8], extent: u32, size: u32, prefix: &str, out: &mut Vec<Entry>) {
    let dir = &img[extent as usize * SECTOR..][..size as usize];
    let mut at = 0;
    let mut n = 0;
    while at < dir.len() {
        let len = usize::from(dir[at]);
        if len == 0 {
            at = (at / SECTOR + 1) * SECTOR; // the rest of the sector is padding
            continue;
        }
        let record = &dir[at..at + len];
        at += len;
        n += 1;
        if n <= 2 {
            continue; // "." and ".."
        }
        let id_len = usize::from(record[32]);
        let iso_name = String::from_utf8_lossy(&record[33..33 + id_len]).into_owned();
        let su_at = 33 + id_len + (1 - id_len % 2); // a pad byte after an even-length id
        let (name, mode) = rock_ridge(&record[su_at..]);
        let path = format!("{prefix}{}", name.expect("a record without an NM entry"));
        let (ext, len) = (both32(&record[2..]), both32(&record[10..]));
        if record[25] & 2 != 0 {
            out.push(Entry {
                path: path.clone(),
                iso_name,
                mode: mode.expect("no PX entry"),
                data: None,
            });
            walk(img, ext, len, &format!("{path}/"), out);
        } else {
            let data = img[ext as usize * SECTOR..][..len as usize].to_vec();
            out.push(Entry {
                path,
                iso_name,
                mode: mode.expect("no PX entry"),
                data: Some(data),
            });
        }
    }
}

/// (NM name, PX mode) from a record's system use area.
fn rock_ridge(mut su: &[u8]) -> (Option<String>, Option<u32>) {
    let (mut name, mut mode) = (None, None);
    while su.len() >= 4 && su[2] >= 4 {
        let entry = &su[..usize::from(su[2])];
        match &entry[..2] {
            b"NM" => name = Some(String::from_utf8(entry[5..].to_vec()).unwrap()),
            b"PX" => mode = Some(both32(&entry[4..])),
            _ => {}
        }
        su = &su[entry.len()..];
    }
    (name, mode)
}
