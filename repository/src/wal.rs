//! WAL segments: runs of a shard's write batches, shipped to WAL archives and stored in
//! backups, in the engine's own raw bytes.
//!
//! A batch is kept exactly as the engine wrote it (RocksDB's WriteBatch representation, with
//! its HLC LogData record), never decoded and re-encoded, so replaying it reproduces the
//! shard bit for bit. A segment's plaintext is:
//!
//! ```text
//! "LKSWAL02"
//! shard id            u32 LE length + bytes
//! lineage             timeline u64 LE, id 16 bytes, parent 16 bytes (zeros: none), branch u64 LE
//! number of batches   u32 LE
//! per batch           first seq u64 LE, count u64 LE, hlc u64 LE, u32 LE length + raw bytes
//! ```
//!
//! It is stored through the object codec (`codec.rs`: zstd when it pays, SHA-256 of the
//! plaintext), under a key that names the shard, the lineage, the sequence range, the HLC
//! range and the hash (`layout.rs`), so a listing alone plans a replay and checks continuity.
//!
//! Architecture invariant: within one lineage, the segments of a shard cover its history with
//! no hole: a hole is `ERR_BACKUP_WAL_GAP`, reported and never skipped. An overlap is the
//! same writes twice (a late put's leftover on an object store: on one lineage a sequence
//! number is one write), so readers pick a chain through it ([`chain`]); the `lockstep://`
//! archive refuses overlaps outright ([`check_segments`] is that strict check).

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{HlcTime, ObjectId, Seq, ShardId, Timeline};
use crate::lineage::{Lineage, LineageId};

const MAGIC: &[u8; 8] = b"LKSWAL02";
const SEGMENT_SUFFIX: &str = ".seg";

/// One write batch as the engine's WAL holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalBatch {
    /// The sequence number of the batch's first operation.
    pub first: Seq,
    /// How many sequence numbers the batch consumed.
    pub count: u64,
    /// The HLC commit time the agent stamped on the batch.
    pub hlc: HlcTime,
    /// The raw bytes, as the engine replays them.
    pub data: Vec<u8>,
}

impl WalBatch {
    /// The sequence number of the batch's last operation.
    pub fn last(&self) -> Seq {
        Seq((self.first.0 + self.count).saturating_sub(1))
    }

    /// The sequence number the next batch must start at.
    pub fn next(&self) -> Seq {
        Seq(self.first.0 + self.count)
    }
}

/// Checks that `batches` start at `expected` and follow each other with no gap; `what`
/// names the WAL in the error (`shard shard-0`).
pub fn check_continuity(
    what: impl std::fmt::Display,
    expected: Seq,
    batches: &[WalBatch],
) -> Result<()> {
    let mut expected = expected;
    for batch in batches {
        if batch.first != expected {
            return Err(gap(&what, expected, batch.first));
        }
        expected = batch.next();
    }
    Ok(())
}

/// The error for a missing WAL range; `what` names the WAL (`shard shard-0`).
pub fn gap(what: impl std::fmt::Display, expected: Seq, found: Seq) -> Error {
    Error::new(
        ErrorCode::BackupWalGap,
        format!(
            "WAL of {what} has a gap: expected sequence {expected}, found {found}; \
             the writes in between are gone"
        ),
    )
}

/// A run of consecutive batches of one shard on one lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub shard_id: ShardId,
    pub lineage: Lineage,
    pub batches: Vec<WalBatch>,
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn id(&mut self) -> Option<LineageId> {
        self.take(16)?.try_into().ok().map(LineageId::from_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

impl Segment {
    /// The segment's description, for its key; `None` when it holds no batch.
    pub fn info(&self, id: ObjectId) -> Option<SegmentInfo> {
        let first = self.batches.first()?;
        let last = self.batches.last()?;
        Some(SegmentInfo {
            shard_id: self.shard_id.clone(),
            lineage: self.lineage,
            first: first.first,
            last: last.last(),
            hlc_min: first.hlc,
            hlc_max: last.hlc,
            id,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.batches.iter().map(|b| b.data.len() + 28).sum();
        let mut out = Vec::with_capacity(size + 64);
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, self.shard_id.as_str().len() as u32);
        out.extend_from_slice(self.shard_id.as_str().as_bytes());
        put_u64(&mut out, self.lineage.timeline.0);
        out.extend_from_slice(self.lineage.id.as_bytes());
        out.extend_from_slice(self.lineage.parent.unwrap_or(LineageId::NONE).as_bytes());
        put_u64(&mut out, self.lineage.branch.0);
        put_u32(&mut out, self.batches.len() as u32);
        for batch in &self.batches {
            put_u64(&mut out, batch.first.0);
            put_u64(&mut out, batch.count);
            put_u64(&mut out, batch.hlc.0);
            put_u32(&mut out, batch.data.len() as u32);
            out.extend_from_slice(&batch.data);
        }
        out
    }

    /// Parses a segment's plaintext; `what` names it in errors.
    pub fn decode(what: &str, bytes: &[u8]) -> Result<Segment> {
        let corrupt = || {
            Error::new(
                ErrorCode::BackupWalArchiveFailed,
                format!("WAL segment {what} is malformed"),
            )
        };
        let mut reader = Reader(bytes);
        if reader.take(MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(corrupt());
        }
        let shard = reader.bytes().ok_or_else(corrupt)?;
        let shard_id = std::str::from_utf8(shard)
            .ok()
            .and_then(|s| ShardId::new(s).ok())
            .ok_or_else(corrupt)?;
        let timeline = Timeline(reader.u64().ok_or_else(corrupt)?);
        let id = reader.id().ok_or_else(corrupt)?;
        let parent = reader.id().ok_or_else(corrupt)?;
        let lineage = Lineage {
            id,
            timeline,
            parent: (parent != LineageId::NONE).then_some(parent),
            branch: Seq(reader.u64().ok_or_else(corrupt)?),
        };
        lineage.check().map_err(|_| corrupt())?;
        let n_batches = reader.u32().ok_or_else(corrupt)?;
        let mut batches = Vec::with_capacity(n_batches.min(1 << 16) as usize);
        for _ in 0..n_batches {
            let first = Seq(reader.u64().ok_or_else(corrupt)?);
            let count = reader.u64().ok_or_else(corrupt)?;
            // A batch ends where a shard can be: `first + count` never wraps.
            if !first.is_valid() || count > Seq::MAX.0 - first.0 + 1 {
                return Err(corrupt());
            }
            let hlc = HlcTime(reader.u64().ok_or_else(corrupt)?);
            let data = reader.bytes().ok_or_else(corrupt)?.to_vec();
            batches.push(WalBatch {
                first,
                count,
                hlc,
                data,
            });
        }
        if !reader.0.is_empty() {
            return Err(corrupt());
        }
        Ok(Segment {
            shard_id,
            lineage,
            batches,
        })
    }
}

/// What a segment's key says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub shard_id: ShardId,
    pub lineage: Lineage,
    pub first: Seq,
    pub last: Seq,
    pub hlc_min: HlcTime,
    pub hlc_max: HlcTime,
    /// The SHA-256 of the segment's plaintext.
    pub id: ObjectId,
}

impl SegmentInfo {
    /// The segment's file name within its lineage's directory.
    pub fn file_name(&self) -> String {
        format!(
            "{:020}-{:020}-{:016x}-{:016x}-{}{SEGMENT_SUFFIX}",
            self.first.0,
            self.last.0,
            self.hlc_min.0,
            self.hlc_max.0,
            self.id.to_hex()
        )
    }

    /// Whether the segment is marked (`Repository::wal_mark_before`): one in 1,024, by the
    /// first ten bits of its SHA-256, so a put of the same segment again marks it again.
    pub fn is_marked(&self) -> bool {
        let id = self.id.as_bytes();
        id[0] == 0 && id[1] < 0x40
    }

    /// Parses a file name written by [`SegmentInfo::file_name`].
    pub fn parse(shard_id: &ShardId, lineage: &Lineage, file_name: &str) -> Option<SegmentInfo> {
        let stem = file_name.strip_suffix(SEGMENT_SUFFIX)?;
        let mut parts = stem.split('-');
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        let hlc_min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let hlc_max = u64::from_str_radix(parts.next()?, 16).ok()?;
        let id = parts.next()?.parse().ok()?;
        if parts.next().is_some() || first > last || !Seq(last).is_valid() {
            return None;
        }
        let info = SegmentInfo {
            shard_id: shard_id.clone(),
            lineage: *lineage,
            first: Seq(first),
            last: Seq(last),
            hlc_min: HlcTime(hlc_min),
            hlc_max: HlcTime(hlc_max),
            id,
        };
        // Only the name `file_name` writes: keys sort as their segments do, and a listing
        // continues after the very key it last saw.
        (info.file_name() == file_name).then_some(info)
    }
}

/// Checks that sorted segments follow each other with no gap and no overlap.
pub fn check_segments(segments: &[SegmentInfo]) -> Result<()> {
    for pair in segments.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let expected = Seq(prev.last.0 + 1);
        if next.first > expected {
            return Err(gap(
                format_args!("shard {} {}", prev.shard_id, prev.lineage),
                expected,
                next.first,
            ));
        }
        if next.first < expected {
            return Err(Error::new(
                ErrorCode::BackupWalArchiveFailed,
                format!(
                    "WAL archive of shard {} {} has overlapping segments: {} and {}",
                    prev.shard_id,
                    prev.lineage,
                    prev.file_name(),
                    next.file_name()
                ),
            ));
        }
    }
    Ok(())
}

/// The segment that reaches furthest (with overlaps not always the last in order): where a
/// shipper resumes, and what retention keeps of every lineage.
pub fn furthest(segments: &[SegmentInfo]) -> Option<&SegmentInfo> {
    segments.iter().max_by_key(|s| s.last)
}

/// Of `segments` (one shard and lineage, in sequence order), the fewest that cover what they
/// cover, in order, or the first gap. Segments may overlap: a put an object store applied
/// after the shipper had given up on it and shipped the range again (with other bounds)
/// leaves the same writes twice. On one lineage a sequence number is one write, so a
/// segment the others cover is left out, and a replay skips the writes it already applied
/// where two chosen segments overlap.
pub fn chain(segments: Vec<SegmentInfo>) -> Result<Vec<SegmentInfo>> {
    let mut chosen: Vec<SegmentInfo> = Vec::with_capacity(segments.len());
    for segment in segments {
        if let Some(prev) = chosen.last() {
            if segment.last <= prev.last {
                continue; // covered
            }
            let expected = Seq(prev.last.0 + 1);
            if segment.first > expected {
                return Err(gap(
                    format_args!("shard {} {}", prev.shard_id, prev.lineage),
                    expected,
                    segment.first,
                ));
            }
        }
        // Drop the chosen segments this one makes redundant.
        loop {
            let n = chosen.len();
            let redundant = (n >= 1 && segment.first <= chosen[n - 1].first)
                || (n >= 2 && segment.first.0 <= chosen[n - 2].last.0 + 1);
            if !redundant {
                break;
            }
            chosen.pop();
        }
        chosen.push(segment);
    }
    Ok(chosen)
}

/// Of `segments` (one shard and lineage, in sequence order), the ones that carry the writes
/// after `after` through `to` (as [`chain`] picks them), checked to cover that whole range.
/// A hole at the start or between segments is a gap (those writes are gone); an archive that
/// stops short of `to` says how far it reaches. `what` names the archive in messages.
pub fn segments_covering(
    mut segments: Vec<SegmentInfo>,
    after: Seq,
    to: Seq,
    what: impl std::fmt::Display,
) -> Result<Vec<SegmentInfo>> {
    segments.retain(|s| s.last > after && s.first <= to);
    let mut segments = chain(segments)?;
    // A segment the next one makes redundant from `after` on.
    let skip = segments
        .windows(2)
        .take_while(|pair| pair[1].first.0 <= after.0 + 1)
        .count();
    segments.drain(..skip);
    if let Some(first) = segments.first().filter(|s| s.first.0 > after.0 + 1) {
        return Err(gap(what, Seq(after.0 + 1), first.first));
    }
    let reaches = segments.last().map_or(after, |s| s.last);
    if reaches < to {
        return Err(Error::new(
            ErrorCode::BackupWalGap,
            format!(
                "WAL of {what} reaches sequence {reaches}, short of the target {to}: \
                 sequences {} to {to} are not there (not shipped yet, or lost); \
                 see `lockstep wal status`, or pick an earlier target",
                reaches.0 + 1
            ),
        ));
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> ShardId {
        ShardId::new("shard-0").expect("shard id")
    }

    fn batch(first: u64, count: u64) -> WalBatch {
        WalBatch {
            first: Seq(first),
            count,
            hlc: HlcTime::new(1_000 + first, 0),
            data: vec![first as u8; count as usize],
        }
    }

    #[test]
    fn batches_and_names_past_the_largest_sequence_number_are_malformed() {
        for (first, count) in [
            (u64::MAX, 2),
            (Seq::MAX.0, 2),
            (5, u64::MAX),
            (Seq::MAX.0 + 1, 1),
        ] {
            let bytes = Segment {
                shard_id: shard(),
                lineage: Lineage::root(),
                batches: vec![WalBatch {
                    first: Seq(first),
                    count: 1,
                    hlc: HlcTime::new(1, 0),
                    data: Vec::new(),
                }],
            }
            .encode();
            // The count is patched in after the batch's first sequence number.
            let mut bytes = bytes;
            let at = bytes.len() - 4 - 8 - 8;
            bytes[at..at + 8].copy_from_slice(&count.to_le_bytes());
            assert!(
                Segment::decode("test", &bytes).is_err(),
                "a batch of {count} from {first} must be malformed"
            );
        }
        let name = format!(
            "{:020}-{:020}-{:016x}-{:016x}-{}.seg",
            1,
            u64::MAX,
            1,
            2,
            ObjectId::of(b"x").to_hex()
        );
        assert!(SegmentInfo::parse(&shard(), &Lineage::root(), &name).is_none());
    }

    #[test]
    fn segments_round_trip_and_their_names_describe_them() {
        let lineage = Lineage::root().child(Seq(4), Timeline(3));
        let segment = Segment {
            shard_id: shard(),
            lineage,
            batches: vec![batch(5, 2), batch(7, 1)],
        };
        let bytes = segment.encode();
        assert_eq!(Segment::decode("test", &bytes).ok(), Some(segment.clone()));
        let info = segment.info(ObjectId::of(&bytes)).expect("info");
        assert_eq!((info.first, info.last), (Seq(5), Seq(7)));
        let parsed = SegmentInfo::parse(&shard(), &lineage, &info.file_name());
        assert_eq!(parsed.as_ref(), Some(&info));
        assert!(Segment::decode("test", &bytes[..bytes.len() - 1]).is_err());
        assert!(SegmentInfo::parse(&shard(), &lineage, "junk.seg").is_none());
        // Only the canonical name: another spelling of the same numbers would sort elsewhere.
        let name = info.file_name();
        for other in [
            name.replacen("00000000000000000005", "5", 1),
            name.replacen("00000000000000000005", "+0000000000000000005", 1),
            name.to_uppercase().replace(".SEG", ".seg"),
        ] {
            assert_ne!(other, name);
            assert!(
                SegmentInfo::parse(&shard(), &lineage, &other).is_none(),
                "{other}"
            );
        }
    }

    /// A segment of shard-0 on `lineage` holding `first..=last`.
    fn segment_info(lineage: Lineage, first: u64, last: u64) -> SegmentInfo {
        SegmentInfo {
            shard_id: shard(),
            lineage,
            first: Seq(first),
            last: Seq(last),
            hlc_min: HlcTime(0),
            hlc_max: HlcTime(0),
            id: ObjectId::of(&[first as u8, last as u8]),
        }
    }

    #[test]
    fn continuity_is_checked_batch_by_batch_and_segment_by_segment() {
        let batches = vec![batch(1, 3), batch(4, 1), batch(5, 2)];
        assert!(check_continuity("shard shard-0", Seq(1), &batches).is_ok());
        let err = check_continuity("shard shard-0", Seq(2), &batches).expect_err("gap");
        assert_eq!(err.code, ErrorCode::BackupWalGap);
        let holed = vec![batch(1, 3), batch(5, 2)];
        assert!(check_continuity("shard shard-0", Seq(1), &holed).is_err());

        let lineage = Lineage::root();
        let info = |first, last| segment_info(lineage, first, last);
        assert!(check_segments(&[info(1, 4), info(5, 9)]).is_ok());
        let all = vec![info(1, 4), info(5, 9), info(10, 12)];
        let needed = segments_covering(all.clone(), Seq(5), Seq(10), "the archive");
        assert_eq!(needed.ok(), Some(vec![info(5, 9), info(10, 12)]));
        let short = segments_covering(all.clone(), Seq(4), Seq(20), "the archive")
            .expect_err("short of the target");
        assert_eq!(short.code, ErrorCode::BackupWalGap);
        assert!(
            short
                .to_string()
                .contains("reaches sequence 12, short of the target 20: sequences 13 to 20"),
            "{short}"
        );
        let late = segments_covering(all[1..].to_vec(), Seq(2), Seq(9), "the archive")
            .expect_err("starts late");
        assert!(
            late.to_string().contains("expected sequence 3, found 5"),
            "{late}"
        );
        let empty =
            segments_covering(Vec::new(), Seq(2), Seq(9), "the archive").expect_err("nothing");
        assert!(empty.to_string().contains("reaches sequence 2"), "{empty}");
        let hole = check_segments(&[info(1, 4), info(6, 9)]).expect_err("hole");
        assert_eq!(hole.code, ErrorCode::BackupWalGap);
        let overlap = check_segments(&[info(1, 4), info(4, 9)]).expect_err("overlap");
        assert_eq!(overlap.code, ErrorCode::BackupWalArchiveFailed);
    }

    #[test]
    fn a_chain_leaves_out_the_segments_a_late_put_left_twice_and_stops_at_a_gap() {
        let lineage = Lineage::root();
        let info = |first, last| segment_info(lineage, first, last);
        // 1..=10 landed after the shipper shipped 1..=6 and 7..=12 again: of two segments
        // starting together the longer one stays, and 1..=6 goes.
        let late = vec![info(1, 6), info(1, 10), info(7, 12), info(13, 20)];
        assert_eq!(
            chain(late.clone()).ok(),
            Some(vec![info(1, 10), info(7, 12), info(13, 20)])
        );
        // The other way round: the late put is the longer one and covers two.
        let long = vec![info(1, 3), info(1, 12), info(4, 12), info(13, 20)];
        assert_eq!(chain(long).ok(), Some(vec![info(1, 12), info(13, 20)]));
        // A partial overlap stays (the replay skips what it applied).
        let partial = vec![info(1, 6), info(5, 9), info(10, 12)];
        assert_eq!(chain(partial.clone()).ok(), Some(partial));
        let holed = chain(vec![info(1, 6), info(1, 8), info(10, 12)]).expect_err("gap");
        assert_eq!(holed.code, ErrorCode::BackupWalGap);
        assert!(
            holed.to_string().contains("expected sequence 9, found 10"),
            "{holed}"
        );
        // From 9: 7..=12 holds it, so 1..=10 is not needed either.
        let needed = segments_covering(late, Seq(8), Seq(15), "the archive");
        assert_eq!(needed.ok(), Some(vec![info(7, 12), info(13, 20)]));
    }
}
