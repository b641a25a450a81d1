//! Chunks: content-defined cut points (FastCDC 2020), zstd compression,
//! and the SHA-256 check every reader (the cache on upload, the client on
//! restore) runs on the uncompressed bytes.

use crate::error::DircacheError;
use crate::manifest::MAX_CHUNK_BYTES;
use sha2::{Digest as _, Sha256};

/// Smallest chunk the chunker cuts (except a stream's last).
pub const MIN_CHUNK: usize = 16 << 10;
/// Average chunk size the chunker aims at. 64 KiB keeps requests per
/// gigabyte near 16,000 while a one-file change still rewrites only about
/// two chunks' worth of the stream.
pub const AVG_CHUNK: usize = 64 << 10;
/// Largest chunk the chunker cuts.
pub const MAX_CHUNK: usize = 256 << 10;

/// zstd level for chunks: 3 (zstd's default) compresses a tool cache at
/// several hundred MB/s per core, so saving is bound by reading files.
pub const ZSTD_LEVEL: i32 = 3;

/// The stored form of a chunk's name: hex SHA-256 of its bytes.
pub fn digest_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Compresses a chunk for upload.
pub fn compress(data: &[u8]) -> Result<Vec<u8>, DircacheError> {
    zstd::bulk::compress(data, ZSTD_LEVEL).map_err(|e| DircacheError::io("compressing a chunk", e))
}

/// Decompresses a stored chunk (never to more than [`MAX_CHUNK_BYTES`])
/// and checks it against `digest`, and against `size` when given.
pub fn open(digest: &str, stored: &[u8], size: Option<u32>) -> Result<Vec<u8>, DircacheError> {
    let corrupt = |detail: String| DircacheError::CorruptChunk {
        digest: digest.to_string(),
        detail,
    };
    // The recorded size when known: one right-sized buffer per chunk
    // instead of a 1 MiB one (which cost a page-faulting allocation each).
    let cap = size.map_or(MAX_CHUNK_BYTES, |s| s.min(MAX_CHUNK_BYTES)) as usize;
    let data = zstd::bulk::decompress(stored, cap)
        .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
    if let Some(size) = size
        && data.len() != size as usize
    {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {size}",
            data.len()
        )));
    }
    let actual = digest_hex(&data);
    if actual != digest {
        return Err(corrupt(format!("content has digest {actual}")));
    }
    Ok(data)
}

/// [`open`] for a restore's hot loop: decompresses with a reused
/// decompression context into `buf` (cleared first, its allocation kept),
/// then checks the size and the digest. The bound on the output is
/// `size` (itself at most [`MAX_CHUNK_BYTES`], as validated manifests are):
/// a chunk that would decompress to more fails as corrupt.
pub fn open_into(
    dctx: &mut zstd::bulk::Decompressor<'_>,
    digest: &str,
    stored: &[u8],
    size: u32,
    buf: &mut Vec<u8>,
) -> Result<(), DircacheError> {
    let corrupt = |detail: String| DircacheError::CorruptChunk {
        digest: digest.to_string(),
        detail,
    };
    let want = size.min(MAX_CHUNK_BYTES) as usize;
    buf.clear();
    // Room for `want` bytes; zstd writes at most the capacity, which
    // `reserve_exact` keeps at the largest chunk this buffer has held (at
    // most MAX_CHUNK_BYTES), so decompression stays bounded.
    buf.reserve_exact(want);
    let n = dctx
        .decompress_to_buffer(stored, buf)
        .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
    if n != size as usize {
        return Err(corrupt(format!("{n} bytes, the manifest says {size}")));
    }
    let actual = digest_hex(buf);
    if actual != digest {
        return Err(corrupt(format!("content has digest {actual}")));
    }
    Ok(())
}

/// Cuts a byte stream at the same content-defined points as [`split`],
/// reading as it goes (one chunk's bytes held at a time): each item is a
/// chunk's bytes, or the read error that ended the stream.
pub fn stream<R: std::io::Read>(src: R) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    fastcdc::v2020::StreamCDC::new(src, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).map(|c| {
        c.map(|c| c.data).map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            e => std::io::Error::other(e.to_string()),
        })
    })
}

/// Cuts bytes held in memory at the same content-defined points a saved
/// stream gets: `(offset, length)` of each chunk.
pub fn split(data: &[u8]) -> Vec<(usize, usize)> {
    fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| (c.offset, c.length))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let data = b"hello hello hello hello".repeat(100);
        let d = digest_hex(&data);
        let z = compress(&data).unwrap();
        assert_eq!(open(&d, &z, Some(data.len() as u32)).unwrap(), data);
        assert!(open(&d, &z, Some(1)).is_err());
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        assert!(open(&d, &bad, None).is_err());
        let other = compress(b"other").unwrap();
        assert!(open(&d, &other, None).is_err());
    }
}
