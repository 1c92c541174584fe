//! Property-based fuzzing of what arrives off the wire before any handler checks it: any
//! bytes decoded as any request message return a message or an error, never a panic, and
//! the checked conversions (lineages, WAL legs) accept only what they can stand behind.
//!
//! `make test` runs 2,000 cases per property; `make fuzz` sets `LOCKSTEP_FUZZ_CASES`.

use lockstep_proto::v1;
use lockstep_proto::wire::{legs_from_wire, lineage_from_wire, lineage_to_wire};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(lockstep_tests::fuzz_cases())
}

/// Decodes `bytes` as `M`; a message that decodes encodes back to what decodes the same.
fn decodes<M: Message + Default + PartialEq>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(message) = M::decode(bytes) {
        let again = M::decode(message.encode_to_vec().as_slice());
        prop_assert!(again.is_ok_and(|again| again == message));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_as_any_request_decode_or_fail_without_panicking(
        bytes in vec(any::<u8>(), 0..512),
    ) {
        decodes::<v1::PutWalSegmentRequest>(&bytes)?;
        decodes::<v1::GetWalSegmentRequest>(&bytes)?;
        decodes::<v1::ListWalSegmentsRequest>(&bytes)?;
        decodes::<v1::BarrierRequest>(&bytes)?;
        decodes::<v1::PrepareRequest>(&bytes)?;
        decodes::<v1::RestoreRequest>(&bytes)?;
        decodes::<v1::RestoreClusterRequest>(&bytes)?;
        decodes::<v1::CreateBackupRequest>(&bytes)?;
        decodes::<v1::DeleteBackupRequest>(&bytes)?;
        decodes::<v1::VerifyBackupRequest>(&bytes)?;
        decodes::<v1::SetLimitsRequest>(&bytes)?;
        decodes::<v1::CreateTagRequest>(&bytes)?;
        decodes::<v1::WriteRequest>(&bytes)?;
        decodes::<v1::ScanRequest>(&bytes)?;
    }

    #[test]
    fn a_lineage_off_the_wire_is_accepted_only_when_it_is_one(
        id in "\\PC{0,40}",
        parent in "\\PC{0,40}",
        timeline in any::<u64>(),
        branch in any::<u64>(),
        hex_id in "[0-9a-f]{32}",
    ) {
        for id in [id, hex_id] {
            let wire = v1::Lineage { id, parent: parent.clone(), timeline, branch };
            if let Ok(lineage) = lineage_from_wire(Some(&wire), "fuzz") {
                prop_assert!(lineage.check().is_ok());
                let again = lineage_from_wire(Some(&lineage_to_wire(&lineage)), "again");
                prop_assert_eq!(again.ok(), Some(lineage));
            }
        }
        prop_assert!(lineage_from_wire(None, "fuzz").is_err());
    }

    #[test]
    fn wal_legs_off_the_wire_never_panic(
        legs in vec((any::<u64>(), "\\PC{0,40}", any::<u64>()), 0..8),
    ) {
        let wire: Vec<v1::WalLeg> = legs
            .into_iter()
            .map(|(timeline, id, to_seq)| v1::WalLeg {
                lineage: Some(v1::Lineage { id, parent: String::new(), timeline, branch: 0 }),
                to_seq,
            })
            .collect();
        let _ = legs_from_wire(&wire);
    }
}
