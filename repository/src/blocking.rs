//! Where blocking work (hashing, compression, file and engine I/O) runs.
//!
//! Normally on tokio's blocking pool, so the async worker threads stay free. On a thread
//! marked with [`run_inline_on_this_thread`] it runs inline instead: the deterministic
//! simulations run every host of a cluster on one thread in simulated time, and work on a
//! real thread pool would finish at a simulated instant that depends on the OS scheduler.
//! Inline, it finishes within the step that started it, in the same order on every run.
//!
//! Every blocking call in the agent, the coordinator and the repository goes through
//! [`run`]; nothing else calls `spawn_blocking`.

use std::cell::Cell;
use std::fmt;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Runs blocking work inline on this thread from now on (simulations only).
pub fn run_inline_on_this_thread() {
    INLINE.with(|inline| inline.set(true));
}

/// A blocking task that panicked or was cancelled.
#[derive(Debug)]
pub struct TaskFailed(String);

impl fmt::Display for TaskFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocking task failed: {}", self.0)
    }
}

impl std::error::Error for TaskFailed {}

/// Runs `work` where blocking work belongs (see the module documentation).
pub async fn run<R, F>(work: F) -> Result<R, TaskFailed>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if INLINE.with(Cell::get) {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| TaskFailed(err.to_string()))
}
