//! Reads the root disk out of the `image` file that `create_stemcell` gets: a
//! gzipped tar holding `root.img` (what BOSH stemcells carry), a plain tar, or
//! a bare qcow2/raw file. Streaming only: no temporary copy, memory bounded
//! by the chunk size times the channel depth.
//!
//! `read_root_image` runs on its own thread so that decompression overlaps
//! the upload; it sends what it finds over a bounded channel and stops when
//! the receiver goes away. After `root.img` it reads the rest of a gzip stream
//! so that the gzip checksum is verified before the import is declared good.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};

mod gunzip;

use gunzip::Gunzip;

/// What the reader thread reports, in this order: `Found`, `Data`..., `End`;
/// or an error message at any point, after which it stops.
#[derive(Debug)]
pub enum Event {
    Found {
        container: Container,
        size: u64,
    },
    /// The next bytes of root.img; every chunk but the last is full.
    Data(Vec<u8>),
    /// root.img was read completely and the container checked to its end.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    GzipTar,
    Tar,
    Bare,
}

impl Container {
    pub fn describe(self) -> &'static str {
        match self {
            Container::GzipTar => "gzipped tar",
            Container::Tar => "tar",
            Container::Bare => "bare image file",
        }
    }
}

pub const ROOT_IMG: &str = "root.img";

type Reply = Result<Event, String>;

/// Reads `path` and streams root.img as chunks of `chunk_size` bytes.
/// Buffers coming back on `recycle` are reused.
pub fn read_root_image(
    path: &Path,
    chunk_size: usize,
    tx: SyncSender<Reply>,
    recycle: Receiver<Vec<u8>>,
) {
    let mut out = Sender {
        tx,
        recycle,
        chunk_size,
    };
    if let Err(e) = read(path, &mut out) {
        // The receiver may be gone already (it gave up first): nothing to tell.
        let _ = out.tx.send(Err(e));
    }
}

struct Sender {
    tx: SyncSender<Reply>,
    recycle: Receiver<Vec<u8>>,
    chunk_size: usize,
}

/// The receiver hung up: stop quietly.
const STOPPED: &str = "stopped";

impl Sender {
    fn send(&self, event: Event) -> Result<(), String> {
        self.tx.send(Ok(event)).map_err(|_| STOPPED.to_string())
    }

    /// Sends exactly `size` bytes of `r` as chunks.
    fn pump(&self, r: &mut dyn Read, size: u64, what: &str) -> Result<(), String> {
        let mut left = size;
        while left > 0 {
            let mut buf = self.recycle.try_recv().unwrap_or_default();
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.chunk_size);
            buf.resize(want, 0);
            let mut got = 0;
            while got < want {
                match r.read(&mut buf[got..want]) {
                    Ok(0) => {
                        return Err(format!(
                            "{what} is truncated: {size} bytes declared, the stream ended after {}",
                            size - left + got as u64
                        ))
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(format!(
                            "reading {what} at byte {}: {e}",
                            size - left + got as u64
                        ))
                    }
                }
            }
            left -= want as u64;
            self.send(Event::Data(buf))?;
        }
        Ok(())
    }
}

fn read(path: &Path, out: &mut Sender) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let head = read_head(&mut file, 512).map_err(|e| format!("cannot read it: {e}"))?;

    if head.starts_with(&[0x1f, 0x8b]) {
        let mut gz = Gunzip::new(Cursor::new(head).chain(file))
            .map_err(|e| format!("cannot read it: {e}"))?;
        let inner = read_head(&mut gz, 512).map_err(|e| format!("corrupt gzip stream: {e}"))?;
        // An all-zero block is an empty tar here (a bare raw disk may start
        // with zeros, but a gzipped one is not accepted).
        let empty_tar = inner.len() == 512 && inner.iter().all(|&b| b == 0);
        if !looks_like_tar(&inner) && !empty_tar {
            return Err(
                "the image is gzip-compressed but does not hold a tar archive (expected a tar with root.img)"
                    .into(),
            );
        }
        let rest = from_tar(Cursor::new(inner).chain(gz), Container::GzipTar, out)?;
        // Reading to the end makes the decoder check the gzip CRC and length.
        drain(rest).map_err(|e| format!("corrupt gzip stream after root.img: {e}"))?;
    } else if looks_like_tar(&head) {
        let rest = from_tar(Cursor::new(head).chain(file), Container::Tar, out)?;
        drain(rest).map_err(|e| format!("reading the tar after root.img: {e}"))?;
    } else {
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read it: {e}"))?;
        if !meta.is_file() {
            return Err("it is neither a tar archive nor a regular file".into());
        }
        let size = meta.len();
        out.send(Event::Found {
            container: Container::Bare,
            size,
        })?;
        let mut r = Cursor::new(head).chain(file);
        out.pump(&mut r, size, "the image file")?;
    }
    out.send(Event::End)
}

/// Finds root.img in the tar, streams it, and returns the reader positioned
/// after it.
fn from_tar<R: Read>(r: R, container: Container, out: &mut Sender) -> Result<R, String> {
    let what = container.describe();
    let mut archive = tar::Archive::new(r);
    let mut seen = Vec::new();
    let mut found = false;
    {
        let entries = archive
            .entries()
            .map_err(|e| format!("reading the {what}: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("corrupt or truncated {what}: {e}"))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let name = name.trim_start_matches("./").to_string();
            if name != ROOT_IMG {
                if seen.len() < 10 {
                    seen.push(name);
                }
                continue;
            }
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_gnu_sparse()) {
                return Err(format!(
                    "root.img in the {what} is not a regular file (tar entry type {:?})",
                    kind
                ));
            }
            let size = entry.size();
            out.send(Event::Found { container, size })?;
            out.pump(&mut entry, size, "root.img")?;
            found = true;
            break;
        }
    }
    if !found {
        let listing = if seen.is_empty() {
            "it is empty".to_string()
        } else {
            format!("it holds {}", seen.join(", "))
        };
        return Err(format!("the {what} has no root.img ({listing})"));
    }
    Ok(archive.into_inner())
}

/// Reads up to `n` bytes (fewer only at the end of the stream).
fn read_head(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

fn drain(mut r: impl Read) -> io::Result<u64> {
    io::copy(&mut r, &mut io::sink())
}

/// A POSIX/GNU tar header (magic "ustar"), or an old-style one whose
/// checksum adds up.
fn looks_like_tar(h: &[u8]) -> bool {
    if h.len() < 512 {
        return false;
    }
    if &h[257..262] == b"ustar" {
        return true;
    }
    let field = std::str::from_utf8(&h[148..156]).unwrap_or("");
    let Ok(declared) = u32::from_str_radix(field.trim_matches(|c: char| c == ' ' || c == '\0'), 8)
    else {
        return false;
    };
    let sum: u32 = h[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    declared == sum && h[0] != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Runs the reader on `bytes` (written to a temp file); returns the
    /// container, the bytes of root.img, or the error.
    fn run(bytes: &[u8]) -> Result<(Container, Vec<u8>), String> {
        let dir = std::env::temp_dir().join(format!(
            "cpi-archive-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        std::fs::write(&path, bytes).unwrap();
        let (tx, rx) = mpsc::sync_channel(2);
        let (_rtx, rrx) = mpsc::channel();
        let t = std::thread::spawn(move || read_root_image(&path, 1000, tx, rrx));
        let mut data = Vec::new();
        let mut container = None;
        let result = loop {
            match rx.recv().unwrap() {
                Ok(Event::Found { container: c, size }) => {
                    container = Some(c);
                    data.reserve(size as usize);
                }
                Ok(Event::Data(d)) => data.extend_from_slice(&d),
                Ok(Event::End) => break Ok((container.unwrap(), data)),
                Err(e) => break Err(e),
            }
        };
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn containers() {
        let img: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let t = tar_of(&[("./other", b"x"), ("./root.img", &img)]);
        assert_eq!(run(&t).unwrap(), (Container::Tar, img.clone()));
        assert_eq!(run(&gz(&t)).unwrap(), (Container::GzipTar, img.clone()));
        let mut bare = b"QFI\xfb".to_vec();
        bare.extend_from_slice(&img);
        assert_eq!(run(&bare).unwrap(), (Container::Bare, bare.clone()));
    }

    #[test]
    fn broken_containers() {
        let img = vec![7u8; 30_000];
        let t = tar_of(&[("root.img", &img)]);
        let e = run(&tar_of(&[("a", b"1"), ("b", b"2")])).unwrap_err();
        assert!(e.contains("no root.img (it holds a, b)"), "{e}");
        let e = run(&gz(&tar_of(&[]))).unwrap_err();
        assert!(e.contains("no root.img"), "{e}");
        // truncated tar: root.img cut short
        let e = run(&t[..20_000]).unwrap_err();
        assert!(e.contains("root.img is truncated"), "{e}");
        // truncated gzip, at many points
        let g = gz(&t);
        for cut in [g.len() - 1, g.len() - 4, g.len() - 8, g.len() / 2, 20] {
            assert!(
                run(&g[..cut]).is_err(),
                "gzip cut at {cut} of {} accepted",
                g.len()
            );
        }
        // a flipped bit inside the compressed data or the CRC
        for at in [g.len() / 2, g.len() - 6] {
            let mut bad = g.clone();
            bad[at] ^= 0x10;
            assert!(
                run(&bad).is_err(),
                "gzip with a flipped bit at {at} accepted"
            );
        }
        let e = run(&gz(b"just some text, not a tar at all")).unwrap_err();
        assert!(e.contains("does not hold a tar"), "{e}");
    }

    #[test]
    fn tar_detection() {
        let t = tar_of(&[("root.img", b"abc")]);
        assert!(looks_like_tar(&t[..512]));
        assert!(!looks_like_tar(&[0u8; 512]));
        assert!(!looks_like_tar(b"QFI\xfb"));
    }
}
