//! Hostile input against a real coordinator's WalArchive service (which every agent, and in
//! a plaintext cluster anyone, can reach): a segment whose header declares more than a
//! segment may hold, zstd bombs that inflate to what they declare, and a message larger than
//! the service takes are all refused, nothing is stored, and the coordinator's peak memory
//! stays bounded by one segment however many bombs arrive at once. Its peak RSS is printed.

use std::io::Write;

use lockstep_proto::v1::{self, wal_archive_client::WalArchiveClient};
use lockstep_proto::wire::lineage_to_wire;
use lockstep_repository::wal::SegmentInfo;
use lockstep_repository::{HlcTime, Lineage, ObjectId, Seq, ShardId};

use crate::cluster::Cluster;

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("field")
}

/// A stored object in format 1, zstd, declaring `declared` plaintext bytes.
fn object(declared: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = b"LKSO".to_vec();
    out.extend_from_slice(&[1, 1, 0, 0]);
    out.extend_from_slice(&declared.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A zstd frame of `mib` MiB of zeros (a few KiB).
fn zeros(mib: usize) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).expect("encoder");
    let block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        encoder.write_all(&block).expect("compress");
    }
    encoder.finish().expect("finish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compression_bombs_and_oversized_messages_are_refused_in_bounded_memory() {
    let cluster = Cluster::start(10_000, None);
    let pid = cluster.coordinator.as_ref().expect("coordinator").id();
    let client = WalArchiveClient::connect(cluster.coordinator_address.clone())
        .await
        .expect("connect")
        .max_encoding_message_size(256 << 20)
        .max_decoding_message_size(256 << 20);
    let lineage = Lineage::root();
    let info = SegmentInfo {
        shard_id: ShardId::new("shard-0").expect("shard"),
        lineage,
        first: Seq(1),
        last: Seq(1),
        hlc_min: HlcTime(1),
        hlc_max: HlcTime(1),
        id: ObjectId::of(b"not what the bomb holds"),
    };
    let request = |stored: Vec<u8>| v1::PutWalSegmentRequest {
        shard_id: "shard-0".into(),
        lineage: Some(lineage_to_wire(&lineage)),
        name: info.file_name(),
        stored,
    };
    let put = |stored: Vec<u8>| {
        let mut client = client.clone();
        let request = request(stored);
        async move { client.put_segment(request).await }
    };
    let baseline = status_kib(pid, "VmHWM:");

    // Declaring more than any segment holds: refused before anything is decompressed.
    let refused = put(object(4 << 30, &zeros(1)))
        .await
        .expect_err("declared 4 GiB");
    assert!(refused.message().contains("more than"), "{refused:?}");
    let after_declared = status_kib(pid, "VmHWM:");

    // A message larger than the archive takes (64 MiB): refused by its length.
    let refused = put(vec![7u8; 100 << 20]).await.expect_err("100 MiB");
    assert!(
        matches!(
            refused.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{refused:?}"
    );
    let after_oversized = status_kib(pid, "VmHWM:");

    // Four bombs at once, each inflating to the 256 MiB it declares: each is refused once
    // decoded (it does not hash to its name), one at a time.
    let bomb = object(256 << 20, &zeros(256));
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let results = futures::future::join_all((0..4).map(|_| put(bomb.clone()))).await;
    for result in results {
        let refused = result.expect_err("a bomb");
        assert!(
            refused.message().contains("hashes to"),
            "refused for what it holds: {refused:?}"
        );
    }
    // Four more whose callers give up at once (a 1 ms deadline): their decodes still run one
    // at a time.
    let impatient = (0..4).map(|_| {
        let mut client = client.clone();
        let mut request = tonic::Request::new(request(bomb.clone()));
        request.set_timeout(std::time::Duration::from_millis(1));
        async move { client.put_segment(request).await }
    });
    for result in futures::future::join_all(impatient).await {
        assert!(result.is_err());
    }
    // One more, waited for: its decode comes after every decode those started (the slot is
    // handed out in order).
    let last = put(bomb.clone()).await.expect_err("a bomb");
    assert!(last.message().contains("hashes to"), "{last:?}");
    let after_bombs = status_kib(pid, "VmHWM:");

    println!(
        "coordinator peak RSS: {} MiB at start, {} MiB after a 4 GiB declaration, {} MiB after a 100 MiB message, {} MiB after 4 bombs of 256 MiB at once",
        baseline >> 10,
        after_declared >> 10,
        after_oversized >> 10,
        after_bombs >> 10
    );
    assert!(
        after_declared < baseline + (32 << 10),
        "a refused declaration allocated nothing"
    );
    // One 256 MiB plaintext at a time (four at once would be 1 GiB).
    assert!(
        after_bombs < baseline + (400 << 10),
        "peak {} MiB from {} MiB: more than one bomb was decoded at once",
        after_bombs >> 10,
        baseline >> 10
    );
    assert!(
        after_oversized < after_declared + (32 << 10),
        "the oversized message was not buffered"
    );

    // Nothing was stored, and the coordinator still serves.
    let wal = cluster.repo().join("wal");
    let stored: Vec<_> = lockstep_tests::files_under(&wal)
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(&info.id.to_hex()))
        .collect();
    assert!(stored.is_empty(), "{stored:?}");
    let status = cluster.lockstep(&["cluster", "status"]);
    assert!(status.status.success(), "{}", lockstep_tests::text(&status));
}
