use std::time::{Duration, Instant};

use super::LazyTimer;

fn at(ms: u64) -> Instant {
    tokio::time::Instant::now().into_std() + Duration::from_millis(ms)
}

async fn fire(t: &mut LazyTimer) -> Duration {
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), t.fired()).await.expect("the timer fires");
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn fires_at_its_deadline_and_is_then_disarmed() {
    let mut t = LazyTimer::new();
    t.arm(Some(at(30)));
    assert_eq!(fire(&mut t).await, Duration::from_millis(30));
    assert_eq!(t.armed(), None);
    assert!(tokio::time::timeout(Duration::from_secs(5), t.fired()).await.is_err(), "a disarmed timer never fires");
}

#[tokio::test(start_paused = true)]
async fn an_earlier_deadline_moves_the_timer() {
    let mut t = LazyTimer::new();
    t.arm(Some(at(100)));
    t.arm(Some(at(10)));
    assert_eq!(fire(&mut t).await, Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn a_later_deadline_keeps_the_earlier_timer_then_the_loop_arms_it_again() {
    let mut t = LazyTimer::new();
    t.arm(Some(at(10)));
    let later = at(100);
    t.arm(Some(later));
    assert_eq!(t.armed(), Some(at(10)));
    assert_eq!(fire(&mut t).await, Duration::from_millis(10), "early, never late");
    t.arm(Some(later));
    assert_eq!(fire(&mut t).await, Duration::from_millis(90));
}

#[tokio::test(start_paused = true)]
async fn none_keeps_an_armed_timer() {
    let mut t = LazyTimer::new();
    t.arm(Some(at(20)));
    t.arm(None);
    assert_eq!(fire(&mut t).await, Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn a_past_deadline_fires_at_once() {
    let mut t = LazyTimer::new();
    tokio::time::advance(Duration::from_millis(50)).await;
    t.arm(Some(tokio::time::Instant::now().into_std() - Duration::from_millis(5)));
    assert_eq!(fire(&mut t).await, Duration::ZERO);
}
