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
}
