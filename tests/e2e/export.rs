//! Export and import: a backup with its chain, and a tag with the WAL its restore replays,
//! leave the cluster as one file; a new repository imports them and restores them key by key
//! as the model says, as does a bare machine with `lockstep-agent restore --from-file`; a
//! damaged file is refused and publishes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lockstep_repository::codec;
use lockstep_tests::{agent_ok, binary, text};

use crate::cluster::{Cluster, N_AGENTS, json};
use crate::pitr::{Acked, keys_in, state, wait_shipped, write};

/// Writes `n` keys named `name-k` to every shard (every fifth deletes an earlier one).
async fn round(cluster: &Cluster, history: &mut [Vec<Acked>], name: &str, n: usize) {
    for (shard, writes) in history.iter_mut().enumerate() {
        for k in 0..n {
            let deleted = k % 5 == 4;
            let key = if deleted {
                format!("{name}-{:03}", k - 2)
            } else {
                format!("{name}-{k:03}")
            };
            writes.push(write(cluster, shard, key, deleted).await);
        }
    }
}

fn states(history: &[Vec<Acked>]) -> Vec<BTreeSet<String>> {
    history
        .iter()
        .map(|writes| state(writes, |_| true))
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn export(cluster: &Cluster, what: &[&str], file: &Path) {
    let mut args = vec!["backup", "export"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", path(file)]);
    let output = cluster.lockstep(&args);
    assert!(
        output.status.success(),
        "export {what:?}: {}",
        text(&output)
    );
    assert!(text(&output).contains("Exported to"), "{}", text(&output));
}

/// `lockstep-agent restore --from-file` of every shard; each shard's keys.
fn from_file(file: &Path, dir: &Path, env: &[(String, String)]) -> Vec<BTreeSet<String>> {
    (0..N_AGENTS)
        .map(|i| {
            let target = dir.join(Cluster::shard(i));
            let output = std::process::Command::new(binary("lockstep-agent"))
                .args([
                    "restore",
                    "--from-file",
                    path(file),
                    "--shard",
                    &Cluster::shard(i),
                    "--to",
                    path(&target),
                ])
                .envs(env.iter().cloned())
                .env_remove("LOCKSTEP_REPO")
                .output()
                .expect("run lockstep-agent");
            assert!(output.status.success(), "shard {i}: {}", text(&output));
            keys_in(&target)
        })
        .collect()
}

fn restored(cluster: &Cluster, args: &[&str], dir: &Path) -> Vec<BTreeSet<String>> {
    let mut all = vec!["restore"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--to", path(dir)]);
    let output = cluster.lockstep(&all);
    assert!(
        output.status.success(),
        "restore {args:?}: {}",
        text(&output)
    );
    (0..N_AGENTS)
        .map(|i| keys_in(&dir.join(Cluster::shard(i))))
        .collect()
}

/// Leftovers of unpacking or staging beside a restore target.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().contains(".lockstep-restore-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_chain_and_tag_restore_exactly_in_a_new_repository_and_from_the_file() {
    let source = Cluster::start(5000, None);
    let mut history = vec![Vec::new(); N_AGENTS];
    round(&source, &mut history, "a", 30).await;
    let full = source.backup("full");
    round(&source, &mut history, "b", 30).await;
    let incremental = source.backup("incremental");
    let at_incremental = states(&history);
    round(&source, &mut history, "c", 30).await;
    let tagged = source.lockstep(&["tag", "create", "before-move"]);
    assert!(tagged.status.success(), "{}", text(&tagged));
    let at_tag = states(&history);
    wait_shipped(&source).await;
    round(&source, &mut history, "d", 10).await;

    let files = tempfile::tempdir().expect("tempdir");
    let chain_file = files.path().join("chain.tar.zst");
    let tag_file = files.path().join("tag.tar.zst");
    export(&source, &[&incremental], &chain_file);
    export(&source, &["--tag", "before-move"], &tag_file);
    let again = source.lockstep(&["backup", "export", &full, "-o", path(&chain_file)]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("exists"), "{}", text(&again));
    assert!(
        !files.path().join("chain.tar.zst.partial").exists(),
        "no partial file is left"
    );
    assert!(
        std::fs::read_dir(files.path()).expect("list").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")),
        "no partial file is left"
    );

    // A bare machine: no repository, only the files.
    let bare = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        from_file(&chain_file, &bare.path().join("chain"), &[]),
        at_incremental
    );
    assert_eq!(from_file(&tag_file, &bare.path().join("tag"), &[]), at_tag);
    assert!(leftovers(&bare.path().join("chain")).is_empty());
    let unknown = std::process::Command::new(binary("lockstep-agent"))
        .args([
            "restore",
            "--from-file",
            path(&chain_file),
            "--shard",
            "shard-9",
            "--to",
            path(&bare.path().join("unknown")),
        ])
        .output()
        .expect("run lockstep-agent");
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(
        text(&unknown).contains("no shard shard-9"),
        "{}",
        text(&unknown)
    );
    assert!(
        leftovers(bare.path()).is_empty(),
        "{:?}",
        leftovers(bare.path())
    );

    // A damaged file, imported into a new repository: refused, nothing published.
    let target = Cluster::start(5000, None);
    let damaged = files.path().join("damaged.tar.zst");
    let mut bytes = std::fs::read(&chain_file).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&damaged, bytes).expect("write");
    let refused = target.lockstep(&["backup", "import", path(&damaged)]);
    assert!(!refused.status.success(), "a damaged file imported");
    assert!(
        text(&refused).contains("ERR_BACKUP_CHECKSUM_MISMATCH"),
        "{}",
        text(&refused)
    );
    assert!(target.listed().is_empty(), "a damaged import published");
    let bare_damaged = std::process::Command::new(binary("lockstep-agent"))
        .args([
            "restore",
            "--from-file",
            path(&damaged),
            "--shard",
            "shard-0",
            "--to",
            path(&bare.path().join("damaged")),
        ])
        .output()
        .expect("run lockstep-agent");
    assert!(!bare_damaged.status.success(), "a damaged file restored");
    assert!(!bare.path().join("damaged").exists());
    assert!(
        leftovers(bare.path()).is_empty(),
        "{:?}",
        leftovers(bare.path())
    );

    // The whole files, into the new repository.
    let imported = target.lockstep(&["backup", "import", path(&chain_file), "--json"]);
    assert!(imported.status.success(), "{}", text(&imported));
    let report = json(&imported);
    assert_eq!(report["backup_ids"], serde_json::json!([full, incremental]));
    assert_eq!(target.listed(), vec![full.clone(), incremental.clone()]);
    let imported = target.lockstep(&["backup", "import", path(&tag_file)]);
    assert!(imported.status.success(), "{}", text(&imported));
    assert!(
        text(&imported).contains("already here"),
        "{}",
        text(&imported)
    );
    let verify = target.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // A repository holding backups of its own takes a file that adds backups only when told
    // to: the file's would become its newest. One it holds whole comes in as before.
    let own = target.backup("full");
    let later = source.backup("full");
    let later_file = files.path().join("later.tar.zst");
    export(&source, &[&later], &later_file);
    let refused = target.lockstep(&["backup", "import", path(&later_file)]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("--force"), "{}", text(&refused));
    assert_eq!(
        target.listed(),
        vec![full.clone(), incremental.clone(), own.clone()]
    );
    let again = target.lockstep(&["backup", "import", path(&chain_file)]);
    assert!(again.status.success(), "{}", text(&again));
    let forced = target.lockstep(&["backup", "import", path(&later_file), "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(
        target.listed(),
        vec![full.clone(), incremental.clone(), own, later]
    );

    let restores = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        restored(&target, &[&incremental], &restores.path().join("chain")),
        at_incremental
    );
    assert_eq!(
        restored(
            &target,
            &["--tag", "before-move", "--wal-from", path(&target.repo())],
            &restores.path().join("tag"),
        ),
        at_tag
    );
    // And offline, from the new repository: an incremental through its chain.
    let offline = restores.path().join("offline");
    agent_ok(&[
        "restore",
        "--repo",
        path(&target.repo()),
        "--backup",
        &incremental,
        "--shard",
        "shard-1",
        "--to",
        path(&offline),
    ]);
    assert_eq!(keys_in(&offline), at_incremental[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_repository_exports_an_encrypted_file() {
    let source = Cluster::start_encrypted(5000, "correct horse battery staple");
    let mut history = vec![Vec::new(); N_AGENTS];
    round(&source, &mut history, "secret-key", 20).await;
    let full = source.backup("full");
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("sealed.tar.zst");
    export(&source, &[&full], &file);

    // Every object and manifest in the file is sealed, as in the repository.
    let decoder = zstd::Decoder::new(std::fs::File::open(&file).expect("open")).expect("zstd");
    let mut archive = tar::Archive::new(decoder);
    let (mut objects, mut records) = (0, 0);
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let name = entry.path().expect("path").display().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).expect("read");
        if name.starts_with("objects/") {
            assert!(codec::is_sealed(&bytes), "{name} is not sealed");
            objects += 1;
        } else if name.starts_with("shards/") || name.starts_with("backups/") {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&bytes).is_err(),
                "{name} is readable"
            );
            records += 1;
        }
    }
    assert!(
        objects > 0 && records == N_AGENTS + 1,
        "{objects} objects, {records} records"
    );
    // Restored with the repository's passphrase; refused without it.
    let bare = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        from_file(&file, &bare.path().join("with"), &source.repo_env),
        states(&history)
    );
    let without = std::process::Command::new(binary("lockstep-agent"))
        .args([
            "restore",
            "--from-file",
            path(&file),
            "--shard",
            "shard-0",
            "--to",
            path(&bare.path().join("without")),
        ])
        .env_remove("LOCKSTEP_PASSPHRASE_FILE")
        .env_remove("LOCKSTEP_PASSPHRASE")
        .output()
        .expect("run lockstep-agent");
    assert!(!without.status.success(), "restored without the passphrase");
    // A plaintext repository cannot take it: it lacks the key.
    let plaintext = Cluster::start(5000, None);
    let refused = plaintext.lockstep(&["backup", "import", path(&file)]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("key import"), "{}", text(&refused));
    assert!(plaintext.listed().is_empty());

    // The other way, a plaintext file goes into the encrypted repository: every object
    // sealed again under another name (a keyed hash), the manifests renamed to match.
    let mut plain_history = vec![Vec::new(); N_AGENTS];
    round(&plaintext, &mut plain_history, "plain", 20).await;
    let plain_full = plaintext.backup("full");
    let plain_file = files.path().join("plain.tar.zst");
    export(&plaintext, &[&plain_full], &plain_file);
    let imported = source.lockstep(&["backup", "import", path(&plain_file), "--force"]);
    assert!(imported.status.success(), "{}", text(&imported));
    let verify = source.lockstep(&["backup", "verify", &plain_full, "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert_eq!(
        restored(&source, &[&plain_full], &bare.path().join("plain")),
        states(&plain_history)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_waits_for_the_backup_holding_the_cluster_then_publishes() {
    let source = Cluster::start(5000, None);
    let mut history = vec![Vec::new(); N_AGENTS];
    round(&source, &mut history, "moved", 10).await;
    let full = source.backup("full");
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("full.tar.zst");
    export(&source, &[&full], &file);

    // The target's backup holds the cluster, paused before it publishes.
    let target = Cluster::start(10_000, Some("before-publish:3000"));
    let backup = target.spawn_lockstep(&["backup", "create", "--wait", "--json"]);
    target.wait_for_fault_pause().await;
    let imported = target.lockstep(&["backup", "import", path(&file)]);
    assert!(imported.status.success(), "{}", text(&imported));
    let backup = backup.wait_with_output().expect("backup");
    assert!(backup.status.success(), "{}", text(&backup));
    let own = json(&backup)["backup_id"]
        .as_str()
        .expect("backup id")
        .to_string();
    // The import was published after the backup it waited for.
    assert_eq!(target.listed(), vec![own, full.clone()]);
    let restores = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        restored(&target, &[&full], &restores.path().join("moved")),
        states(&history)
    );
}
