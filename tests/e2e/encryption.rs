//! Encryption at rest (DESIGN §15), against real processes and stores: an encrypted
//! repository round-trips on file:// and s3:// (moto) and holds no key or value of the data
//! in plaintext; an encrypted cluster backs up, ships sealed WAL and restores to a point in
//! time; a passphrase change keeps every backup restorable and locks the old passphrase out;
//! a wrong or missing passphrase is refused with ERR_ENCRYPTION_KEY; a flipped byte in a
//! sealed object is ERR_BACKUP_CHECKSUM_MISMATCH.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use lockstep_repository::Repository;
use lockstep_repository::seal::PASSPHRASE_FILE_ENV;
use lockstep_tests::{Moto, binary, files_under, text};
use object_store::{ObjectStore, ObjectStoreExt};

use crate::cluster::{Cluster, N_AGENTS};
use crate::pitr::{Acked, keys_in, seq_vector, state, wait_shipped, write};

/// Whether `bytes` hold a key of the round trip's workload (`k` and 8 digits): one is in
/// every RocksDB file of it, and random bytes hold one about once in 10^13 windows.
fn holds_workload_key(bytes: &[u8]) -> bool {
    bytes
        .windows(9)
        .any(|w| w[0] == b'k' && w[1..].iter().all(u8::is_ascii_digit))
}

fn passphrase_option(dir: &Path, passphrase: &str) -> (String, String) {
    let file = dir.join("passphrase");
    std::fs::write(&file, passphrase).expect("write the passphrase");
    (PASSPHRASE_FILE_ENV.to_string(), file.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_round_trip_on_file_holds_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let option = passphrase_option(dir.path(), "file passphrase");
    let url = format!("file://{}", repo_dir.display());
    let repo = Repository::open_with(&url, &[option])
        .await
        .expect("create");
    assert!(repo.seal().is_sealed());
    let source = crate::round_trip::round_trip(repo).await;
    // The control: the shard itself holds the workload's keys where a grep finds them.
    assert!(
        files_under(source.path())
            .iter()
            .any(|f| holds_workload_key(&std::fs::read(f).expect("read"))),
        "the grep finds keys in plaintext files"
    );
    for file in files_under(&repo_dir) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            !holds_workload_key(&bytes),
            "{} holds a key",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_round_trip_on_s3_holds_no_plaintext() {
    let moto = Moto::start("lockstep-sealed");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = moto.env();
    options.push(passphrase_option(dir.path(), "s3 passphrase"));
    let url = "s3://lockstep-sealed/backups";
    let repo = Repository::open_with(url, &options).await.expect("create");
    assert!(repo.seal().is_sealed());
    crate::round_trip::round_trip(repo).await;
    // Every object in the bucket, read with the store's own client.
    let objects = bucket(&moto, url).await;
    assert!(objects.len() > 10, "{} objects", objects.len());
    for (name, bytes) in objects {
        assert!(!holds_workload_key(&bytes), "{name} holds a key");
    }
    // Opened without the passphrase, or with another, the repository is refused.
    let locked = Repository::open_with(url, &moto.env())
        .await
        .expect_err("no passphrase");
    assert_eq!(locked.code.as_str(), "ERR_ENCRYPTION_KEY", "{locked}");
    let mut wrong = moto.env();
    wrong.push(passphrase_option(dir.path(), "not the s3 passphrase"));
    let wrong = Repository::open_with(url, &wrong).await.expect_err("wrong");
    assert_eq!(wrong.code.as_str(), "ERR_ENCRYPTION_KEY", "{wrong}");
}

/// Every object under `url` on `moto`, read with the store's own client: name and bytes.
async fn bucket(moto: &Moto, url: &str) -> Vec<(String, Vec<u8>)> {
    let mut builder = object_store::aws::AmazonS3Builder::new().with_url(url);
    for (key, value) in moto.env() {
        builder = builder.with_config(key.to_ascii_lowercase().parse().expect("option"), value);
    }
    let store = builder.build().expect("s3 client");
    let metas: Vec<_> = store.list(None).try_collect().await.expect("list");
    let mut out = Vec::new();
    for meta in metas {
        let bytes = store.get(&meta.location).await.expect("get").bytes().await;
        out.push((meta.location.to_string(), bytes.expect("bytes").to_vec()));
    }
    out
}

/// `lockstep-agent ARGS` with the passphrase in `passphrase_file` (none: without any).
fn agent_with(args: &[&str], passphrase_file: Option<&Path>) -> std::process::Output {
    let mut command = std::process::Command::new(binary("lockstep-agent"));
    command
        .args(args)
        .env_remove(PASSPHRASE_FILE_ENV)
        .env_remove("LOCKSTEP_PASSPHRASE");
    if let Some(file) = passphrase_file {
        command.env(PASSPHRASE_FILE_ENV, file);
    }
    command.output().expect("run lockstep-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_cluster_ships_sealed_wal_restores_in_time_and_survives_a_passphrase_change() {
    let mut cluster = Cluster::start_encrypted(10_000, "the first passphrase");
    let repo = cluster.repo().display().to_string();
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    for n in 0..20 {
        for (i, shard) in history.iter_mut().enumerate() {
            shard.push(write(&cluster, i, format!("secret-key-{n:04}"), false).await);
        }
    }
    let backup = cluster.backup("full");
    for n in 20..60 {
        for (i, shard) in history.iter_mut().enumerate() {
            shard.push(write(&cluster, i, format!("secret-key-{n:04}"), n % 7 == 0).await);
        }
    }
    wait_shipped(&cluster).await;

    // Nothing of the data is in plaintext in the repository or the WAL archive.
    let stored: Vec<PathBuf> = files_under(&cluster.repo())
        .into_iter()
        .chain(files_under(&cluster.archive()))
        .collect();
    assert!(
        stored
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "seg"))
    );
    for file in &stored {
        let bytes = std::fs::read(file).expect("read");
        assert!(
            !bytes.windows(11).any(|w| w == b"secret-key-"),
            "{} holds a key in plaintext",
            file.display()
        );
    }

    // A restore to a sequence vector past the backup: objects and sealed WAL opened.
    let targets: Vec<u64> = history.iter().map(|shard| shard[45].seq).collect();
    let to = cluster.dir.path().join("pitr");
    let restored = cluster.lockstep(&[
        "restore",
        "--to-seq",
        &seq_vector(&targets),
        "--to",
        to.to_str().expect("utf-8"),
    ]);
    assert!(restored.status.success(), "{}", text(&restored));
    for (i, target) in targets.iter().enumerate() {
        assert_eq!(
            keys_in(&to.join(Cluster::shard(i))),
            state(&history[i], |w| w.seq <= *target),
            "shard {i} at seq {target}"
        );
    }

    // The archive carries the repository's sealed keys: after a disaster a new repository
    // adopts them and opens the archive's WAL with the passphrase.
    let archive = cluster.archive().display().to_string();
    assert!(cluster.archive().join("lockstep-encryption.json").exists());
    let fresh = cluster
        .dir
        .path()
        .join("new-repository")
        .display()
        .to_string();
    let imported = cluster.lockstep(&["key", "import", "--repo", &fresh, "--from", &archive]);
    assert!(imported.status.success(), "{}", text(&imported));
    let passphrase = cluster.repo_env[0].clone();
    let adopted = Repository::open_with(&fresh, &[passphrase])
        .await
        .expect("the new repository opens with the passphrase");
    let shipped = Repository::open_archive(&archive, adopted.seal())
        .await
        .expect("archive");
    for i in 0..N_AGENTS {
        let shard = lockstep_repository::ShardId::new(Cluster::shard(i)).expect("shard");
        let mut batches = 0;
        for lineage in shipped.wal_lineages(&shard).await.expect("lineages") {
            for info in shipped.wal_segments(&shard, &lineage).await.expect("list") {
                let segment = shipped.get_wal_segment(&info).await.expect("opens");
                batches += segment.batches.len();
            }
        }
        assert!(batches >= 60, "shard {i}: {batches} batches");
    }
    let again = cluster.lockstep(&["key", "import", "--repo", &repo, "--from", &archive]);
    assert!(
        !again.status.success() && text(&again).contains("is not new"),
        "only a new repository adopts keys: {}",
        text(&again)
    );

    // The passphrase changes: the old one opens nothing, the new one every backup.
    let new_file = cluster.dir.path().join("new-passphrase");
    std::fs::write(&new_file, "the second passphrase\n").expect("write");
    let listed = cluster.lockstep(&["key", "list", "--repo", &repo, "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let slots = crate::cluster::json(&listed);
    assert_eq!(slots.as_array().map(Vec::len), Some(1), "{slots:#}");
    assert!(!text(&listed).contains("sealed_key"), "{}", text(&listed));
    let changed = cluster.lockstep(&[
        "key",
        "passwd",
        "--repo",
        &repo,
        "--new-passphrase-file",
        new_file.to_str().expect("utf-8"),
    ]);
    assert!(changed.status.success(), "{}", text(&changed));
    let old_file = PathBuf::from(&cluster.repo_env[0].1);
    let target = cluster.dir.path().join("restored-after-passwd");
    let restore = |file: Option<&Path>| {
        agent_with(
            &[
                "restore",
                "--repo",
                &repo,
                "--backup",
                &backup,
                "--shard",
                &Cluster::shard(0),
                "--to",
                target.to_str().expect("utf-8"),
            ],
            file,
        )
    };
    for refused in [restore(Some(&old_file)), restore(None)] {
        assert!(!refused.status.success());
        assert!(
            text(&refused).contains("ERR_ENCRYPTION_KEY"),
            "{}",
            text(&refused)
        );
    }
    let output = restore(Some(&new_file));
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        keys_in(&target),
        state(&history[0], |w| w.key.as_str() < "secret-key-0020")
    );
    // The running cluster holds its keys: it backs up on, under the new passphrase too.
    cluster.repo_env = vec![(
        PASSPHRASE_FILE_ENV.to_string(),
        new_file.display().to_string(),
    )];
    cluster.kill_coordinator();
    cluster.start_coordinator(None);
    cluster.backup("incremental");

    // A flipped byte in a sealed object: verify finds it, as a checksum mismatch.
    let object = files_under(&cluster.repo().join("objects"))
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .expect("an object");
    let mut bytes = std::fs::read(&object).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&object, bytes).expect("write");
    let verify = agent_with(
        &["verify", "--repo", &repo, "--full", "--json"],
        Some(&new_file),
    );
    assert!(!verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("ERR_BACKUP_CHECKSUM_MISMATCH"),
        "{}",
        text(&verify)
    );
}

/// Runs `lockstep-agent ARGS` with `env` (debug logging on) and returns its exit status and
/// everything it printed.
fn agent_printing(args: &[&str], env: &[(String, String)]) -> (bool, String) {
    let output = std::process::Command::new(binary("lockstep-agent"))
        .args(args)
        .env_remove(PASSPHRASE_FILE_ENV)
        .env("LOCKSTEP_LOG", "debug")
        .envs(env.iter().cloned())
        .output()
        .expect("run lockstep-agent");
    (output.status.success(), text(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_passphrase_or_s3_key_reaches_output_logs_errors_or_the_bucket() {
    let moto = Moto::start("lockstep-secrets");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let db = db.to_str().expect("utf-8");
    lockstep_tests::agent_ok(&["load", "--db", db, "--keys", "2000"]);
    let (s3_secret, passphrase) = ("s3-secret-4f1c2b7e9d0a6c3b", "passphrase-8e2d4a6f1b3c5d7e");
    // Moto takes any credentials: the secret key is ours, so a grep finds it wherever it went.
    let env: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "AWS_SECRET_ACCESS_KEY" => (k, s3_secret.to_string()),
            _ => (k, v),
        })
        .chain([("LOCKSTEP_PASSPHRASE".to_string(), passphrase.to_string())])
        .collect();
    let repo = "s3://lockstep-secrets/repo";
    let restored = dir.path().join("restored");
    let mut printed = Vec::new();
    for (args, succeeds) in [
        (vec!["backup", "--db", db, "--repo", repo, "--json"], true),
        (vec!["list", "--repo", repo, "--json"], true),
        (vec!["verify", "--repo", repo, "--full", "--json"], true),
        (
            vec![
                "restore",
                "--repo",
                repo,
                "--backup",
                "latest",
                "--to",
                restored.to_str().expect("utf-8"),
            ],
            true,
        ),
        // Errors: a bucket that does not exist, and a backup that does not.
        (vec!["list", "--repo", "s3://no-such-bucket/repo"], false),
        (
            vec![
                "restore", "--repo", repo, "--backup", "b-none", "--to", "/nowhere",
            ],
            false,
        ),
    ] {
        let (ok, output) = agent_printing(&args, &env);
        assert_eq!(ok, succeeds, "{args:?}: {output}");
        printed.push((format!("{args:?}"), output));
    }
    // A wrong passphrase is an error that names no passphrase.
    let wrong: Vec<(String, String)> = env
        .iter()
        .cloned()
        .map(|(k, v)| match k.as_str() {
            "LOCKSTEP_PASSPHRASE" => (k, "another-passphrase-1a2b3c".to_string()),
            _ => (k, v),
        })
        .collect();
    let (ok, output) = agent_printing(&["list", "--repo", repo], &wrong);
    assert!(!ok && output.contains("ERR_ENCRYPTION_KEY"), "{output}");
    assert!(!output.contains("another-passphrase"), "{output}");
    printed.push(("wrong passphrase".into(), output));
    // The bucket as its owner sees it.
    let objects = bucket(&moto, repo).await;
    assert!(!objects.is_empty());
    for (name, bytes) in objects {
        printed.push((name, String::from_utf8_lossy(&bytes).into_owned()));
    }
    for (what, text) in &printed {
        for secret in [s3_secret, passphrase] {
            assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    }
}
