//! The demo's load generator: a constant rate of requests to one service through the balancer,
//! a new connection per request (as most probes and many clients behind NAT do), each answer
//! recorded with its time and the version that answered, so the verification can count any
//! span of time afterwards ([`super::verify`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serin_coordinator::control::now_millis;
use serin_coordinator::metrics::Side;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::verify::{Answer, Outcome};

/// Concurrent senders per service; each sends at `rps / WORKERS`.
const WORKERS: u32 = 6;

/// A running load generator for one service.
#[derive(Clone)]
pub struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl Load {
    /// Sends `rps` requests per second to `url` until `stop`; `stable_version` and
    /// `canary_version` are what the stable and canary instances answer with (header
    /// `x-serin-version`), which tells which variant served each request.
    pub fn start(
        url: String,
        rps: u32,
        stable_version: &str,
        canary_version: &str,
        stop: CancellationToken,
        tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>,
    ) -> Load {
        let load = Load {
            answers: Arc::default(),
        };
        let period = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(rps.max(1)));
        for worker in 0..WORKERS {
            let load = load.clone();
            let stop = stop.clone();
            let url = format!("{url}{worker}");
            let versions = (stable_version.to_owned(), canary_version.to_owned());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(2))
                    .build()?;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    let sent_ms = now_millis();
                    let result = client.get(&url).send().await;
                    let side_of = |r: &reqwest::Response| {
                        let version = r.headers().get("x-serin-version")?.to_str().ok()?;
                        if version == versions.0 {
                            Some(Side::Stable)
                        } else if version == versions.1 {
                            Some(Side::Canary)
                        } else {
                            None
                        }
                    };
                    let (side, outcome) = match &result {
                        Ok(r) => match side_of(r) {
                            Some(side) if r.status().is_success() => (Some(side), Outcome::Ok),
                            Some(side) => (Some(side), Outcome::AppError),
                            None => (None, Outcome::Failed),
                        },
                        Err(_) => (None, Outcome::Failed),
                    };
                    let answer = Answer {
                        sent_ms,
                        at_ms: now_millis(),
                        side,
                        outcome,
                    };
                    load.answers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(answer);
                }
            }));
        }
        load
    }

    /// Every answer so far, in the order they arrived.
    pub fn answers(&self) -> Vec<Answer> {
        let mut answers = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        answers.sort_by_key(|a| a.at_ms);
        answers
    }
}
