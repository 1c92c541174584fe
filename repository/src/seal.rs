//! Encryption at rest: keyed object names, sealed objects and records, and the key slots
//! that hold a repository's master key.
//!
//! A repository is encrypted or not from its creation: whoever creates it with a passphrase
//! writes `lockstep-encryption.json` (create-only) and the first key slot. Its master key
//! (32 random bytes) is stored only sealed, once per key slot (`keys/<slot>.json`), under a
//! key derived from that slot's passphrase by Argon2id. From the master key come, by
//! HMAC-SHA256 with distinct labels:
//!
//! - the **id key**: an object is named by HMAC-SHA256(id key, plaintext), so equal chunks
//!   still deduplicate but nobody without the key can test whether a known chunk is stored;
//! - the **data key** of each key epoch: every data object, WAL segment and record is sealed
//!   with AES-256-GCM under a key derived from the epoch's data key and 12 random bytes, with
//!   12 more random bytes as the nonce. With 192 random bits per seal, no nonce or key-use
//!   bound is approached in a repository's life. Every seal names its epoch; repositories
//!   start at epoch 0.
//!
//! A seal authenticates, beside its bytes, what they are: an object its name, codec and
//! plaintext length; a record its key in the repository; a key slot the repository's key id
//! and the slot's name. A flipped byte, a swapped or renamed object or record all fail to
//! open, with `ERR_BACKUP_CHECKSUM_MISMATCH`. A remote `lockstep://` archive stores sealed
//! WAL segments as it receives them, without any key.
//!
//! Architecture invariant: keys and passphrases are never written anywhere, logged or shown
//! (their `Debug` is redacted); only sealed master keys leave memory.

use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::buffers::BufferPool;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::ObjectId;

/// The environment variable naming a file that holds the passphrase (read first).
pub const PASSPHRASE_FILE_ENV: &str = "LOCKSTEP_PASSPHRASE_FILE";
/// The environment variable holding the passphrase itself.
pub const PASSPHRASE_ENV: &str = "LOCKSTEP_PASSPHRASE";
const MAX_PASSPHRASE_BYTES: u64 = 4096;

/// The random bytes of one seal: 12 select the per-seal key, 12 are the AES-GCM nonce.
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;

/// A passphrase, wiped from memory when dropped and never shown.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl Passphrase {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Passphrase> {
        let bytes = Zeroizing::new(bytes.into());
        if bytes.is_empty() {
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                "the passphrase is empty",
            ));
        }
        Ok(Passphrase(bytes))
    }

    /// The passphrase in `path`: its contents, without one trailing line end.
    pub fn from_file(path: &std::path::Path) -> Result<Passphrase> {
        use std::io::Read;
        let failed = |why: String| {
            Error::new(
                ErrorCode::EncryptionKey,
                format!("passphrase file {}: {why}", path.display()),
            )
        };
        let file = std::fs::File::open(path).map_err(|err| failed(err.to_string()))?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_PASSPHRASE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|err| failed(err.to_string()))?;
        if bytes.len() as u64 > MAX_PASSPHRASE_BYTES {
            return Err(failed(format!(
                "longer than {MAX_PASSPHRASE_BYTES} bytes; is this the right file?"
            )));
        }
        for end in [&b"\n"[..], b"\r"] {
            if bytes.ends_with(end) {
                bytes.pop();
            }
        }
        Passphrase::new(bytes.to_vec()).map_err(|_| failed("it is empty".into()))
    }

    /// The passphrase the environment gives: the file named by `LOCKSTEP_PASSPHRASE_FILE`,
    /// else `LOCKSTEP_PASSPHRASE`; `None` when neither is set.
    pub fn from_env() -> Result<Option<Passphrase>> {
        if let Some(path) = std::env::var_os(PASSPHRASE_FILE_ENV).filter(|p| !p.is_empty()) {
            return Passphrase::from_file(std::path::Path::new(&path)).map(Some);
        }
        match std::env::var_os(PASSPHRASE_ENV).filter(|p| !p.is_empty()) {
            Some(value) => Passphrase::new(value.into_encoded_bytes()).map(Some),
            None => Ok(None),
        }
    }
}

/// `key`, a 32-byte secret, as an HMAC-SHA256 key.
fn prf(key: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, key)
}

/// HMAC-SHA256(`key`, `label` || `context`): one 32-byte key.
fn derive(key: &hmac::Key, label: &[u8], context: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(label);
    ctx.update(context);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn crypto_failed(what: &str) -> Error {
    Error::new(
        ErrorCode::BackupCreationFailed,
        format!("{what}: the cryptographic library failed"),
    )
}

/// The AES-256-GCM key and nonce of one seal under `key`.
fn seal_key(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce)> {
    let derived = derive(&prf(key), b"lockstep v1 seal key", &nonce[..12]);
    let unbound = UnboundKey::new(&AES_256_GCM, derived.as_ref())
        .map_err(|_| crypto_failed("make a seal key"))?;
    let mut gcm_nonce = [0u8; 12];
    gcm_nonce.copy_from_slice(&nonce[12..]);
    Ok((
        LessSafeKey::new(unbound),
        Nonce::assume_unique_for_key(gcm_nonce),
    ))
}

/// Seals `in_out` in place under `key` with fresh random bytes; returns them and the tag.
fn seal_with(
    key: &[u8; KEY_LEN],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN])> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| crypto_failed("draw a nonce"))?;
    let (sealing, gcm_nonce) = seal_key(key, &nonce)?;
    let tag = sealing
        .seal_in_place_separate_tag(gcm_nonce, Aad::from(aad), in_out)
        .map_err(|_| crypto_failed("seal"))?;
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag.as_ref());
    Ok((nonce, tag_bytes))
}

/// Opens in place what [`seal_with`] sealed; false (and `in_out` unspecified) when the
/// bytes, the tag, the nonce, the associated data or the key differ from the seal's.
fn open_with(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    tag: &[u8; TAG_LEN],
    aad: &[u8],
    in_out: &mut [u8],
) -> bool {
    let Ok((opening, gcm_nonce)) = seal_key(key, nonce) else {
        return false;
    };
    opening
        .open_in_place_separate_tag(gcm_nonce, Aad::from(aad), tag, in_out)
        .is_ok()
}

/// What a seal adds beside the sealed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealInfo {
    pub epoch: u32,
    pub nonce: [u8; NONCE_LEN],
    pub tag: [u8; TAG_LEN],
}

/// A repository's keys, unlocked. Wiped from memory when dropped; never shown.
pub struct Keys {
    master: Zeroizing<[u8; KEY_LEN]>,
    /// The random id of this master key, which its slots' seals name.
    key_id: String,
    ids: hmac::Key,
    /// The data key of each epoch, by epoch; the last one seals.
    data: Vec<Zeroizing<[u8; KEY_LEN]>>,
    /// The key slot they were unlocked through.
    slot: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({}, slot {}, <redacted>)", self.key_id, self.slot)
    }
}

impl Keys {
    fn from_master(
        master: Zeroizing<[u8; KEY_LEN]>,
        key_id: String,
        epochs: u32,
        slot: String,
    ) -> Keys {
        let root = prf(master.as_ref());
        let ids = prf(derive(&root, b"lockstep v1 object ids", &[]).as_ref());
        let data = (0..epochs.max(1))
            .map(|epoch| derive(&root, b"lockstep v1 data epoch", &epoch.to_le_bytes()))
            .collect();
        Keys {
            master,
            key_id,
            ids,
            data,
            slot,
        }
    }

    /// The key slot these keys were unlocked through (or created with).
    pub fn slot(&self) -> &str {
        &self.slot
    }

    fn current(&self) -> (u32, &[u8; KEY_LEN]) {
        let epoch = self.data.len() - 1;
        (epoch as u32, &self.data[epoch])
    }

    /// Seals `in_out` in place with the current epoch's key.
    pub fn seal(&self, aad: &[u8], in_out: &mut [u8]) -> Result<SealInfo> {
        let (epoch, key) = self.current();
        let (nonce, tag) = seal_with(key, &epoch_aad(epoch, aad), in_out)?;
        Ok(SealInfo { epoch, nonce, tag })
    }

    /// Opens in place what [`Keys::seal`] sealed with the same `aad`; false when anything
    /// differs (or the epoch is unknown).
    pub fn open(&self, info: &SealInfo, aad: &[u8], in_out: &mut [u8]) -> bool {
        let Some(key) = self.data.get(info.epoch as usize) else {
            return false;
        };
        open_with(
            key,
            &info.nonce,
            &info.tag,
            &epoch_aad(info.epoch, aad),
            in_out,
        )
    }
}

fn epoch_aad(epoch: u32, aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + aad.len());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(aad);
    out
}

/// How a repository handle names and stores what it writes: in plaintext, or sealed.
#[derive(Clone, Default)]
pub enum Seal {
    #[default]
    Plain,
    Sealed {
        keys: Arc<Keys>,
        /// Where opened objects are decrypted (page-aligned, so restores write them
        /// directly).
        buffers: BufferPool,
    },
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seal::Plain => f.write_str("Seal::Plain"),
            Seal::Sealed { keys, .. } => write!(f, "Seal::Sealed({keys:?})"),
        }
    }
}

impl Seal {
    pub fn sealed(keys: Keys) -> Seal {
        Seal::Sealed {
            keys: Arc::new(keys),
            buffers: BufferPool::default(),
        }
    }

    pub fn is_sealed(&self) -> bool {
        matches!(self, Seal::Sealed { .. })
    }

    pub fn keys(&self) -> Option<&Keys> {
        match self {
            Seal::Plain => None,
            Seal::Sealed { keys, .. } => Some(keys),
        }
    }

    /// The name of an object holding `plaintext`.
    pub fn object_id(&self, plaintext: &[u8]) -> ObjectId {
        let mut hasher = self.hasher();
        hasher.update(plaintext);
        hasher.finish()
    }

    /// A hasher that names an object from its plaintext fed piece by piece.
    pub fn hasher(&self) -> IdHasher {
        match self {
            Seal::Plain => IdHasher::Plain(Sha256::new()),
            Seal::Sealed { keys, .. } => {
                IdHasher::Keyed(Box::new(hmac::Context::with_key(&keys.ids)))
            }
        }
    }

    /// A record (manifest, tag, record of the repository) as stored under `name` (its key
    /// under the repository's prefix): sealed, or as it is in a plaintext repository.
    pub fn seal_record(&self, name: &str, mut plaintext: Vec<u8>) -> Result<Vec<u8>> {
        let Some(keys) = self.keys() else {
            return Ok(plaintext);
        };
        let info = keys.seal(&record_aad(name), &mut plaintext)?;
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + plaintext.len());
        out.extend_from_slice(RECORD_MAGIC);
        out.extend_from_slice(&[RECORD_VERSION, 0, 0, 0]);
        out.extend_from_slice(&info.epoch.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&info.nonce);
        out.extend_from_slice(&info.tag);
        out.extend_from_slice(&plaintext);
        Ok(out)
    }

    /// The plaintext of a record stored under `name`, checked.
    pub fn open_record(&self, name: &str, stored: bytes::Bytes) -> Result<bytes::Bytes> {
        let sealed = stored.starts_with(RECORD_MAGIC);
        let Some(keys) = self.keys() else {
            if sealed {
                return Err(Error::new(
                    ErrorCode::EncryptionKey,
                    format!("{name} is encrypted, and this repository was opened without its key"),
                ));
            }
            return Ok(stored);
        };
        let corrupt =
            |why: &str| Error::new(ErrorCode::BackupChecksumMismatch, format!("{name}: {why}"));
        if !sealed || stored.len() < RECORD_HEADER_LEN {
            return Err(corrupt("not an encrypted record"));
        }
        if stored[4] != RECORD_VERSION || stored[5..8] != [0, 0, 0] || stored[12..16] != [0; 4] {
            return Err(corrupt("unknown encrypted record format"));
        }
        let info = SealInfo {
            epoch: u32::from_le_bytes([stored[8], stored[9], stored[10], stored[11]]),
            nonce: array(&stored[16..16 + NONCE_LEN]),
            tag: array(&stored[16 + NONCE_LEN..RECORD_HEADER_LEN]),
        };
        let mut plaintext = stored[RECORD_HEADER_LEN..].to_vec();
        if !keys.open(&info, &record_aad(name), &mut plaintext) {
            return Err(corrupt(
                "it does not authenticate (altered, moved from another key, or not written with this repository's key)",
            ));
        }
        Ok(plaintext.into())
    }
}

const RECORD_MAGIC: &[u8; 4] = b"LKSR";
const RECORD_VERSION: u8 = 1;
/// magic, version and 3 zero bytes, epoch, 4 zero bytes, nonce, tag.
const RECORD_HEADER_LEN: usize = 16 + NONCE_LEN + TAG_LEN;
/// What a seal adds to a record.
pub const RECORD_OVERHEAD: u64 = RECORD_HEADER_LEN as u64;

fn record_aad(name: &str) -> Vec<u8> {
    [&RECORD_MAGIC[..], name.as_bytes()].concat()
}

/// The first `N` bytes of `bytes` (which the caller has checked are there).
pub(crate) fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Names an object from its plaintext, piece by piece.
pub enum IdHasher {
    Plain(Sha256),
    Keyed(Box<hmac::Context>),
}

impl IdHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            IdHasher::Plain(hasher) => hasher.update(bytes),
            IdHasher::Keyed(context) => context.update(bytes),
        }
    }

    pub fn finish(self) -> ObjectId {
        match self {
            IdHasher::Plain(hasher) => ObjectId::from_digest(hasher.finalize().into()),
            IdHasher::Keyed(context) => ObjectId::from_digest(array(context.sign().as_ref())),
        }
    }
}

/// `lockstep-encryption.json`: whether the repository is encrypted, and how; written once,
/// when it is created (repositories created before it existed have none: plaintext).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionMarker {
    pub format: u32,
    /// The random id of the master key, which every key slot's seal names.
    pub key_id: String,
    pub cipher: String,
    pub object_ids: String,
    /// How many key epochs exist (data keys derived from the master key).
    pub epochs: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl EncryptionMarker {
    /// The marker of a new plaintext repository: it claims its mode at creation too.
    pub fn plaintext() -> EncryptionMarker {
        EncryptionMarker {
            format: 1,
            key_id: String::new(),
            cipher: PLAINTEXT.into(),
            object_ids: "sha256".into(),
            epochs: 0,
            created_at: chrono::Utc::now(),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.cipher != PLAINTEXT
    }
}

const PLAINTEXT: &str = "none";
const CIPHER: &str = "aes-256-gcm";
/// The most key epochs a marker may name (each is one derived key in memory).
const MAX_EPOCHS: u32 = 1 << 16;
const OBJECT_IDS: &str = "hmac-sha256";

/// How a key slot derives its key from a passphrase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

/// The cost of new key slots' Argon2id: 64 MiB, 3 passes (RFC 9106's second choice, with
/// one lane: about 0.2 s here, once per process that opens the repository).
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_ITERATIONS: u32 = 3;
const KDF_PARALLELISM: u32 = 1;
/// What a key slot read from the repository may ask for, so a crafted slot cannot make an
/// opener allocate or spin without bound.
const KDF_MAX_MEMORY_KIB: u32 = 1 << 20;
const KDF_MAX_ITERATIONS: u32 = 64;
const KDF_MAX_PARALLELISM: u32 = 16;

/// `keys/<slot>.json`: the master key sealed under one passphrase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    pub slot: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub kdf: Kdf,
    /// nonce, tag and sealed master key, in hex.
    pub sealed_key: String,
}

impl Kdf {
    fn new() -> Result<Kdf> {
        let mut salt = [0u8; 16];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| crypto_failed("draw a salt"))?;
        Ok(Kdf {
            algorithm: "argon2id".into(),
            memory_kib: KDF_MEMORY_KIB,
            iterations: KDF_ITERATIONS,
            parallelism: KDF_PARALLELISM,
            salt: hex::encode(salt),
        })
    }

    /// The slot key of `passphrase`. CPU- and memory-bound (Argon2id): call it off the
    /// async workers.
    fn derive(&self, slot: &str, passphrase: &Passphrase) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        let invalid = |why: String| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("key slot {slot}: {why}"),
            )
        };
        if self.algorithm != "argon2id" {
            return Err(invalid(format!("unknown KDF {:?}", self.algorithm)));
        }
        if self.memory_kib > KDF_MAX_MEMORY_KIB
            || self.iterations > KDF_MAX_ITERATIONS
            || self.parallelism > KDF_MAX_PARALLELISM
        {
            return Err(invalid("its KDF asks for more than any slot may".into()));
        }
        let salt = hex::decode(&self.salt).map_err(|err| invalid(err.to_string()))?;
        let params = argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(KEY_LEN),
        )
        .map_err(|err| invalid(err.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(&passphrase.0, &salt, out.as_mut())
            .map_err(|err| invalid(err.to_string()))?;
        Ok(out)
    }
}

fn slot_aad(key_id: &str, slot: &str) -> Vec<u8> {
    [
        b"LKSK ".as_slice(),
        key_id.as_bytes(),
        b" ",
        slot.as_bytes(),
    ]
    .concat()
}

/// A new repository's master key, its marker and its first key slot.
pub fn create(passphrase: &Passphrase) -> Result<(Keys, EncryptionMarker, KeySlot)> {
    let mut master = Zeroizing::new([0u8; KEY_LEN]);
    aws_lc_rs::rand::fill(master.as_mut()).map_err(|_| crypto_failed("draw a master key"))?;
    let key_id = uuid::Uuid::new_v4().simple().to_string();
    let mut keys = Keys::from_master(master, key_id.clone(), 1, String::new());
    let marker = EncryptionMarker {
        format: 1,
        key_id,
        cipher: CIPHER.into(),
        object_ids: OBJECT_IDS.into(),
        epochs: 1,
        created_at: chrono::Utc::now(),
    };
    let slot = new_slot(&keys, passphrase)?;
    keys.slot = slot.slot.clone();
    Ok((keys, marker, slot))
}

/// A new key slot holding `keys`' master key under `passphrase`.
pub fn new_slot(keys: &Keys, passphrase: &Passphrase) -> Result<KeySlot> {
    let slot = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let kdf = Kdf::new()?;
    let slot_key = kdf.derive(&slot, passphrase)?;
    let mut sealed = Zeroizing::new(*keys.master);
    let (nonce, tag) = seal_with(&slot_key, &slot_aad(&keys.key_id, &slot), sealed.as_mut())?;
    Ok(KeySlot {
        slot,
        created_at: chrono::Utc::now(),
        kdf,
        sealed_key: hex::encode([&nonce[..], &tag[..], &sealed[..]].concat()),
    })
}

/// Refuses a marker this version cannot open (or a crafted one).
pub fn check_marker(marker: &EncryptionMarker) -> Result<()> {
    if marker.epochs == 0 || marker.epochs > MAX_EPOCHS {
        return Err(Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!("the encryption marker names {} key epochs", marker.epochs),
        ));
    }
    if marker.format != 1 || marker.cipher != CIPHER || marker.object_ids != OBJECT_IDS {
        return Err(Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!(
                "the repository is encrypted with {} and {} (format {}), which this version does not know",
                marker.cipher, marker.object_ids, marker.format
            ),
        ));
    }
    Ok(())
}

/// The keys `passphrase` unlocks through `slot`, if it is that slot's passphrase.
pub fn unlock(
    marker: &EncryptionMarker,
    slot: &KeySlot,
    passphrase: &Passphrase,
) -> Result<Option<Keys>> {
    check_marker(marker)?;
    let sealed = Zeroizing::new(hex::decode(&slot.sealed_key).unwrap_or_default());
    if sealed.len() != NONCE_LEN + TAG_LEN + KEY_LEN {
        return Err(Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!("key slot {}: its sealed key is malformed", slot.slot),
        ));
    }
    let slot_key = slot.kdf.derive(&slot.slot, passphrase)?;
    let nonce = array(&sealed[..NONCE_LEN]);
    let tag = array(&sealed[NONCE_LEN..NONCE_LEN + TAG_LEN]);
    let mut master = Zeroizing::new(array::<KEY_LEN>(&sealed[NONCE_LEN + TAG_LEN..]));
    if !open_with(
        &slot_key,
        &nonce,
        &tag,
        &slot_aad(&marker.key_id, &slot.slot),
        master.as_mut(),
    ) {
        return Ok(None);
    }
    Ok(Some(Keys::from_master(
        master,
        marker.key_id.clone(),
        marker.epochs,
        slot.slot.clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Keys, EncryptionMarker, KeySlot) {
        create(&Passphrase::new("correct horse").expect("passphrase")).expect("create")
    }

    #[test]
    fn a_slot_opens_with_its_passphrase_only() -> Result<()> {
        let (keys, marker, slot) = keys();
        let unlocked = unlock(&marker, &slot, &Passphrase::new("correct horse")?)?
            .expect("the right passphrase unlocks");
        assert_eq!(*unlocked.master, *keys.master);
        assert!(unlock(&marker, &slot, &Passphrase::new("correct horsE")?)?.is_none());
        // A slot moved to another repository (another key id) opens nowhere.
        let other = EncryptionMarker {
            key_id: "other".into(),
            ..marker.clone()
        };
        assert!(unlock(&other, &slot, &Passphrase::new("correct horse")?)?.is_none());
        // A crafted slot cannot ask for unbounded work.
        let greedy = KeySlot {
            kdf: Kdf {
                memory_kib: u32::MAX,
                ..slot.kdf.clone()
            },
            ..slot
        };
        let err =
            unlock(&marker, &greedy, &Passphrase::new("correct horse")?).expect_err("bounded");
        assert_eq!(err.code, ErrorCode::BackupManifestCorrupt);
        Ok(())
    }

    #[test]
    fn records_open_only_unaltered_and_under_their_own_name() -> Result<()> {
        let (keys, ..) = keys();
        let seal = Seal::sealed(keys);
        let stored = seal.seal_record("backups/b1.json", b"{\"a\":1}".to_vec())?;
        assert!(!stored.windows(5).any(|w| w == b"\"a\":1"));
        let opened = seal.open_record("backups/b1.json", stored.clone().into())?;
        assert_eq!(&opened[..], b"{\"a\":1}");
        let moved = seal
            .open_record("backups/b2.json", stored.clone().into())
            .expect_err("moved");
        assert_eq!(moved.code, ErrorCode::BackupChecksumMismatch);
        for at in [4, 9, 20, 50, stored.len() - 1] {
            let mut flipped = stored.clone();
            flipped[at] ^= 1;
            let err = seal
                .open_record("backups/b1.json", flipped.into())
                .expect_err("flipped");
            assert_eq!(err.code, ErrorCode::BackupChecksumMismatch, "byte {at}");
        }
        // Plain bytes where a sealed record belongs are refused, and a sealed record read
        // without keys says so.
        let plain = seal
            .open_record("backups/b1.json", bytes::Bytes::from_static(b"{\"a\":1}"))
            .expect_err("plain");
        assert_eq!(plain.code, ErrorCode::BackupChecksumMismatch);
        let locked = Seal::Plain
            .open_record("backups/b1.json", stored.into())
            .expect_err("locked");
        assert_eq!(locked.code, ErrorCode::EncryptionKey);
        Ok(())
    }

    #[test]
    fn keyed_ids_differ_from_plain_hashes_and_between_repositories() {
        let (one, ..) = keys();
        let (two, ..) = keys();
        let chunk = b"a chunk everybody knows";
        let plain = Seal::Plain.object_id(chunk);
        let one = Seal::sealed(one);
        assert_eq!(plain, ObjectId::of(chunk));
        assert_ne!(one.object_id(chunk), plain);
        assert_ne!(one.object_id(chunk), Seal::sealed(two).object_id(chunk));
        let mut pieces = one.hasher();
        pieces.update(&chunk[..5]);
        pieces.update(&chunk[5..]);
        assert_eq!(pieces.finish(), one.object_id(chunk));
    }

    #[test]
    fn passphrases_never_show_and_files_lose_one_line_end() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pass");
        std::fs::write(&path, "s3cret phrase\n").expect("write");
        let passphrase = Passphrase::from_file(&path)?;
        assert_eq!(&passphrase.0[..], b"s3cret phrase");
        assert!(!format!("{passphrase:?}").contains("s3cret"));
        let (keys, ..) = keys();
        let master = hex::encode(&keys.master[..8]);
        assert!(!format!("{:?}", Seal::sealed(keys)).contains(&master));
        std::fs::write(&path, "\n").expect("write");
        assert_eq!(
            Passphrase::from_file(&path).expect_err("empty").code,
            ErrorCode::EncryptionKey
        );
        Ok(())
    }
}
