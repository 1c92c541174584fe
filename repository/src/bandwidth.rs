//! Upload and download rate limits of one agent, shared by everything it sends and fetches,
//! and changeable while it runs.
//!
//! Each limit is a token bucket of bytes refilled at the limit's rate (0: unlimited) and
//! holding at most a quarter second of it. A transfer takes its stored size: it waits until
//! the bucket is not in debt, then takes it all, so a chunk larger than the bucket goes at
//! once and the ones after it wait out the debt. Over a transfer the rate is the limit.
//!
//! WAL shipping keeps a reserved share of the upload limit: segments take their bytes at
//! once, never waiting (the debt falls on backups), and backups draw at most the rest of the
//! limit. So a throttled backup never delays shipping, and while shipping stays within its
//! share what both send stays within the limit. Shipping is never throttled: while it
//! catches up a backlog faster than the limit, the total exceeds the limit, and the debt it
//! leaves backups is capped at one second of the limit, so they keep their share rather
//! than wait out the backlog.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorCode, Result};

/// How long a bucket may save up for.
const BURST: Duration = Duration::from_millis(250);

/// The longest a waiting transfer sleeps before it looks at its bucket again: a limit raised
/// (or removed) meanwhile applies within this long.
const RECHECK: Duration = Duration::from_millis(100);

/// The share of the upload limit kept for WAL shipping by default, in percent.
pub const DEFAULT_WAL_SHARE_PERCENT: u32 = 20;

/// One token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    /// Bytes per second; 0 is unlimited.
    rate: AtomicU64,
    /// Tokens (negative: debt), and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: AtomicU64::new(rate),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Refills by the time passed; the rate, and how long until the debt is paid.
    fn refill(&self, state: &mut (f64, Instant)) -> (f64, Duration) {
        let rate = self.rate.load(Ordering::Relaxed) as f64;
        let now = Instant::now();
        let burst = rate * BURST.as_secs_f64();
        state.0 = (state.0 + rate * now.duration_since(state.1).as_secs_f64()).min(burst);
        state.1 = now;
        let wait = if state.0 >= 0.0 || rate == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.0 / rate)
        };
        (rate, wait)
    }

    /// Waits until the bucket is out of debt, then takes `bytes`.
    async fn take(&self, bytes: u64) {
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let (rate, wait) = self.refill(&mut state);
                if rate == 0.0 {
                    state.0 = 0.0;
                    return;
                }
                if wait.is_zero() {
                    state.0 -= bytes as f64;
                    return;
                }
                wait
            };
            tokio::time::sleep(wait.min(RECHECK)).await;
        }
    }

    /// Takes `bytes` at once, going into debt if the bucket lacks them, at most one second
    /// of the rate deep.
    fn take_now(&self, bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, _) = self.refill(&mut state);
        if rate > 0.0 {
            state.0 = (state.0 - bytes as f64).max(state.0.min(-rate));
        }
    }
}

/// An agent's limits in bytes per second (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub upload: u64,
    pub download: u64,
    /// The share of `upload` kept for WAL shipping, in percent (0..=90).
    pub wal_share_percent: u32,
}

/// A change of limits as operators give it, in MiB/s and percent; `None` keeps the value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Change {
    pub upload_mib_s: Option<u64>,
    pub download_mib_s: Option<u64>,
    pub wal_share_percent: Option<u32>,
}

const MIB: u64 = 1 << 20;

impl Limits {
    /// These limits with `change` applied; a rate past 1 TiB/s or a share past 90% is
    /// refused.
    pub fn changed(self, change: &Change) -> Result<Limits> {
        let rate = |mib: Option<u64>, current: u64, what: &str| match mib {
            None => Ok(current),
            Some(mib) if mib <= MIB => Ok(mib * MIB),
            Some(mib) => Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("a {what} limit of {mib} MiB/s is past 1 TiB/s; 0 means no limit"),
            )),
        };
        let wal_share_percent = match change.wal_share_percent {
            None => self.wal_share_percent,
            Some(share) if share <= 90 => share,
            Some(share) => {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("a WAL share of {share}% leaves backups too little; use 0..=90"),
                ));
            }
        };
        Ok(Limits {
            upload: rate(change.upload_mib_s, self.upload, "upload")?,
            download: rate(change.download_mib_s, self.download, "download")?,
            wal_share_percent,
        })
    }
}

/// The rate limits of one agent (see the module documentation).
#[derive(Debug)]
pub struct Bandwidth {
    upload: Bucket,
    /// Backups' part of the upload limit: the rest is WAL shipping's.
    backup_upload: Bucket,
    download: Bucket,
    wal_share_percent: AtomicU32,
}

impl Default for Bandwidth {
    /// No limits, and the default WAL share for when one is set.
    fn default() -> Bandwidth {
        Bandwidth::new(Limits {
            wal_share_percent: DEFAULT_WAL_SHARE_PERCENT,
            ..Limits::default()
        })
    }
}

impl Bandwidth {
    pub fn new(limits: Limits) -> Bandwidth {
        let bandwidth = Bandwidth {
            upload: Bucket::new(0),
            backup_upload: Bucket::new(0),
            download: Bucket::new(0),
            wal_share_percent: AtomicU32::new(0),
        };
        bandwidth.set(limits);
        bandwidth
    }

    /// Changes the limits; transfers under way follow from their next chunk.
    pub fn set(&self, limits: Limits) {
        let share = limits.wal_share_percent.min(90);
        self.upload.set_rate(limits.upload);
        // Backups' part, never 0 (no limit) when the whole is limited.
        let backup = u128::from(limits.upload) * u128::from(100 - share) / 100;
        let backup = u64::try_from(backup).unwrap_or(u64::MAX);
        self.backup_upload
            .set_rate(if limits.upload > 0 { backup.max(1) } else { 0 });
        self.download.set_rate(limits.download);
        self.wal_share_percent.store(share, Ordering::Relaxed);
    }

    pub fn limits(&self) -> Limits {
        Limits {
            upload: self.upload.rate.load(Ordering::Relaxed),
            download: self.download.rate.load(Ordering::Relaxed),
            wal_share_percent: self.wal_share_percent.load(Ordering::Relaxed),
        }
    }

    /// A backup's upload of `bytes`: within its share and the whole limit.
    pub async fn backup_upload(&self, bytes: u64) {
        self.backup_upload.take(bytes).await;
        self.upload.take(bytes).await;
    }

    /// WAL shipping's upload of `bytes`: never waits; backups pay for it.
    pub fn wal_upload(&self, bytes: u64) {
        self.upload.take_now(bytes);
    }

    /// A download (a restore's) of `bytes`.
    pub async fn download(&self, bytes: u64) {
        self.download.take(bytes).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn limits(upload: u64, download: u64) -> Limits {
        Limits {
            upload,
            download,
            wal_share_percent: DEFAULT_WAL_SHARE_PERCENT,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transfer_runs_at_the_limit() {
        let bandwidth = Bandwidth::new(limits(0, 10 * MIB));
        let started = Instant::now();
        for _ in 0..50 {
            bandwidth.download(2 * MIB).await;
        }
        // 100 MiB at 10 MiB/s: the first chunk goes at once, the other 49 wait 0.2 s each.
        let took = started.elapsed().as_secs_f64();
        assert!((9.7..=10.0).contains(&took), "{took} s");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits_and_a_new_limit_applies_to_the_next_chunk() {
        let bandwidth = Bandwidth::new(limits(0, 0));
        let started = Instant::now();
        for _ in 0..100 {
            bandwidth.backup_upload(8 * MIB).await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        bandwidth.set(limits(10 * MIB, 0));
        assert_eq!(bandwidth.limits().upload, 10 * MIB);
        let started = Instant::now();
        for _ in 0..11 {
            bandwidth.backup_upload(MIB).await;
        }
        // Backups get 80% of the limit: 10 MiB at 8 MiB/s after the first.
        let took = started.elapsed().as_secs_f64();
        assert!((1.2..=1.3).contains(&took), "{took} s");
    }

    #[tokio::test(start_paused = true)]
    async fn wal_shipping_never_waits_and_backups_pay_for_it() {
        let bandwidth = Bandwidth::new(limits(10 * MIB, 0));
        let started = Instant::now();
        // Shipping sends 10 MiB at once while a backup sends 20 MiB: shipping is not held,
        // and both together stay within the limit (30 MiB at 10 MiB/s is 3 s at least; the
        // backup alone, at its 8 MiB/s, would take 2.5).
        for _ in 0..10 {
            bandwidth.wal_upload(MIB);
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        for _ in 0..20 {
            bandwidth.backup_upload(MIB).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!((2.9..=3.5).contains(&took), "{took} s");
    }

    #[test]
    fn a_change_sets_what_it_names_and_refuses_what_is_out_of_range() {
        let before = limits(10 * MIB, 0);
        let after = before
            .changed(&Change {
                download_mib_s: Some(5),
                ..Change::default()
            })
            .expect("change");
        assert_eq!(after, limits(10 * MIB, 5 * MIB));
        for change in [
            Change {
                upload_mib_s: Some(MIB + 1),
                ..Change::default()
            },
            Change {
                wal_share_percent: Some(91),
                ..Change::default()
            },
        ] {
            let refused = before.changed(&change).expect_err("out of range");
            assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_wakes_a_transfer_waiting_out_a_long_debt() {
        let bandwidth = Arc::new(Bandwidth::new(limits(0, 1)));
        bandwidth.download(8 * MIB).await;
        let started = Instant::now();
        let waiting = {
            let bandwidth = bandwidth.clone();
            tokio::spawn(async move { bandwidth.download(MIB).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        bandwidth.set(limits(0, 0));
        waiting.await.expect("the transfer ends");
        // At 1 byte/s the debt alone is 97 days; lifted, the limit lets it go at once.
        assert!(started.elapsed() < Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shipping_backlog_leaves_backups_at_most_a_second_of_debt() {
        let bandwidth = Bandwidth::new(limits(10 * MIB, 0));
        // A 1 GiB backlog shipped at once: backups wait a second, not 100.
        bandwidth.wal_upload(1024 * MIB);
        let started = Instant::now();
        bandwidth.backup_upload(MIB).await;
        let took = started.elapsed().as_secs_f64();
        assert!((0.9..=1.1).contains(&took), "{took} s");
    }

    #[test]
    fn a_tiny_upload_limit_still_limits_backups() {
        let bandwidth = Bandwidth::new(limits(50, 0));
        assert_eq!(bandwidth.backup_upload.rate.load(Ordering::Relaxed), 40);
        let bandwidth = Bandwidth::new(limits(1, 0));
        assert_eq!(bandwidth.backup_upload.rate.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wal_share_is_bounded() {
        let bandwidth = Bandwidth::new(Limits {
            upload: 100,
            download: 0,
            wal_share_percent: 100,
        });
        assert_eq!(bandwidth.limits().wal_share_percent, 90);
    }
}
