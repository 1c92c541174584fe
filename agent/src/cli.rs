//! The `lockstep-agent` command line: offline commands for one shard, usable on a bare
//! machine with no coordinator (`backup`, `list`, `verify`, `restore`), plus `load` and
//! `digest`, which generate and fingerprint shard data for demos, tests and benchmarks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lockstep_proto::auth::Identity;
use lockstep_proto::tls::{Security, Tls, TlsFiles};
use lockstep_repository::bandwidth::{Bandwidth, DEFAULT_WAL_SHARE_PERCENT, Limits};
use lockstep_repository::codec::Compression;
use lockstep_repository::transfer::{Progress, TransferOptions};
use lockstep_repository::verify::{VerifyLevel, verify};
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, Result, ShardId};
use sha2::{Digest, Sha256};

use crate::backup::{BackupOptions, backup_offline};
use crate::engine::{EngineConfig, ShardEngine, WriteBatch, with_engine};
use crate::restore::{restore_planned, restore_shard, select_shard, unpack_export};
use crate::shipper::ShipperOptions;
use crate::splitmix::SplitMix;
use crate::startup::{BackgroundPriority, ShardSource, Startup, prepare_serving};

#[derive(Debug, Parser)]
#[command(
    name = "lockstep-agent",
    version,
    about = "Lockstep agent: owns one RocksDB shard; offline backup, verify and restore"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the shard over gRPC (Shard data API, Agent barrier API) until interrupted.
    Serve(ServeArgs),
    /// Take a full backup of a shard directory (the shard must not be open elsewhere).
    Backup(BackupArgs),
    /// List the backups in a repository.
    List(ListArgs),
    /// Verify backups: quick by default, `--full` re-hashes every object.
    Verify(VerifyArgs),
    /// Restore a shard of a backup into a new directory.
    Restore(RestoreArgs),
    /// Write deterministic generated data into a shard (for demos, tests and benchmarks).
    Load(LoadArgs),
    /// Print a shard's sequence number and a SHA-256 over all its column families.
    Digest(DigestArgs),
}

/// The engine a command opens the shard with; `rocksdb` needs the `rocksdb` cargo feature.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EngineKind {
    Rocksdb,
    Memory,
}

impl EngineKind {
    /// The engine's name, as [`ShardEngine::kind`] and manifests spell it.
    fn name(self) -> &'static str {
        match self {
            EngineKind::Rocksdb => "rocksdb",
            EngineKind::Memory => "memory",
        }
    }
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Chunks read and hashed in parallel (as many more may be waiting on their writes).
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    /// Chunk size in MiB.
    #[arg(long, default_value_t = 8)]
    pub chunk_mib: usize,
    /// zstd level for new objects (1 is fastest, up to 19); 0 turns compression off.
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
}

impl TransferArgs {
    fn options(&self) -> TransferOptions {
        TransferOptions {
            parallelism: self.parallelism,
            chunk_size: self.chunk_mib.saturating_mul(1024 * 1024),
            compression: Compression {
                zstd_level: self.zstd_level,
            },
        }
    }
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The shard's directory.
    #[arg(long)]
    pub db: PathBuf,
    /// Repository URL or local path.
    #[arg(long, env = "LOCKSTEP_REPO")]
    pub repo: String,
    /// The shard's id in the repository.
    #[arg(long, default_value = "shard-0")]
    pub shard: String,
    #[arg(long, value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Upload limit in MiB/s (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub upload_mib_s: u64,
    #[arg(long)]
    pub json: bool,
}

/// Where and when a capture may be taken.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Where captures are staged: on the shard's filesystem, neither the shard's directory,
    /// inside it, nor holding it, and not shared with another agent: a serving agent removes
    /// every `lockstep-capture-*` (and `bk-<date>-<time>-<hex>`, as older versions named
    /// captures) there at start, and nothing else. Default: `<db>.lockstep-captures`.
    #[arg(long)]
    pub capture_dir: Option<PathBuf>,
    /// No capture starts while the shard's filesystem has less free space than this
    /// (`ERR_STORAGE_DISK_FULL`): a capture keeps files and WAL that compactions would free.
    /// 0 turns the floor off.
    #[arg(long, default_value_t = 1024)]
    pub min_free_mib: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The shard's directory (created if missing).
    #[arg(long)]
    pub db: PathBuf,
    /// The shard's id.
    #[arg(long)]
    pub shard: String,
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub listen: String,
    #[arg(long, env = "LOCKSTEP_REPO")]
    pub repo: String,
    #[arg(long, value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,
    /// Column families to create if missing (comma separated).
    #[arg(long, default_value = "default", value_delimiter = ',')]
    pub cfs: Vec<String>,
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// CPU priority of background work (upload hashing and compression, compactions).
    #[arg(long, value_enum, default_value = "low")]
    pub background_priority: BackgroundPriority,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub wal: WalArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (the shard's sequence number, its gate,
    /// and WAL shipping per destination).
    #[arg(long, value_name = "ADDR", env = "LOCKSTEP_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: ServeTlsArgs,
}

/// How the agent's server and its calls (to `lockstep://` archives) are secured.
#[derive(Debug, Args)]
pub struct ServeTlsArgs {
    /// The cluster's CA certificate (PEM): serve and call with mutual TLS.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM), naming lockstep://agent/<shard> (`lockstep cert issue`).
    #[arg(long, value_name = "PEM", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// Bearer tokens accepted from Shard API clients without certificates (`lockstep cert
    /// token`).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_tokens: Option<PathBuf>,
    /// Serve and call without TLS: anyone who reaches the port may read, write, freeze or
    /// replace the shard. Chosen explicitly, never a default.
    #[arg(long, conflicts_with = "tls_ca")]
    pub plaintext: bool,
}

impl ServeTlsArgs {
    /// The security these flags choose for the agent of `shard`.
    pub fn security(&self, shard: &ShardId) -> Result<Security> {
        if self.plaintext {
            return Ok(Security::Plaintext);
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "no TLS: give --tls-ca, --tls-cert and --tls-key (`lockstep cert` makes them), or --plaintext to let anyone who reaches the port act on the shard",
            ));
        };
        let tls = Tls::load(TlsFiles {
            ca: ca.clone(),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            tokens: self.tls_tokens.clone(),
        })?;
        tls.check_serves_as(&Identity::Agent(shard.clone()))?;
        Ok(Security::Tls(tls))
    }
}

/// How a client command (`load --endpoint`) reaches an `https://` agent.
#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// The cluster's CA certificate (PEM): needed for an https:// endpoint.
    #[arg(long, env = "LOCKSTEP_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), naming lockstep://client/NAME.
    #[arg(long, env = "LOCKSTEP_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "LOCKSTEP_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token, for a client without a certificate.
    #[arg(long, env = "LOCKSTEP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// Rate limits, changeable while the agent runs (`lockstep cluster limits`).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Upload limit of backups and WAL shipping together, in MiB/s (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub upload_mib_s: u64,
    /// Download limit of restores, in MiB/s (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub download_mib_s: u64,
    /// The share of the upload limit kept for WAL shipping, in percent: backups never take
    /// it, so a throttled backup never delays shipping.
    #[arg(long, default_value_t = DEFAULT_WAL_SHARE_PERCENT, value_parser = clap::value_parser!(u32).range(0..=90))]
    pub wal_share_percent: u32,
}

impl LimitArgs {
    fn bandwidth(&self) -> Bandwidth {
        Bandwidth::new(Limits {
            upload: self.upload_mib_s << 20,
            download: self.download_mib_s << 20,
            wal_share_percent: self.wal_share_percent,
        })
    }
}

/// WAL shipping.
#[derive(Debug, Args)]
pub struct WalArgs {
    /// A WAL destination ("region"): any repository URL or path. Repeat for several; each
    /// gets every segment and keeps its own cursor.
    #[arg(long = "wal-to", value_name = "URL")]
    pub destinations: Vec<String>,
    /// Cut a segment once it holds this many MiB...
    #[arg(long, default_value_t = 4)]
    pub wal_segment_mib: usize,
    /// ...or once its oldest write has waited this many milliseconds (the floor of the
    /// shipping lag; 25 keeps its p99 under 100 ms, at up to 40 objects per second per shard).
    #[arg(long, default_value_t = 25)]
    pub wal_segment_ms: u64,
    /// WAL kept for shipping and incremental backups after RocksDB is done with it, in MiB.
    /// Past it the oldest WAL is dropped and a destination still behind reports
    /// ERR_BACKUP_WAL_GAP; the agent warns at 90%.
    #[arg(long, default_value_t = 1024)]
    pub wal_retention_mib: u64,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, env = "LOCKSTEP_REPO")]
    pub repo: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long, env = "LOCKSTEP_REPO")]
    pub repo: String,
    /// Backup to verify (`latest` works); all backups when omitted.
    #[arg(long)]
    pub backup: Option<String>,
    /// Download, decompress and re-hash every object.
    #[arg(long)]
    pub full: bool,
    /// Check a random PCT% of the objects (a new sample each run); manifests are checked whole.
    #[arg(long, value_name = "PCT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub sample: u8,
    #[arg(long, default_value_t = 8)]
    pub parallelism: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[arg(long, env = "LOCKSTEP_REPO", required_unless_present = "from_file")]
    pub repo: Option<String>,
    /// Backup id, or `latest`.
    #[arg(
        long,
        required_unless_present = "from_file",
        conflicts_with = "from_file"
    )]
    pub backup: Option<String>,
    /// Restore from an export file (`lockstep backup export`) instead of a repository: the
    /// file is checked and unpacked beside the target (it needs about the file's size there)
    /// and removed afterwards; the shard comes back to the backup or tag the file holds.
    #[arg(long, value_name = "FILE.tar.zst")]
    pub from_file: Option<PathBuf>,
    /// Shard to restore; may be omitted when the backup has one shard.
    #[arg(long)]
    pub shard: Option<String>,
    /// New or empty directory to restore into.
    #[arg(long)]
    pub to: PathBuf,
    /// Restore only this column family (repeat for several, or comma separated): the others
    /// are absent from the result (the default one, which RocksDB always has, is empty unless
    /// named). The shard starts a new history of its own (an orphan lineage).
    #[arg(long = "cf", value_name = "NAME", value_delimiter = ',')]
    pub column_families: Vec<String>,
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Download limit in MiB/s (0: none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub download_mib_s: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("shard").required(true).args(["db", "endpoint"])))]
pub struct LoadArgs {
    /// Write into this shard directory (the shard must not be open elsewhere)...
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// ...or through a serving agent's Shard API (for example https://127.0.0.1:7401).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Keys to write per column family.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Column families to write (comma separated).
    #[arg(long, default_value = "default", value_delimiter = ',')]
    pub cfs: Vec<String>,
    /// Fraction of each value that is random (the rest compresses well), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.5)]
    pub random_fraction: f64,
    /// Seed for the generated data; the same seed writes the same bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Prefix for generated keys, so repeated loads can add or overwrite.
    #[arg(long, default_value = "key")]
    pub prefix: String,
    #[arg(long, value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,
    /// Keys per write batch (default: as many as fit in about 1 MiB, at most 1000).
    #[arg(long)]
    pub batch_keys: Option<u64>,
    /// With --endpoint: send at most this many batches per second (0: as fast as they are
    /// acknowledged), for a steady load instead of a saturating one.
    #[arg(long, default_value_t = 0)]
    pub batches_per_sec: u32,
}

#[derive(Debug, Args)]
pub struct DigestArgs {
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,
    #[arg(long)]
    pub json: bool,
}

fn progress_bar(
    progress: Arc<Progress>,
    what: &'static str,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what);
    let ticker = bar.clone();
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let (done, total) = progress.snapshot();
            ticker.set_length(total);
            ticker.set_position(done);
        }
    });
    (bar, task)
}

/// `work`, with a progress bar of `progress` named `what` on stderr while it runs.
async fn with_progress<T>(
    what: &'static str,
    progress: &Arc<Progress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let (bar, ticker) = progress_bar(progress.clone(), what);
    let outcome = work.await;
    ticker.abort();
    bar.finish_and_clear();
    outcome
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

async fn resolve_backup(repo: &Repository, name: &str) -> Result<BackupId> {
    if name == "latest" {
        return repo.latest_backup().await;
    }
    BackupId::new(name)
}

/// Where and how a command backs up the shard in `db`: captures go to `--capture-dir`, or by
/// default to `<db>.lockstep-captures` beside it (on the shard's filesystem); a capture
/// directory overlapping the shard is refused.
fn backup_options(
    db: &Path,
    capture: &CaptureArgs,
    transfer: &TransferArgs,
) -> Result<BackupOptions> {
    let capture_root = capture.capture_dir.clone().unwrap_or_else(|| {
        let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".lockstep-captures");
        db.with_file_name(name)
    });
    crate::backup::check_capture_root(db, &capture_root)?;
    Ok(BackupOptions {
        capture_root,
        transfer: transfer.options(),
        min_free_bytes: capture.min_free_mib << 20,
    })
}

/// `repo` within these limits (offline: no WAL shipping, so no share is kept for it).
fn limited(repo: Repository, upload_mib_s: u64, download_mib_s: u64) -> Repository {
    if upload_mib_s == 0 && download_mib_s == 0 {
        return repo;
    }
    repo.throttled(Arc::new(Bandwidth::new(Limits {
        upload: upload_mib_s << 20,
        download: download_mib_s << 20,
        wal_share_percent: 0,
    })))
}

async fn run_backup<E: ShardEngine>(args: &BackupArgs) -> Result<()> {
    let shard = ShardId::new(&args.shard)?;
    let db = args.db.clone();
    if matches!(args.engine, EngineKind::Rocksdb) && !db.join("CURRENT").exists() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "{} is not a RocksDB directory (no CURRENT file)",
                db.display()
            ),
        ));
    }
    // The repository first: one that does not open (a wrong passphrase) leaves the shard
    // unopened.
    let repo = limited(Repository::open(&args.repo).await?, args.upload_mib_s, 0);
    let engine = Arc::new(
        lockstep_repository::blocking::run(move || E::open(&db, &[]))
            .await
            .map_err(|err| Error::with_source(ErrorCode::ShardEngineFailed, "open shard", err))??,
    );
    let options = backup_options(&args.db, &args.capture, &args.transfer)?;
    let progress = Arc::new(Progress::default());
    let (bar, ticker) = progress_bar(progress.clone(), "backup");
    let started = Instant::now();
    let sources = crate::lineage::HistorySources {
        shard: shard.clone(),
        destinations: Vec::new(),
        repo: Some(repo.clone()),
    };
    let lineage = crate::lineage::establish(&args.db, engine.latest_seq(), &sources).await?;
    let result = backup_offline(&engine, &repo, &shard, &options, lineage, &progress).await;
    ticker.abort();
    bar.finish_and_clear();
    let manifest = result?;
    let elapsed = started.elapsed();
    if args.json {
        print_json(&manifest);
    } else {
        let stats = &manifest.stats;
        println!(
            "Backup {} created: shard {} at seq {}",
            manifest.backup_id,
            shard,
            manifest.cut.get(&shard).copied().unwrap_or_default()
        );
        println!(
            "  {} in {} files; read {}, uploaded {} new ({} stored, {} objects), {} objects already present, {} files reused unread",
            human_bytes(stats.bytes_total),
            manifest.shards.iter().map(|s| s.n_files).sum::<u64>(),
            human_bytes(stats.bytes_read),
            human_bytes(stats.bytes_uploaded),
            human_bytes(stats.stored_bytes_uploaded),
            stats.objects_uploaded,
            stats.objects_already_present,
            stats.files_reused,
        );
        println!(
            "  took {:.2}s ({}); writes paused {:.3} ms",
            elapsed.as_secs_f64(),
            rate(stats.bytes_total, elapsed),
            manifest.max_gate_closed_us as f64 / 1000.0
        );
    }
    Ok(())
}

async fn run_serve<E: ShardEngine>(args: &ServeArgs) -> Result<()> {
    let shard = ShardId::new(&args.shard)?;
    let repo = Repository::open(&args.repo).await?;
    let security = args.tls.security(&shard)?;
    let mut destinations = Vec::new();
    for url in &args.wal.destinations {
        let archive = lockstep_proto::archive::open_archive(url, &security, repo.seal()).await?;
        // An encrypted repository's (sealed) keys go with its WAL, so the archive can be
        // restored from when the repository is gone (`lockstep key import`); in the
        // background, so an unreachable archive does not hold the shard back.
        if let lockstep_repository::archive::WalArchive::Store(store) = &archive
            && repo.seal().is_sealed()
        {
            let (repo, store, url) = (repo.clone(), store.clone(), url.clone());
            tokio::spawn(async move {
                if let Err(err) = repo.copy_keys_to(&store).await {
                    tracing::warn!(archive = %url, error = %err.chain(), "could not copy the repository's keys to a WAL archive");
                }
            });
        }
        destinations.push(archive);
    }
    let shipping = ShipperOptions {
        destinations,
        segment_bytes: args.wal.wal_segment_mib.max(1) << 20,
        segment_age: Duration::from_millis(args.wal.wal_segment_ms),
        compression: args.transfer.options().compression,
        wal_retention_bytes: args.wal.wal_retention_mib.max(1) << 20,
        ..ShipperOptions::default()
    };
    // Bound first: a second agent started on a busy port by mistake stops here, before its
    // start-up cleans the captures the running agent is uploading from.
    let (listener, address) = lockstep_process::bind(&args.listen).await?;
    if let Some(metrics) = &args.metrics_listen {
        lockstep_process::metrics::serve(metrics, "lockstep-agent")?;
    }
    let options = backup_options(&args.db, &args.capture, &args.transfer)?;
    let slot = prepare_serving::<E>(Startup {
        dir: args.db.clone(),
        capture_root: options.capture_root.clone(),
        priority: args.background_priority,
        history: crate::lineage::HistorySources {
            shard: shard.clone(),
            destinations: shipping.destinations.clone(),
            repo: Some(repo.clone()),
        },
        planted_bug: None,
        source: ShardSource::Open {
            column_families: args.cfs.clone(),
            config: EngineConfig {
                wal_retention_mb: args.wal.wal_retention_mib,
                ..EngineConfig::default()
            },
        },
    })
    .await?;
    println!(
        "lockstep-agent: shard {shard} ({}) listening on {address}",
        slot.get()?.kind()
    );
    let shutdown = lockstep_process::shutdown_on_signal();
    let parts = crate::server::AgentParts {
        slot,
        repo,
        shard_id: shard,
        options,
        shipping,
        gate: crate::gate::WriteGate::new(),
        planted_bug: None,
        metrics: args.metrics_listen.is_some(),
        bandwidth: std::sync::Arc::new(args.limits.bandwidth()),
        security,
    };
    crate::server::serve(parts, listener, shutdown).await
}

async fn run_list(args: &ListArgs) -> Result<()> {
    let repo = Repository::open(&args.repo).await?;
    let backups = repo.backups().await?;
    if args.json {
        let rows: Vec<serde_json::Value> = backups
            .iter()
            .map(|(id, manifest)| match manifest {
                Ok(m) => serde_json::to_value(m).unwrap_or_default(),
                Err(err) => serde_json::json!({ "backup_id": id, "error": err.code, "message": err.message }),
            })
            .collect();
        print_json(&rows);
        return Ok(());
    }
    if backups.is_empty() {
        println!("No backups in {}", repo.url());
        return Ok(());
    }
    println!(
        "{:<26} {:<8} {:<20} {:>6} {:>12} {:>12} {:>10}",
        "BACKUP", "KIND", "COMPLETED (UTC)", "SHARDS", "SIZE", "UPLOADED", "PAUSE ms"
    );
    for (id, manifest) in &backups {
        match manifest {
            Ok(m) => println!(
                "{:<26} {:<8} {:<20} {:>6} {:>12} {:>12} {:>10.3}",
                id.as_str(),
                m.kind.to_string(),
                m.completed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                m.shards.len(),
                human_bytes(m.stats.bytes_total),
                human_bytes(m.stats.stored_bytes_uploaded),
                m.max_gate_closed_us as f64 / 1000.0
            ),
            Err(err) => println!("{:<26} {}", id.as_str(), err.code),
        }
    }
    Ok(())
}

async fn run_verify(args: &VerifyArgs) -> Result<bool> {
    let repo = Repository::open(&args.repo).await?;
    let backups = match &args.backup {
        Some(name) => vec![resolve_backup(&repo, name).await?],
        None => repo.backup_ids().await?,
    };
    if backups.is_empty() {
        return Err(Error::new(
            ErrorCode::BackupNotFound,
            format!("repository {} holds no backup", repo.url()),
        ));
    }
    let level = if args.full {
        VerifyLevel::Full
    } else {
        VerifyLevel::Quick
    };
    let progress = Arc::new(Progress::default());
    let report = with_progress(
        "verify",
        &progress,
        verify(
            &repo,
            &backups,
            level,
            args.sample,
            None,
            args.parallelism,
            &progress,
        ),
    )
    .await?;
    if args.json {
        print_json(&report);
    } else {
        println!("{report}");
    }
    Ok(report.passed)
}

async fn run_restore(args: &RestoreArgs) -> Result<()> {
    let shard = args.shard.as_deref().map(ShardId::new).transpose()?;
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let (outcome, backup, what) = if let Some(file) = &args.from_file {
        let unpacked = with_progress(
            "unpack",
            &progress,
            unpack_export(file, &args.to, shard.clone(), progress.clone()),
        )
        .await?;
        let plan = unpacked.shard(shard.as_ref())?;
        let what = match &unpacked.manifest.tag {
            Some(tag) => format!("tag {tag}"),
            None => format!("backup {}", unpacked.manifest.backup_id),
        };
        let progress = Arc::new(Progress::default());
        let outcome = with_progress(
            "restore",
            &progress,
            restore_planned(
                &unpacked.repo,
                plan,
                &args.to,
                &args.column_families,
                args.transfer.options(),
                &progress,
            ),
        )
        .await?;
        (outcome, unpacked.manifest.backup_id.clone(), what)
    } else {
        let location = args.repo.as_deref().unwrap_or_default();
        let repo = limited(Repository::open(location).await?, 0, args.download_mib_s);
        let backup = resolve_backup(&repo, args.backup.as_deref().unwrap_or("latest")).await?;
        let shard = select_shard(&repo, &backup, shard.as_ref()).await?;
        let outcome = with_progress(
            "restore",
            &progress,
            restore_shard(
                &repo,
                &backup,
                &shard,
                &args.to,
                &args.column_families,
                args.transfer.options(),
                &progress,
            ),
        )
        .await?;
        let what = format!("backup {backup}");
        (outcome, backup, what)
    };
    let elapsed = started.elapsed();
    if args.json {
        print_json(&serde_json::json!({
            "backup_id": backup, "shard_id": outcome.shard, "seq": outcome.seq,
            "files": outcome.n_files, "bytes": outcome.bytes, "target": outcome.target,
            "seconds": elapsed.as_secs_f64(),
        }));
    } else {
        println!(
            "Restored shard {} of {} to {}: seq {} verified, {} in {} files, {:.2}s ({})",
            outcome.shard,
            what,
            outcome.target.display(),
            outcome.seq,
            human_bytes(outcome.bytes),
            outcome.n_files,
            elapsed.as_secs_f64(),
            rate(outcome.bytes, elapsed)
        );
    }
    Ok(())
}

/// The generated data of `load`, as a stream of write batches of at most about 1 MiB.
struct Generator<'a> {
    args: &'a LoadArgs,
    rng: SplitMix,
    random_len: usize,
    per_batch: u64,
    cf: usize,
    next_key: u64,
    bytes: u64,
}

impl<'a> Generator<'a> {
    fn new(args: &'a LoadArgs) -> Generator<'a> {
        Generator {
            args,
            rng: SplitMix(args.seed),
            random_len: ((args.value_size as f64) * args.random_fraction.clamp(0.0, 1.0)) as usize,
            per_batch: args
                .batch_keys
                .unwrap_or(1024 * 1024 / args.value_size.max(1) as u64)
                .clamp(1, 1000),
            cf: 0,
            next_key: 0,
            bytes: 0,
        }
    }

    fn next_batch(&mut self) -> Option<WriteBatch> {
        let args = self.args;
        if self.next_key >= args.keys {
            self.cf += 1;
            self.next_key = 0;
        }
        let cf = args.cfs.get(self.cf)?;
        if args.keys == 0 {
            return None;
        }
        let mut batch = WriteBatch::new();
        let end = (self.next_key + self.per_batch).min(args.keys);
        for key in self.next_key..end {
            let mut value = vec![b'a' + (key % 26) as u8; args.value_size];
            self.rng.fill(&mut value[..self.random_len]);
            self.bytes += value.len() as u64;
            batch.put(cf, format!("{}{key:012}", args.prefix), value);
        }
        self.next_key = end;
        Some(batch)
    }
}

fn report_load(args: &LoadArgs, bytes: u64, started: Instant, seq: u64) {
    println!(
        "Loaded {} keys x {} column families ({}) in {:.2}s; shard at seq {seq}",
        args.keys,
        args.cfs.len(),
        human_bytes(bytes),
        started.elapsed().as_secs_f64(),
    );
}

fn run_load<E: ShardEngine>(args: &LoadArgs, db: &Path) -> Result<()> {
    let engine = E::open(db, &args.cfs)?;
    let started = Instant::now();
    let mut generator = Generator::new(args);
    while let Some(batch) = generator.next_batch() {
        engine.write(&batch)?;
    }
    report_load(args, generator.bytes, started, engine.latest_seq().0);
    Ok(())
}

/// [`run_load_remote`] on one thread of its own (a current-thread runtime). A load generator
/// shares the machine with what it measures (`make bench` runs 8 of them next to 8 agents on
/// 2 cores): on the multi-thread runtime every request hopped between threads, and the 8
/// writers of the steady load took 53% of a core; on one thread, 29%.
async fn run_load_remote_on_one_thread(args: &LoadArgs, endpoint: &str) -> Result<()> {
    let (args, endpoint) = (args.clone(), endpoint.to_string());
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| {
                Error::with_source(ErrorCode::AgentUnavailable, "start the load runtime", err)
            })?;
        runtime.block_on(run_load_remote(&args, &endpoint))
    })
    .await
    .map_err(|err| {
        Error::new(
            ErrorCode::AgentUnavailable,
            format!("the load task failed: {err}"),
        )
    })?
}

/// `load --endpoint`: the same data through a serving agent, each batch acknowledged before
/// the next is sent (so it can run while backups are taken).
async fn run_load_remote(args: &LoadArgs, endpoint: &str) -> Result<()> {
    use lockstep_proto::v1;
    let tls = &args.tls;
    let (security, bearer) = lockstep_proto::tls::client_credentials(
        tls.ca.as_deref(),
        tls.cert.as_deref(),
        tls.key.as_deref(),
        tls.token_file.as_deref(),
    )?;
    let channel = lockstep_proto::tls::endpoint(
        endpoint,
        &security,
        lockstep_proto::tls::Expected::AnyAgent,
    )?
    .connect()
    .await
    .map_err(|err| {
        Error::with_source(
            ErrorCode::AgentUnavailable,
            format!("connect to the agent at {endpoint}"),
            err,
        )
    })?;
    let mut client = v1::shard_client::ShardClient::with_interceptor(channel, bearer);
    let started = Instant::now();
    let mut generator = Generator::new(args);
    let mut seq = 0;
    let mut pace = (args.batches_per_sec > 0).then(|| {
        let mut every = tokio::time::interval(Duration::from_secs_f64(
            1.0 / f64::from(args.batches_per_sec),
        ));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every
    });
    while let Some(batch) = generator.next_batch() {
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        let ops = batch
            .ops
            .into_iter()
            .filter_map(|op| match op {
                crate::engine::Op::Put { cf, key, value } => Some(v1::WriteOp {
                    kind: v1::write_op::Kind::Put as i32,
                    column_family: cf,
                    key,
                    value,
                    end_key: Vec::new(),
                }),
                _ => None,
            })
            .collect();
        let reply = client
            .write(v1::WriteRequest { ops })
            .await
            .map_err(|s| lockstep_proto::from_status("write", &s))?;
        seq = reply.into_inner().last_seq;
    }
    report_load(args, generator.bytes, started, seq);
    Ok(())
}

fn run_digest<E: ShardEngine>(args: &DigestArgs) -> Result<()> {
    if !args.db.exists() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("{} does not exist", args.db.display()),
        ));
    }
    let engine = E::open(&args.db, &[])?;
    let mut hasher = Sha256::new();
    let mut n_keys = 0u64;
    let mut families = engine.column_families();
    families.sort();
    for cf in &families {
        hasher.update((cf.len() as u64).to_le_bytes());
        hasher.update(cf.as_bytes());
        let mut start: Vec<u8> = Vec::new();
        loop {
            let page = engine.scan(cf, &start, None, 10_000)?;
            let Some((last, _)) = page.last() else { break };
            start = last.clone();
            start.push(0);
            for (key, value) in &page {
                n_keys += 1;
                hasher.update((key.len() as u64).to_le_bytes());
                hasher.update(key);
                hasher.update((value.len() as u64).to_le_bytes());
                hasher.update(value);
            }
        }
    }
    let digest = hex::encode(hasher.finalize());
    if args.json {
        print_json(
            &serde_json::json!({ "seq": engine.latest_seq(), "keys": n_keys, "column_families": families, "sha256": digest }),
        );
    } else {
        println!(
            "seq={} keys={} cfs={} sha256={digest}",
            engine.latest_seq(),
            n_keys,
            families.join(",")
        );
    }
    Ok(())
}

/// Clap requires `--db` or `--endpoint`; this keeps a bad parse from panicking anyway.
fn no_shard_named() -> Result<()> {
    Err(Error::new(
        ErrorCode::InvalidArgument,
        "name the shard with --db DIR or --endpoint URL",
    ))
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let result = match &cli.command {
        Command::Serve(args) => with_engine!(args.engine.name(), |E| run_serve::<E>(args).await),
        Command::Backup(args) => {
            with_engine!(args.engine.name(), |E| run_backup::<E>(args).await)
        }
        Command::List(args) => run_list(args).await,
        Command::Verify(args) => match run_verify(args).await {
            Ok(true) => Ok(()),
            Ok(false) => return ErrorCode::BackupVerificationFailed.exit_code(),
            Err(err) => Err(err),
        },
        Command::Restore(args) => run_restore(args).await,
        Command::Load(args) => match (&args.db, &args.endpoint) {
            (Some(db), _) => with_engine!(args.engine.name(), |E| run_load::<E>(args, db)),
            (None, Some(endpoint)) => run_load_remote_on_one_thread(args, endpoint).await,
            (None, None) => no_shard_named(),
        },
        Command::Digest(args) => with_engine!(args.engine.name(), |E| run_digest::<E>(args)),
    };
    match result {
        Ok(()) => 0,
        Err(err) => lockstep_process::report_error(&err),
    }
}
