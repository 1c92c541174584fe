//! Schedules (`[[schedules]]`): the coordinator runs full, incremental and differential
//! backups, tags, retention, GC and verify at the times cron expressions give, each in its
//! time zone.
//!
//! - croner parses 5 fields (minute first) or 6 (seconds first); a time zone is an IANA
//!   name, UTC by default. Across daylight-saving changes the Vixie rules hold: a time that
//!   repeats fires once, a time the change skips fires right after it.
//! - The last firing of each schedule is kept in the repository (`schedules/<name>.json`),
//!   written before its run starts, so a restarted coordinator (or its successor) never fires
//!   the same time twice.
//! - Firings missed while no coordinator ran (or while this one stalled) are caught up once,
//!   at once; the others are counted as missed.
//! - A firing while the schedule's previous run still runs, or while another operation
//!   holds the cluster (`ERR_BARRIER_BUSY`), is skipped and counted; so is one that cannot
//!   be recorded first.
//! - A fenced-out coordinator fires nothing.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use croner::Cron;
use futures::FutureExt;
use futures::future::BoxFuture;
use lockstep_process::metrics as names;
use lockstep_proto::v1;
use lockstep_repository::manifest::{BackupKind, Labels};
use lockstep_repository::{Error, ErrorCode, Repository, Result, TagName};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fence::Fence;
use crate::ops::{ClusterContext, ClusterOps};

/// One `[[schedules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Names the schedule in `schedule list`, metrics, labels and its record.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week) or six (seconds first).
    pub cron: String,
    /// An IANA time zone (`Europe/Berlin`); UTC when absent.
    #[serde(default = "utc")]
    pub timezone: String,
    pub action: Action,
    /// `verify` only: 0 runs a quick verify; N runs a full one that leaves out the objects a
    /// full verify checked within the last N hours (1..=9600; incremental verify).
    #[serde(default)]
    pub verify_window_hours: u32,
}

fn utc() -> String {
    "UTC".to_string()
}

/// What a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Full,
    Incremental,
    Differential,
    Tag,
    Retention,
    Gc,
    /// A quick verify of every backup and of the WAL archive.
    Verify,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Full => "full",
            Action::Incremental => "incremental",
            Action::Differential => "differential",
            Action::Tag => "tag",
            Action::Retention => "retention",
            Action::Gc => "gc",
            Action::Verify => "verify",
        }
    }

    /// Whether the action holds the cluster (needs agents).
    pub fn needs_agents(self) -> bool {
        matches!(
            self,
            Action::Full | Action::Incremental | Action::Differential | Action::Tag
        )
    }
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub pattern: String,
    pub cron: Cron,
    pub timezone: chrono_tz::Tz,
    pub action: Action,
    /// A full verify's window (`verify_window_hours`), or a quick verify.
    pub verify_window: Option<chrono::Duration>,
}

impl Schedule {
    pub fn parse(config: &ScheduleConfig) -> Result<Schedule> {
        let invalid = |why: String| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("schedule {:?}: {why}", config.name),
            )
        };
        TagName::new(config.name.as_str()).map_err(|err| {
            invalid(format!(
                "the name must be letters, digits, '-', '_' or '.' ({})",
                err.message
            ))
        })?;
        let cron = Cron::from_str(&config.cron).map_err(|err| {
            invalid(format!(
                "cron {:?} does not parse ({err}): write five fields (minute hour day month weekday) or six (seconds first), e.g. \"0 2 * * *\"",
                config.cron
            ))
        })?;
        let timezone = chrono_tz::Tz::from_str(&config.timezone).map_err(|_| {
            invalid(format!(
                "timezone {:?} is not an IANA time zone (e.g. \"Europe/Berlin\", \"UTC\")",
                config.timezone
            ))
        })?;
        let verify_window = match (config.action, config.verify_window_hours) {
            (_, 0) => None,
            (Action::Verify, hours @ 1..=9600) => Some(chrono::Duration::hours(i64::from(hours))),
            (Action::Verify, hours) => {
                return Err(invalid(format!(
                    "verify_window_hours {hours} is not 0 (a quick verify) or 1..=9600"
                )));
            }
            (action, _) => {
                return Err(invalid(format!(
                    "verify_window_hours is for action verify, not {}",
                    action.as_str()
                )));
            }
        };
        Ok(Schedule {
            name: config.name.clone(),
            pattern: config.cron.clone(),
            cron,
            timezone,
            action: config.action,
            verify_window,
        })
    }

    /// The last firing at or before `until` (on a whole second).
    pub fn last_at_or_before(&self, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let until = until.trunc_subsecs(0);
        self.cron
            .find_previous_occurrence(&until.with_timezone(&self.timezone), true)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// The first firing strictly after `after` (on a whole second).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner keeps the fraction of a second it is given.
        let after = after.trunc_subsecs(0);
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
}

/// Checks every schedule of a configuration: each parses, names are unique, and the ones
/// that hold the cluster have agents to hold.
pub fn validate(
    schedules: &[ScheduleConfig],
    has_agents: bool,
    retention: &crate::retention::RetentionConfig,
) -> Result<()> {
    let mut names = HashSet::new();
    for config in schedules {
        let schedule = Schedule::parse(config)?;
        if !names.insert(config.name.as_str()) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("schedule {:?} is defined twice", config.name),
            ));
        }
        if schedule.action == Action::Retention && retention.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "schedule {:?}: action retention needs a policy: set keep_full, keep_full_days, keep_daily, keep_weekly, keep_monthly or recovery_window_hours in [retention]",
                    config.name
                ),
            ));
        }
        if schedule.action.needs_agents() && !has_agents {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "schedule {:?}: action {} needs agents, and this coordinator has none",
                    config.name,
                    schedule.action.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// The wall clock the scheduler reads (a test's follows tokio's paused time).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Runs one schedule's action (for its firing time) to its end.
pub type Runner =
    Arc<dyn Fn(&Schedule, DateTime<Utc>) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// A schedule and what happened to it.
struct Entry {
    schedule: Schedule,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Default)]
struct State {
    last_fired: Option<DateTime<Utc>>,
    next: Option<DateTime<Utc>>,
    running: bool,
    runs: u64,
    failed: u64,
    skipped: u64,
    missed: u64,
    last_outcome: String,
}

/// The longest the scheduler sleeps before it reads the wall clock again (it may have been
/// set meanwhile).
const MAX_NAP: Duration = Duration::from_secs(60);

/// The last firing of `schedule` from `due` through `until`, and how many came before it
/// (counted up to `cap`).
fn latest_due(
    schedule: &Schedule,
    due: DateTime<Utc>,
    until: DateTime<Utc>,
    cap: u64,
) -> (DateTime<Utc>, u64) {
    let latest = schedule
        .last_at_or_before(until)
        .filter(|latest| *latest >= due)
        .unwrap_or(due);
    let (mut at, mut before) = (due, 0);
    while before < cap && at < latest {
        match schedule.next_after(at) {
            Some(next) if next <= latest => {
                before += 1;
                at = next;
            }
            _ => break,
        }
    }
    (latest, before)
}

/// The schedules of one coordinator.
pub struct Scheduler {
    entries: Vec<Arc<Entry>>,
    repo: Repository,
    fence: Arc<Fence>,
    clock: Clock,
    runner: Runner,
}

impl Scheduler {
    pub fn new(
        schedules: Vec<Schedule>,
        repo: Repository,
        fence: Arc<Fence>,
        clock: Clock,
        runner: Runner,
    ) -> Scheduler {
        Scheduler {
            entries: schedules
                .into_iter()
                .map(|schedule| {
                    Arc::new(Entry {
                        schedule,
                        state: Mutex::default(),
                    })
                })
                .collect(),
            repo,
            fence,
            clock,
            runner,
        }
    }

    /// What `lockstep schedule list` shows.
    pub fn list(&self) -> Vec<v1::ScheduleInfo> {
        let time = |t: Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        self.entries
            .iter()
            .map(|entry| {
                let state = entry.state.lock().map(|s| s.clone()).unwrap_or_default();
                let schedule = &entry.schedule;
                v1::ScheduleInfo {
                    name: schedule.name.clone(),
                    cron: schedule.pattern.clone(),
                    timezone: schedule.timezone.name().to_string(),
                    action: schedule.action.as_str().to_string(),
                    next_run: time(state.next),
                    last_fired: time(state.last_fired),
                    running: state.running,
                    runs: state.runs,
                    failed: state.failed,
                    skipped: state.skipped,
                    missed: state.missed,
                    last_outcome: state.last_outcome,
                }
            })
            .collect()
    }

    fn update<T>(entry: &Entry, change: impl FnOnce(&mut State) -> T) -> T {
        let mut state = entry
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut state)
    }

    fn skip(entry: &Entry, reason: &'static str, at: DateTime<Utc>) {
        tracing::warn!(schedule = %entry.schedule.name, %at, reason, "scheduled run skipped");
        metrics::counter!(names::SCHEDULE_SKIPPED, "schedule" => entry.schedule.name.clone(), "reason" => reason)
            .increment(1);
        Scheduler::update(entry, |s| {
            s.skipped += 1;
            s.last_outcome = format!("skipped at {}: {reason}", at.to_rfc3339());
        });
    }

    fn set_next(entry: &Entry, next: Option<DateTime<Utc>>) {
        if let Some(next) = next {
            metrics::gauge!(names::SCHEDULE_NEXT_RUN, "schedule" => entry.schedule.name.clone())
                .set(next.timestamp() as f64);
        }
        Scheduler::update(entry, |s| s.next = next);
    }

    /// Runs the schedules until `stop`; a run under way when it fires is awaited.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut runs: JoinSet<()> = JoinSet::new();
        let now = (self.clock)();
        for entry in &self.entries {
            let last = match self.repo.schedule_last_fired(&entry.schedule.name).await {
                Ok(last) => last,
                Err(err) => {
                    tracing::error!(schedule = %entry.schedule.name, error = %err.chain(), "could not read the schedule's last firing; counting from now");
                    None
                }
            };
            Scheduler::update(entry, |s| s.last_fired = last);
            // Never fired: the first firing is the next one from now.
            let next = match last {
                Some(last) => entry.schedule.next_after(last),
                None => entry.schedule.next_after(now),
            };
            Scheduler::set_next(entry, next);
        }
        loop {
            let due = self
                .entries
                .iter()
                .filter_map(|e| Scheduler::update(e, |s| s.next))
                .min();
            let nap = due.map_or(MAX_NAP, |due| {
                (due - (self.clock)())
                    .to_std()
                    .unwrap_or_default()
                    .min(MAX_NAP)
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(_) = runs.join_next(), if !runs.is_empty() => continue,
                _ = tokio::time::sleep(nap) => {}
            }
            let now = (self.clock)();
            for entry in &self.entries {
                let Some(next) = Scheduler::update(entry, |s| s.next).filter(|n| *n <= now) else {
                    continue;
                };
                // Every firing up to now is due; one run, the latest, stands for them all.
                let (latest, missed) = latest_due(&entry.schedule, next, now, 10_000);
                if missed > 0 {
                    tracing::warn!(schedule = %entry.schedule.name, missed, "scheduled firings missed; running once for them");
                    metrics::counter!(names::SCHEDULE_SKIPPED, "schedule" => entry.schedule.name.clone(), "reason" => "missed")
                        .increment(missed);
                    Scheduler::update(entry, |s| s.missed += missed);
                }
                Scheduler::set_next(entry, entry.schedule.next_after(now));
                self.fire(entry.clone(), latest, &mut runs).await;
            }
        }
        while runs.join_next().await.is_some() {}
    }

    async fn fire(&self, entry: Arc<Entry>, at: DateTime<Utc>, runs: &mut JoinSet<()>) {
        let name = entry.schedule.name.clone();
        if let Err(err) = self.fence.check(&format!("run schedule {name}")).await {
            tracing::error!(schedule = %name, error = %err.chain(), "not firing");
            Scheduler::skip(&entry, "fenced", at);
            return;
        }
        if Scheduler::update(&entry, |s| s.running) {
            Scheduler::skip(&entry, "overlap", at);
            return;
        }
        // Another coordinator (the one before this, or a clock ahead of this one's) may have
        // fired it already.
        match self.repo.schedule_last_fired(&name).await {
            Ok(Some(last)) if last >= at => {
                Scheduler::update(&entry, |s| s.last_fired = Some(last));
                Scheduler::skip(&entry, "fired already", at);
                return;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(schedule = %name, error = %err.chain(), "could not read the last firing");
                Scheduler::skip(&entry, "unrecorded", at);
                return;
            }
        }
        // Recorded first: a coordinator that restarts mid-run does not fire it again.
        if let Err(err) = self.repo.put_schedule_fired(&name, at).await {
            tracing::error!(schedule = %name, error = %err.chain(), "could not record the firing");
            Scheduler::skip(&entry, "unrecorded", at);
            return;
        }
        Scheduler::update(&entry, |s| {
            s.last_fired = Some(at);
            s.running = true;
        });
        tracing::info!(schedule = %name, action = entry.schedule.action.as_str(), "scheduled run starts");
        let run = (self.runner)(&entry.schedule, at);
        runs.spawn(async move {
            // A run that panics ends as failed; its schedule goes on.
            let outcome = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorCode::BarrierAborted,
                        "the scheduled run panicked",
                    ))
                });
            let (label, text) = match &outcome {
                Ok(()) => ("ok", "ok".to_string()),
                Err(err) if err.code == ErrorCode::BarrierBusy => ("busy", err.message.clone()),
                Err(err) => ("failed", format!("{}: {}", err.code, err.message)),
            };
            if label == "busy" {
                Scheduler::update(&entry, |s| s.running = false);
                Scheduler::skip(&entry, "busy", at);
                return;
            }
            if let Err(err) = &outcome {
                tracing::error!(schedule = %name, error = %err.chain(), "scheduled run failed");
            } else {
                tracing::info!(schedule = %name, "scheduled run ended");
            }
            metrics::counter!(names::SCHEDULE_RUNS, "schedule" => name, "outcome" => label)
                .increment(1);
            Scheduler::update(&entry, |s| {
                s.running = false;
                s.runs += 1;
                s.failed += u64::from(outcome.is_err());
                s.last_outcome = format!("{text} (fired {})", at.to_rfc3339());
            });
        });
    }
}

/// How often a scheduled backup's job is looked at until it ends.
const JOB_POLL_EVERY: Duration = Duration::from_millis(250);

/// The runner of a coordinator: each action through the same paths as the CLI's.
pub fn cluster_runner(ctx: ClusterContext, ops: ClusterOps, stop: CancellationToken) -> Runner {
    Arc::new(move |scheduled: &Schedule, at| {
        let (ctx, ops, stop) = (ctx.clone(), ops.clone(), stop.clone());
        let (action, schedule, window) = (
            scheduled.action,
            scheduled.name.clone(),
            scheduled.verify_window,
        );
        Box::pin(async move {
            let labels: Labels = [("schedule".to_string(), schedule.clone())].into();
            let kind = match action {
                Action::Full => BackupKind::Full,
                Action::Incremental => BackupKind::Incremental,
                Action::Differential => BackupKind::Differential,
                Action::Tag => {
                    let stamp = at.format("%Y%m%dT%H%M%SZ");
                    let name = TagName::new(format!("{schedule}-{stamp}"))?;
                    return ops.tag(name, labels).await.map(|_| ());
                }
                Action::Retention => return ops.retention(false).await.map(|_| ()),
                Action::Gc => return crate::gc::collect(&ctx, false, &stop).await.map(|_| ()),
                Action::Verify => return crate::service::verify_everything(&ctx, window).await,
            };
            let id = ops.backup(kind, labels).await?.backup_id;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(JOB_POLL_EVERY) => {}
                }
                let state = ops.job(id.clone()).await?.map(|j| j.state);
                match state {
                    Some(v1::JobState::Committed) => return Ok(()),
                    Some(v1::JobState::Failed) | None => {
                        return Err(Error::new(
                            ErrorCode::BarrierAborted,
                            format!(
                                "scheduled backup {id} failed: see `lockstep backup status {id}`"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn schedule(name: &str, cron: &str, action: Action) -> Schedule {
        Schedule::parse(&ScheduleConfig {
            name: name.into(),
            cron: cron.into(),
            timezone: "UTC".into(),
            action,
            verify_window_hours: 0,
        })
        .expect("schedule")
    }

    /// A wall clock that moves with tokio's (paused) time, from `start`.
    fn paused_clock(start: DateTime<Utc>) -> Clock {
        let origin = tokio::time::Instant::now();
        Arc::new(move || start + chrono::Duration::from_std(origin.elapsed()).expect("elapsed"))
    }

    /// A runner that counts runs and takes `takes` each.
    fn counting(takes: Duration) -> (Runner, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let runner: Runner = Arc::new(move |_, _| {
            let counted = counted.clone();
            Box::pin(async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(takes).await;
                Ok(())
            })
        });
        (runner, count)
    }

    /// Runs `sched` for `span` of (paused) time, then stops it and waits for its runs.
    async fn run_for(sched: &Arc<Scheduler>, span: Duration) {
        let (stop, handle) = start(sched);
        tokio::time::sleep(span).await;
        stop.cancel();
        handle.await.expect("scheduler");
    }

    fn start(sched: &Arc<Scheduler>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(sched.clone().run(stop.clone()));
        (stop, handle)
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn bad_schedules_are_refused_with_what_to_write() {
        let config = |name: &str, cron: &str, tz: &str, action| ScheduleConfig {
            name: name.into(),
            cron: cron.into(),
            timezone: tz.into(),
            action,
            verify_window_hours: 0,
        };
        let policy = crate::retention::RetentionConfig::default();
        let cases = [
            (
                config("a", "61 * * * *", "UTC", Action::Full),
                "five fields",
            ),
            (
                config("a", "0 2 * * *", "UTC", Action::Retention),
                "[retention]",
            ),
            (
                config("a", "0 2 * * *", "Mars/Olympus", Action::Full),
                "IANA",
            ),
            (config("../x", "0 2 * * *", "UTC", Action::Full), "name"),
        ];
        for (bad, hint) in cases {
            let err = validate(&[bad], true, &policy).expect_err("refused");
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(err.message.contains(hint), "{err}");
        }
        let twice = [
            config("a", "0 2 * * *", "UTC", Action::Full),
            config("a", "0 3 * * *", "UTC", Action::Gc),
        ];
        assert!(
            validate(&twice, true, &policy)
                .expect_err("twice")
                .message
                .contains("twice")
        );
        let window = |action, hours| ScheduleConfig {
            verify_window_hours: hours,
            ..config("w", "0 2 * * *", "UTC", action)
        };
        for (bad, hint) in [
            (window(Action::Full, 24), "for action verify"),
            (window(Action::Verify, 10_000), "1..=9600"),
        ] {
            let err = validate(&[bad], true, &policy).expect_err("refused");
            assert!(err.message.contains(hint), "{err}");
        }
        let nightly = Schedule::parse(&window(Action::Verify, 168)).expect("a window");
        assert_eq!(nightly.verify_window, Some(chrono::Duration::hours(168)));
        let no_agents = [config("a", "0 2 * * *", "UTC", Action::Tag)];
        assert!(validate(&no_agents, false, &policy).is_err());
        assert!(
            validate(
                &[config("a", "0 2 * * *", "UTC", Action::Gc)],
                false,
                &policy
            )
            .is_ok()
        );
    }

    #[test]
    fn firings_follow_the_time_zone_and_its_daylight_saving_changes() {
        let berlin = Schedule::parse(&ScheduleConfig {
            name: "nightly".into(),
            cron: "30 2 * * *".into(),
            timezone: "Europe/Berlin".into(),
            action: Action::Full,
            verify_window_hours: 0,
        })
        .expect("schedule");
        // 02:30 in Berlin is 00:30 UTC in summer and 01:30 UTC in winter.
        assert_eq!(
            berlin.next_after(at("2026-07-01T12:00:00Z")),
            Some(at("2026-07-02T00:30:00Z"))
        );
        assert_eq!(
            berlin.next_after(at("2026-12-01T12:00:00Z")),
            Some(at("2026-12-02T01:30:00Z"))
        );
        // 2026-03-29 skips 02:00-03:00 in Berlin: the run comes right after the jump, once.
        let spring = berlin.next_after(at("2026-03-28T12:00:00Z")).expect("next");
        assert_eq!(spring, at("2026-03-29T01:00:00Z"), "03:00 CEST");
        // 2026-10-25 repeats 02:00-03:00: 02:30 fires once.
        let first = berlin.next_after(at("2026-10-24T12:00:00Z")).expect("next");
        assert_eq!(
            first,
            at("2026-10-25T00:30:00Z"),
            "02:30 CEST, the first of the two"
        );
        let after = berlin.next_after(first).expect("next");
        assert_eq!(
            after,
            at("2026-10-26T01:30:00Z"),
            "not 02:30 CET the same night"
        );
        // Six fields: seconds first.
        let every_second = schedule("s", "* * * * * *", Action::Gc);
        assert_eq!(
            every_second.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:00:01Z"))
        );
    }

    async fn rig(
        schedules: Vec<Schedule>,
        runner: Runner,
        clock: Clock,
    ) -> (Arc<Scheduler>, Repository, Arc<Fence>) {
        let repo = Repository::open(&format!("memory://schedules-{}", uuid::Uuid::new_v4()))
            .await
            .expect("repo");
        let fence = Arc::new(Fence::take(&repo).await.expect("fence"));
        let sched = Arc::new(Scheduler::new(
            schedules,
            repo.clone(),
            fence.clone(),
            clock,
            runner,
        ));
        (sched, repo, fence)
    }

    #[tokio::test(start_paused = true)]
    async fn each_firing_runs_once_and_an_overlapping_one_is_skipped_and_counted() {
        let (runner, count) = counting(Duration::from_millis(2500));
        let clock = paused_clock(at("2026-01-01T00:00:00.200Z"));
        let every_second = schedule("fast", "* * * * * *", Action::Incremental);
        let (sched, repo, _fence) = rig(vec![every_second], runner, clock).await;
        // Firings at :01, :02, ..., :10; each run takes 2.5 s, so the next two overlap it.
        run_for(&sched, Duration::from_millis(10_000)).await;
        let info = &sched.list()[0];
        assert_eq!(
            count.load(Ordering::SeqCst),
            4,
            "runs at :01, :04, :07, :10: {info:?}"
        );
        assert_eq!(info.runs, 4);
        assert_eq!(info.skipped, 6, "{info:?}");
        assert_eq!(info.missed, 0);
        assert_eq!(
            repo.schedule_last_fired("fast").await.expect("record"),
            Some(at("2026-01-01T00:00:10Z")),
            "the last firing is in the repository"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_run_is_caught_up_once_and_a_restart_never_fires_the_same_time_twice() {
        let hourly = || schedule("hourly", "0 * * * *", Action::Full);
        let (runner, count) = counting(Duration::from_millis(10));
        let (sched, repo, _fence) = rig(
            vec![hourly()],
            runner.clone(),
            paused_clock(at("2026-01-01T09:59:00Z")),
        )
        .await;
        run_for(&sched, Duration::from_secs(120)).await;
        assert_eq!(count.load(Ordering::SeqCst), 1, "10:00 fired");

        // Down from 10:01 to 15:20: 11:00 to 15:00 were missed; one run at start stands for
        // them all, then 16:00 comes as usual.
        let fence = Arc::new(Fence::take(&repo).await.expect("successor"));
        let sched = Arc::new(Scheduler::new(
            vec![hourly()],
            repo.clone(),
            fence,
            paused_clock(at("2026-01-01T15:20:00Z")),
            runner.clone(),
        ));
        let (stop, handle) = start(&sched);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2, "one catch-up");
        assert_eq!(
            sched.list()[0].missed,
            4,
            "11:00 to 14:00 counted as missed"
        );
        tokio::time::sleep(Duration::from_secs(45 * 60)).await;
        stop.cancel();
        handle.await.expect("scheduler");
        assert_eq!(count.load(Ordering::SeqCst), 3, "16:00");

        // A successor started within the same hour fires nothing until the next hour.
        let fence = Arc::new(Fence::take(&repo).await.expect("successor"));
        let sched = Arc::new(Scheduler::new(
            vec![hourly()],
            repo.clone(),
            fence,
            paused_clock(at("2026-01-01T16:00:30Z")),
            runner,
        ));
        run_for(&sched, Duration::from_secs(120)).await;
        assert_eq!(count.load(Ordering::SeqCst), 3, "16:00 is not fired twice");
        assert_eq!(sched.list()[0].next_run, "2026-01-01T17:00:00Z");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_out_coordinator_fires_nothing_and_a_busy_cluster_is_a_skip() {
        let (runner, count) = counting(Duration::from_millis(10));
        let (sched, repo, _fence) = rig(
            vec![schedule("fast", "* * * * * *", Action::Full)],
            runner,
            paused_clock(at("2026-01-01T00:00:00.500Z")),
        )
        .await;
        let _successor = Fence::take(&repo).await.expect("successor");
        run_for(&sched, Duration::from_secs(3)).await;
        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert!(sched.list()[0].skipped >= 2);
        assert_eq!(
            repo.schedule_last_fired("fast").await.expect("record"),
            None
        );

        let busy: Runner = Arc::new(|_, _| {
            Box::pin(async {
                Err(Error::new(
                    ErrorCode::BarrierBusy,
                    "a restore holds the cluster",
                ))
            })
        });
        let (sched, _repo, _fence) = rig(
            vec![schedule("fast", "* * * * * *", Action::Full)],
            busy,
            paused_clock(at("2026-01-01T00:00:00.500Z")),
        )
        .await;
        run_for(&sched, Duration::from_millis(2200)).await;
        let info = &sched.list()[0];
        assert_eq!((info.runs, info.skipped), (0, 2), "{info:?}");
        assert!(info.last_outcome.contains("busy"), "{info:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_panics_fails_and_the_schedule_goes_on() {
        let panicking: Runner = Arc::new(|_, _| Box::pin(async { panic!("a bug in a run") }));
        let (sched, _repo, _fence) = rig(
            vec![schedule("fast", "* * * * * *", Action::Gc)],
            panicking,
            paused_clock(at("2026-01-01T00:00:00.500Z")),
        )
        .await;
        run_for(&sched, Duration::from_millis(2200)).await;
        let info = &sched.list()[0];
        assert_eq!(
            (info.runs, info.failed, info.skipped),
            (2, 2, 0),
            "{info:?}"
        );
        assert!(!info.running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_outage_is_caught_up_once_at_its_latest_firing() {
        let (runner, count) = counting(Duration::from_millis(10));
        let every_second = || schedule("fast", "* * * * * *", Action::Gc);
        let (sched, repo, _fence) = rig(
            vec![every_second()],
            runner,
            paused_clock(at("2026-01-01T05:00:00.500Z")),
        )
        .await;
        repo.put_schedule_fired("fast", at("2026-01-01T00:00:00Z"))
            .await
            .expect("record");
        run_for(&sched, Duration::from_millis(300)).await;
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "one run for five hours of firings"
        );
        assert_eq!(
            repo.schedule_last_fired("fast").await.expect("record"),
            Some(at("2026-01-01T05:00:00Z")),
            "recorded at the latest firing, not where counting stopped"
        );
        assert_eq!(sched.list()[0].missed, 10_000, "counted up to the cap");
    }
}
