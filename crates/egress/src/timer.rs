//! A coarse timer for hyper's deadlines (header read, HTTP/2 keep-alive).
//!
//! hyper arms a header-read deadline for every request on a keep-alive connection. With
//! tokio's own timer each of those is a registration in the runtime's timer wheel, and
//! when the wheel was empty (or the new deadline is earlier than the parked driver's
//! wake-up) the registration unparks the I/O driver: one extra `write` to an eventfd and
//! one extra wake-up per proxied request (seen with `strace` on the benchmark). These
//! deadlines are 15–30 s slowloris guards, so a quarter of a second of slack costs
//! nothing: here they sit in one ordered map, and a single task checks the map every
//! [`TICK`] while any are pending. The guards fire at most one tick late.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// How often pending deadlines are checked, and so how late one may fire.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Ticks with nothing pending before the checking task stops (it restarts on demand).
const IDLE_TICKS: u32 = 20;

#[derive(Clone, Default)]
pub(crate) struct CoarseTimer {
    shared: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// (deadline, id) → the waker of the sleep waiting for it.
    waiting: BTreeMap<(Instant, u64), Waker>,
    ticking: bool,
}

fn lock(shared: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(CoarseSleep {
            shared: self.shared.clone(),
            deadline,
            key: None,
        })
    }
}

struct CoarseSleep {
    shared: Arc<Mutex<State>>,
    deadline: Instant,
    /// Set once registered; the ticker may remove the entry when it expires.
    key: Option<(Instant, u64)>,
}

impl Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            self.deregister();
            return Poll::Ready(());
        }
        let shared = self.shared.clone();
        let mut state = lock(&shared);
        let key = match self.key {
            Some(key) => key,
            None => {
                state.next_id += 1;
                let key = (self.deadline, state.next_id);
                self.key = Some(key);
                key
            }
        };
        match state.waiting.get_mut(&key) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            Some(waker) => waker.clone_from(cx.waker()),
            None => {
                state.waiting.insert(key, cx.waker().clone());
            }
        }
        if !state.ticking {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    state.ticking = true;
                    runtime.spawn(tick(shared.clone()));
                }
                // Outside a runtime nothing could drive the map; hyper only polls its
                // timers on the runtime, so this is a fallback that stays correct.
                Err(_) => cx.waker().wake_by_ref(),
            }
        }
        Poll::Pending
    }
}

impl CoarseSleep {
    fn deregister(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&self.shared).waiting.remove(&key);
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        self.deregister();
    }
}

async fn tick(shared: Arc<Mutex<State>>) {
    let mut idle = 0;
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let expired = {
            let mut state = lock(&shared);
            let later = state.waiting.split_off(&(now, u64::MAX));
            let expired = std::mem::replace(&mut state.waiting, later);
            if state.waiting.is_empty() && expired.is_empty() {
                idle += 1;
                if idle >= IDLE_TICKS {
                    state.ticking = false;
                    return;
                }
            } else {
                idle = 0;
            }
            expired
        };
        for waker in expired.into_values() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deadlines_fire_within_a_tick_and_dropped_sleeps_leave_nothing_behind() {
        let timer = CoarseTimer::default();
        let started = Instant::now();
        timer.sleep(Duration::from_millis(100)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_millis(100) + TICK * 3, "{waited:?}");

        let mut pending = timer.sleep(Duration::from_secs(60));
        let polled = futures_poll_once(pending.as_mut()).await;
        assert!(polled.is_pending());
        assert_eq!(lock(&timer.shared).waiting.len(), 1);
        drop(pending);
        assert!(lock(&timer.shared).waiting.is_empty());
    }

    async fn futures_poll_once(mut sleep: Pin<&mut dyn Sleep>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx))).await
    }
}
