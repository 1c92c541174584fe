//! Encryption at rest: the same LZ4 shard backed up and restored by Lockstep into a plaintext
//! and an encrypted repository, and by BackupEngine, alternated in pairs (plain, encrypted,
//! BackupEngine; each from a cold page cache), so the ratios are taken pair by pair on a
//! noisy machine and reported as median, min and max. The encrypted runs unlock the
//! repository (Argon2id, about 0.2 s) in every process, as an operator's would.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::contenders::{
    Binaries, backup_engine, backup_engine_restore_timed, disk_bytes, lockstep_backup_with,
    lockstep_restore_with, remove,
};
use crate::stats::{Ratio, median};

#[derive(Debug, Clone, Serialize)]
pub struct EncryptionResult {
    pub shard_disk_mib: f64,
    pub pairs: usize,
    /// Median seconds of each contender.
    pub backup_plain_secs: f64,
    pub backup_encrypted_secs: f64,
    pub backup_engine_backup_secs: f64,
    pub restore_plain_secs: f64,
    pub restore_encrypted_secs: f64,
    pub backup_engine_restore_secs: f64,
    /// Encrypted over plaintext, pair by pair (target ≤ 1.10).
    pub backup_encrypted_vs_plain: Ratio,
    pub restore_encrypted_vs_plain: Ratio,
    /// Encrypted over BackupEngine, pair by pair.
    pub backup_encrypted_vs_backup_engine: Ratio,
    pub restore_encrypted_vs_backup_engine: Ratio,
    /// What unlocking costs a process (Argon2id): `list` of the encrypted repository less
    /// `list` of the plaintext one, median. A serving agent pays it once, at start.
    pub unlock_secs: f64,
    /// Encrypted over plaintext with the unlock taken out: the cost on the data path.
    pub backup_data_path_ratio: Ratio,
    pub restore_data_path_ratio: Ratio,
}

pub fn measure(
    bins: &Binaries,
    work: &Path,
    mib: u64,
    pairs: usize,
    threads: usize,
) -> Result<EncryptionResult> {
    let dir = work.join("encryption");
    remove(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("db");
    crate::generate::shard(&db, true, mib)?;
    let shard_disk_mib = disk_bytes(&db) as f64 / (1 << 20) as f64;
    eprintln!(
        "[bench] encryption at rest: a {shard_disk_mib:.0} MiB LZ4 shard, {pairs} alternated runs"
    );
    let passphrase = dir.join("passphrase");
    std::fs::write(&passphrase, "bench passphrase")?;
    let sealed_env = [("LOCKSTEP_PASSPHRASE_FILE", passphrase.as_path())];
    let (plain_repo, sealed_repo, engine_dir) =
        (dir.join("plain"), dir.join("sealed"), dir.join("engine"));
    let restored = dir.join("restored");
    let mut secs: [Vec<f64>; 6] = Default::default();
    let mut unlock = Vec::new();
    for pair in 0..pairs.max(1) {
        for repo in [&plain_repo, &sealed_repo, &engine_dir] {
            remove(repo);
        }
        eprintln!("[bench]   run {}/{pairs}", pair + 1);
        let plain = lockstep_backup_with(bins, &db, &plain_repo, threads, &[])?;
        let sealed = lockstep_backup_with(bins, &db, &sealed_repo, threads, &sealed_env)?;
        let engine = backup_engine(bins, &db, &engine_dir, threads)?;
        let plain_restore = lockstep_restore_with(bins, &plain_repo, &restored, threads, &[])?;
        let sealed_restore =
            lockstep_restore_with(bins, &sealed_repo, &restored, threads, &sealed_env)?;
        let engine_restore = backup_engine_restore_timed(bins, &engine_dir, &restored, threads)?;
        let list = |repo: &Path, env: &[(&str, &Path)]| {
            crate::contenders::timed_with(
                &bins.agent,
                &["list", "--repo", repo.to_str().unwrap_or_default()],
                env,
            )
        };
        unlock.push(list(&sealed_repo, &sealed_env)?.secs - list(&plain_repo, &[])?.secs);
        for (i, timed) in [
            plain.timed.secs,
            sealed.timed.secs,
            engine.secs,
            plain_restore.secs,
            sealed_restore.secs,
            engine_restore.secs,
        ]
        .into_iter()
        .enumerate()
        {
            secs[i].push(timed);
        }
    }
    remove(&dir);
    let unlock_secs = median(&unlock).max(0.0);
    let less_unlock = |a: usize, b: usize| {
        let unlocked: Vec<f64> = secs[a].iter().map(|x| x - unlock_secs).collect();
        Ratio::pairwise(&unlocked, &secs[b])
    };
    let ratio = |a: usize, b: usize| Ratio::pairwise(&secs[a], &secs[b]);
    Ok(EncryptionResult {
        shard_disk_mib,
        pairs: pairs.max(1),
        backup_encrypted_vs_plain: ratio(1, 0),
        restore_encrypted_vs_plain: ratio(4, 3),
        backup_encrypted_vs_backup_engine: ratio(1, 2),
        restore_encrypted_vs_backup_engine: ratio(4, 5),
        unlock_secs,
        backup_data_path_ratio: less_unlock(1, 0),
        restore_data_path_ratio: less_unlock(4, 3),
        backup_plain_secs: median(&secs[0]),
        backup_encrypted_secs: median(&secs[1]),
        backup_engine_backup_secs: median(&secs[2]),
        restore_plain_secs: median(&secs[3]),
        restore_encrypted_secs: median(&secs[4]),
        backup_engine_restore_secs: median(&secs[5]),
    })
}
