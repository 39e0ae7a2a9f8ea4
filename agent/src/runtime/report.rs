//! The agent's view as proto messages: its `Register` (from the config) and, per report,
//! each instance's window (from a scrape and the instance's delta tracker) and the host's
//! metrics. No I/O and no clock (a failed scrape is logged at debug level).
//!
//! Instance windows: the first successful scrape after a start or a failure is only a
//! baseline, so the instance is left out of that report; a failed scrape is reported with
//! `scrape_ok = false` and its error, and the baseline is dropped.

use serin_proto::v1 as pb;

use crate::collect::{DeltaTracker, HostSample, Sample, Window};
use crate::config::{AgentConfig, InstanceConfig};
use crate::traffic::Variant;

fn proto_variant(v: Variant) -> pb::Variant {
    match v {
        Variant::Stable => pb::Variant::Stable,
        Variant::Canary => pb::Variant::Canary,
    }
}

/// The `Register` message, without `last_applied` and `lease_expired` (filled in per
/// session).
pub(super) fn register(config: &AgentConfig, instance_id: String) -> pb::Register {
    pb::Register {
        agent: config.name.clone(),
        instance_id,
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        targets: config
            .instances
            .iter()
            .map(|i| pb::Target {
                name: i.name.clone(),
                service: i.service.clone(),
                variant: proto_variant(i.variant) as i32,
                address: i.address.clone(),
                version: i.version.clone().unwrap_or_default(),
                managed: i.managed,
            })
            .collect(),
        last_applied: None,
        balancer_services: config.balancer_services(),
        lease_expired: None,
    }
}

/// The instance's window for this report: `None` for a baseline sample.
pub(super) fn instance_window(
    instance: &InstanceConfig,
    variant: Variant,
    tracker: &mut DeltaTracker,
    result: Result<Sample, String>,
) -> Option<pb::InstanceWindow> {
    let mut window = pb::InstanceWindow {
        instance: instance.name.clone(),
        service: instance.service.clone(),
        variant: proto_variant(variant) as i32,
        ..Default::default()
    };
    match result {
        Ok(sample) => {
            let Window {
                requests,
                errors,
                buckets,
                latency_sum,
            } = tracker.observe(sample)?;
            window.scrape_ok = true;
            window.requests = requests;
            window.errors = errors;
            window.latency = buckets
                .into_iter()
                .map(|(le, count)| pb::Bucket { le, count })
                .collect();
            window.latency_sum_seconds = latency_sum;
        }
        Err(error) => {
            tracing::debug!(instance = %instance.name, %error, "scrape failed");
            tracker.forget();
            window.scrape_ok = false;
            window.scrape_error = error;
        }
    }
    Some(window)
}

pub(super) fn host_metrics(h: HostSample) -> pb::HostMetrics {
    pb::HostMetrics {
        cpu_percent: h.cpu_percent,
        memory_used_bytes: h.memory_used_bytes,
        memory_total_bytes: h.memory_total_bytes,
    }
}

/// The longest stretch of measurements one merged report may cover: what an agent measured
/// while no coordinator took its reports (a leader change takes 1-3 s) is sent with the next
/// report, but not older than this (stale errors must not decide a stage now).
pub(crate) const MAX_CARRIED_MS: u64 = 30_000;

/// Folds `newer` into `older`, so a report measured while disconnected is not lost: counts,
/// errors and latency buckets add up per instance and variant, `interval_ms` covers both, and
/// the host metrics, workloads and `seq` are the newer ones. When the two would cover more than
/// [`MAX_CARRIED_MS`], `older` is dropped.
pub(crate) fn merge_reports(older: pb::Report, newer: pb::Report) -> pb::Report {
    if older.interval_ms + newer.interval_ms > MAX_CARRIED_MS {
        return newer;
    }
    let mut windows = older.instances;
    for window in newer.instances {
        match windows.iter_mut().find(|w| {
            w.instance == window.instance
                && w.service == window.service
                && w.variant == window.variant
        }) {
            Some(w) => merge_window(w, window),
            None => windows.push(window),
        }
    }
    pb::Report {
        interval_ms: older.interval_ms + newer.interval_ms,
        instances: windows,
        ..newer
    }
}

/// Adds `newer`'s counts to `window`'s; a failed scrape adds nothing (its interval is missing
/// data either way), and a window with no counts yet takes the newer one whole.
fn merge_window(window: &mut pb::InstanceWindow, newer: pb::InstanceWindow) {
    if !newer.scrape_ok {
        if !window.scrape_ok {
            *window = newer;
        }
        return;
    }
    if !window.scrape_ok {
        *window = newer;
        return;
    }
    window.requests += newer.requests;
    window.errors += newer.errors;
    window.latency_sum_seconds += newer.latency_sum_seconds;
    for bucket in newer.latency {
        match window.latency.iter_mut().find(|b| b.le == bucket.le) {
            Some(b) => b.count += bucket.count,
            None => window.latency.push(bucket),
        }
    }
    window
        .latency
        .sort_by(|a, b| a.le.partial_cmp(&b.le).unwrap_or(std::cmp::Ordering::Equal));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::instance;

    #[test]
    fn baseline_sample_gives_no_window_and_failures_reset_it() {
        let inst = instance("web-s", "web", Variant::Stable, 8001);
        let mut tracker = DeltaTracker::default();
        let sample = |requests: f64| {
            Sample::of(
                requests,
                1.0,
                &[(0.1, requests), (f64::INFINITY, requests)],
                requests / 100.0,
            )
        };
        assert_eq!(
            instance_window(&inst, inst.variant, &mut tracker, Ok(sample(10.0))),
            None
        );
        let w = instance_window(&inst, inst.variant, &mut tracker, Ok(sample(25.0))).unwrap();
        assert!(w.scrape_ok);
        assert_eq!((w.requests, w.errors), (15, 0));
        assert_eq!(w.variant, pb::Variant::Stable as i32);
        assert_eq!(
            w.latency,
            vec![
                pb::Bucket { le: 0.1, count: 15 },
                pb::Bucket {
                    le: f64::INFINITY,
                    count: 15
                }
            ]
        );
        let w = instance_window(&inst, inst.variant, &mut tracker, Err("boom".into())).unwrap();
        assert!(!w.scrape_ok);
        assert_eq!(w.scrape_error, "boom");
        assert_eq!(w.requests, 0);
        // After a failure the next success is a new baseline.
        assert_eq!(
            instance_window(&inst, inst.variant, &mut tracker, Ok(sample(40.0))),
            None
        );
    }

    fn window(instance: &str, variant: pb::Variant, ok: bool, requests: u64) -> pb::InstanceWindow {
        pb::InstanceWindow {
            instance: instance.into(),
            service: "web".into(),
            variant: variant as i32,
            scrape_ok: ok,
            scrape_error: if ok { String::new() } else { "refused".into() },
            requests,
            errors: requests / 10,
            latency: vec![
                pb::Bucket {
                    le: 0.1,
                    count: requests / 2,
                },
                pb::Bucket {
                    le: f64::INFINITY,
                    count: requests,
                },
            ],
            latency_sum_seconds: requests as f64 * 0.01,
        }
    }

    fn report(seq: u64, interval_ms: u64, instances: Vec<pb::InstanceWindow>) -> pb::Report {
        pb::Report {
            seq,
            interval_ms,
            instances,
            ..pb::Report::default()
        }
    }

    #[test]
    fn merged_reports_add_up_counts_per_instance_and_variant_and_keep_the_newer_rest() {
        let older = report(
            1,
            1000,
            vec![
                window("a", pb::Variant::Stable, true, 100),
                window("b", pb::Variant::Canary, true, 10),
            ],
        );
        let newer = report(
            2,
            1000,
            vec![
                window("a", pb::Variant::Stable, true, 50),
                window("b", pb::Variant::Stable, true, 20),
            ],
        );
        let merged = merge_reports(older, newer);
        assert_eq!((merged.seq, merged.interval_ms), (2, 2000));
        let a = &merged.instances[0];
        assert_eq!((a.requests, a.errors), (150, 15));
        assert_eq!(
            a.latency.iter().map(|b| b.count).collect::<Vec<_>>(),
            [75, 150]
        );
        assert!((a.latency_sum_seconds - 1.5).abs() < 1e-9);
        // b changed side between the two: its windows stay apart.
        assert_eq!(merged.instances.len(), 3);
        assert_eq!(merged.instances[1].requests, 10);
        assert_eq!(merged.instances[2].requests, 20);
    }

    #[test]
    fn a_failed_scrape_adds_nothing_and_an_ok_one_replaces_a_failure() {
        let failed = report(1, 1000, vec![window("a", pb::Variant::Stable, false, 0)]);
        let ok = report(2, 1000, vec![window("a", pb::Variant::Stable, true, 40)]);
        let merged = merge_reports(failed.clone(), ok.clone());
        assert!(merged.instances[0].scrape_ok);
        assert_eq!(merged.instances[0].requests, 40);
        let merged = merge_reports(ok, failed);
        assert!(merged.instances[0].scrape_ok);
        assert_eq!(merged.instances[0].requests, 40);
    }

    #[test]
    fn measurements_older_than_the_carry_limit_are_dropped() {
        let older = report(
            1,
            MAX_CARRIED_MS,
            vec![window("a", pb::Variant::Stable, true, 100)],
        );
        let newer = report(2, 1000, vec![window("a", pb::Variant::Stable, true, 5)]);
        let merged = merge_reports(older, newer);
        assert_eq!(
            (merged.interval_ms, merged.instances[0].requests),
            (1000, 5)
        );
    }
}
