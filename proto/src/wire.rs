//! The typed wire model: every protobuf state enumeration gets its one lower-case name here
//! (the name the CLI prints and its JSON carries), and every `i32` off the wire is read
//! through prost's typed getters (`status.state()`), which turn a value this build does not
//! know into `Unspecified`. Nothing else names states or trims enum names.
//!
//! Every `lockstep.v1` message derives `serde::Serialize` (see `build.rs`) for the CLI's
//! `--json`: state fields serialize through the functions below as their names, HLC times as
//! RFC 3339 text.

use lockstep_repository::bandwidth::Change;
use lockstep_repository::{Error, ErrorCode, Lineage, LineageId, Seq, Timeline};
use serde::Serializer;

use crate::v1;

/// A lineage on the wire.
pub fn lineage_to_wire(lineage: &Lineage) -> v1::Lineage {
    v1::Lineage {
        timeline: lineage.timeline.0,
        id: lineage.id.to_string(),
        parent: lineage.parent.map(|p| p.to_string()).unwrap_or_default(),
        branch: lineage.branch.0,
    }
}

/// A lineage off the wire, checked; `what` names the field in the error.
pub fn lineage_from_wire(
    wire: Option<&v1::Lineage>,
    what: &str,
) -> lockstep_repository::Result<Lineage> {
    let invalid = |why: String| Error::new(ErrorCode::InvalidArgument, format!("{what}: {why}"));
    let wire = wire.ok_or_else(|| invalid("no lineage given".to_string()))?;
    let lineage = Lineage {
        id: LineageId::parse(&wire.id).map_err(|err| invalid(err.message))?,
        timeline: Timeline(wire.timeline),
        parent: if wire.parent.is_empty() {
            None
        } else {
            Some(LineageId::parse(&wire.parent).map_err(|err| invalid(err.message))?)
        },
        branch: Seq(wire.branch),
    };
    lineage.check().map_err(|err| invalid(err.message))?;
    Ok(lineage)
}

/// A lineage as the CLI prints it: `TIMELINE/ID8`, or `-` when there is none.
pub fn lineage_text(lineage: Option<&v1::Lineage>) -> String {
    match lineage {
        Some(l) => format!("{}/{}", l.timeline, l.id.get(..8).unwrap_or(&l.id)),
        None => "-".to_string(),
    }
}

/// WAL replay legs off the wire, checked.
pub fn legs_from_wire(
    wire: &[v1::WalLeg],
) -> lockstep_repository::Result<Vec<lockstep_repository::lineage::Leg>> {
    wire.iter()
        .map(|leg| {
            if !Seq(leg.to_seq).is_valid() {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "a WAL leg ends past the largest sequence number: {}",
                        leg.to_seq
                    ),
                ));
            }
            Ok(lockstep_repository::lineage::Leg {
                lineage: lineage_from_wire(leg.lineage.as_ref(), "a WAL leg")?,
                to: Seq(leg.to_seq),
            })
        })
        .collect()
}

/// WAL replay legs on the wire.
pub fn legs_to_wire(legs: &[lockstep_repository::lineage::Leg]) -> Vec<v1::WalLeg> {
    legs.iter()
        .map(|leg| v1::WalLeg {
            lineage: Some(lineage_to_wire(&leg.lineage)),
            to_seq: leg.to.0,
        })
        .collect()
}

/// A wire state's lower-case name, e.g. `prepared`.
pub trait Label: Copy {
    fn label(self) -> &'static str;
}

macro_rules! labels {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl Label for $ty {
            fn label(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $name),*
                }
            }
        }
    };
}

labels!(v1::BarrierState {
    Unspecified => "unspecified",
    Staged => "staged",
    Prepared => "prepared",
    Uploading => "uploading",
    Uploaded => "uploaded",
    Aborted => "aborted",
    Expired => "expired",
    Failed => "failed",
    Unknown => "unknown",
});

labels!(v1::RestoreState {
    Unspecified => "unspecified",
    Staging => "staging",
    Staged => "staged",
    Swapped => "swapped",
    Applied => "applied",
    Discarded => "discarded",
    Failed => "failed",
    Unknown => "unknown",
});

labels!(v1::JobState {
    Unspecified => "unspecified",
    Preparing => "preparing",
    Uploading => "uploading",
    Committed => "committed",
    Failed => "failed",
});

labels!(v1::RestorePhase {
    Unspecified => "unspecified",
    Staging => "staging",
    Applying => "applying",
    Done => "done",
    Failed => "failed",
});

labels!(v1::CaptureMode {
    Files => "files",
    Wal => "wal",
    Point => "point",
});

/// Serializes an enumeration field (an `i32` in the generated struct) as its name.
fn named<E: Label + TryFrom<i32>, S: Serializer>(
    raw: i32,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(E::try_from(raw).map_or("unspecified", Label::label))
}

pub fn job_state<S: Serializer>(raw: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    named::<v1::JobState, S>(*raw, serializer)
}

pub fn restore_phase<S: Serializer>(raw: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    named::<v1::RestorePhase, S>(*raw, serializer)
}

pub fn barrier_state<S: Serializer>(raw: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    named::<v1::BarrierState, S>(*raw, serializer)
}

pub fn restore_state<S: Serializer>(raw: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    named::<v1::RestoreState, S>(*raw, serializer)
}

pub fn capture_mode<S: Serializer>(raw: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    named::<v1::CaptureMode, S>(*raw, serializer)
}

/// An HLC time as people read it (`-` for none).
pub fn hlc_text(hlc: u64) -> String {
    if hlc == 0 {
        "-".into()
    } else {
        lockstep_repository::HlcTime(hlc).to_string()
    }
}

pub fn hlc_time<S: Serializer>(hlc: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hlc_text(*hlc))
}

/// A `SetLimits` request as a change of an agent's limits.
pub fn limits_change_from_wire(request: &v1::SetLimitsRequest) -> Change {
    Change {
        upload_mib_s: request.upload_mib_s,
        download_mib_s: request.download_mib_s,
        wal_share_percent: request.wal_share_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_a_distinct_name() {
        let barrier: Vec<_> = (0..=8)
            .map(|raw| {
                v1::BarrierStatus {
                    state: raw,
                    ..Default::default()
                }
                .state()
                .label()
            })
            .collect();
        let mut unique = barrier.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), barrier.len(), "{barrier:?}");
        // A state a newer peer sends decodes as unspecified, never as a real state.
        let unknown = v1::BarrierStatus {
            state: 99,
            ..Default::default()
        };
        assert_eq!(unknown.state(), v1::BarrierState::Unspecified);
        assert_eq!(v1::RestoreState::Applied.label(), "applied");
        assert_eq!(v1::JobState::Committed.label(), "committed");
        assert_eq!(v1::RestorePhase::Done.label(), "done");
    }

    #[test]
    fn json_carries_state_names_and_times() {
        let job = v1::BackupJob {
            backup_id: "bk-1".into(),
            state: v1::JobState::Committed as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&job).expect("serialize");
        assert_eq!(json["state"], "committed");
        assert_eq!(json["backup_id"], "bk-1");
        let point = v1::TagPoint {
            seq: 7,
            lineage: Some(lineage_to_wire(&Lineage::root())),
            hlc: 0,
        };
        let json = serde_json::to_value(point).expect("serialize");
        assert_eq!(json["time"], "-");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["lineage"]["timeline"], 1);
    }

    #[test]
    fn lineages_and_legs_round_trip_and_junk_is_refused() {
        let root = Lineage::root();
        let child = root.child(Seq(40), Timeline(2));
        for lineage in [root, child] {
            let wire = lineage_to_wire(&lineage);
            assert_eq!(lineage_from_wire(Some(&wire), "x").ok(), Some(lineage));
        }
        let legs = vec![
            lockstep_repository::lineage::Leg {
                lineage: root,
                to: Seq(40),
            },
            lockstep_repository::lineage::Leg {
                lineage: child,
                to: Seq(90),
            },
        ];
        assert_eq!(legs_from_wire(&legs_to_wire(&legs)).ok(), Some(legs));

        let missing = lineage_from_wire(None, "the restore point").expect_err("none");
        assert_eq!(missing.code, ErrorCode::InvalidArgument);
        assert!(
            missing.message.starts_with("the restore point"),
            "{missing}"
        );
        let mut junk = lineage_to_wire(&child);
        junk.id = "../etc".into();
        assert!(lineage_from_wire(Some(&junk), "x").is_err());
        let mut orphaned = lineage_to_wire(&child);
        orphaned.parent = orphaned.id.clone();
        assert!(
            lineage_from_wire(Some(&orphaned), "x").is_err(),
            "its own parent"
        );
    }
}
