//! Where blocking work (hashing, compression, file and engine I/O) runs.
//!
//! Normally on tokio's blocking pool, so the async worker threads stay free. On a thread
//! marked with [`run_inline_on_this_thread`] it runs inline instead: the deterministic
//! simulations run every host of a cluster on one thread in simulated time, and work on a
//! real thread pool would finish at a simulated instant that depends on the OS scheduler.
//! Inline, it finishes within the step that started it, in the same order on every run.
//!
//! Every blocking call in the agent, the coordinator and the repository goes through
//! [`run`] or [`run_bulk`]; nothing else calls `spawn_blocking`.
//!
//! Background work runs on threads of its own: a backup's upload as a whole (spawned on
//! [`background`]), and the hashing, compression and decompression of object data wherever
//! it is called from ([`run_bulk`]). A serving agent lowers their CPU priority
//! ([`set_background_nice`]), as RocksDB's BackupEngine does with
//! `background_thread_cpu_priority`, so on a busy host the scheduler serves the shard's
//! writes and the barrier's messages first.

use std::cell::Cell;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

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

/// The `nice` increment of background work at low priority, as `nice -n 10`: lowered enough
/// to yield to every foreground thread, not so far that a backup stalls on a busy host.
pub const LOW_PRIORITY_NICE: i32 = 10;

static BACKGROUND_NICE: AtomicI32 = AtomicI32::new(0);
static BACKGROUND: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();

/// Sets how much lower than the process's priority background work runs: a `nice` increment
/// from 0 (the same priority) to 19 (the lowest there is). Takes effect for threads started
/// afterwards, so a binary calls it once at start-up.
pub fn set_background_nice(nice: i32) {
    BACKGROUND_NICE.store(nice.clamp(0, 19), Ordering::Relaxed);
}

/// Where background tasks (a backup's upload) run: a runtime of their own, whose threads
/// (its worker and its blocking pool, so every blocking call the task makes) run at the
/// background priority. `None` on a thread that runs blocking work inline (the simulations
/// keep every task on their own runtime) or if that runtime cannot be started; the caller
/// then spawns on its own runtime.
pub fn background() -> Option<tokio::runtime::Handle> {
    if INLINE.with(Cell::get) {
        return None;
    }
    BACKGROUND
        .get_or_init(start_background)
        .as_ref()
        .map(|runtime| runtime.handle().clone())
}

/// Runs bulk work on data (hash, compress, decompress, and local object writes) on the
/// background threads.
pub async fn run_bulk<R, F>(work: F) -> Result<R, TaskFailed>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if INLINE.with(Cell::get) {
        return Ok(work());
    }
    let Some(background) = background() else {
        return run(work).await;
    };
    background
        .spawn_blocking(work)
        .await
        .map_err(|err| TaskFailed(err.to_string()))
}

fn start_background() -> Option<tokio::runtime::Runtime> {
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("lockstep-bulk")
        .on_thread_start(lower_this_threads_priority)
        .build();
    match built {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the background threads; background work runs at normal priority");
            None
        }
    }
}

fn lower_this_threads_priority() {
    let nice = BACKGROUND_NICE.load(Ordering::Relaxed);
    if nice == 0 {
        return;
    }
    // On Linux, PRIO_PROCESS with a thread id reads and sets that thread's priority alone.
    let thread = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(thread)
        .and_then(|now| rustix::process::setpriority_process(thread, (now + nice).min(19)));
    if let Err(err) = lowered {
        tracing::warn!(error = %err, nice, "cannot lower the priority of a background thread");
    }
}
