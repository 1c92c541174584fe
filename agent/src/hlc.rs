//! The agent's hybrid logical clock: the commit time stamped into every write's WAL record.
//!
//! `now` returns the wall clock in milliseconds when it moved forward, and otherwise the last
//! time plus one logical tick, so times strictly increase even when the wall clock stalls or
//! steps back. Engines call it under their write serialization, so HLC times grow along the
//! WAL in sequence order. On open an engine `observe`s the last time in its WAL, so a restart
//! with a clock that stepped back still never goes backwards.
//!
//! The wall clock is injected (`HlcClock::with_wall_clock`), so simulations drive it.

use std::sync::{Arc, Mutex};

use lockstep_repository::HlcTime;

/// Milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A hybrid logical clock. Cheap to clone; clones share the clock.
#[derive(Clone)]
pub struct HlcClock {
    last: Arc<Mutex<HlcTime>>,
    wall: WallClock,
}

impl std::fmt::Debug for HlcClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HlcClock")
            .field("last", &self.last())
            .finish()
    }
}

impl Default for HlcClock {
    fn default() -> HlcClock {
        HlcClock::system()
    }
}

impl HlcClock {
    /// A clock on the system's wall clock.
    pub fn system() -> HlcClock {
        HlcClock::with_wall_clock(Arc::new(|| {
            chrono::Utc::now().timestamp_millis().max(0) as u64
        }))
    }

    pub fn with_wall_clock(wall: WallClock) -> HlcClock {
        HlcClock {
            last: Arc::new(Mutex::new(HlcTime(0))),
            wall,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HlcTime> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A time later than every time this clock returned or observed.
    pub fn now(&self) -> HlcTime {
        let wall = HlcTime::new((self.wall)(), 0);
        let mut last = self.lock();
        *last = if wall > *last {
            wall
        } else {
            HlcTime(last.0 + 1)
        };
        *last
    }

    /// Moves the clock past `time` (from the WAL on open, or from a peer).
    pub fn observe(&self, time: HlcTime) {
        let mut last = self.lock();
        if time > *last {
            *last = time;
        }
    }

    /// The last time returned or observed.
    pub fn last(&self) -> HlcTime {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn times_strictly_increase_even_when_the_wall_clock_steps_back() {
        let wall = Arc::new(AtomicU64::new(5_000));
        let source = wall.clone();
        let clock = HlcClock::with_wall_clock(Arc::new(move || source.load(Ordering::SeqCst)));
        let a = clock.now();
        assert_eq!(a, HlcTime::new(5_000, 0));
        let b = clock.now();
        assert_eq!(b, HlcTime::new(5_000, 1));
        wall.store(4_000, Ordering::SeqCst);
        let c = clock.now();
        assert!(c > b, "a clock step back must not move HLC time back");
        wall.store(6_000, Ordering::SeqCst);
        assert_eq!(clock.now(), HlcTime::new(6_000, 0));
        clock.observe(HlcTime::new(9_000, 4));
        assert_eq!(clock.now(), HlcTime::new(9_000, 5));
    }
}
