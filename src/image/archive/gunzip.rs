//! gunzip as a `Read`, with ISA-L (Intel's Intelligent Storage Acceleration
//! Library; Debian's libisal), the fastest streaming inflater measured on a
//! realistic stemcell (ci/bench-stemcell, case (d)): about 1.5x zlib-rs and
//! zlib-ng and 2x miniz_oxide (flate2's backends). libdeflate inflates as
//! fast but only whole buffers, the whole output in memory at once, which a
//! multi-GiB root.img cannot afford.
//!
//! Like a multi-member gunzip (`gzip -dc`): members follow each other until
//! the input ends; each one's CRC-32 and length are verified (by ISA-L) before
//! its end is reported. An input that ends inside a member is an error, as is
//! anything after a member that is not another member.

use std::io::{self, Read};
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

extern "C" {
    // src/image/archive/isal_shim.c
    fn cpi_isal_gunzip_new() -> *mut c_void;
    fn cpi_isal_gunzip_reset(state: *mut c_void);
    fn cpi_isal_gunzip_free(state: *mut c_void);
    fn cpi_isal_gunzip(
        state: *mut c_void,
        input: *const u8,
        in_len: u32,
        in_used: *mut u32,
        out: *mut u8,
        out_len: u32,
        out_used: *mut u32,
        member_done: *mut c_int,
    ) -> c_int;
}

/// Compressed bytes read from the source at a time.
const IN_BUF: usize = 256 << 10;

pub struct Gunzip<R> {
    inner: R,
    state: NonNull<c_void>,
    buf: Box<[u8]>,
    /// `buf[start..end]` is read but not yet inflated.
    start: usize,
    end: usize,
    /// The last member ended (verified); more input starts a new one.
    member_done: bool,
    /// Bytes inflated in the current member (for error messages).
    member_out: u64,
}

impl<R: Read> Gunzip<R> {
    pub fn new(inner: R) -> io::Result<Gunzip<R>> {
        // SAFETY: plain allocation; NULL only when out of memory.
        let state = NonNull::new(unsafe { cpi_isal_gunzip_new() })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "allocating gunzip state"))?;
        Ok(Gunzip {
            inner,
            state,
            buf: vec![0u8; IN_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            member_done: false,
            member_out: 0,
        })
    }

    /// Reads more compressed input after what is left; `false` at its end.
    fn refill(&mut self) -> io::Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// isal_inflate's error codes (igzip_lib.h).
fn describe(rc: c_int) -> &'static str {
    match rc {
        -1 => "invalid deflate block",
        -2 => "invalid deflate symbol",
        -3 => "invalid back-reference distance",
        -4 => "invalid gzip header",
        -5 => "unsupported compression method",
        -6 => "CRC-32 or length mismatch",
        _ => "corrupt data",
    }
}

impl<R: Read> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.member_done {
                if self.start == self.end && !self.refill()? {
                    return Ok(0); // the input ended right after a member
                }
                // SAFETY: the state is valid until drop.
                unsafe { cpi_isal_gunzip_reset(self.state.as_ptr()) };
                self.member_done = false;
                self.member_out = 0;
            }
            if self.start == self.end && !self.refill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "gzip stream is truncated (ends inside a member, after {} bytes of it)",
                        self.member_out
                    ),
                ));
            }
            let input = &self.buf[self.start..self.end];
            let out_len = out.len().min(u32::MAX as usize);
            let (mut in_used, mut out_used, mut done) = (0u32, 0u32, 0 as c_int);
            // SAFETY: the state is valid; `input` and `out[..out_len]` are
            // valid for the lengths passed; the shim writes the three outs.
            let rc = unsafe {
                cpi_isal_gunzip(
                    self.state.as_ptr(),
                    input.as_ptr(),
                    input.len() as u32,
                    &mut in_used,
                    out.as_mut_ptr(),
                    out_len as u32,
                    &mut out_used,
                    &mut done,
                )
            };
            if rc < 0 {
                return Err(invalid(format!(
                    "corrupt gzip stream: {} (after {} bytes of a member)",
                    describe(rc),
                    self.member_out
                )));
            }
            self.start += in_used as usize;
            self.member_out += u64::from(out_used);
            self.member_done = done != 0;
            if out_used > 0 {
                return Ok(out_used as usize);
            }
            if !self.member_done && in_used == 0 {
                // No progress with input at hand: it needs more at once.
                if !self.refill()? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "gzip stream is truncated",
                    ));
                }
            }
        }
    }
}

impl<R> Drop for Gunzip<R> {
    fn drop(&mut self) {
        // SAFETY: allocated by cpi_isal_gunzip_new, freed once.
        unsafe { cpi_isal_gunzip_free(self.state.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Reads all of it through reads of `step` bytes at most.
    fn gunzip(bytes: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut g = Gunzip::new(bytes)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            let n = g.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn data(n: usize) -> Vec<u8> {
        // Compressible but not trivial: words from a small LCG.
        let mut x = 12345u32;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefgh \n"[(x >> 16) as usize % 10]
            })
            .collect()
    }

    #[test]
    fn round_trips_members_and_read_sizes() {
        let d = data(3 << 20);
        let g = gz(&d);
        for step in [1 << 20, 4096, 7] {
            assert_eq!(gunzip(&g, step).unwrap(), d);
        }
        // two members, as `cat a.gz b.gz`; and an empty member
        let mut two = gz(&d[..1000]);
        two.extend_from_slice(&gz(b""));
        two.extend_from_slice(&gz(&d[1000..]));
        assert_eq!(gunzip(&two, 65536).unwrap(), d);
        assert_eq!(gunzip(&gz(b""), 10).unwrap(), b"");
    }

    #[test]
    fn header_with_name_and_comment() {
        let mut e = flate2::GzBuilder::new()
            .filename("root.img")
            .comment("a comment")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), flate2::Compression::fast());
        e.write_all(b"hello").unwrap();
        let g = e.finish().unwrap();
        assert_eq!(gunzip(&g, 100).unwrap(), b"hello");
    }

    #[test]
    fn corrupt_and_truncated_streams_fail() {
        let d = data(200_000);
        let g = gz(&d);
        for cut in [g.len() - 1, g.len() - 4, g.len() - 8, g.len() / 2, 20, 5] {
            let e = gunzip(&g[..cut], 65536).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}: {e}");
        }
        // the CRC, the length, the data
        for at in [g.len() - 6, g.len() - 2, g.len() / 2] {
            let mut bad = g.clone();
            bad[at] ^= 0x10;
            assert!(gunzip(&bad, 65536).is_err(), "flipped bit at {at} accepted");
        }
        let mut trailing = g.clone();
        trailing.extend_from_slice(b"garbage after the member");
        let e = gunzip(&trailing, 65536).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(gunzip(b"not gzip at all", 100).is_err());
    }
}
