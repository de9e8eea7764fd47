//! Zero runs of a raw image found on its way to a sparse upload.

/// A piece of a raw image on its way to a sparse upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Bytes to send: a range within the chunk.
    Data(usize, usize),
    /// A run of zeros to skip.
    Hole(usize),
}

/// Zero runs shorter than this are sent as data: a hole per 4 KiB block
/// would cost more in messages than it saves.
pub const MIN_HOLE: usize = 64 << 10;
const BLOCK: usize = 4096;

/// Splits `chunk` into data and holes (zero runs of at least `MIN_HOLE`
/// bytes, in whole 4 KiB blocks). A chunk's holes start at block boundaries
/// relative to the chunk, so callers pass chunks that start block-aligned.
pub fn segments(chunk: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut data_start: Option<usize> = None;
    let mut zero_start: Option<usize> = None;
    let flush_zeros =
        |zs: usize, ze: usize, data_start: &mut Option<usize>, out: &mut Vec<Segment>| {
            if ze - zs >= MIN_HOLE {
                if let Some(ds) = data_start.take() {
                    out.push(Segment::Data(ds, zs));
                }
                out.push(Segment::Hole(ze - zs));
            } else if data_start.is_none() {
                *data_start = Some(zs);
            }
        };
    let mut at = 0;
    while at < chunk.len() {
        let end = (at + BLOCK).min(chunk.len());
        let block = &chunk[at..end];
        if block.len() == BLOCK && is_zero(block) {
            if zero_start.is_none() {
                zero_start = Some(at);
            }
        } else {
            if let Some(zs) = zero_start.take() {
                flush_zeros(zs, at, &mut data_start, &mut out);
            }
            if data_start.is_none() {
                data_start = Some(at);
            }
        }
        at = end;
    }
    if let Some(zs) = zero_start {
        flush_zeros(zs, chunk.len(), &mut data_start, &mut out);
    }
    if let Some(ds) = data_start {
        out.push(Segment::Data(ds, chunk.len()));
    }
    out
}

/// Branch-free OR over the block so the compiler vectorises it.
fn is_zero(block: &[u8]) -> bool {
    let mut acc = 0u64;
    for w in block.chunks_exact(8) {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        acc |= u64::from_ne_bytes(a);
    }
    acc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_zero_runs() {
        let mut v = vec![0u8; 1 << 20];
        assert_eq!(segments(&v), vec![Segment::Hole(1 << 20)]);
        v[5] = 1;
        v[300_000] = 1;
        let s = segments(&v);
        assert_eq!(
            s,
            vec![
                Segment::Data(0, 4096),
                Segment::Hole(299_008 - 4096),
                Segment::Data(299_008, 303_104),
                Segment::Hole((1 << 20) - 303_104)
            ]
        );
        // short zero runs stay data; a partial tail block is data
        let mut v = vec![1u8; 100_000];
        v[8192..16384].fill(0);
        assert_eq!(segments(&v), vec![Segment::Data(0, 100_000)]);
        let total: usize = segments(&vec![0u8; 70_000])
            .iter()
            .map(|s| match s {
                Segment::Data(a, b) => b - a,
                Segment::Hole(n) => *n,
            })
            .sum();
        assert_eq!(total, 70_000);
    }
}
