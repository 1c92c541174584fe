//! Damaged repositories, through the real `lockstep-agent` binary: a flipped byte, a deleted
//! object and a truncated manifest are each reported with their seed code, and a restore
//! from damaged data refuses and leaves nothing at the target.

use std::path::{Path, PathBuf};

use lockstep_tests::{agent, agent_ok, text};

struct Fixture {
    dir: tempfile::TempDir,
    repo: PathBuf,
    backup: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let repo = dir.path().join("repo");
        agent_ok(&[
            "load",
            "--db",
            path(&db),
            "--keys",
            "20000",
            "--value-size",
            "200",
            "--cfs",
            "default,users,events",
        ]);
        let out = agent_ok(&["backup", "--db", path(&db), "--repo", path(&repo), "--json"]);
        let manifest: serde_json::Value = serde_json::from_str(&out).expect("backup --json");
        let backup = manifest["backup_id"]
            .as_str()
            .expect("backup_id")
            .to_string();
        Fixture { dir, repo, backup }
    }

    fn shard_manifest_path(&self) -> PathBuf {
        self.repo
            .join("shards/shard-0")
            .join(format!("{}.json", self.backup))
    }

    /// The first SST file of the backup and the path of its first object.
    fn sst_object(&self) -> (String, PathBuf) {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.shard_manifest_path()).expect("read manifest"),
        )
        .expect("parse");
        let file = manifest["files"]
            .as_array()
            .expect("files")
            .iter()
            .find(|f| f["kind"] == "sst" && f["size"].as_u64() > Some(1000))
            .expect("an SST file");
        let id = file["chunks"][0]["id"]
            .as_str()
            .expect("chunk id")
            .to_string();
        (
            file["name"].as_str().expect("name").to_string(),
            self.repo.join("objects").join(&id[..2]).join(&id),
        )
    }

    fn repo(&self) -> &str {
        path(&self.repo)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn assert_nothing_left(parent: &Path, target: &Path) {
    assert!(!target.exists(), "restore left {} behind", target.display());
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .expect("list parent")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("lockstep-restore"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging directories left behind: {leftovers:?}"
    );
}

#[test]
fn a_flipped_byte_fails_full_verify_and_restore() {
    let fx = Fixture::new();
    let (file, object) = fx.sst_object();
    let mut bytes = std::fs::read(&object).expect("read object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).expect("write object");

    // Quick verify only checks presence and sizes, so it still passes.
    agent_ok(&["verify", "--repo", fx.repo()]);

    let full = agent(&["verify", "--repo", fx.repo(), "--full"]);
    let out = text(&full);
    assert!(
        !full.status.success(),
        "full verify passed on a corrupt object:\n{out}"
    );
    assert!(out.contains("ERR_BACKUP_CHECKSUM_MISMATCH"), "{out}");
    assert!(
        out.contains(&format!("file={file}")),
        "the report names the file {file}:\n{out}"
    );
    assert!(out.contains("Backup verification: FAILED"), "{out}");

    let target = fx.dir.path().join("restored");
    let restore = agent(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        &fx.backup,
        "--to",
        path(&target),
    ]);
    let out = text(&restore);
    assert!(
        !restore.status.success(),
        "restore succeeded from a corrupt object:\n{out}"
    );
    assert!(out.contains("ERR_BACKUP_CHECKSUM_MISMATCH"), "{out}");
    assert_nothing_left(fx.dir.path(), &target);
}

#[test]
fn a_deleted_object_fails_quick_verify() {
    let fx = Fixture::new();
    let (file, object) = fx.sst_object();
    std::fs::remove_file(&object).expect("delete object");
    let quick = agent(&["verify", "--repo", fx.repo(), "--backup", &fx.backup]);
    let out = text(&quick);
    assert!(!quick.status.success(), "{out}");
    assert!(
        out.contains("ERR_BACKUP_INCOMPLETE") && out.contains("is missing"),
        "{out}"
    );
    assert!(out.contains(&format!("file={file}")), "{out}");

    let target = fx.dir.path().join("restored");
    let restore = agent(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        "latest",
        "--to",
        path(&target),
    ]);
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("ERR_BACKUP_INCOMPLETE"),
        "{}",
        text(&restore)
    );
    assert_nothing_left(fx.dir.path(), &target);
}

#[test]
fn a_truncated_manifest_is_reported_as_corrupt() {
    let fx = Fixture::new();
    let manifest = fx.shard_manifest_path();
    let bytes = std::fs::read(&manifest).expect("read manifest");
    std::fs::write(&manifest, &bytes[..bytes.len() / 3]).expect("truncate manifest");

    let quick = agent(&["verify", "--repo", fx.repo()]);
    let out = text(&quick);
    assert!(!quick.status.success(), "{out}");
    assert!(out.contains("ERR_BACKUP_MANIFEST_CORRUPT"), "{out}");

    let target = fx.dir.path().join("restored");
    let restore = agent(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        &fx.backup,
        "--to",
        path(&target),
    ]);
    assert!(!restore.status.success());
    assert!(
        text(&restore).contains("ERR_BACKUP_MANIFEST_CORRUPT"),
        "{}",
        text(&restore)
    );
    assert_nothing_left(fx.dir.path(), &target);

    // A truncated backup manifest too: listing still works and names the problem.
    let backup_manifest = fx.repo.join("backups").join(format!("{}.json", fx.backup));
    std::fs::write(&backup_manifest, b"{\"format_version\": 1, \"backup_").expect("truncate");
    let list = agent_ok(&["list", "--repo", fx.repo()]);
    assert!(list.contains("ERR_BACKUP_MANIFEST_CORRUPT"), "{list}");
}

#[test]
fn restore_round_trips_and_refuses_a_non_empty_target() {
    let fx = Fixture::new();
    let db = fx.dir.path().join("db");
    let before = agent_ok(&["digest", "--db", path(&db)]);
    let target = fx.dir.path().join("restored");
    let out = agent_ok(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        "latest",
        "--to",
        path(&target),
    ]);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(agent_ok(&["digest", "--db", path(&target)]), before);

    let again = agent(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        &fx.backup,
        "--to",
        path(&target),
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("ERR_RESTORE_TARGET_NOT_EMPTY"),
        "{}",
        text(&again)
    );
    assert_eq!(
        agent_ok(&["digest", "--db", path(&target)]),
        before,
        "the existing target was not touched"
    );

    let missing = agent(&[
        "restore",
        "--repo",
        fx.repo(),
        "--backup",
        "bk-nope",
        "--to",
        path(&fx.dir.path().join("x")),
    ]);
    assert_eq!(missing.status.code(), Some(3), "{}", text(&missing));
    assert!(text(&missing).contains("ERR_BACKUP_NOT_FOUND"));
    assert!(text(&missing).contains("Solution:"));
}
