//! The typed wire model: every protobuf state enumeration gets its one lower-case name here
//! (the name the CLI prints and its JSON carries), and every `i32` off the wire is read
//! through prost's typed getters (`status.state()`), which turn a value this build does not
//! know into `Unspecified`. Nothing else names states or trims enum names.
//!
//! Every `lockstep.v1` message derives `serde::Serialize` (see `build.rs`) for the CLI's
//! `--json`: state fields serialize through the functions below as their names, HLC times as
//! RFC 3339 text.

use serde::Serializer;

use crate::v1;

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
            timeline: 1,
            hlc: 0,
        };
        let json = serde_json::to_value(point).expect("serialize");
        assert_eq!(json["time"], "-");
        assert_eq!(json["seq"], 7);
    }
}
