//! Fencing: at most one coordinator acts on a repository (ARCHITECTURE.md, "Fencing").
//!
//! A starting coordinator takes the next epoch in the repository
//! (`Repository::take_epoch`). Before every step that changes what the repository says
//! (publishing a backup or tag, removing leftovers, deleting a backup, recording or deciding
//! a restore) it checks that no later epoch exists: one HEAD. A coordinator that finds one
//! has been taken over; it says so once, and from then on refuses every operation with
//! `ERR_COORDINATOR_FENCED`. A watcher checks every [`WATCH_EVERY`] as well, so an idle
//! coordinator learns it too.
//!
//! A check and the step after it are not atomic: a coordinator that checked just before a
//! takeover may still publish. The one destructive step of a new coordinator that could race
//! it, removing an uncommitted backup's leftovers, therefore waits `takeover_grace_ms` after
//! the takeover and looks again whether the backup committed meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lockstep_process::metrics as names;
use lockstep_repository::{Error, ErrorCode, Repository, Result};

/// How often an idle coordinator checks whether it was taken over.
pub const WATCH_EVERY: Duration = Duration::from_secs(10);

/// This coordinator's epoch on its repository.
#[derive(Debug)]
pub struct Fence {
    repo: Repository,
    epoch: u64,
    lost: AtomicBool,
}

impl Fence {
    /// Takes the repository over: the next epoch. Every older coordinator is fenced out.
    pub async fn take(repo: &Repository) -> Result<Fence> {
        let holder = format!("coordinator pid {} on {}", std::process::id(), hostname());
        let epoch = repo.take_epoch(&holder).await?;
        tracing::info!(
            epoch,
            "took the repository over: this coordinator acts on it"
        );
        metrics::gauge!(names::COORDINATOR_EPOCH).set(epoch as f64);
        metrics::gauge!(names::COORDINATOR_FENCED).set(0.0);
        Ok(Fence {
            repo: repo.clone(),
            epoch,
            lost: AtomicBool::new(false),
        })
    }

    /// Fails fast once this coordinator knows it was taken over.
    pub fn still_held(&self) -> Result<()> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(self.fenced());
        }
        Ok(())
    }

    /// Checks, in the repository, that no newer coordinator took over; call right before a
    /// step that changes what the repository says. `what` names the step for the error.
    pub async fn check(&self, what: &str) -> Result<()> {
        self.still_held()?;
        if self.repo.epoch_superseded(self.epoch).await? {
            if !self.lost.swap(true, Ordering::Relaxed) {
                metrics::gauge!(names::COORDINATOR_FENCED).set(1.0);
                tracing::error!(
                    epoch = self.epoch,
                    "a newer coordinator took the repository over; this one stops acting on it"
                );
            }
            return Err(self.fenced().context(format!("refused to {what}")));
        }
        Ok(())
    }

    fn fenced(&self) -> Error {
        Error::new(
            ErrorCode::CoordinatorFenced,
            format!(
                "a newer coordinator took repository {} over from this one (epoch {})",
                self.repo.url(),
                self.epoch
            ),
        )
    }

    /// Checks every [`WATCH_EVERY`] until taken over or `stop` is cancelled.
    pub async fn watch(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            match self.check("keep acting").await {
                Err(err) if err.code == ErrorCode::CoordinatorFenced => return,
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "could not check whether a newer coordinator took over")
                }
                Ok(()) => {}
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "an unknown host".into())
}
