//! Lineage: the identity of one history of a shard.
//!
//! A shard's sequence numbers alone do not name a state: after a restore, a rollback of its
//! machine or a wiped directory, the same numbers are written again with other contents. Every
//! history therefore gets a random [`LineageId`], minted when the shard is created and again
//! whenever its history branches (every restore, and every start at which the agent cannot
//! prove that the shard continues what it shipped). A [`Lineage`] records its parent and the
//! last sequence number it inherited from it (`branch`), so the histories of a shard form a
//! tree, and one point of a history is `(lineage, seq)`.
//!
//! WAL segments are stored under their lineage (`layout.rs`: the directory name is
//! [`Lineage::dir_name`], so a listing alone gives the tree), shard manifests and tags
//! record it, and a point-in-time restore replays the [`Leg`]s of [`ancestry`]: the part of
//! each ancestor that the target history includes. The timeline is the counter people read
//! (`timeline 3`); the id is what is compared.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{Seq, Timeline};

/// The random id of one history of a shard.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineageId(uuid::Uuid);

impl LineageId {
    /// All zeros: never minted, so it stands for "none" where a fixed-size field needs one.
    pub const NONE: LineageId = LineageId(uuid::Uuid::nil());

    pub fn from_bytes(bytes: [u8; 16]) -> LineageId {
        LineageId(uuid::Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// A new, random id.
    pub fn mint() -> LineageId {
        LineageId(uuid::Uuid::new_v4())
    }

    /// Parses the 32 hex digits [`Display`](fmt::Display) writes.
    pub fn parse(text: &str) -> Result<LineageId> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("invalid lineage id {text:?}: expected 32 hex digits"),
            ));
        }
        uuid::Uuid::try_parse(text).map(LineageId).map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                format!("invalid lineage id {text:?}"),
                err,
            )
        })
    }

    /// The first 8 hex digits, for messages.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for LineageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl fmt::Debug for LineageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LineageId({self})")
    }
}

impl Serialize for LineageId {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LineageId {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<LineageId, D::Error> {
        let text = String::deserialize(deserializer)?;
        LineageId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One history of a shard: its id, the counter people read, and where it branched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    pub id: LineageId,
    pub timeline: Timeline,
    /// The history this one continues; `None` for a shard created empty, or one whose
    /// history before `branch` is unknown.
    pub parent: Option<LineageId>,
    /// The last sequence number inherited: this history's own writes start after it.
    pub branch: Seq,
}

impl Lineage {
    /// The history of a shard created now, empty.
    pub fn root() -> Lineage {
        Lineage {
            id: LineageId::mint(),
            timeline: Timeline::default(),
            parent: None,
            branch: Seq(0),
        }
    }

    /// A history that continues this one after `branch` on `timeline`.
    pub fn child(&self, branch: Seq, timeline: Timeline) -> Lineage {
        Lineage {
            id: LineageId::mint(),
            timeline,
            parent: Some(self.id),
            branch,
        }
    }

    /// A history whose writes before `branch` cannot be told apart from another's: nothing
    /// before it is ever replayed from an archive.
    pub fn orphan(branch: Seq, timeline: Timeline) -> Lineage {
        Lineage {
            id: LineageId::mint(),
            timeline,
            parent: None,
            branch,
        }
    }

    /// The directory of the lineage's WAL segments: `<timeline:010>-<id>-<parent or 0s>-<branch:020>`,
    /// so that a listing of the directories is the whole tree.
    pub fn dir_name(&self) -> String {
        format!(
            "{:010}-{}-{}-{:020}",
            self.timeline.0,
            self.id,
            self.parent
                .map_or_else(|| "0".repeat(32), |parent| parent.to_string()),
            self.branch.0
        )
    }

    /// Parses a name written by [`Lineage::dir_name`].
    pub fn parse_dir_name(name: &str) -> Option<Lineage> {
        let mut parts = name.split('-');
        let timeline = parts.next().filter(|t| t.len() == 10)?.parse().ok()?;
        let id = LineageId::parse(parts.next()?).ok()?;
        let parent = parts.next()?;
        let parent = if parent.bytes().all(|b| b == b'0') && parent.len() == 32 {
            None
        } else {
            Some(LineageId::parse(parent).ok()?)
        };
        let branch = Seq(parts.next().filter(|b| b.len() == 20)?.parse().ok()?);
        let lineage = Lineage {
            id,
            timeline: Timeline(timeline),
            parent,
            branch,
        };
        (parts.next().is_none() && lineage.check().is_ok()).then_some(lineage)
    }

    /// Whether this record is one a shard can have.
    pub fn check(&self) -> Result<()> {
        if self.timeline.0 == 0
            || !self.branch.is_valid()
            || self.parent == Some(self.id)
            || self.id == LineageId::NONE
            || self.parent == Some(LineageId::NONE)
        {
            return Err(Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("lineage {self} is malformed"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timeline {} (lineage {})",
            self.timeline,
            self.id.short()
        )
    }
}

/// One lineage's part of a history: its writes up to and including `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leg {
    pub lineage: Lineage,
    pub to: Seq,
}

/// The history that ends at `seq` of `target`, as legs from the newest back to its root (or
/// to the first ancestor that `known` lacks): each ancestor with the last of its sequence
/// numbers the history includes. Legs that hold none of their own writes are left out (the
/// history branched off, or fell back, at or before their branch point), so the first leg is
/// the lineage that holds `seq` itself (the one a restore to the point branches from), and
/// each leg starts where the one after it ends: `legs[i].lineage.branch == legs[i + 1].to`.
pub fn ancestry(target: &Lineage, seq: Seq, known: &HashMap<LineageId, Lineage>) -> Vec<Leg> {
    let mut legs = vec![Leg {
        lineage: *target,
        to: seq,
    }];
    let mut current = *target;
    let mut to = seq;
    while let Some(parent) = current.parent.and_then(|id| known.get(&id)) {
        if legs.len() > known.len() {
            break; // a loop in a damaged listing: stop where it repeats
        }
        to = to.min(current.branch);
        legs.push(Leg {
            lineage: *parent,
            to,
        });
        current = *parent;
    }
    let oldest = legs[legs.len() - 1];
    legs.retain(|leg| leg.to > leg.lineage.branch);
    if legs.is_empty() {
        legs.push(oldest);
    }
    legs
}

/// Checks legs given to replay (oldest first) against the point they lead to: each starts
/// where the one before ends, none ends before it starts, and the last is `point`'s.
pub fn check_legs(legs: &[Leg], point: &Lineage) -> Result<()> {
    let malformed = |why: String| {
        Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("the WAL history to replay is malformed: {why}"),
        ))
    };
    for pair in legs.windows(2) {
        if pair[1].lineage.branch != pair[0].to {
            return malformed(format!(
                "{} branches at {}, but the leg before it ends at {}",
                pair[1].lineage, pair[1].lineage.branch, pair[0].to
            ));
        }
    }
    if let Some(leg) = legs.iter().find(|leg| leg.to < leg.lineage.branch) {
        return malformed(format!(
            "{} ends at {}, before its branch point {}",
            leg.lineage, leg.to, leg.lineage.branch
        ));
    }
    match legs.last() {
        Some(last) if last.lineage.id != point.id => malformed(format!(
            "it ends on {}, not on the restore point's {point}",
            last.lineage
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lineage_round_trips_through_its_directory_name_and_json() {
        let root = Lineage::root();
        let child = root.child(Seq(2_000), Timeline(2));
        for lineage in [root, child, Lineage::orphan(Seq(7), Timeline(5))] {
            assert_eq!(Lineage::parse_dir_name(&lineage.dir_name()), Some(lineage));
            let json = serde_json::to_string(&lineage).expect("json");
            assert_eq!(
                serde_json::from_str::<Lineage>(&json).expect("parse"),
                lineage
            );
        }
        for junk in [
            "0000000001",
            "1-2-3-4",
            &format!("0000000000-{}-{}-{:020}", root.id, "0".repeat(32), 0),
            &format!("0000000001-{}-{}-{:020}", root.id, root.id, 0),
        ] {
            assert_eq!(Lineage::parse_dir_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn ancestry_keeps_only_what_the_history_inherited() {
        let root = Lineage::root();
        // Restored to seq 2,000 of the root, then rolled back to 2,500 of that.
        let restored = root.child(Seq(2_000), Timeline(2));
        let rolled_back = restored.child(Seq(2_500), Timeline(3));
        let known: HashMap<_, _> = [root, restored, rolled_back]
            .into_iter()
            .map(|l| (l.id, l))
            .collect();
        let legs = ancestry(&rolled_back, Seq(7_000), &known);
        assert_eq!(
            legs,
            vec![
                Leg {
                    lineage: rolled_back,
                    to: Seq(7_000)
                },
                Leg {
                    lineage: restored,
                    to: Seq(2_500)
                },
                Leg {
                    lineage: root,
                    to: Seq(2_000)
                },
            ]
        );
        // A point before the last branch belongs to the parent.
        let legs = ancestry(&rolled_back, Seq(2_100), &known);
        assert_eq!(legs[0].lineage, restored);
        assert_eq!(legs[0].to, Seq(2_100));
        // An unknown parent ends the path.
        let alone: HashMap<_, _> = [(rolled_back.id, rolled_back)].into_iter().collect();
        assert_eq!(ancestry(&rolled_back, Seq(3_000), &alone).len(), 1);
    }

    #[test]
    fn a_history_that_fell_below_a_branch_skips_the_lineage_it_holds_nothing_of() {
        // Restored to 2,000 (a child), whose machine then lost its WAL tail back to 1,500,
        // below the child's own branch: the grandchild inherits only the root's 1..1,500.
        let root = Lineage::root();
        let restored = root.child(Seq(2_000), Timeline(2));
        let fell_back = restored.child(Seq(1_500), Timeline(3));
        let known: HashMap<_, _> = [root, restored, fell_back]
            .into_iter()
            .map(|l| (l.id, l))
            .collect();
        let legs = ancestry(&fell_back, Seq(4_000), &known);
        assert_eq!(
            legs.iter()
                .map(|l| (l.lineage.id, l.to))
                .collect::<Vec<_>>(),
            vec![(fell_back.id, Seq(4_000)), (root.id, Seq(1_500))]
        );
        let mut oldest_first = legs.clone();
        oldest_first.reverse();
        assert!(check_legs(&oldest_first, &fell_back).is_ok());
        // A point at sequence 0 of a root is the root itself.
        assert_eq!(
            ancestry(&root, Seq(0), &known),
            vec![Leg {
                lineage: root,
                to: Seq(0)
            }]
        );
    }

    #[test]
    fn malformed_legs_are_refused() {
        let root = Lineage::root();
        let child = root.child(Seq(2_000), Timeline(2));
        let other = Lineage::orphan(Seq(10), Timeline(9));
        let good = vec![
            Leg {
                lineage: root,
                to: Seq(2_000),
            },
            Leg {
                lineage: child,
                to: Seq(5_000),
            },
        ];
        assert!(check_legs(&good, &child).is_ok());
        assert!(check_legs(&[], &child).is_ok(), "nothing to replay");
        for (legs, point) in [
            // A gap between the legs: the child branches at 2,000, the root leg ends at 1,000.
            (
                vec![
                    Leg {
                        lineage: root,
                        to: Seq(1_000),
                    },
                    good[1],
                ],
                child,
            ),
            // Not leading to the point.
            (good.clone(), root),
            // An unrelated lineage that happens to cover the range.
            (
                vec![
                    good[0],
                    Leg {
                        lineage: other,
                        to: Seq(5_000),
                    },
                ],
                other,
            ),
            // Ends before its own branch.
            (
                vec![Leg {
                    lineage: child,
                    to: Seq(100),
                }],
                child,
            ),
        ] {
            let err = check_legs(&legs, &point).expect_err("malformed");
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        }
    }
}
