//! What every Lockstep binary (`lockstep`, `lockstep-agent`) does around its command: logs to
//! stderr, runs on a multi-threaded runtime, binds its listening socket, stops on Ctrl-C or
//! SIGTERM, and reports an error the way operators of the seed systems expect, with its exit
//! code. Nothing here knows the protocol or the repository format.

pub mod metrics;

use lockstep_repository::{Error, ErrorCode};

/// Environment variable for fault tests that kill or slow a process inside an operation:
/// `POINT:MS` pauses `MS` milliseconds at `POINT`. The coordinator's points:
/// `before-commit` (between the last Prepared and Commit), `before-publish` (between the
/// last upload and the backup manifest), `before-apply` (between the last shard staged and a
/// restore's Apply), `applying` (between the record saying `applying` and the first Apply
/// sent), `swapped` (between every shard swapped and the restore's decision), `decided`
/// (between the decision stored and sent), `gc-sweep` and `gc-swept` (before and after each batch a GC pass deletes).
/// The agent's: `restore-swap` (an in-place Apply,
/// with the gate closed, before the swap). Never set in production.
pub const FAULT_PAUSE: &str = "LOCKSTEP_FAULT_PAUSE";

/// Waits at `point` if [`FAULT_PAUSE`] names it; `operation` is the backup or restore, for
/// the log.
pub async fn fault_pause(point: &str, operation: &(dyn std::fmt::Display + Sync)) {
    let Ok(spec) = std::env::var(FAULT_PAUSE) else {
        return;
    };
    let Some((name, ms)) = spec.split_once(':') else {
        return;
    };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if name == point {
        tracing::warn!(operation = %operation, point, pause_ms = ms, "fault injection: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Binds the listener of a server binary and returns it with the address it got.
pub async fn bind(address: &str) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), Error> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("listen on {address}"),
                err,
            )
        })?;
    let local = listener.local_addr().map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            "read the listening address",
            err,
        )
    })?;
    Ok((listener, local))
}

/// A token cancelled on Ctrl-C or SIGTERM: the shutdown trigger of every server binary.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    token
}

/// The body of every Lockstep binary's `main`: logs to stderr (filter from `LOCKSTEP_LOG`,
/// else `default_filter`), runs `command` on a multi-threaded runtime, and turns its exit code
/// into the process's.
pub fn run_binary(
    default_filter: &str,
    command: impl std::future::Future<Output = i32>,
) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("Error: start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(command);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Prints an error the way operators of the seed systems expect, and returns the exit code.
pub fn report_error(err: &Error) -> i32 {
    eprintln!("Error: {}", err.chain());
    eprintln!("Severity: {}", err.severity());
    eprintln!("Solution: {}", err.hint());
    err.code.exit_code()
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
