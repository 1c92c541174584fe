//! Property-based fuzzing of every decoder a repository's bytes go through: objects, WAL
//! segments and their key names, manifests, tags, lineage names, and the ids that become
//! keys. On any input a decoder returns a value or an error, never panics, and never accepts
//! what it should not: an object decodes only to the plaintext its name hashes, a segment
//! only to what was encoded, an id never to a path that could leave its prefix.
//!
//! `make test` runs 2,000 cases per property; `make fuzz` sets `LOCKSTEP_FUZZ_CASES` for a
//! long run.

use lockstep_repository::codec::{self, Compression};
use lockstep_repository::lineage::Lineage;
use lockstep_repository::manifest::{BackupManifest, ShardManifest, TagManifest};
use lockstep_repository::seal::{Passphrase, Seal};
use lockstep_repository::wal::{Segment, SegmentInfo, WalBatch};
use lockstep_repository::{
    BackupId, HlcTime, LineageId, ObjectId, RestoreId, Seq, ShardId, TagName,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(lockstep_tests::fuzz_cases())
}

/// A stored object for `plaintext` (zstd when it pays), as one buffer.
fn stored(plaintext: &[u8]) -> Vec<u8> {
    let encoded = codec::encode(plaintext, Compression::default(), &Seal::Plain).expect("encode");
    encoded.parts().concat()
}

/// One encrypted repository's keys for every case (Argon2id runs once).
fn sealing() -> &'static Seal {
    static SEAL: std::sync::OnceLock<Seal> = std::sync::OnceLock::new();
    SEAL.get_or_init(|| {
        let passphrase = Passphrase::new("fuzz").expect("passphrase");
        let (keys, ..) = lockstep_repository::seal::create(&passphrase).expect("keys");
        Seal::sealed(keys)
    })
}

fn shard() -> ShardId {
    ShardId::new("shard-0").expect("shard")
}

/// A valid segment of batches of the given sizes, starting at sequence 1.
fn segment(sizes: &[usize]) -> Segment {
    let mut first = 1;
    let batches = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let batch = WalBatch {
                first: Seq(first),
                count: 1 + (*size as u64 % 3),
                hlc: HlcTime(1_000 + i as u64),
                data: vec![i as u8; *size],
            };
            first += batch.count;
            batch
        })
        .collect();
    Segment {
        shard_id: shard(),
        lineage: Lineage::root(),
        batches,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_decode_to_the_named_plaintext_or_an_error(
        bytes in vec(any::<u8>(), 0..4096),
        len in any::<u64>(),
    ) {
        let id = ObjectId::of(b"the plaintext this name stands for");
        prop_assert!(codec::decode(&id, bytes.clone().into(), &Seal::Plain).is_err());
        prop_assert!(codec::decode_sized(&id, bytes.clone().into(), len, &Seal::Plain).is_err());
        prop_assert!(codec::decode_at_most(&id, bytes.into(), len, &Seal::Plain).is_err());
    }

    #[test]
    fn a_damaged_object_is_refused_or_still_its_own_plaintext(
        plaintext in vec(any::<u8>(), 0..20_000),
        repetitive in any::<bool>(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let plaintext = if repetitive { plaintext.repeat(4) } else { plaintext };
        let id = ObjectId::of(&plaintext);
        let mut object = stored(&plaintext);
        for (at, value) in flips {
            let at = at.index(object.len());
            object[at] = value;
        }
        let len = plaintext.len() as u64;
        let decoded = [
            codec::decode(&id, object.clone().into(), &Seal::Plain),
            codec::decode_sized(&id, object.clone().into(), len, &Seal::Plain),
            codec::decode_at_most(&id, object.clone().into(), len, &Seal::Plain),
        ];
        for decoded in decoded.into_iter().flatten() {
            prop_assert_eq!(decoded.as_ref(), plaintext.as_slice());
        }
    }

    #[test]
    fn a_damaged_sealed_object_or_record_is_refused_and_any_bytes_never_open(
        plaintext in vec(any::<u8>(), 0..20_000),
        repetitive in any::<bool>(),
        flips in vec((any::<prop::sample::Index>(), 1..=255u8), 1..8),
        noise in vec(any::<u8>(), 0..2048),
    ) {
        let seal = sealing();
        let plaintext = if repetitive { plaintext.repeat(4) } else { plaintext };
        let encoded = codec::encode(&plaintext, Compression::default(), seal).expect("encode");
        let id = encoded.id;
        let object = encoded.to_vec();
        let intact = codec::decode(&id, object.clone().into(), seal).expect("intact");
        prop_assert_eq!(intact.as_ref(), plaintext.as_slice());
        let record = seal.seal_record("tags/t.json", plaintext.clone()).expect("seal");
        for (mut damaged, is_object) in [(object, true), (record, false)] {
            // Each position flipped once (two flips of one byte could cancel out).
            let mut flipped = std::collections::BTreeSet::new();
            for (at, xor) in &flips {
                let at = at.index(damaged.len());
                if flipped.insert(at) {
                    damaged[at] ^= xor;
                }
            }
            // Every flip changes a byte the seal covers: nothing damaged opens.
            if is_object {
                prop_assert!(codec::decode(&id, damaged.into(), seal).is_err());
            } else {
                prop_assert!(seal.open_record("tags/t.json", damaged.into()).is_err());
            }
        }
        prop_assert!(codec::decode(&id, noise.clone().into(), seal).is_err());
        prop_assert!(seal.open_record("tags/t.json", noise.into()).is_err());
    }

    #[test]
    fn a_header_declaring_more_than_the_limit_is_refused_before_decompressing(
        declared in (64u64 << 20)..u64::MAX,
    ) {
        let plaintext = vec![7u8; 100_000];
        let id = ObjectId::of(&plaintext);
        let mut object = stored(&plaintext);
        // The declared plaintext length is bytes 8..16 of the header.
        object[8..16].copy_from_slice(&declared.to_le_bytes());
        for refused in [
            codec::decode_at_most(&id, object.clone().into(), 64 << 20, &Seal::Plain),
            codec::decode_sized(&id, object.into(), 100_000, &Seal::Plain),
        ] {
            let err = refused.expect_err("refused");
            prop_assert!(err.message.contains("header declares"), "{}", err);
        }
    }

    #[test]
    fn segments_round_trip_and_any_bytes_never_panic(
        sizes in vec(0usize..300, 1..20),
        noise in vec(any::<u8>(), 0..2048),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let original = segment(&sizes);
        let mut encoded = original.encode();
        prop_assert_eq!(Segment::decode("fuzz", &encoded).ok(), Some(original));
        for (at, value) in flips {
            let at = at.index(encoded.len());
            encoded[at] = value;
        }
        let _ = Segment::decode("fuzz", &encoded);
        let _ = Segment::decode("fuzz", &noise);
    }

    #[test]
    fn segment_key_names_and_lineage_names_never_panic(name in "\\PC{0,120}") {
        let lineage = Lineage::root();
        if let Some(info) = SegmentInfo::parse(&shard(), &lineage, &name) {
            prop_assert!(info.first <= info.last && info.last.is_valid());
        }
        let _ = Lineage::parse_dir_name(&name);
        let _ = LineageId::parse(&name);
    }

    #[test]
    fn manifests_and_tags_from_any_bytes_are_parsed_or_refused(
        bytes in vec(any::<u8>(), 0..2048),
        json in "\\{(\"[a-z_]{1,12}\":(null|[0-9]{1,20}|\"[ -~]{0,16}\"|\\[\\]|\\{\\}),?){0,12}\\}",
    ) {
        for input in [bytes.as_slice(), json.as_bytes()] {
            let _ = ShardManifest::parse("fuzz", input);
            let _ = BackupManifest::parse("fuzz", input);
            let _ = TagManifest::parse("fuzz", input);
        }
    }

    #[test]
    fn an_id_that_is_accepted_never_names_a_path(
        text in "\\PC{0,80}|[./\\\\a-z0-9\\x00-]{0,24}",
    ) {
        let accepted = [
            BackupId::new(text.as_str()).is_ok(),
            ShardId::new(text.as_str()).is_ok(),
            TagName::new(text.as_str()).is_ok(),
            RestoreId::new(text.as_str()).is_ok(),
        ];
        if accepted.iter().any(|ok| *ok) {
            prop_assert!(!text.is_empty(), "empty id accepted");
            prop_assert!(!text.contains(".."), "{:?} accepted", text);
            prop_assert!(!text.contains('/') && !text.contains('\\'), "{:?} accepted", text);
            prop_assert!(!text.contains('\0'), "{:?} accepted", text);
            prop_assert!(text != ".", "{:?} accepted", text);
        }
    }
}
