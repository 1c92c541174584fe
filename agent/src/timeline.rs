//! The shard's timeline: which history line its writes belong to.
//!
//! Stored as `LOCKSTEP-TIMELINE` in the shard directory: the timeline number and the
//! sequence number it starts after, as text (`2 41800`). A shard with no file is on timeline
//! 1 from sequence 0. Every restore writes a new file into the restored shard with a
//! timeline above every one the shard's WAL archives know, so the WAL shipped after a restore
//! never mixes with the history before it. The file is not part of a capture.

use std::path::Path;

use lockstep_repository::{Error, ErrorCode, Result, Seq, Timeline};

pub const TIMELINE_FILE: &str = "LOCKSTEP-TIMELINE";

/// A timeline and the sequence number it starts after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lineage {
    pub timeline: Timeline,
    /// The last sequence number inherited from the previous timeline (the restore point).
    pub start: Seq,
}

/// The lineage of the shard in `dir` (the default for a shard that never was restored).
pub fn read_lineage(dir: &Path) -> Result<Lineage> {
    let path = dir.join(TIMELINE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Lineage::default()),
        Err(err) => {
            return Err(Error::io(
                ErrorCode::ShardEngineFailed,
                format!("read {}", path.display()),
                err,
            ));
        }
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(timeline)), Some(Ok(start)), None) if timeline > 0 => Ok(Lineage {
            timeline: Timeline(timeline),
            start: Seq(start),
        }),
        _ => Err(Error::new(
            ErrorCode::ShardEngineFailed,
            format!("{} is malformed: {text:?}", path.display()),
        )),
    }
}

/// Records the lineage of the shard in `dir`, durably.
pub fn write_lineage(dir: &Path, lineage: Lineage) -> Result<()> {
    let path = dir.join(TIMELINE_FILE);
    let io = |err| {
        Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("write {}", path.display()),
            err,
        )
    };
    let text = format!("{} {}\n", lineage.timeline.0, lineage.start.0);
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::create(&path).map_err(io)?;
    std::io::Write::write_all(&mut &file, text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_round_trips_and_defaults_to_timeline_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_lineage(dir.path()).ok(), Some(Lineage::default()));
        let lineage = Lineage {
            timeline: Timeline(3),
            start: Seq(99),
        };
        write_lineage(dir.path(), lineage).expect("write");
        assert_eq!(read_lineage(dir.path()).ok(), Some(lineage));
        std::fs::write(dir.path().join(TIMELINE_FILE), "x").expect("write junk");
        assert!(read_lineage(dir.path()).is_err());
    }
}
