//! Identifiers and positions, validated where they enter the system.
//!
//! Every identifier that becomes part of an object key is checked here: no `/`, no `..`,
//! nothing outside `[A-Za-z0-9._-]`, so a key built from it can never escape its prefix.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode};

fn validate_component(kind: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value != "."
        && !value.contains("..")
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "invalid {kind} {value:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' and without '..'"
            ),
        ))
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                validate_component($kind, &value)?;
                Ok($name(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

string_id!(
    /// A backup, e.g. `bk-20261121-101502417-3fa9`: sortable by creation time.
    BackupId,
    "backup id"
);
string_id!(
    /// A shard of the cluster, e.g. `shard-0`.
    ShardId,
    "shard id"
);

string_id!(
    /// A named restore point, e.g. `before-migration-42`.
    TagName,
    "tag name"
);

string_id!(
    /// A cluster restore, e.g. `rs-3fa9...`: names one restore on every agent it involves.
    RestoreId,
    "restore id"
);

impl RestoreId {
    /// A fresh random id in the `rs-` form.
    pub fn generate() -> RestoreId {
        RestoreId(format!("rs-{}", uuid::Uuid::new_v4().simple()))
    }
}

impl BackupId {
    /// A fresh id from the wall clock (to the millisecond, so ids of one coordinator sort in
    /// creation order) and four random hex digits, in the seed's `bk-` form.
    pub fn generate() -> BackupId {
        let now = chrono::Utc::now().format("%Y%m%d-%H%M%S%3f");
        let random = uuid::Uuid::new_v4().simple().to_string();
        BackupId(format!("bk-{now}-{}", &random[..4]))
    }

    /// Whether `name` has the form [`BackupId::generate`] gives (`bk-20261121-101502417-3fa9`).
    pub fn is_generated(name: &str) -> bool {
        let parts: Vec<&str> = name.split('-').collect();
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        matches!(parts.as_slice(), ["bk", day, time, random]
            if digits(day, 8) && digits(time, 9)
                && random.len() == 4 && random.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// A RocksDB sequence number: the position of a write in one shard's history.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The largest sequence number a shard can reach (RocksDB keeps 56 bits). One read from
    /// disk or the wire above it is corruption, so `+ 1` on a checked number never wraps.
    pub const MAX: Seq = Seq((1 << 56) - 1);

    /// Whether this is a sequence number a shard can reach.
    pub fn is_valid(self) -> bool {
        self <= Seq::MAX
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A hybrid-logical-clock time: milliseconds since the Unix epoch in the high 48 bits, a
/// logical counter in the low 16. Every acknowledged write carries one in its WAL record;
/// along one shard's WAL they only grow, so "the last write at or before T" is a prefix.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct HlcTime(pub u64);

impl HlcTime {
    const LOGICAL_BITS: u32 = 16;

    pub fn new(millis: u64, logical: u16) -> HlcTime {
        HlcTime((millis << Self::LOGICAL_BITS) | u64::from(logical))
    }

    pub fn millis(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The latest HLC time within the wall-clock millisecond of `time`: every write stamped
    /// at or before `time` has an HLC time at or below it.
    pub fn at_or_before(time: chrono::DateTime<chrono::Utc>) -> HlcTime {
        HlcTime::new(time.timestamp_millis().max(0) as u64, u16::MAX)
    }

    /// The wall-clock part as a UTC time.
    pub fn to_datetime(self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.millis() as i64).unwrap_or_default()
    }
}

/// As people read a time: RFC 3339 UTC to the millisecond, then the logical counter apart
/// (`#3`) only when it is not zero (`2026-12-06T03:04:18.852Z`, `2026-12-06T03:04:18.852Z #3`).
impl fmt::Display for HlcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = self
            .to_datetime()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match self.logical() {
            0 => write!(f, "{time}"),
            logical => write!(f, "{time} #{logical}"),
        }
    }
}

/// The number people read of a shard's history: each new lineage gets one above every one
/// the shard's archives and backups know. Identity is the lineage's id (`lineage::Lineage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timeline(pub u64);

impl Default for Timeline {
    fn default() -> Timeline {
        Timeline(1)
    }
}

impl Timeline {
    pub fn next(self) -> Timeline {
        Timeline(self.0 + 1)
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The SHA-256 of an object's plaintext, which is also its name in the repository.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId([u8; 32]);

impl ObjectId {
    pub fn of(plaintext: &[u8]) -> ObjectId {
        ObjectId(Sha256::digest(plaintext).into())
    }

    pub fn from_digest(digest: [u8; 32]) -> ObjectId {
        ObjectId(digest)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.to_hex())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for ObjectId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                format!("invalid object id {s:?}"),
                err,
            )
        })?;
        Ok(ObjectId(out))
    }
}

impl Serialize for ObjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_key_prefix_are_refused() {
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "a b", "é", "a..", "a..b",
        ] {
            assert!(ShardId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ShardId::new("shard-0").is_ok());
        assert!(serde_json::from_str::<ShardId>("\"../etc\"").is_err());
    }

    #[test]
    fn only_the_generated_form_counts_as_generated() {
        assert!(BackupId::is_generated(BackupId::generate().as_str()));
        assert!(BackupId::is_generated("bk-20261121-101502417-3fa9"));
        for other in [
            "bk-1",
            "data",
            "bk-20261121-101502417-3fa9-x",
            "bk-2026112-101502417-3fa9",
            "bk-20261121-101502417-zzzz",
        ] {
            assert!(!BackupId::is_generated(other), "{other}");
        }
    }

    #[test]
    fn generated_backup_ids_are_valid_and_sort_by_time() {
        let id = BackupId::generate();
        assert!(BackupId::new(id.as_str()).is_ok());
        assert!(id.as_str().starts_with("bk-"));
    }

    #[test]
    fn hlc_times_order_by_wall_clock_then_counter() {
        let a = HlcTime::new(1_000, 7);
        assert_eq!((a.millis(), a.logical()), (1_000, 7));
        assert!(HlcTime::new(1_000, 8) > a);
        assert!(HlcTime::new(1_001, 0) > HlcTime::new(1_000, u16::MAX));
        let time = a.to_datetime();
        assert!(HlcTime::at_or_before(time) >= a);
        assert!(HlcTime::at_or_before(time) < HlcTime::new(1_001, 0));
        assert_eq!(a.to_string(), "1970-01-01T00:00:01.000Z #7");
        assert_eq!(
            HlcTime::new(1_000, 0).to_string(),
            "1970-01-01T00:00:01.000Z"
        );
    }

    #[test]
    fn object_ids_round_trip_through_hex() {
        let id = ObjectId::of(b"hello");
        assert_eq!(id.to_hex().parse::<ObjectId>().ok(), Some(id));
        assert!("zz".parse::<ObjectId>().is_err());
    }
}
