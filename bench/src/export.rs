//! Export and import: a shard backed up offline, exported through a coordinator into one
//! file, imported into a second coordinator's repository, and restored from the file with no
//! repository (`lockstep-agent restore --from-file`) beside a restore from the repository.
//! Each command is a process timed whole from a cold page cache (`contenders::timed`).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::barrier::Processes;
use crate::contenders::{Binaries, disk_bytes, remove, timed};

#[derive(Debug, Clone, Serialize)]
pub struct ExportResult {
    /// Bytes the backup stored in the repository, and the export file's size.
    pub stored_mib: f64,
    pub file_mib: f64,
    pub backup_secs: f64,
    pub export_secs: f64,
    pub import_secs: f64,
    pub restore_secs: f64,
    pub from_file_secs: f64,
}

/// Measures a shard of `mib` MiB of values (half random, as the bench's default shards).
pub fn measure(bins: &Binaries, work: &Path, mib: u64) -> Result<ExportResult> {
    eprintln!("[bench] export and import of a {mib} MiB shard");
    let dir = work.join(format!("export-{mib}"));
    remove(&dir);
    let runtime = crate::scale::runtime()?;
    // `prepare` makes each coordinator's directory afresh, with its repository inside.
    let (source_repo, target_repo) = (dir.join("source/repo"), dir.join("target/repo"));
    let source = crate::scale::prepare(&runtime, &dir.join("source"), &source_repo, 0)?;
    let target = crate::scale::prepare(&runtime, &dir.join("target"), &target_repo, 0)?;
    let (db, file) = (dir.join("db"), dir.join("backup.tar.zst"));
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    crate::contenders::load(bins, &db, mib, 0.5)?;
    let backup = timed(
        &bins.agent,
        &["backup", "--db", &s(&db), "--repo", &s(&source_repo)],
    )?;
    let stored = disk_bytes(&source_repo.join("objects"));
    let mut processes = Processes(Vec::new());
    let source_address =
        crate::scale::serve(&mut processes, bins, &source, &dir.join("source.log"))?;
    let target_address =
        crate::scale::serve(&mut processes, bins, &target, &dir.join("target.log"))?;
    let url = |address: &str| format!("http://{address}");
    let export = timed(
        &bins.coordinator,
        &[
            "--coordinator",
            &url(&source_address),
            "backup",
            "export",
            "latest",
            "-o",
            &s(&file),
        ],
    )?;
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let import = timed(
        &bins.coordinator,
        &[
            "--coordinator",
            &url(&target_address),
            "backup",
            "import",
            &s(&file),
        ],
    )?;
    drop(processes);
    let restore = timed(
        &bins.agent,
        &[
            "restore",
            "--repo",
            &s(&source_repo),
            "--backup",
            "latest",
            "--to",
            &s(&dir.join("restored")),
        ],
    )?;
    let from_file = timed(
        &bins.agent,
        &[
            "restore",
            "--from-file",
            &s(&file),
            "--to",
            &s(&dir.join("from-file")),
        ],
    )?;
    remove(&dir);
    let mib_of = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    Ok(ExportResult {
        stored_mib: mib_of(stored),
        file_mib: mib_of(file_bytes),
        backup_secs: backup.secs,
        export_secs: export.secs,
        import_secs: import.secs,
        restore_secs: restore.secs,
        from_file_secs: from_file.secs,
    })
}
