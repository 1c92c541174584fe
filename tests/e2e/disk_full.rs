//! A restore onto a filesystem that fills up fails with `ERR_STORAGE_DISK_FULL` and leaves
//! nothing behind. The restore runs in a private mount namespace on a 2 MiB tmpfs.

use std::process::Command;

use lockstep_tests::{agent_ok, binary, text};

#[test]
fn restore_onto_a_full_disk_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let repo = dir.path().join("repo");
    let mount = dir.path().join("small-disk");
    std::fs::create_dir(&mount).expect("mkdir");
    let (db, repo, mount) = (
        db.to_str().expect("utf-8"),
        repo.to_str().expect("utf-8"),
        mount.to_str().expect("utf-8"),
    );
    // About 8 MiB of incompressible data: four times the size of the disk.
    agent_ok(&[
        "load",
        "--db",
        db,
        "--keys",
        "8000",
        "--value-size",
        "1024",
        "--random-fraction",
        "1.0",
    ]);
    agent_ok(&["backup", "--db", db, "--repo", repo]);

    let script = format!(
        "mount -t tmpfs -o size=2m lockstep-test {mount} || exit 97; \
         '{agent}' restore --repo '{repo}' --backup latest --to {mount}/target; rc=$?; \
         echo \"left:$(ls -A {mount} | tr '\\n' ' ')\"; exit $rc",
        agent = binary("lockstep-agent").display(),
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    let out = text(&output);
    assert_ne!(
        output.status.code(),
        Some(97),
        "could not mount a tmpfs (this test needs root):\n{out}"
    );
    assert!(
        !output.status.success(),
        "restore onto a 2 MiB disk succeeded:\n{out}"
    );
    assert!(out.contains("ERR_STORAGE_DISK_FULL"), "{out}");
    assert_eq!(
        output.status.code(),
        Some(5),
        "disk full has its own exit code:\n{out}"
    );
    let left = out
        .lines()
        .find_map(|l| l.strip_prefix("left:"))
        .expect("listing");
    assert!(
        left.trim().is_empty(),
        "restore left files on the full disk: {left:?}"
    );
}
