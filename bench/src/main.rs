//! `lockstep-bench`: the numbers behind `make bench`.
//!
//! Lockstep and RocksDB's BackupEngine (through the `rocksdb` crate, the same RocksDB build)
//! back up and restore the same generated shards, on the same disk, with the same number of
//! threads, as separate processes timed by GNU time (wall time and peak RSS), in pairs of
//! runs one after the other (alternating which goes first), each pair with the disk's own
//! copy floor measured beside it; ratios are taken pair by pair (`stats.rs`). Numbers are
//! reported, never asserted.
//!
//! - `generate.rs`: deterministic shards (compressible, half-random and random values), with
//!   RocksDB block compression on (LZ4, as in production) or off;
//! - `contenders.rs`: one backup, restore or verify of either contender, timed;
//! - `floor.rs`: the disk's copy floor, a direct-I/O copy of the same files;
//! - `stats.rs`: medians, quantiles, ratios pair by pair;
//! - `barrier.rs`: the write pause of the two-phase barrier with N agents under write load;
//! - `wal.rs`: WAL shipping lag under steady writes, incremental bytes, PITR replay rate;
//! - `gc.rs`: a garbage-collection pass over synthetic repositories of two sizes;
//! - `limits.rs`: a rate-limited backup and restore against their limit;
//! - `encryption.rs`: backups and restores into an encrypted repository against plaintext
//!   ones and BackupEngine, in alternated runs;
//! - `export.rs`: export through a coordinator, import into another, restore from the file;
//! - `report.rs`: the whole run, the JSON file and the Markdown tables.

mod barrier;
mod contenders;
mod encryption;
mod export;
mod floor;
mod gc;
mod generate;
mod limits;
mod report;
mod scale;
mod stats;
mod wal;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lockstep-bench",
    about = "Lockstep against RocksDB's BackupEngine, in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every measurement and write results.json and results.md into --out.
    Run(RunArgs),
    /// Only the full backups and restores in pairs against BackupEngine and the copy floor,
    /// at both sizes and both block compressions (the first table of `run`), as Markdown on
    /// stdout (the arguments of `run`'s other sections, and --out, are not used).
    Pairs(RunArgs),
    /// Only the WAL measurement (shipping lag, incremental bytes, PITR replay), as JSON.
    Wal {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 15)]
        secs: u64,
    },
    /// Only the barrier's write pause, as JSON.
    Barrier {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value = "3,8", value_delimiter = ',')]
        agents: Vec<usize>,
        #[arg(long, default_value_t = 30)]
        backups: usize,
    },
    /// Only export, import and restore from the file at each size, as JSON.
    Export {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value = "256,1024", value_delimiter = ',')]
        mib: Vec<u64>,
    },
    /// Only the rate-limited backup and restore, as JSON.
    Limits {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 512)]
        mib: u64,
        #[arg(long, default_value_t = 64)]
        limit_mib_s: u64,
    },
    /// Only encryption at rest (alternated plaintext, encrypted and BackupEngine runs), as
    /// JSON.
    Encryption {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 1536)]
        mib: u64,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Only the GC pass at each size, as JSON.
    Gc {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value = "100000,1000000", value_delimiter = ',')]
        objects: Vec<u64>,
    },
    /// Only the scale section (the WAL archive's put and resume, `backup list`), as JSON.
    Scale {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value = "10000,1000000", value_delimiter = ',')]
        segments: Vec<u64>,
        #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
        backups: Vec<u64>,
    },
    /// One GC scan and record over a repository (run as its own process, so it is timed alone).
    #[command(hide = true)]
    GcPass {
        #[arg(long)]
        repo: PathBuf,
    },
    /// Generate a benchmark shard (for profiling one contender by hand).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long)]
        uncompressed: bool,
    },
    /// Back up a shard with BackupEngine (run as its own process, so it is timed alone).
    #[command(hide = true)]
    BackupEngineBackup {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        threads: i32,
    },
    /// The disk's copy floor: copy the files of --from into --to with direct I/O.
    #[command(hide = true)]
    CopyFloor {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        threads: usize,
    },
    /// Restore the latest BackupEngine backup.
    #[command(hide = true)]
    BackupEngineRestore {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        threads: i32,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Where lockstep-agent and lockstep live.
    #[arg(long)]
    pub bin_dir: PathBuf,
    /// Scratch space for shards and repositories (removed at the end).
    #[arg(long)]
    pub work: PathBuf,
    /// Where results.json and results.md go.
    #[arg(long)]
    pub out: PathBuf,
    /// Logical size of the main shards (values before RocksDB compression).
    #[arg(long, default_value_t = 3072)]
    pub size_mib: u64,
    /// Logical size of the small shards: both sizes show how cost grows with size (fixed
    /// costs weigh more on small shards) and that memory does not.
    #[arg(long, default_value_t = 768)]
    pub small_mib: u64,
    /// Pairs of runs (Lockstep and BackupEngine one after the other, with the copy floor)
    /// per operation and shard.
    #[arg(long, default_value_t = 5)]
    pub pairs: usize,
    /// Threads for both contenders (Lockstep's transfer parallelism, BackupEngine's
    /// max_background_operations).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Cluster sizes for the barrier write-pause measurement.
    #[arg(long, default_value = "3,8", value_delimiter = ',')]
    pub agents: Vec<usize>,
    /// Backups per cluster size for the write pause.
    #[arg(long, default_value_t = 30)]
    pub backups: usize,
    /// Seconds of steady writes while the WAL ships (3 agents), before the PITR replay.
    #[arg(long, default_value_t = 15)]
    pub wal_secs: u64,
    /// Repository sizes (objects) for the GC pass.
    #[arg(long, default_value = "100000,1000000", value_delimiter = ',')]
    pub gc_objects: Vec<u64>,
    /// Archive sizes (segments of one lineage) for the WAL archive's put and resume.
    #[arg(long, default_value = "10000,1000000", value_delimiter = ',')]
    pub archive_segments: Vec<u64>,
    /// Catalog sizes (committed backups) for `backup list`.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    pub catalog_backups: Vec<u64>,
    /// The rate limit of the rate-limited backup and restore, in MiB/s...
    #[arg(long, default_value_t = 64)]
    pub limit_mib_s: u64,
    /// ...of a shard of this many MiB of random values.
    #[arg(long, default_value_t = 512)]
    pub limit_shard_mib: u64,
    /// Logical size of the LZ4 shard of the encryption-at-rest runs (the main shards' size)...
    #[arg(long, default_value_t = 3072)]
    pub encryption_mib: u64,
    /// ...and how many alternated runs of each contender.
    #[arg(long, default_value_t = 5)]
    pub encryption_pairs: usize,
    /// Shard sizes (MiB of values) for export, import and restore from the file.
    #[arg(long, default_value = "256,1024", value_delimiter = ',')]
    pub export_mib: Vec<u64>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => report::run(&args),
        Command::Pairs(args) => report::pairs_only(&args),
        Command::Wal {
            bin_dir,
            work,
            secs,
        } => report::wal_only(&bin_dir, &work, secs),
        Command::Gc {
            bin_dir,
            work,
            objects,
        } => report::gc_only(&bin_dir, &work, &objects),
        Command::GcPass { repo } => gc::pass(&repo),
        Command::Limits {
            bin_dir,
            work,
            mib,
            limit_mib_s,
        } => report::limits_only(&bin_dir, &work, mib, limit_mib_s),
        Command::Export { bin_dir, work, mib } => report::export_only(&bin_dir, &work, &mib),
        Command::Scale {
            bin_dir,
            work,
            segments,
            backups,
        } => report::scale_only(&bin_dir, &work, &segments, &backups),
        Command::Encryption {
            bin_dir,
            work,
            mib,
            pairs,
            threads,
        } => report::encryption_only(&bin_dir, &work, mib, pairs, threads),
        Command::Generate {
            db,
            mib,
            uncompressed,
        } => generate::shard(&db, !uncompressed, mib).map(|_| ()),
        Command::Barrier {
            bin_dir,
            work,
            agents,
            backups,
        } => report::barrier_only(&bin_dir, &work, &agents, backups),
        Command::BackupEngineBackup { db, dir, threads } => {
            contenders::backup_engine_backup(&db, &dir, threads)
        }
        Command::CopyFloor { from, to, threads } => floor::copy(&from, &to, threads),
        Command::BackupEngineRestore { dir, to, threads } => {
            contenders::backup_engine_restore(&dir, &to, threads)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lockstep-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
