//! The whole run: every measurement in order, medians, `results.json` and `results.md`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::RunArgs;
use crate::barrier;
use crate::contenders::{self, Binaries, Timed, disk_bytes, remove};
use crate::generate;
use crate::stats::{Ratio, median, quantile};
use crate::wal::{self, WalResult};

const MIB: f64 = 1024.0 * 1024.0;

/// The runs of one operation, for one contender.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub runs_secs: Vec<f64>,
    pub median_secs: f64,
    pub max_rss_mib: f64,
}

impl Op {
    fn of(timed: &[Timed]) -> Op {
        let runs_secs: Vec<f64> = timed.iter().map(|t| t.secs).collect();
        Op {
            median_secs: median(&runs_secs),
            max_rss_mib: timed.iter().map(|t| t.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
            runs_secs,
        }
    }
}

/// One operation of both contenders in pairs of runs, against the copy floor of the same
/// pairs.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub lockstep: Op,
    pub engine: Op,
    /// Lockstep over BackupEngine, pair by pair.
    pub vs_engine: Ratio,
    /// Lockstep over the copy floor measured in the same pair.
    pub vs_floor: Ratio,
    pub engine_vs_floor: Ratio,
}

impl Paired {
    fn of(lockstep: &[Timed], engine: &[Timed], floor: &[Timed]) -> Paired {
        let secs = |runs: &[Timed]| runs.iter().map(|t| t.secs).collect::<Vec<_>>();
        let (ls, be, fl) = (secs(lockstep), secs(engine), secs(floor));
        Paired {
            lockstep: Op::of(lockstep),
            engine: Op::of(engine),
            vs_engine: Ratio::pairwise(&ls, &be),
            vs_floor: Ratio::pairwise(&ls, &fl),
            engine_vs_floor: Ratio::pairwise(&be, &fl),
        }
    }
}

/// What only the main size measures: verify, a re-backup with no changes, an incremental.
#[derive(Debug, Clone, Serialize)]
pub struct Extras {
    pub lockstep_verify: Op,
    pub lockstep_rebackup_secs: f64,
    pub lockstep_rebackup_uploaded: u64,
    pub engine_rebackup_secs: f64,
    pub engine_rebackup_bytes: u64,
    pub changed_bytes: u64,
    pub lockstep_incremental_uploaded: u64,
    pub lockstep_incremental_secs: f64,
    pub engine_incremental_bytes: u64,
    pub engine_incremental_secs: f64,
}

/// One shard: a size and a block compression.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub compression: &'static str,
    pub logical_mib: u64,
    pub data_bytes: u64,
    pub generated: generate::Generated,
    pub pairs: usize,
    /// The disk's copy floor (`floor.rs`), one run per pair.
    pub floor: Op,
    pub backup: Paired,
    pub restore: Paired,
    pub lockstep_repo_bytes: u64,
    pub engine_repo_bytes: u64,
    pub lockstep_gate_closed_us: u64,
    pub extras: Option<Extras>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BarrierResult {
    pub agents: usize,
    pub load: &'static str,
    pub backups: usize,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub write_keys_per_sec: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: String,
    pub command: String,
    pub threads: usize,
    pub pairs: usize,
    /// Whether every timed run started from a cold page cache.
    pub cold_page_cache: bool,
    /// Each block compression at the main size (with the extras), then at the small size.
    pub variants: Vec<Variant>,
    /// Peak RSS of a Lockstep backup of the LZ4 shard by logical shard size in MiB.
    pub rss_mib_by_shard_mib: BTreeMap<u64, f64>,
    pub barrier: Vec<BarrierResult>,
    pub wal: WalResult,
    pub gc: Vec<crate::gc::GcResult>,
    pub archive: Vec<crate::scale::ArchiveResult>,
    pub catalog: Vec<crate::scale::CatalogResult>,
    pub limits: crate::limits::LimitResult,
    pub encryption: crate::encryption::EncryptionResult,
    pub export: Vec<crate::export::ExportResult>,
}

/// Regular files of a shard by name, with sizes.
fn files(db: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(db)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    meta.is_file()
                        .then(|| (e.file_name().to_string_lossy().into_owned(), meta.len()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One shard of `size_mib` MiB of values: backups and restores in pairs with the copy floor,
/// and with `extras`, verify, a re-backup and an incremental.
fn variant(
    bins: &Binaries,
    args: &RunArgs,
    compressed: bool,
    size_mib: u64,
    extras: bool,
) -> Result<Variant> {
    let name = if compressed { "lz4" } else { "none" };
    let label = format!("{name} {size_mib} MiB");
    let db = args.work.join(format!("db-{name}"));
    let repo = args.work.join(format!("repo-{name}"));
    let engine_dir = args.work.join(format!("backupengine-{name}"));
    let restored = args.work.join("restored");
    remove(&db);
    eprintln!("[bench] {label}: generating the shard");
    let generated = generate::shard(&db, compressed, size_mib)?;
    let data_bytes = disk_bytes(&db);

    let pairs = args.pairs.max(1);
    let (mut ls, mut be, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ls_restore, mut be_restore) = (Vec::new(), Vec::new());
    let mut gate_closed_us = 0;
    for pair in 0..pairs {
        eprintln!("[bench] {label}: pair {}/{pairs}", pair + 1);
        // A B, B A, A B...: neither contender always runs on the disk the other just used.
        let lockstep_first = pair % 2 == 0;
        for lockstep in [lockstep_first, !lockstep_first] {
            if lockstep {
                remove(&repo);
                let backup = contenders::lockstep_backup(bins, &db, &repo, args.threads)?;
                gate_closed_us = gate_closed_us.max(backup.gate_closed_us);
                ls.push(backup.timed);
            } else {
                remove(&engine_dir);
                be.push(contenders::backup_engine(
                    bins,
                    &db,
                    &engine_dir,
                    args.threads,
                )?);
            }
        }
        floor.push(contenders::copy_floor(bins, &db, &restored, args.threads)?);
        for lockstep in [lockstep_first, !lockstep_first] {
            if lockstep {
                ls_restore.push(contenders::lockstep_restore(
                    bins,
                    &repo,
                    &restored,
                    args.threads,
                )?);
            } else {
                be_restore.push(contenders::backup_engine_restore_timed(
                    bins,
                    &engine_dir,
                    &restored,
                    args.threads,
                )?);
            }
            remove(&restored);
        }
    }
    let (lockstep_repo_bytes, engine_repo_bytes) = (disk_bytes(&repo), disk_bytes(&engine_dir));
    let extras = if extras {
        Some(more(
            bins,
            args,
            &label,
            compressed,
            size_mib,
            &db,
            &repo,
            &engine_dir,
        )?)
    } else {
        None
    };
    remove(&db);
    remove(&repo);
    remove(&engine_dir);
    Ok(Variant {
        compression: name,
        logical_mib: size_mib,
        data_bytes,
        generated,
        pairs,
        floor: Op::of(&floor),
        backup: Paired::of(&ls, &be, &floor),
        restore: Paired::of(&ls_restore, &be_restore, &floor),
        lockstep_repo_bytes,
        engine_repo_bytes,
        lockstep_gate_closed_us: gate_closed_us,
        extras,
    })
}

/// Verify, a re-backup with no changes and an incremental after 5% new data, of the shard
/// `variant` backed up.
#[allow(clippy::too_many_arguments)]
fn more(
    bins: &Binaries,
    args: &RunArgs,
    label: &str,
    compressed: bool,
    size_mib: u64,
    db: &Path,
    repo: &Path,
    engine_dir: &Path,
) -> Result<Extras> {
    eprintln!("[bench] {label}: full verify");
    let mut verify = Vec::new();
    for _ in 0..args.pairs.clamp(1, 3) {
        verify.push(contenders::lockstep_verify(bins, repo, args.threads)?);
    }

    eprintln!("[bench] {label}: re-backup with no changes");
    let rebackup = contenders::lockstep_backup(bins, db, repo, args.threads)?;
    let engine_before = disk_bytes(engine_dir);
    let engine_rebackup = contenders::backup_engine(bins, db, engine_dir, args.threads)?;
    let engine_rebackup_bytes = disk_bytes(engine_dir).saturating_sub(engine_before);

    eprintln!("[bench] {label}: incremental (5% new data)");
    let before = files(db);
    let keys = size_mib * 1024 * 1024 / generate::VALUE_SIZE as u64;
    generate::write(db, compressed, keys, keys / 20, 2)?;
    let changed_bytes: u64 = files(db)
        .into_iter()
        .filter(|(name, size)| before.get(name) != Some(size))
        .map(|(_, size)| size)
        .sum();
    let incremental = contenders::lockstep_backup(bins, db, repo, args.threads)?;
    let engine_before = disk_bytes(engine_dir);
    let engine_incremental = contenders::backup_engine(bins, db, engine_dir, args.threads)?;
    let engine_incremental_bytes = disk_bytes(engine_dir).saturating_sub(engine_before);
    Ok(Extras {
        lockstep_verify: Op::of(&verify),
        lockstep_rebackup_secs: rebackup.timed.secs,
        lockstep_rebackup_uploaded: rebackup.bytes_uploaded,
        engine_rebackup_secs: engine_rebackup.secs,
        engine_rebackup_bytes,
        changed_bytes,
        lockstep_incremental_uploaded: incremental.bytes_uploaded,
        lockstep_incremental_secs: incremental.timed.secs,
        engine_incremental_bytes,
        engine_incremental_secs: engine_incremental.secs,
    })
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB RAM")
}

fn binaries(bin_dir: &Path) -> Result<Binaries> {
    Ok(Binaries {
        agent: bin_dir.join("lockstep-agent"),
        coordinator: bin_dir.join("lockstep"),
        bench: std::env::current_exe().context("locate lockstep-bench")?,
    })
}

/// `lockstep-bench wal`: the WAL measurement alone, printed as JSON.
/// The barrier's write pause, under steady then saturating writes, for each cluster size.
fn barriers(
    bins: &Binaries,
    work: &Path,
    agents: &[usize],
    backups: usize,
) -> Result<Vec<BarrierResult>> {
    let mut barrier_results = Vec::new();
    for load in [barrier::Load::Steady, barrier::Load::Saturating] {
        for &agents in agents {
            eprintln!(
                "[bench] barrier: {agents} agents under {} write load, {} backups",
                load.name(),
                backups
            );
            let pauses = barrier::measure(bins, work, agents, backups, load)?;
            barrier_results.push(BarrierResult {
                agents,
                load: load.name(),
                backups: pauses.backups,
                samples: pauses.pauses_us.len(),
                p50_ms: quantile(&pauses.pauses_us, 0.50) as f64 / 1000.0,
                p99_ms: quantile(&pauses.pauses_us, 0.99) as f64 / 1000.0,
                max_ms: pauses.pauses_us.iter().copied().max().unwrap_or(0) as f64 / 1000.0,
                write_keys_per_sec: pauses.write_keys_per_sec,
            });
        }
    }
    Ok(barrier_results)
}

/// Only the barrier measurement, as JSON.
pub fn barrier_only(bin_dir: &Path, work: &Path, agents: &[usize], backups: usize) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let results = barriers(&binaries(bin_dir)?, work, agents, backups)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

/// Only encryption at rest, as JSON.
pub fn encryption_only(
    bin_dir: &Path,
    work: &Path,
    mib: u64,
    pairs: usize,
    threads: usize,
) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let result = crate::encryption::measure(&binaries(bin_dir)?, work, mib, pairs, threads)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Only export, import and restore from the file, as JSON.
pub fn export_only(bin_dir: &Path, work: &Path, sizes: &[u64]) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let bins = binaries(bin_dir)?;
    let results = sizes
        .iter()
        .map(|mib| crate::export::measure(&bins, work, *mib))
        .collect::<Result<Vec<_>>>()?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

/// Only the rate-limited backup and restore, as JSON.
pub fn limits_only(bin_dir: &Path, work: &Path, mib: u64, limit_mib_s: u64) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let result = crate::limits::measure(&binaries(bin_dir)?, work, mib, limit_mib_s)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

pub fn gc_only(bin_dir: &Path, work: &Path, objects: &[u64]) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let bins = binaries(bin_dir)?;
    let results: Vec<_> = objects
        .iter()
        .map(|n| crate::gc::measure(&bins, work, *n))
        .collect::<Result<_>>()?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

pub fn scale_only(bin_dir: &Path, work: &Path, segments: &[u64], backups: &[u64]) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let bins = binaries(bin_dir)?;
    let archive: Vec<_> = segments
        .iter()
        .map(|n| crate::scale::measure(&bins, work, *n))
        .collect::<Result<_>>()?;
    let catalog: Vec<_> = backups
        .iter()
        .map(|n| crate::scale::measure_catalog(&bins, work, *n))
        .collect::<Result<_>>()?;
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({ "archive": archive, "catalog": catalog })
        )?
    );
    Ok(())
}

pub fn wal_only(bin_dir: &Path, work: &Path, secs: u64) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let result = wal::measure(&binaries(bin_dir)?, work, 3, secs)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Every shard variant: each block compression at the main size (with the extras if asked),
/// then at the small size.
fn variants(bins: &Binaries, args: &RunArgs, extras: bool) -> Result<Vec<Variant>> {
    let mut variants = Vec::new();
    for (size_mib, main) in [(args.size_mib, true), (args.small_mib, false)] {
        for compressed in [true, false] {
            variants.push(variant(bins, args, compressed, size_mib, extras && main)?);
        }
    }
    Ok(variants)
}

/// `lockstep-bench pairs`: the backup and restore pairs alone, as Markdown on stdout.
pub fn pairs_only(args: &RunArgs) -> Result<()> {
    let bins = binaries(&args.bin_dir)?;
    std::fs::create_dir_all(&args.work)?;
    let started = std::time::Instant::now();
    let variants = variants(&bins, args, false)?;
    let _ = std::fs::remove_dir_all(&args.work);
    println!(
        "Machine: {}; {} pairs, threads {}, cold page cache: {}; {:.0} s.\n{}",
        machine(),
        args.pairs,
        args.threads,
        contenders::every_run_cold(),
        started.elapsed().as_secs_f64(),
        pairs_table(&variants)
    );
    Ok(())
}

pub fn run(args: &RunArgs) -> Result<()> {
    let bins = binaries(&args.bin_dir)?;
    for bin in [&bins.agent, &bins.coordinator] {
        if !bin.exists() {
            bail!(
                "{} is missing; build with `cargo build --workspace --bins`",
                bin.display()
            );
        }
    }
    if !Path::new("/usr/bin/time").exists() {
        bail!("/usr/bin/time (GNU time) is missing; `make deps` installs it");
    }
    std::fs::create_dir_all(&args.work)?;
    std::fs::create_dir_all(&args.out)?;
    let started = std::time::Instant::now();

    let variants = variants(&bins, args, true)?;
    let rss = variants
        .iter()
        .filter(|v| v.compression == "lz4")
        .map(|v| (v.logical_mib, v.backup.lockstep.max_rss_mib))
        .collect();
    let barrier_results = barriers(&bins, &args.work, &args.agents, args.backups)?;
    eprintln!(
        "[bench] WAL: 3 agents shipping under steady writes for {} s, then an incremental and a PITR restore",
        args.wal_secs
    );
    let wal = wal::measure(&bins, &args.work, 3, args.wal_secs)?;
    let gc = args
        .gc_objects
        .iter()
        .map(|n| crate::gc::measure(&bins, &args.work, *n))
        .collect::<Result<Vec<_>>>()?;
    let archive = args
        .archive_segments
        .iter()
        .map(|n| crate::scale::measure(&bins, &args.work, *n))
        .collect::<Result<Vec<_>>>()?;
    let catalog = args
        .catalog_backups
        .iter()
        .map(|n| crate::scale::measure_catalog(&bins, &args.work, *n))
        .collect::<Result<Vec<_>>>()?;
    let limits = crate::limits::measure(&bins, &args.work, args.limit_shard_mib, args.limit_mib_s)?;
    let encryption = crate::encryption::measure(
        &bins,
        &args.work,
        args.encryption_mib,
        args.encryption_pairs,
        args.threads,
    )?;
    let export = args
        .export_mib
        .iter()
        .map(|mib| crate::export::measure(&bins, &args.work, *mib))
        .collect::<Result<Vec<_>>>()?;
    let _ = std::fs::remove_dir_all(&args.work);

    let results = Results {
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: machine(),
        command: format!(
            "make bench (lockstep-bench run --size-mib {} --small-mib {} --pairs {} --threads {} --agents {} --backups {} --wal-secs {}",
            args.size_mib,
            args.small_mib,
            args.pairs,
            args.threads,
            args.agents
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            args.backups,
            args.wal_secs
        ) + &format!(
            " --gc-objects {} --archive-segments {} --catalog-backups {} --limit-mib-s {} --limit-shard-mib {} --encryption-mib {} --encryption-pairs {} --export-mib {})",
            args.gc_objects
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
            args.archive_segments
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
            args.catalog_backups
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
            args.limit_mib_s,
            args.limit_shard_mib,
            args.encryption_mib,
            args.encryption_pairs,
            args.export_mib
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        threads: args.threads,
        pairs: args.pairs,
        cold_page_cache: contenders::every_run_cold(),
        variants,
        rss_mib_by_shard_mib: rss,
        barrier: barrier_results,
        wal,
        gc,
        archive,
        catalog,
        limits,
        encryption,
        export,
    };
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let markdown = markdown(&results, started.elapsed().as_secs_f64());
    std::fs::write(args.out.join("results.md"), &markdown)?;
    println!("{markdown}");
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / MIB)
}

fn ratio(lockstep: f64, engine: f64) -> String {
    if engine > 0.0 {
        format!("{:.2}x", lockstep / engine)
    } else {
        "-".into()
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// The backup and restore pairs of every shard, against BackupEngine and the copy floor.
fn pairs_table(variants: &[Variant]) -> String {
    let mut out = String::new();
    out.push_str(
        "\n**Full backup and restore against BackupEngine and the disk** (seconds are medians; \
         targets: ≤ 0.90x BackupEngine and ≤ 1.30x the copy floor, every byte still SHA-256-hashed \
         and zstd tried)\n\n\
         | shard (values, block compression, on disk) | operation | Lockstep s (MiB/s) | BackupEngine s | copy floor s | Lockstep / BackupEngine | Lockstep / floor | BackupEngine / floor | |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for v in variants {
        let data = v.data_bytes as f64 / MIB;
        for (operation, paired) in [("full backup", &v.backup), ("restore", &v.restore)] {
            out.push_str(&format!(
                "| {} MiB, {}, {} MiB | {} | {:.2} ({:.0}) | {:.2} | {:.2} | {} | {} | {} | {} |\n",
                v.logical_mib,
                v.compression,
                mib(v.data_bytes),
                operation,
                paired.lockstep.median_secs,
                data / paired.lockstep.median_secs.max(1e-9),
                paired.engine.median_secs,
                v.floor.median_secs,
                paired.vs_engine.shown(),
                paired.vs_floor.shown(),
                paired.engine_vs_floor.shown(),
                met(paired.vs_engine.median <= 0.90 && paired.vs_floor.median <= 1.30)
            ));
        }
    }
    out
}

/// The Markdown report: one table per variant, then memory and the barrier.
pub fn markdown(r: &Results, total_secs: f64) -> String {
    let mut out = format!(
        "Machine: {}; {}; threads {} for both contenders; {} pairs of runs per shard and \
         operation (Lockstep and BackupEngine one after the other, alternating which goes first, \
         then the disk's copy floor: the same files copied with direct I/O), each run from {}; \
         ratios taken pair by pair, median (min-max); whole run {:.0} s.\n\
         Command: `{}`\n",
        r.machine,
        r.date,
        r.threads,
        r.pairs,
        if r.cold_page_cache {
            "a cold page cache (synced and dropped before every timed run)"
        } else {
            "a warm page cache (dropping it needs root)"
        },
        total_secs,
        r.command
    );
    out.push_str(&pairs_table(&r.variants));
    for v in &r.variants {
        let Some(x) = &v.extras else {
            continue;
        };
        let data = v.data_bytes as f64 / MIB;
        out.push_str(&format!(
            "\n**Shard: {} MiB of values, RocksDB block compression {}, {} MiB on disk** \
             (generated at {:.0} batches/s of 1000 keys)\n\n",
            v.logical_mib,
            v.compression,
            mib(v.data_bytes),
            v.generated.batches as f64 / v.generated.write_secs.max(1e-9)
        ));
        out.push_str("| measure | Lockstep | BackupEngine | Lockstep / BackupEngine | target | |\n|---|---|---|---|---|---|\n");
        out.push_str(&format!(
            "| repository MiB | {} | {} | {} | reported | |\n",
            mib(v.lockstep_repo_bytes),
            mib(v.engine_repo_bytes),
            ratio(v.lockstep_repo_bytes as f64, v.engine_repo_bytes as f64)
        ));
        out.push_str(&format!(
            "| re-backup, no changes: s / bytes | {:.2} / {} B | {:.2} / {} B | | near zero | {} |\n",
            x.lockstep_rebackup_secs,
            x.lockstep_rebackup_uploaded,
            x.engine_rebackup_secs,
            x.engine_rebackup_bytes,
            met(x.lockstep_rebackup_uploaded < 1024 * 1024)
        ));
        let incremental_ratio =
            x.lockstep_incremental_uploaded as f64 / (x.changed_bytes as f64).max(1.0);
        out.push_str(&format!(
            "| after 5% new data: s / MiB stored (changed files: {} MiB) | {:.2} / {} ({:.2}x changed) | {:.2} / {} | | ≤ 1.1x changed | {} |\n",
            mib(x.changed_bytes),
            x.lockstep_incremental_secs,
            mib(x.lockstep_incremental_uploaded),
            incremental_ratio,
            x.engine_incremental_secs,
            mib(x.engine_incremental_bytes),
            met(incremental_ratio <= 1.1)
        ));
        out.push_str(&format!(
            "| full verify s (MiB/s) | {:.2} ({:.0}) | - | | reported | |\n",
            x.lockstep_verify.median_secs,
            data / x.lockstep_verify.median_secs.max(1e-9)
        ));
        out.push_str(&format!(
            "| peak RSS MiB, backup / restore | {:.0} / {:.0} | {:.0} / {:.0} | | bounded | |\n",
            v.backup.lockstep.max_rss_mib,
            v.restore.lockstep.max_rss_mib,
            v.backup.engine.max_rss_mib,
            v.restore.engine.max_rss_mib
        ));
        out.push_str(&format!(
            "| write pause of the offline backup ms (max of runs) | {:.3} | - | | | |\n",
            v.lockstep_gate_closed_us as f64 / 1000.0
        ));
    }
    out.push_str("\n**Agent peak RSS during a backup, by shard size** (target: independent of size)\n\n| shard MiB (logical) | peak RSS MiB |\n|---|---|\n");
    for (size, rss) in &r.rss_mib_by_shard_mib {
        out.push_str(&format!("| {size} | {rss:.0} |\n"));
    }
    out.push_str("\n**Barrier write pause under write load** (per shard per backup, from the request to close the gate until it reopens; target p99 < 5 ms with 8 agents; steady: 200 batches of 10 keys per second per agent; saturating: batches of 1000 keys back to back)\n\n| agents | load | backups | samples | p50 ms | p99 ms | max ms | cluster writes (keys/s) | |\n|---|---|---|---|---|---|---|---|---|\n");
    for b in &r.barrier {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            b.agents,
            b.load,
            b.backups,
            b.samples,
            b.p50_ms,
            b.p99_ms,
            b.max_ms,
            b.write_keys_per_sec,
            met(b.p99_ms < 5.0)
        ));
    }
    let w = &r.wal;
    out.push_str(&format!(
        "\n**WAL shipping and point-in-time restore** ({} agents shipping to a second local \"region\", \
         200 batches of 10 keys per second per agent for {:.0} s; lag per segment: how long its oldest \
         write waited until the segment was durable, worst shard)\n\n| measure | value | target | |\n|---|---|---|---|\n",
        w.agents, w.write_secs
    ));
    out.push_str(&format!(
        "| raw write rate (cluster, keys/s acknowledged) | {} | reported | |\n",
        w.write_keys_per_sec
    ));
    out.push_str(&format!(
        "| shipping lag p50 / p99 ms ({} segments) | {} / {} | p99 < 100 | {} |\n",
        w.segments_shipped,
        w.lag_p50_ms,
        w.lag_p99_ms,
        met(w.lag_p99_ms < 100)
    ));
    let incremental_ratio = w.incremental_stored_bytes as f64 / (w.changed_bytes as f64).max(1.0);
    out.push_str(&format!(
        "| incremental backup: s / MiB stored (keys and values written: {} MiB) | {:.2} / {} ({:.2}x written) | ≤ 1.1x | {} |\n",
        mib(w.changed_bytes),
        w.incremental_secs,
        mib(w.incremental_stored_bytes),
        incremental_ratio,
        met(incremental_ratio <= 1.1)
    ));
    out.push_str(&format!(
        "| PITR replay: batches/s per shard (keys/s, cluster) | {:.0} ({:.0}) | reported | |\n",
        w.replay_batches_per_sec, w.replay_keys_per_sec
    ));
    out.push_str(&format!(
        "| PITR restore to the end vector: s ({} batches, slowest shard's replay {:.2} s) | {:.2} | reported | |\n",
        w.replay_batches, w.replay_secs, w.restore_secs
    ));
    out.push_str(
        "\n**Garbage collection at scale** (a synthetic `file://` repository, half its objects named by \
         shard manifests of 500 chunks; one pass's mark, listing, plan and candidate record, in its own \
         process; targets: time linear in objects, peak RSS < 256 MiB at 1,000,000)\n\n\
         | objects | manifests | candidates | s | µs per object | peak RSS MiB | |\n|---|---|---|---|---|---|---|\n",
    );
    for g in &r.gc {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.0} | {} |\n",
            g.objects,
            g.manifests,
            g.candidates,
            g.secs,
            g.secs * 1e6 / (g.objects as f64).max(1.0),
            g.max_rss_mib,
            met(g.max_rss_mib < 256.0)
        ));
    }
    out.push_str(
        "\n**WAL archive at scale** (an archive-only coordinator over a `file://` repository whose \
         one lineage holds N segments; what a shipper asks of it over gRPC; the first resume and \
         the first put after a restart find the lineage's end in its last directories, later ones \
         list nothing; a replay of the last 100 segments lists from the archive's mark before them, \
         reading only the directories from there; target: ten times more segments cost at most \
         twice the time)\n\n\
         | segments | first resume ms | resume ms | first put after a restart ms | put ms | replay listing ms |\n|---|---|---|---|---|---|\n",
    );
    for a in &r.archive {
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} |\n",
            a.segments, a.resume_cold_ms, a.resume_ms, a.put_cold_ms, a.put_ms, a.replay_ms
        ));
    }
    out.push_str(
        "\n**Catalog at scale** (a coordinator over N committed backups of three shards; `backup \
         list` in pages of 500, whole and its first page, and the plan of a restore of the newest \
         backup (`restore --dry-run`), each first after a start and later; the manifests \
         predate the catalog index, so the first list builds it; target: 10x the backups at \
         most 2x the time for a page and a plan)\n\n\
         | backups | first list ms | list ms | first page ms | first restore plan ms | restore plan ms |\n\
         |---|---|---|---|---|---|\n",
    );
    for c in &r.catalog {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} |\n",
            c.backups, c.list_cold_ms, c.list_ms, c.page_ms, c.plan_cold_ms, c.plan_ms
        ));
    }
    let l = &r.limits;
    let within = |rate: f64| {
        let ratio = rate / l.limit_mib_s as f64;
        format!("{ratio:.2}x {}", met((0.9..=1.0).contains(&ratio)))
    };
    out.push_str(&format!(
        "\n**Rate limits** (an offline backup with `--upload-mib-s {0}` and a restore with \
         `--download-mib-s {0}` of {1:.0} MiB of random values; bytes stored over the command's \
         wall time, fixed costs included; target: within 10% of the limit, never over)\n\n\
         | | s | MiB/s | of the limit |\n|---|---|---|---|\n\
         | backup | {2:.2} | {3:.1} | {4} |\n| restore | {5:.2} | {6:.1} | {7} |\n",
        l.limit_mib_s,
        l.stored_mib,
        l.backup_secs,
        l.backup_mib_s,
        within(l.backup_mib_s),
        l.restore_secs,
        l.restore_mib_s,
        within(l.restore_mib_s),
    ));
    out.push_str(
        "\n**Export and import** (a shard of half-random values backed up offline, exported \
         through a coordinator to one file, imported into another coordinator's repository, \
         and restored from the file with no repository, beside a restore from the repository; \
         each command timed whole from a cold page cache)\n\n\
         | stored MiB | file MiB | backup s | export s | import s | restore s | restore --from-file s |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for x in &r.export {
        out.push_str(&format!(
            "| {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            x.stored_mib,
            x.file_mib,
            x.backup_secs,
            x.export_secs,
            x.import_secs,
            x.restore_secs,
            x.from_file_secs
        ));
    }
    let e = &r.encryption;
    let shown = Ratio::shown;
    out.push_str(&format!(
        "\n**Encryption at rest** (a {:.0} MiB LZ4 shard into a plaintext and an encrypted \
         repository, and by BackupEngine, alternated {} times from a cold page cache; ratios \
         pair by pair, median (min-max); the encrypted runs include unlocking the repository; \
         target: encrypted ≤ 1.10x plaintext)\n\n\
         | | plaintext s | encrypted s | BackupEngine s | encrypted / plaintext | encrypted / BackupEngine |\n\
         |---|---|---|---|---|---|\n\
         | full backup | {:.2} | {:.2} | {:.2} | {} {} | {} |\n\
         | restore | {:.2} | {:.2} | {:.2} | {} {} | {} |\n\n\
         Unlocking the repository (Argon2id) costs each process {:.2} s, once (a serving agent \
         at start); without it, on the data path: backup {}, restore {}.\n",
        e.shard_disk_mib,
        e.pairs,
        e.backup_plain_secs,
        e.backup_encrypted_secs,
        e.backup_engine_backup_secs,
        shown(&e.backup_encrypted_vs_plain),
        met(e.backup_encrypted_vs_plain.median <= 1.10),
        shown(&e.backup_encrypted_vs_backup_engine),
        e.restore_plain_secs,
        e.restore_encrypted_secs,
        e.backup_engine_restore_secs,
        shown(&e.restore_encrypted_vs_plain),
        met(e.restore_encrypted_vs_plain.median <= 1.10),
        shown(&e.restore_encrypted_vs_backup_engine),
        e.unlock_secs,
        shown(&e.backup_data_path_ratio),
        shown(&e.restore_data_path_ratio),
    ));
    out
}
