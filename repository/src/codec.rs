//! The data-object codec: plaintext → framed, possibly compressed, possibly sealed bytes,
//! and back.
//!
//! ```text
//! offset 0  magic  "LKSO"
//!        4  format version (1 or 2: plaintext; 3 or 4: sealed)
//!        5  codec: 0 = stored, 1 = zstd
//!        6  reserved (0, 0)
//!        8  plaintext length, u64 little endian
//!       16  payload (version 1)
//!       16  key epoch, u32 little endian; 4 zero bytes; the seal's 24 random bytes; its
//!           16-byte tag (versions 3 and 4)
//!       64  sealed payload (version 3)
//!     4096  payload (version 2; bytes 16..4096 are zero), sealed payload (version 4; bytes
//!           64..4096 are zero)
//! ```
//!
//! Version 2 frames a stored (uncompressed) chunk in the buffer it was read into: the chunk
//! is read one page after the buffer's start, the header goes in front of it, and the whole
//! object is written without a copy, with direct I/O on a local repository (`direct.rs`); on
//! restore, its payload is page-aligned and goes to the restored file the same way. A chunk
//! that compresses is compressed one page into a buffer of its own and framed the same way.
//! WAL segments, payloads under a page and every object on a remote store use version 1
//! ([`Encoded::unpaged`]). Readers accept both; binaries from before version 2 reject it
//! as an unknown format. Versions 3 and 4 are 1 and 2 in an encrypted repository: the
//! payload (compressed or not) sealed in place (`seal.rs`), the seal authenticating the
//! object's name, codec and plaintext length too.
//!
//! An object's name is the SHA-256 of its plaintext, or in an encrypted repository its
//! HMAC-SHA256 under the repository's id key ([`Seal::object_id`]). Compression is used only
//! when it pays: a zstd-1 probe of the first 64 KiB must save at least 10% for the chunk to be
//! compressed, and the result is kept only when it saves at least 3%, so incompressible data
//! (already-compressed SST blocks) costs one probe.
//!
//! Architecture invariant: `decode` returns plaintext only after opening its seal (when
//! sealed) and re-hashing it against the expected id; a reader never sees unverified bytes.

use crate::buffers::{BufferPool, PooledBuffer};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::ObjectId;
use crate::seal::{NONCE_LEN, Seal, SealInfo, TAG_LEN, array};

const MAGIC: &[u8; 4] = b"LKSO";
/// Version 1: the payload follows the header.
const FORMAT_VERSION: u8 = 1;
/// Version 2: the payload starts one page in ([`HEADER_ROOM`]).
const FORMAT_VERSION_PAGED: u8 = 2;
/// Version 3: version 1 sealed; the payload follows the sealed header.
const FORMAT_SEALED: u8 = 3;
/// Version 4: version 2 sealed.
const FORMAT_SEALED_PAGED: u8 = 4;
pub const HEADER_LEN: usize = 16;
/// The header of a sealed object: the plain header, the epoch and the seal.
pub const SEALED_HEADER_LEN: usize = HEADER_LEN + 8 + NONCE_LEN + TAG_LEN;
/// Room a chunk buffer keeps in front of the chunk for a version-2 header: where a version-2
/// payload starts (a format constant: never derive it from the I/O page size).
pub const HEADER_ROOM: usize = 4096;
const _: () = assert!(HEADER_ROOM.is_multiple_of(crate::buffers::PAGE));
const _: () = assert!(SEALED_HEADER_LEN <= HEADER_ROOM);
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

/// An encoded object, ready to store.
#[derive(Debug)]
pub struct Encoded {
    pub id: ObjectId,
    pub plaintext_len: u64,
    pub frame: Frame,
    pub compressed: bool,
}

/// A version-1 or version-3 header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    bytes: [u8; SEALED_HEADER_LEN],
    len: usize,
}

impl Header {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The bytes of a stored object.
#[derive(Debug)]
pub enum Frame {
    /// The whole object in one buffer (version 2 or 4, stored: the chunk's own buffer),
    /// starting page-aligned.
    Whole(bytes::Bytes),
    /// A version-1 or 3 header and the payload apart, so a payload is never copied behind it.
    Split(Header, bytes::Bytes),
}

impl Encoded {
    /// Bytes the object takes in the repository.
    pub fn stored_len(&self) -> u64 {
        self.parts().iter().map(|part| part.len() as u64).sum()
    }

    /// The object's bytes, in order, in at most two pieces.
    pub fn parts(&self) -> [&[u8]; 2] {
        match &self.frame {
            Frame::Whole(whole) => [whole, &[]],
            Frame::Split(header, payload) => [header.as_slice(), payload],
        }
    }

    /// The object in format 1 (or 3): a paged object's padding page dropped, without a copy
    /// (for stores and sizes where a page-aligned payload buys nothing).
    pub fn unpaged(self) -> Encoded {
        match self.frame {
            Frame::Whole(whole) if whole.len() >= HEADER_ROOM => {
                let header = if whole[4] == FORMAT_SEALED_PAGED {
                    let mut header = Header {
                        bytes: array(&whole[..SEALED_HEADER_LEN]),
                        len: SEALED_HEADER_LEN,
                    };
                    header.bytes[4] = FORMAT_SEALED;
                    header
                } else {
                    header(FORMAT_VERSION, whole[5], self.plaintext_len)
                };
                Encoded {
                    frame: Frame::Split(header, whole.slice(HEADER_ROOM..)),
                    ..self
                }
            }
            frame => Encoded { frame, ..self },
        }
    }

    /// The whole stored object in one buffer (a copy; for small objects such as WAL segments).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

fn header(version: u8, codec: u8, plaintext_len: u64) -> Header {
    let mut bytes = [0u8; SEALED_HEADER_LEN];
    bytes[..4].copy_from_slice(MAGIC);
    bytes[4] = version;
    bytes[5] = codec;
    bytes[8..16].copy_from_slice(&plaintext_len.to_le_bytes());
    Header {
        bytes,
        len: HEADER_LEN,
    }
}

/// The header of a sealed object (`version` 3 or 4).
fn sealed_header(version: u8, codec: u8, plaintext_len: u64, seal: &SealInfo) -> Header {
    let mut header = header(version, codec, plaintext_len);
    header.bytes[16..20].copy_from_slice(&seal.epoch.to_le_bytes());
    header.bytes[24..24 + NONCE_LEN].copy_from_slice(&seal.nonce);
    header.bytes[24 + NONCE_LEN..SEALED_HEADER_LEN].copy_from_slice(&seal.tag);
    header.len = SEALED_HEADER_LEN;
    header
}

/// What an object's seal authenticates beside its payload.
fn object_aad(id: &ObjectId, codec: u8, plaintext_len: u64) -> Vec<u8> {
    [
        &MAGIC[..],
        &[codec],
        &plaintext_len.to_le_bytes(),
        id.as_bytes(),
    ]
    .concat()
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

/// Names and encodes one plaintext (a small object: a stored one is copied behind its
/// header). CPU-bound: call it off the async workers.
pub fn encode(plaintext: &[u8], compression: Compression, seal: &Seal) -> Result<Encoded> {
    let id = seal.object_id(plaintext);
    let (codec, payload) = match compress(&id, plaintext, compression)? {
        Some(compressed) => (CODEC_ZSTD, compressed),
        None => (CODEC_STORED, plaintext.to_vec()),
    };
    split(id, plaintext.len() as u64, codec, payload, seal)
}

/// A version-1 object, or version 3 when `seal` seals (the payload in place).
fn split(
    id: ObjectId,
    plaintext_len: u64,
    codec: u8,
    mut payload: Vec<u8>,
    seal: &Seal,
) -> Result<Encoded> {
    let header = match seal.keys() {
        None => header(FORMAT_VERSION, codec, plaintext_len),
        Some(keys) => {
            let info = keys.seal(&object_aad(&id, codec, plaintext_len), &mut payload)?;
            sealed_header(FORMAT_SEALED, codec, plaintext_len, &info)
        }
    };
    Ok(Encoded {
        id,
        plaintext_len,
        frame: Frame::Split(header, payload.into()),
        compressed: codec == CODEC_ZSTD,
    })
}

/// Encodes a chunk whose id the caller has computed with [`Seal::object_id`] (or its
/// hasher) over `buffer[HEADER_ROOM..]`; the first [`HEADER_ROOM`] bytes of `buffer` are
/// free for the header. A chunk of a page or more stored uncompressed becomes the object in
/// place (version 2, or 4 sealed in place), without a copy; a smaller one goes in version 1
/// (or 3), also without a copy.
pub fn encode_in_place(
    id: ObjectId,
    buffer: PooledBuffer,
    compression: Compression,
    seal: &Seal,
) -> Result<Encoded> {
    let plaintext = buffer.contents().get(HEADER_ROOM..).ok_or_else(|| {
        Error::new(
            ErrorCode::BackupCreationFailed,
            format!("object {id}: the buffer has no room for its header"),
        )
    })?;
    let plaintext_len = plaintext.len() as u64;
    // Compressed into a buffer of the same pool, after a header page of its own: the
    // object is that buffer, written around the page cache like a stored chunk.
    if let Some(compressed) = compress_paged(&id, plaintext, compression, buffer.pool())? {
        drop(buffer);
        return paged(id, plaintext_len, CODEC_ZSTD, compressed, seal);
    }
    paged(id, plaintext_len, CODEC_STORED, buffer, seal)
}

/// The object whose payload is `buffer[HEADER_ROOM..]`, in place: the payload sealed when
/// `seal` seals, the header written into the first page (version 2, or 4 sealed). Under a
/// page of payload, version 1 (or 3): nothing would be written directly, and the padding
/// would double the object.
fn paged(
    id: ObjectId,
    plaintext_len: u64,
    codec: u8,
    mut buffer: PooledBuffer,
    seal: &Seal,
) -> Result<Encoded> {
    let header = match seal.keys() {
        None => header(FORMAT_VERSION_PAGED, codec, plaintext_len),
        Some(keys) => {
            let aad = object_aad(&id, codec, plaintext_len);
            let info = keys.seal(&aad, &mut buffer.as_mut_slice()[HEADER_ROOM..])?;
            sealed_header(FORMAT_SEALED_PAGED, codec, plaintext_len, &info)
        }
    };
    buffer.as_mut_slice()[..header.len].copy_from_slice(header.as_slice());
    let payload_len = buffer.len() - HEADER_ROOM;
    let encoded = Encoded {
        id,
        plaintext_len,
        frame: Frame::Whole(bytes::Bytes::from_owner(buffer)),
        compressed: codec == CODEC_ZSTD,
    };
    Ok(if payload_len < crate::buffers::PAGE {
        encoded.unpaged()
    } else {
        encoded
    })
}

/// True when compressing `bytes` is worth trying: compression is on, and a probe of their
/// start compresses well enough.
fn worth_compressing(bytes: &[u8], compression: Compression) -> bool {
    if compression.zstd_level <= 0 || bytes.len() < 512 {
        return false;
    }
    let probe = &bytes[..bytes.len().min(PROBE_LEN)];
    bytes.len() <= PROBE_LEN
        || zstd::bulk::compress(probe, 1)
            .map(|c| probe_pays(probe.len(), c.len()))
            .unwrap_or(true)
}

fn compression_failed(id: &ObjectId, err: std::io::Error) -> Error {
    Error::with_source(
        ErrorCode::BackupCompressionFailed,
        format!("compress object {id}"),
        err,
    )
}

/// The chunk compressed, or `None` when compression does not pay.
fn compress(id: &ObjectId, bytes: &[u8], compression: Compression) -> Result<Option<Vec<u8>>> {
    if !worth_compressing(bytes, compression) {
        return Ok(None);
    }
    let payload = zstd::bulk::compress(bytes, compression.zstd_level)
        .map_err(|err| compression_failed(id, err))?;
    Ok(pays(bytes.len(), payload.len()).then_some(payload))
}

/// [`compress`] into a buffer from `pool`, after [`HEADER_ROOM`] zero bytes.
fn compress_paged(
    id: &ObjectId,
    bytes: &[u8],
    compression: Compression,
    pool: &BufferPool,
) -> Result<Option<PooledBuffer>> {
    if !worth_compressing(bytes, compression) {
        return Ok(None);
    }
    let bound = zstd::zstd_safe::compress_bound(bytes.len());
    let mut out = pool.take(HEADER_ROOM + bound);
    out.extend_zeroed(HEADER_ROOM);
    let written =
        zstd::bulk::compress_to_buffer(bytes, out.extend_unfilled(bound), compression.zstd_level)
            .map_err(|err| compression_failed(id, err))?;
    out.truncate(HEADER_ROOM + written);
    Ok(pays(bytes.len(), written).then_some(out))
}

/// Decodes a stored object and checks that its plaintext hashes to `expected`. A stored
/// (uncompressed, unsealed) object's plaintext is a slice of `stored`, not a copy.
pub fn decode(expected: &ObjectId, stored: bytes::Bytes, seal: &Seal) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::AtMost(MAX_PLAINTEXT), seal, None)
}

/// No object's plaintext is larger (a chunk is at most a few MiB, a WAL segment 64 MiB).
const MAX_PLAINTEXT: u64 = 1 << 31;

/// [`decode`] for an object whose plaintext is at most `max` bytes (a WAL segment): a header
/// that declares more is refused before anything is decompressed or allocated.
pub fn decode_at_most(
    expected: &ObjectId,
    stored: bytes::Bytes,
    max: u64,
    seal: &Seal,
) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::AtMost(max), seal, None)
}

/// The most bytes an object whose plaintext is `plaintext_len` bytes can take stored: the
/// header page and the plaintext (compression is kept only when it pays).
pub fn max_stored_len(plaintext_len: u64) -> u64 {
    plaintext_len.saturating_add(HEADER_ROOM as u64)
}

/// Whether `stored` is a sealed object (by its header alone: nothing is checked).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.len() > 4
        && &stored[..4] == MAGIC
        && matches!(stored[4], FORMAT_SEALED | FORMAT_SEALED_PAGED)
}

/// Checks what a keyless holder (a remote archive) can check of a sealed object: its header,
/// a plaintext of at most `max` bytes, and a payload that fits it (a truncated transfer is
/// refused). The seal itself is checked by whoever opens it.
pub fn check_sealed_frame(stored: &[u8], max: u64) -> std::result::Result<(), String> {
    if !is_sealed(stored) || stored.len() < SEALED_HEADER_LEN {
        return Err("not a sealed object".into());
    }
    if stored[6..8] != [0, 0] || stored[20..24] != [0; 4] {
        return Err("reserved header bytes are not zero".into());
    }
    let codec = stored[5];
    if codec != CODEC_STORED && codec != CODEC_ZSTD {
        return Err(format!("unknown codec {codec}"));
    }
    let plaintext_len = u64::from_le_bytes(array(&stored[8..16]));
    if plaintext_len > max {
        return Err(format!(
            "its header declares {plaintext_len} bytes, more than the {max} it may hold"
        ));
    }
    let payload_at = if stored[4] == FORMAT_SEALED_PAGED {
        HEADER_ROOM
    } else {
        SEALED_HEADER_LEN
    };
    let payload = (stored.len() as u64).checked_sub(payload_at as u64);
    match payload {
        Some(len) if codec == CODEC_STORED && len == plaintext_len => Ok(()),
        Some(len) if codec == CODEC_ZSTD && len > 0 && len < plaintext_len => Ok(()),
        _ => Err(format!(
            "its payload does not fit the {plaintext_len} bytes its header declares (truncated?)"
        )),
    }
}

/// What a decoder knows of the plaintext's length before it decodes.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// A manifest records it exactly.
    Exact(u64),
    /// The kind of object bounds it.
    AtMost(u64),
}

/// [`decode`] for an object whose plaintext length a manifest records: a header that
/// declares another length is refused before anything is decompressed or allocated, so a
/// crafted object cannot make a reader allocate more than the chunk it stands for.
pub fn decode_sized(
    expected: &ObjectId,
    stored: bytes::Bytes,
    len: u64,
    seal: &Seal,
) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::Exact(len), seal, None)
}

/// An object's stored bytes as a reader got them: shared, or in a buffer of its own, where a
/// sealed object is opened in place (no copy; its payload stays page-aligned).
pub enum Stored {
    Shared(bytes::Bytes),
    Owned(PooledBuffer),
}

impl Stored {
    fn as_slice(&self) -> &[u8] {
        match self {
            Stored::Shared(bytes) => bytes,
            Stored::Owned(buffer) => buffer.contents(),
        }
    }

    pub fn into_bytes(self) -> bytes::Bytes {
        match self {
            Stored::Shared(bytes) => bytes,
            Stored::Owned(buffer) => bytes::Bytes::from_owner(buffer),
        }
    }
}

impl From<bytes::Bytes> for Stored {
    fn from(bytes: bytes::Bytes) -> Stored {
        Stored::Shared(bytes)
    }
}

/// [`decode_sized`] of an object in a buffer of its own: a sealed one is opened in place, and
/// a compressed one decompressed into a page-aligned buffer from `pool`, so a restore writes
/// every chunk around the page cache (`direct.rs`).
pub fn decode_sized_owned(
    expected: &ObjectId,
    stored: Stored,
    len: u64,
    seal: &Seal,
    pool: &BufferPool,
) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::Exact(len), seal, Some(pool))
}

fn decode_within(
    expected: &ObjectId,
    stored: impl Into<Stored>,
    limit: Limit,
    seal: &Seal,
    pool: Option<&BufferPool>,
) -> Result<bytes::Bytes> {
    let stored: Stored = stored.into();
    let whole = stored.as_slice();
    let corrupt = |why: &str| {
        Error::new(
            ErrorCode::BackupChecksumMismatch,
            format!("object {expected}: {why}"),
        )
    };
    if whole.len() < HEADER_LEN || &whole[..4] != MAGIC {
        return Err(corrupt("bad object header"));
    }
    if whole[6..8] != [0, 0] {
        return Err(corrupt("reserved header bytes are not zero"));
    }
    let (payload_at, sealed) = match whole[4] {
        FORMAT_VERSION => (HEADER_LEN, false),
        FORMAT_SEALED if whole.len() >= SEALED_HEADER_LEN => (SEALED_HEADER_LEN, true),
        FORMAT_VERSION_PAGED | FORMAT_SEALED_PAGED if whole.len() >= HEADER_ROOM => {
            let sealed = whole[4] == FORMAT_SEALED_PAGED;
            let padding_from = if sealed {
                SEALED_HEADER_LEN
            } else {
                HEADER_LEN
            };
            if whole[padding_from..HEADER_ROOM].iter().any(|b| *b != 0) {
                return Err(corrupt("the header page's padding is not zero"));
            }
            (HEADER_ROOM, sealed)
        }
        FORMAT_SEALED | FORMAT_VERSION_PAGED | FORMAT_SEALED_PAGED => {
            return Err(corrupt("truncated object header"));
        }
        other => {
            return Err(corrupt(&format!("unknown object format version {other}")));
        }
    };
    let plaintext_len = u64::from_le_bytes(array(&whole[8..16]));
    if plaintext_len > MAX_PLAINTEXT {
        return Err(corrupt(&format!(
            "its header declares {plaintext_len} bytes, more than any object holds"
        )));
    }
    match limit {
        Limit::Exact(len) if len != plaintext_len => {
            return Err(corrupt(&format!(
                "its header declares {plaintext_len} bytes, the manifest {len}"
            )));
        }
        Limit::AtMost(max) if plaintext_len > max => {
            return Err(corrupt(&format!(
                "its header declares {plaintext_len} bytes, more than the {max} such an object holds"
            )));
        }
        _ => {}
    }
    let codec = whole[5];
    if codec != CODEC_STORED && codec != CODEC_ZSTD {
        return Err(corrupt(&format!("unknown codec {codec}")));
    }
    let seal_info = sealed.then(|| SealInfo {
        epoch: u32::from_le_bytes(array(&whole[16..20])),
        nonce: array(&whole[24..24 + NONCE_LEN]),
        tag: array(&whole[24 + NONCE_LEN..SEALED_HEADER_LEN]),
    });
    if sealed && whole[20..24] != [0; 4] {
        return Err(corrupt("reserved header bytes are not zero"));
    }
    let payload = match (seal_info, seal) {
        (None, Seal::Plain) => stored.into_bytes().slice(payload_at..),
        (None, Seal::Sealed { .. }) => {
            return Err(corrupt(
                "it is not encrypted, and every object of an encrypted repository is",
            ));
        }
        (Some(_), Seal::Plain) => {
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "object {expected} is encrypted, and this repository was opened without its key"
                ),
            ));
        }
        (Some(info), Seal::Sealed { keys, buffers }) => {
            let (mut opened, from) = match stored {
                Stored::Owned(buffer) => (buffer, payload_at),
                Stored::Shared(bytes) => {
                    // Copied into a page-aligned buffer of its own: shared bytes stay as
                    // they are.
                    let sealed_payload = &bytes[payload_at..];
                    let mut copy = buffers.take(sealed_payload.len());
                    copy.read_from(sealed_payload, sealed_payload.len() as u64)
                        .map_err(|err| {
                            Error::with_source(
                                ErrorCode::BackupChecksumMismatch,
                                "copy payload",
                                err,
                            )
                        })?;
                    (copy, 0)
                }
            };
            let aad = object_aad(expected, codec, plaintext_len);
            if !keys.open(&info, &aad, &mut opened.as_mut_slice()[from..]) {
                return Err(corrupt(
                    "it does not authenticate (altered, renamed, or not written with this repository's key)",
                ));
            }
            bytes::Bytes::from_owner(opened).slice(from..)
        }
    };
    let plaintext = match codec {
        CODEC_ZSTD => {
            let capacity = usize::try_from(plaintext_len)
                .map_err(|_| corrupt("implausible plaintext length"))?;
            // Stored bytes that do not decompress were damaged after they were written: the
            // operator's problem is corruption, so it is reported as a checksum mismatch.
            let undecodable = |err| {
                Error::with_source(
                    ErrorCode::BackupChecksumMismatch,
                    format!("object {expected}: stored payload does not decompress"),
                    err,
                )
            };
            match pool {
                Some(pool) => {
                    let mut plaintext = pool.take(capacity);
                    let written = zstd::bulk::decompress_to_buffer(
                        &payload,
                        plaintext.extend_unfilled(capacity),
                    )
                    .map_err(undecodable)?;
                    plaintext.truncate(written);
                    bytes::Bytes::from_owner(plaintext)
                }
                None => zstd::bulk::decompress(&payload, capacity)
                    .map_err(undecodable)?
                    .into(),
            }
        }
        _ => payload,
    };
    if plaintext.len() as u64 != plaintext_len {
        return Err(corrupt(&format!(
            "plaintext is {} bytes, header says {plaintext_len}",
            plaintext.len()
        )));
    }
    let actual = seal.object_id(&plaintext);
    if &actual != expected {
        return Err(corrupt(&format!("content hashes to {actual}")));
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The plaintext repository's codec; the sealed one is tested below.
    fn encode(plaintext: &[u8], compression: Compression) -> Result<Encoded> {
        super::encode(plaintext, compression, &Seal::Plain)
    }

    fn decode(expected: &ObjectId, stored: bytes::Bytes) -> Result<bytes::Bytes> {
        super::decode(expected, stored, &Seal::Plain)
    }

    fn decode_sized(expected: &ObjectId, stored: bytes::Bytes, len: u64) -> Result<bytes::Bytes> {
        super::decode_sized(expected, stored, len, &Seal::Plain)
    }

    fn sealing() -> Seal {
        let passphrase = crate::seal::Passphrase::new("codec test").expect("passphrase");
        let (keys, ..) = crate::seal::create(&passphrase).expect("keys");
        Seal::sealed(keys)
    }

    #[test]
    fn sealed_objects_round_trip_in_every_shape_and_hide_their_plaintext() -> Result<()> {
        let seal = sealing();
        let marker = b"plaintext marker 0123456789";
        let mut stored_chunk = incompressible(300_000);
        stored_chunk[1000..1000 + marker.len()].copy_from_slice(marker);
        let compressible = marker.repeat(4000);
        for (plain, in_place) in [
            (stored_chunk.clone(), true),
            (stored_chunk[..100].to_vec(), true),
            (compressible.clone(), true),
            (stored_chunk.clone(), false),
            (compressible, false),
        ] {
            let encoded = if in_place {
                encode_chunk_with(&plain, &seal)?
            } else {
                super::encode(&plain, Compression::default(), &seal)?
            };
            assert_eq!(encoded.id, seal.object_id(&plain));
            let bytes = encoded.to_vec();
            assert!(is_sealed(&bytes));
            assert!(!bytes.windows(marker.len()).any(|w| w == marker));
            let id = encoded.id;
            let opened = super::decode_sized(&id, bytes.clone().into(), plain.len() as u64, &seal)?;
            assert_eq!(opened, plain);
            let unpaged = encoded.unpaged().to_vec();
            assert_eq!(super::decode(&id, unpaged.into(), &seal)?, plain);
        }
        // A paged stored chunk opens page-aligned, for direct writes, from shared bytes (a
        // copy) and in the reader's own buffer (in place) alike.
        let encoded = encode_chunk_with(&stored_chunk, &seal)?;
        assert!(matches!(encoded.frame, Frame::Whole(_)));
        let bytes = encoded.to_vec();
        let opened = super::decode(&encoded.id, bytes.clone().into(), &seal)?;
        assert_eq!(opened.as_ptr() as usize % crate::buffers::PAGE, 0);
        let mut own = crate::buffers::BufferPool::default().take(bytes.len());
        own.read_from(bytes.as_slice(), bytes.len() as u64)
            .expect("fill");
        let in_place = decode_sized_owned(
            &encoded.id,
            Stored::Owned(own),
            stored_chunk.len() as u64,
            &seal,
            &crate::buffers::BufferPool::default(),
        )?;
        assert_eq!(in_place, stored_chunk);
        assert_eq!(in_place.as_ptr() as usize % crate::buffers::PAGE, 0);
        Ok(())
    }

    #[test]
    fn a_sealed_object_altered_renamed_or_read_with_the_wrong_keys_is_refused() -> Result<()> {
        let seal = sealing();
        let plain = incompressible(10_000);
        let encoded = super::encode(&plain, Compression::default(), &seal)?;
        let (id, bytes) = (encoded.id, encoded.to_vec());
        for at in [5, 9, 16, 30, 50, SEALED_HEADER_LEN, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1;
            let err = super::decode(&id, flipped.into(), &seal).expect_err("flipped");
            assert_eq!(err.code, ErrorCode::BackupChecksumMismatch, "byte {at}");
        }
        let other = seal.object_id(b"another chunk");
        let renamed = super::decode(&other, bytes.clone().into(), &seal).expect_err("renamed");
        assert_eq!(renamed.code, ErrorCode::BackupChecksumMismatch);
        let foreign = super::decode(&id, bytes.clone().into(), &sealing()).expect_err("other key");
        assert_eq!(foreign.code, ErrorCode::BackupChecksumMismatch);
        let locked = decode(&id, bytes.into()).expect_err("no key");
        assert_eq!(locked.code, ErrorCode::EncryptionKey);
        // A plaintext object planted in an encrypted repository is refused too.
        let planted = encode(&plain, Compression::default())?;
        let err = super::decode(&id, planted.to_vec().into(), &seal).expect_err("planted");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch);
        Ok(())
    }

    #[test]
    fn a_header_declaring_another_length_than_the_manifest_is_refused_before_decompression()
    -> Result<()> {
        let plain = vec![7u8; 100_000];
        let encoded = encode(&plain, Compression::default())?;
        let id = encoded.id;
        let stored: bytes::Bytes = encoded.to_vec().into();
        assert_eq!(decode_sized(&id, stored.clone(), 100_000)?, plain);
        let err = decode_sized(&id, stored.clone(), 99_999).expect_err("other length");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch);
        assert!(err.message.contains("declares 100000 bytes"), "{err}");

        // A crafted header claiming 2 GiB for a few bytes of payload: refused at once, where
        // `decode` alone would reserve the 2 GiB before zstd saw the payload.
        let mut bomb = stored.to_vec();
        bomb[8..16].copy_from_slice(&(2u64 << 30).to_le_bytes());
        let err = decode_sized(&id, bomb.into(), 100_000).expect_err("bomb");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch);
        assert!(err.message.contains("declares 2147483648 bytes"), "{err}");
        Ok(())
    }

    #[test]
    fn compressible_data_is_compressed_and_round_trips() -> Result<()> {
        let plain = vec![7u8; 100_000];
        let encoded = encode(&plain, Compression::default())?;
        assert!(encoded.compressed);
        assert!(encoded.stored_len() < 1000);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        // A restore's read decompresses into a reused page-aligned buffer, for direct writes;
        // what the buffer held before never shows.
        let pool = BufferPool::default();
        let mut stale = pool.take(plain.len());
        stale.extend_unfilled(plain.len()).fill(0xEE);
        drop(stale);
        for _ in 0..2 {
            let restored = decode_sized_owned(
                &encoded.id,
                Stored::Shared(encoded.to_vec().into()),
                plain.len() as u64,
                &Seal::Plain,
                &pool,
            )?;
            assert_eq!(restored, plain);
            assert_eq!(restored.as_ptr() as usize % crate::buffers::PAGE, 0);
        }
        Ok(())
    }

    fn incompressible(len: usize) -> Vec<u8> {
        let mut state = 0x9e3779b97f4a7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// A chunk encoded as the upload does it: read into a buffer after its header room,
    /// then encoded in place.
    fn encode_chunk(plain: &[u8]) -> Result<Encoded> {
        encode_chunk_with(plain, &Seal::Plain)
    }

    fn encode_chunk_with(plain: &[u8], seal: &Seal) -> Result<Encoded> {
        let mut buffer = crate::buffers::BufferPool::default().take(HEADER_ROOM + plain.len());
        buffer.extend_zeroed(HEADER_ROOM);
        let read = buffer.read_from(plain, plain.len() as u64);
        assert_eq!(read.ok(), Some(plain.len()));
        encode_in_place(seal.object_id(plain), buffer, Compression::default(), seal)
    }

    #[test]
    fn a_compressed_chunk_is_paged_for_direct_writes_and_unpages_with_its_codec() -> Result<()> {
        let mut plain = vec![b'x'; 800_000];
        plain.extend(incompressible(200_000));
        for seal in [Seal::Plain, sealing()] {
            let encoded = encode_chunk_with(&plain, &seal)?;
            assert!(encoded.compressed);
            let Frame::Whole(whole) = &encoded.frame else {
                panic!("a compressed chunk of more than a page is one buffer");
            };
            assert_eq!(whole.as_ptr() as usize % crate::buffers::PAGE, 0);
            assert!(matches!(
                whole[4],
                FORMAT_VERSION_PAGED | FORMAT_SEALED_PAGED
            ));
            assert_eq!(whole[5], CODEC_ZSTD);
            assert!(encoded.stored_len() < plain.len() as u64 / 2);
            assert_eq!(super::decode(&encoded.id, whole.clone(), &seal)?, plain);
            // Where pages buy nothing (a remote store), the same object in format 1 or 3.
            let unpaged = encoded.unpaged();
            assert!(matches!(unpaged.frame, Frame::Split(..)));
            assert_eq!(
                super::decode(&unpaged.id, unpaged.to_vec().into(), &seal)?,
                plain
            );
        }
        // Under a page once compressed: format 1 from the start.
        let small = encode_chunk(&vec![b'y'; 100_000])?;
        assert!(small.compressed);
        assert!(matches!(small.frame, Frame::Split(..)));
        assert_eq!(
            decode(&small.id, small.to_vec().into())?,
            vec![b'y'; 100_000]
        );
        Ok(())
    }

    #[test]
    fn an_incompressible_chunk_is_stored_in_place_with_its_payload_page_aligned() -> Result<()> {
        let plain = incompressible(300_000);
        let encoded = encode_chunk(&plain)?;
        assert!(!encoded.compressed);
        let Frame::Whole(whole) = &encoded.frame else {
            panic!("a stored chunk is one buffer");
        };
        assert_eq!(whole.as_ptr() as usize % crate::buffers::PAGE, 0);
        assert_eq!(encoded.stored_len(), (HEADER_ROOM + plain.len()) as u64);
        assert_eq!(whole[4], FORMAT_VERSION_PAGED);
        let decoded = decode(&encoded.id, whole.clone())?;
        assert_eq!(decoded, plain);
        assert_eq!(decoded.as_ptr() as usize % crate::buffers::PAGE, 0);
        let small = encode_chunk(&plain[..100])?;
        assert!(
            matches!(small.frame, Frame::Split(..)),
            "under a page: format 1"
        );
        assert_eq!(small.stored_len(), (HEADER_LEN + 100) as u64);
        Ok(())
    }

    #[test]
    fn a_compressible_chunk_is_compressed_from_its_buffer() -> Result<()> {
        let plain = vec![3u8; 200_000];
        let encoded = encode_chunk(&plain)?;
        assert!(encoded.compressed);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    #[test]
    fn a_damaged_or_truncated_paged_object_is_a_checksum_mismatch_not_a_panic() -> Result<()> {
        let plain = incompressible(10_000);
        let encoded = encode_chunk(&plain)?;
        let (id, bytes) = (encoded.id, encoded.to_vec());
        let mut padded = bytes.clone();
        padded[HEADER_ROOM - 1] = 1;
        let err = decode(&id, padded.into()).err().map(|e| e.code);
        assert_eq!(
            err,
            Some(ErrorCode::BackupChecksumMismatch),
            "damaged padding"
        );
        let unpaged = encoded.unpaged();
        assert!(matches!(unpaged.frame, Frame::Split(..)));
        assert_eq!(unpaged.stored_len(), (HEADER_LEN + plain.len()) as u64);
        assert_eq!(decode(&unpaged.id, unpaged.to_vec().into())?, plain);
        for len in [HEADER_LEN, HEADER_ROOM - 1, HEADER_ROOM + 5] {
            let err = decode(&id, bytes[..len].to_vec().into())
                .err()
                .map(|e| e.code);
            assert_eq!(err, Some(ErrorCode::BackupChecksumMismatch), "{len} bytes");
        }
        Ok(())
    }

    #[test]
    fn incompressible_data_is_stored_as_is() -> Result<()> {
        let plain = incompressible(200_000);
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
