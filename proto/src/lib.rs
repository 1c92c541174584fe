//! The `lockstep.v1` protocol: generated gRPC code for the `Coordinator`, `Agent` and `Shard`
//! services, the descriptor set served by reflection, and the one mapping between domain
//! errors and gRPC statuses.
//!
//! Architecture invariant: a domain error crosses the wire only through [`to_status`], which
//! keeps its seed code in the `x-lockstep-error` metadata; [`from_status`] restores it.

use lockstep_repository::{Error, ErrorCode};
use tonic::{Code, Status};

pub mod archive;
pub mod auth;
pub mod tls;
pub mod wire;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("lockstep.v1");

    /// The encoded descriptors of every `lockstep.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("lockstep_v1_descriptor");
}

/// A connection a Lockstep server accepts: TCP in the binaries, the simulated network in the
/// simulations (`serve_incoming` takes a stream of them).
pub trait Connection:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected
    + Unpin
    + Send
    + 'static
{
}

impl<T> Connection for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static
{
}

/// How Lockstep's long-lived channels (coordinator to agents, agents to remote archives)
/// behave: a bounded connect time, and HTTP/2 keepalive, so a connection that died
/// silently (a partition that dropped its packets, a host that vanished) is noticed within
/// seconds and replaced, instead of holding every later call until it times out. The
/// simulations found this: after a partition healed, every backup failed with
/// `ERR_AGENT_UNAVAILABLE` on the dead connection.
///
/// No per-call cap: each caller bounds its calls by the deadline of what it does (the
/// coordinator's `fleet::Step::timeout`, the archive client's `CALL_TIMEOUT`).
pub fn long_lived(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    use std::time::Duration;
    endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
}

/// The most requests one client connection has in progress on a server at once; more wait.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 256;

/// The server every Lockstep binary serves with: every call authorized by `security`
/// ([`tls::Authorize`]) before a service sees it; at most [`MAX_REQUESTS_PER_CONNECTION`]
/// requests in progress per connection and as many HTTP/2 streams, and each service's
/// messages bounded (tonic's 4 MiB unless the service says otherwise, as the WAL archive
/// does), so no client can make a server hold unbounded work or memory.
pub fn server(
    security: &tls::Security,
) -> tonic::transport::Server<
    tower::layer::util::Stack<tls::AuthorizeLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(MAX_REQUESTS_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_REQUESTS_PER_CONNECTION as u32))
        .layer(tls::AuthorizeLayer(security.clone()))
}

/// The metadata key that carries the seed error code on a failed call.
pub const ERROR_CODE_KEY: &str = "x-lockstep-error";

fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BackupNotFound => Code::NotFound,
        ErrorCode::InvalidArgument | ErrorCode::BackupInvalidType => Code::InvalidArgument,
        ErrorCode::RestoreTargetNotEmpty => Code::AlreadyExists,
        ErrorCode::BarrierLeaseExpired => Code::DeadlineExceeded,
        ErrorCode::StorageUnavailable => Code::Unavailable,
        ErrorCode::StorageDiskFull => Code::ResourceExhausted,
        ErrorCode::BarrierBusy | ErrorCode::CoordinatorFenced => Code::FailedPrecondition,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::BackupChecksumMismatch
        | ErrorCode::BackupManifestCorrupt
        | ErrorCode::BackupIncomplete
        | ErrorCode::BackupDecompressionFailed => Code::DataLoss,
        _ => Code::Internal,
    }
}

/// The gRPC status for a domain error, with its seed code in the metadata.
pub fn to_status(err: &Error) -> Status {
    let mut status = Status::new(grpc_code(err.code), err.chain());
    if let Ok(value) = err.code.as_str().parse() {
        status.metadata_mut().insert(ERROR_CODE_KEY, value);
    }
    status
}

/// The domain error behind a failed call: its seed code when the peer sent one, else a code
/// derived from the gRPC status.
pub fn from_status(what: &str, status: &Status) -> Error {
    // A connection broken below gRPC (HTTP/2 framing): most often a TLS server reached with
    // http://, whose handshake garbles the plaintext preface.
    if status.code() == Code::Internal && status.message().contains("h2 protocol error") {
        return Error::new(
            ErrorCode::AgentUnavailable,
            format!(
                "{what}: {} (is the server TLS, reached with http://? use https:// and the cluster's CA)",
                status.message()
            ),
        );
    }
    let code = status
        .metadata()
        .get(ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::parse)
        .unwrap_or(match status.code() {
            Code::NotFound => ErrorCode::BackupNotFound,
            Code::InvalidArgument => ErrorCode::InvalidArgument,
            Code::DeadlineExceeded => ErrorCode::BarrierLeaseExpired,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::Unavailable | Code::Cancelled | Code::Unknown => ErrorCode::AgentUnavailable,
            _ => ErrorCode::BackupCreationFailed,
        });
    Error::new(code, format!("{what}: {}", status.message()))
}

/// gRPC reflection, v1 and v1alpha (grpcurl speaks v1alpha), for the lockstep and health
/// services.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_code_survives_the_wire() {
        let err = Error::new(ErrorCode::BackupNotFound, "backup bk-1 does not exist");
        let status = to_status(&err);
        assert_eq!(status.code(), Code::NotFound);
        let back = from_status("get backup", &status);
        assert_eq!(back.code, ErrorCode::BackupNotFound);
        assert!(back.message.contains("bk-1"));
    }

    #[test]
    fn a_status_without_a_code_maps_by_grpc_code() {
        let back = from_status(
            "prepare shard-1",
            &Status::unavailable("connection refused"),
        );
        assert_eq!(back.code, ErrorCode::AgentUnavailable);
    }
}
