//! [`NginxActuator`] as a [`TrafficActuator`]: a desired state becomes one [`Route`] per
//! service the local nginx carries ([`nginx_routes`], pure), then one site file and one
//! reload ([`NginxActuator::apply_routes`]).

use super::{Applied, MIN_RELOAD_INTERVAL, NginxActuator, NginxSettings};
use crate::actuator::{ActuatorFailure, ActuatorOutcome, TrafficActuator};
use crate::error::error_chain;
use crate::store::DesiredState;
use crate::traffic::{Route, Upstreams};

impl TrafficActuator for NginxActuator {
    fn services(&self) -> Vec<String> {
        self.settings
            .services
            .iter()
            .map(|s| s.service.clone())
            .collect()
    }

    /// Every change is a reload, which costs idle keep-alive connections: at most one per
    /// [`MIN_RELOAD_INTERVAL`].
    fn min_change_interval(&self) -> Option<std::time::Duration> {
        Some(MIN_RELOAD_INTERVAL)
    }

    /// One site file carries every service, so a failure is attributed with
    /// [`ActuatorFailure::attributed`].
    async fn apply(
        &mut self,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Result<ActuatorOutcome, ActuatorFailure> {
        let routes = nginx_routes(&self.settings, upstreams, desired);
        match self
            .apply_routes(&routes, &desired.generation.to_string())
            .await
        {
            Ok(Applied::Reloaded { elapsed }) => Ok(ActuatorOutcome::Changed { elapsed }),
            Ok(Applied::Unchanged) => Ok(ActuatorOutcome::Unchanged),
            Err(e) => Err(ActuatorFailure::attributed(
                &self.services(),
                desired,
                error_chain(&e),
            )),
        }
    }
}

/// nginx routes for `desired`: one per service the local nginx carries, to that service's
/// servers in `upstreams`. A carried service the desired state does not mention gets all
/// its traffic on stable (no rollout).
fn nginx_routes(
    settings: &NginxSettings,
    upstreams: &Upstreams,
    desired: &DesiredState,
) -> Vec<Route> {
    settings
        .services
        .iter()
        .map(|balanced| Route::for_service(&balanced.service, &balanced.listen, desired, upstreams))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::nginx::BalancedService;
    use crate::store::Generation;
    use crate::traffic::{Server, Variant};

    use crate::test_support::{instance, traffic};

    #[test]
    fn routes_cover_every_balanced_service_with_local_upstreams() {
        let settings = NginxSettings {
            binary: "nginx".into(),
            config: "/c".into(),
            prefix: None,
            site: "/s".into(),
            confirm_timeout: Duration::from_secs(1),
            services: vec![
                BalancedService {
                    service: "web".into(),
                    listen: "0.0.0.0:80".into(),
                },
                BalancedService {
                    service: "api".into(),
                    listen: "0.0.0.0:81".into(),
                },
            ],
        };
        let instances = [
            instance("web-s", "web", Variant::Stable, 8001),
            instance("web-c", "web", Variant::Canary, 8002),
            instance("api-s", "api", Variant::Stable, 8003),
            instance("bot-s", "bot", Variant::Stable, 8004),
        ];
        let desired = DesiredState {
            generation: Generation { term: 1, index: 2 },
            services: vec![
                traffic("web", 25, Some("$cookie_uid")),
                traffic("bot", 50, None),
            ],
        };
        let upstreams: Upstreams = instances
            .iter()
            .map(|i| (i.service.clone(), i.server()))
            .collect();
        let routes = nginx_routes(&settings, &upstreams, &desired);
        assert_eq!(
            routes,
            vec![
                Route {
                    service: "web".into(),
                    listen: "0.0.0.0:80".into(),
                    servers: vec![
                        Server {
                            name: "web-s".into(),
                            address: "127.0.0.1:8001".into(),
                            variant: Variant::Stable
                        },
                        Server {
                            name: "web-c".into(),
                            address: "127.0.0.1:8002".into(),
                            variant: Variant::Canary
                        },
                    ],
                    canary_weight: 25,
                    sticky_key: Some("$cookie_uid".into()),
                    stable_version: "v1".into(),
                    canary_version: "v2".into(),
                    overrides: Default::default(),
                },
                // Not in the desired state: all traffic on stable.
                Route {
                    service: "api".into(),
                    listen: "0.0.0.0:81".into(),
                    servers: vec![Server {
                        name: "api-s".into(),
                        address: "127.0.0.1:8003".into(),
                        variant: Variant::Stable
                    }],
                    canary_weight: 0,
                    sticky_key: None,
                    stable_version: String::new(),
                    canary_version: String::new(),
                    overrides: Default::default(),
                },
            ]
        );
    }
}
