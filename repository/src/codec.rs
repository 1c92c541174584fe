//! The data-object codec: plaintext → framed, possibly compressed bytes, and back.
//!
//! ```text
//! offset 0  magic  "LKSO"
//!        4  format version (1)
//!        5  codec: 0 = stored, 1 = zstd
//!        6  reserved (0, 0)
//!        8  plaintext length, u64 little endian
//!       16  payload
//! ```
//!
//! An object's name is the SHA-256 of its plaintext. Compression is used only when it pays:
//! a zstd-1 probe of the first 64 KiB must save at least 10% for the chunk to be compressed,
//! and the result is kept only when it saves at least 3%, so incompressible data
//! (already-compressed SST blocks) costs one probe.
//!
//! Architecture invariant: `decode` returns plaintext only after re-hashing it against the
//! expected id; a reader never sees unverified bytes.

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::ObjectId;

const MAGIC: &[u8; 4] = b"LKSO";
const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const PROBE_LEN: usize = 64 * 1024;

/// Compression settings for new objects.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// zstd level; 0 disables compression.
    pub zstd_level: i32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression { zstd_level: 1 }
    }
}

/// An encoded object, ready to store: a header and a payload, kept apart so the plaintext of
/// a stored (uncompressed) object is never copied into a frame; a store writes both parts.
#[derive(Debug)]
pub struct Encoded {
    pub id: ObjectId,
    pub plaintext_len: u64,
    pub header: [u8; HEADER_LEN],
    pub payload: bytes::Bytes,
    pub compressed: bool,
}

impl Encoded {
    /// Bytes the object takes in the repository.
    pub fn stored_len(&self) -> u64 {
        (HEADER_LEN + self.payload.len()) as u64
    }

    /// The whole stored object in one buffer (a copy; for small objects such as WAL segments).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.payload);
        out
    }
}

fn header(codec: u8, plaintext_len: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = FORMAT_VERSION;
    out[5] = codec;
    out[8..].copy_from_slice(&plaintext_len.to_le_bytes());
    out
}

/// True when a probe compressed well enough to be worth compressing the whole chunk: at
/// least 10% saved. Below that (already-compressed SST blocks, for instance) zstd costs more
/// time than the bytes it saves are worth; measured with `make bench`.
fn probe_pays(plain: usize, compressed: usize) -> bool {
    compressed * 10 <= plain * 9
}

/// True when saving `compressed` instead of `plain` bytes is worth the decompression.
fn pays(plain: usize, compressed: usize) -> bool {
    compressed + plain / 32 < plain
}

/// Hashes and encodes one plaintext chunk. CPU-bound: call it off the async workers.
pub fn encode(plaintext: &[u8], compression: Compression) -> Result<Encoded> {
    encode_with_id(ObjectId::of(plaintext), plaintext.to_vec(), compression)
}

/// Encodes a chunk whose id the caller has already computed with [`ObjectId::of`]. A chunk
/// stored uncompressed becomes the payload as it is, without a copy.
pub fn encode_with_id<T>(id: ObjectId, plaintext: T, compression: Compression) -> Result<Encoded>
where
    T: AsRef<[u8]> + Send + 'static,
{
    let bytes = plaintext.as_ref();
    let plaintext_len = bytes.len() as u64;
    if compression.zstd_level > 0 && bytes.len() >= 512 {
        let probe = &bytes[..bytes.len().min(PROBE_LEN)];
        let probe_pays = bytes.len() <= PROBE_LEN
            || zstd::bulk::compress(probe, 1)
                .map(|c| probe_pays(probe.len(), c.len()))
                .unwrap_or(true);
        if probe_pays {
            let payload = zstd::bulk::compress(bytes, compression.zstd_level).map_err(|err| {
                Error::with_source(
                    ErrorCode::BackupCompressionFailed,
                    format!("compress object {id}"),
                    err,
                )
            })?;
            if pays(bytes.len(), payload.len()) {
                return Ok(Encoded {
                    id,
                    plaintext_len,
                    header: header(CODEC_ZSTD, plaintext_len),
                    payload: payload.into(),
                    compressed: true,
                });
            }
        }
    }
    Ok(Encoded {
        id,
        plaintext_len,
        header: header(CODEC_STORED, plaintext_len),
        payload: bytes::Bytes::from_owner(plaintext),
        compressed: false,
    })
}

/// Decodes a stored object and checks that its plaintext hashes to `expected`. A stored
/// (uncompressed) object's plaintext is a slice of `stored`, not a copy.
pub fn decode(expected: &ObjectId, stored: bytes::Bytes) -> Result<bytes::Bytes> {
    let corrupt = |why: &str| {
        Error::new(
            ErrorCode::BackupChecksumMismatch,
            format!("object {expected}: {why}"),
        )
    };
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
        return Err(corrupt("bad object header"));
    }
    if stored[4] != FORMAT_VERSION {
        return Err(corrupt(&format!(
            "unknown object format version {}",
            stored[4]
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&stored[8..16]);
    let plaintext_len = u64::from_le_bytes(len_bytes);
    let payload = &stored[HEADER_LEN..];
    let plaintext = match stored[5] {
        CODEC_STORED => stored.slice(HEADER_LEN..),
        CODEC_ZSTD => {
            let capacity = usize::try_from(plaintext_len)
                .ok()
                .filter(|len| *len <= 1 << 31)
                .ok_or_else(|| corrupt("implausible plaintext length"))?;
            // Stored bytes that do not decompress were damaged after they were written: the
            // operator's problem is corruption, so it is reported as a checksum mismatch.
            zstd::bulk::decompress(payload, capacity)
                .map_err(|err| {
                    Error::with_source(
                        ErrorCode::BackupChecksumMismatch,
                        format!("object {expected}: stored payload does not decompress"),
                        err,
                    )
                })?
                .into()
        }
        other => return Err(corrupt(&format!("unknown codec {other}"))),
    };
    if plaintext.len() as u64 != plaintext_len {
        return Err(corrupt(&format!(
            "plaintext is {} bytes, header says {plaintext_len}",
            plaintext.len()
        )));
    }
    let actual = ObjectId::from_digest(Sha256::digest(&plaintext).into());
    if &actual != expected {
        return Err(corrupt(&format!("content hashes to {actual}")));
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_is_compressed_and_round_trips() -> Result<()> {
        let plain = vec![7u8; 100_000];
        let encoded = encode(&plain, Compression::default())?;
        assert!(encoded.compressed);
        assert!(encoded.stored_len() < 1000);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    #[test]
    fn incompressible_data_is_stored_as_is() -> Result<()> {
        let mut state = 0x9e3779b97f4a7c15u64;
        let plain: Vec<u8> = (0..200_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let encoded = encode(&plain, Compression::default())?;
        assert!(!encoded.compressed);
        assert_eq!(encoded.stored_len(), (plain.len() + HEADER_LEN) as u64);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_mismatch() -> Result<()> {
        for plain in [vec![1u8; 10_000], b"short".to_vec()] {
            let encoded = encode(&plain, Compression::default())?;
            let mut bytes = encoded.to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            let err = decode(&encoded.id, bytes.into()).err().map(|e| e.code);
            assert_eq!(err, Some(ErrorCode::BackupChecksumMismatch));
        }
        Ok(())
    }
}
