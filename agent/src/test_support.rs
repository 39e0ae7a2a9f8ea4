//! Builders shared by the agent's unit tests.

use crate::config::InstanceConfig;
use crate::store::ServiceTraffic;
use crate::traffic::Variant;

/// An instance on 127.0.0.1:`port` with its metrics on the same port.
pub fn instance(name: &str, service: &str, variant: Variant, port: u16) -> InstanceConfig {
    InstanceConfig {
        name: name.into(),
        service: service.into(),
        variant,
        address: format!("127.0.0.1:{port}"),
        metrics_url: format!("http://127.0.0.1:{port}/metrics"),
        metrics: Default::default(),
        version: None,
        managed: false,
    }
}

/// Desired traffic of `service` from v1 (stable) to v2 (canary) in rollout r1.
pub fn traffic(service: &str, weight: u32, sticky: Option<&str>) -> ServiceTraffic {
    ServiceTraffic {
        service: service.into(),
        canary_weight: weight,
        stable_version: "v1".into(),
        canary_version: "v2".into(),
        rollout_id: "r1".into(),
        sticky_key: sticky.map(Into::into),
        ..Default::default()
    }
}
