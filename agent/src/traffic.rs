//! The balancer-neutral traffic model: which servers a service has, per variant, and what
//! one service's traffic should look like ([`Route`]), including the header and cookie that
//! pick a variant per request ([`VariantOverride`]). Pure: no I/O, no clock.
//!
//! Why a module of its own: these types are what every traffic actuator (nginx today,
//! HAProxy next) is driven by, and what the local config (`[[instances]]`) and the
//! coordinator's inventory produce ([`Upstreams::for_desired`] picks per service). Living below `config` and every balancer, they let the
//! servers come from either source without a balancer knowing which, and let a second
//! balancer reuse the route derivation and the exact-share weights instead of copying them
//! out of nginx.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::DesiredState;

/// Which side of a rollout a server belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Stable,
    Canary,
}

/// One upstream server of a service: an instance a balancer can send traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The instance's name, unique among the service's servers.
    pub name: String,
    /// `host:port`, as reachable from the balancer.
    pub address: String,
    pub variant: Variant,
}

/// The upstream servers of every service, per service name, each service's servers in the
/// order they were added: what the balancers route to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams(BTreeMap<String, Vec<Server>>);

impl Upstreams {
    /// `service`'s servers, empty when it has none.
    pub fn of(&self, service: &str) -> &[Server] {
        self.0.get(service).map_or(&[], Vec::as_slice)
    }

    /// Adds `server` to `service`'s servers, after those already there.
    pub fn add(&mut self, service: impl Into<String>, server: Server) {
        self.0.entry(service.into()).or_default().push(server);
    }
}

/// A carried service whose servers cannot be taken from a desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRefusal {
    pub service: String,
    /// Why, naming the service (and the server, when one is at fault).
    pub error: String,
}

impl Upstreams {
    /// The servers the `carried` services route to for `desired`: for a service the
    /// coordinator sends `from_inventory`, exactly its servers; otherwise `local`'s (the
    /// agent's `[[instances]]`). Refused, per service: servers the coordinator sent that
    /// could not be read, and an inventory without a stable server (the coordinator never
    /// sends one; routing to it would fail every stable request).
    pub fn for_desired(
        desired: &DesiredState,
        local: &Upstreams,
        carried: &[String],
    ) -> Result<Upstreams, Vec<UpstreamRefusal>> {
        let mut upstreams = Upstreams::default();
        let mut refusals = Vec::new();
        for service in carried {
            let traffic = desired
                .services
                .iter()
                .find(|s| &s.service == service && s.from_inventory);
            let Some(traffic) = traffic else {
                for server in local.of(service) {
                    upstreams.add(service.clone(), server.clone());
                }
                continue;
            };
            let refuse = |error: String| UpstreamRefusal {
                service: service.clone(),
                error,
            };
            if let Some(error) = &traffic.invalid_servers {
                refusals.push(refuse(error.clone()));
            } else if !traffic.servers.iter().any(|s| s.variant == Variant::Stable) {
                refusals.push(refuse(format!(
                    "service '{service}': the coordinator's inventory has no stable server \
                     ({} servers); refusing to route it",
                    traffic.servers.len()
                )));
            } else {
                for s in &traffic.servers {
                    let server = Server {
                        name: s.instance.clone(),
                        address: s.address.clone(),
                        variant: s.variant,
                    };
                    upstreams.add(service.clone(), server);
                }
            }
        }
        if refusals.is_empty() {
            Ok(upstreams)
        } else {
            Err(refusals)
        }
    }
}

/// Builds the upstreams from `(service, server)` pairs, keeping each service's order.
impl FromIterator<(String, Server)> for Upstreams {
    fn from_iter<I: IntoIterator<Item = (String, Server)>>(iter: I) -> Self {
        let mut upstreams = Upstreams::default();
        for (service, server) in iter {
            upstreams.add(service, server);
        }
        upstreams
    }
}

/// What one service's traffic should look like on a balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    /// `host:port` the balancer listens on for this service.
    pub listen: String,
    /// The servers of both variants, each with its [`Variant`].
    pub servers: Vec<Server>,
    /// Share of requests (0..=100) for the canary variant as a whole.
    pub canary_weight: u32,
    /// A balancer-specific key expression (nginx: a variable such as `"$cookie_uid"`);
    /// `Some` switches to a sticky split.
    pub sticky_key: Option<String>,
    /// The version the stable servers run; empty when no rollout mentions the service.
    pub stable_version: String,
    /// The version the canary servers run; empty when no rollout mentions the service.
    pub canary_version: String,
    /// The header and cookie that pick a variant per request, whatever the split.
    pub overrides: VariantOverride,
}

/// A request header and/or cookie that sends a request to a chosen variant, whatever the
/// split: for testers and smoke tests, which must reach the canary at a 1% stage (or the
/// stable variant at 100%). The coordinator sends the names while the service's rollout is
/// active and none once it is promoted, rolled back or aborted; the balancer applies exactly
/// what it is sent.
///
/// What every balancer must do with it (nginx: `agent/src/nginx/render.rs`, a chain of
/// `map`s; HAProxy: `agent/src/haproxy/render.rs`, `use_backend` rules on per-variant
/// backends), and [`VariantOverride::choose`] states the rules as a function each balancer's
/// real-process tests compare against:
///
/// 1. Read the request's header [`VariantOverride::header`] and cookie
///    [`VariantOverride::cookie`] (the names are checked with [`VariantOverride::check`]
///    before they go into a configuration).
/// 2. A value is *recognised* when it is `canary` or `stable`, compared ASCII
///    case-insensitively (`Canary` and `CANARY` work; so does nothing else: `canary ` after
///    the parser's trimming, `canary-1`, `1` are not recognised).
/// 3. The header is looked at first: a recognised value naming a variant that has servers
///    sends the request to that variant's servers (spread over them as the balancer spreads
///    within a variant, ignoring the split's weights). Otherwise the cookie, by the same rule.
/// 4. Otherwise (absent, unrecognised, or the named variant has no servers) the request takes
///    the normal weighted or sticky choice, as if no override existed. A balancer never
///    answers an error because of an override.
///
/// This holds at every canary weight, 0 and 100 included. Counting needs nothing more: the
/// request reaches an instance of the chosen variant, whose agent scrapes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VariantOverride {
    /// Request header name (e.g. `X-Serin-Variant`); `None` = no header override.
    pub header: Option<String>,
    /// Cookie name (e.g. `serin_variant`); `None` = no cookie override.
    pub cookie: Option<String>,
}

impl VariantOverride {
    /// True when neither a header nor a cookie is named.
    pub fn is_none(&self) -> bool {
        self.header.is_none() && self.cookie.is_none()
    }

    /// Refuses names a balancer cannot address safely (they come from the wire and are
    /// written into configurations): the error names the field (`override_header` or
    /// `override_cookie`) and quotes the value.
    pub fn check(&self) -> Result<(), String> {
        if let Some(header) = &self.header {
            serin_proto::overrides::check_header_name(header)
                .map_err(|e| format!("override_header {e}"))?;
        }
        if let Some(cookie) = &self.cookie {
            serin_proto::overrides::check_cookie_name(cookie)
                .map_err(|e| format!("override_cookie {e}"))?;
        }
        Ok(())
    }

    /// The variant a request's header or cookie value names: `canary` or `stable`, ASCII
    /// case-insensitively; `None` for anything else.
    pub fn variant_named(value: &str) -> Option<Variant> {
        if value.eq_ignore_ascii_case(serin_proto::overrides::CANARY_VALUE) {
            Some(Variant::Canary)
        } else if value.eq_ignore_ascii_case(serin_proto::overrides::STABLE_VALUE) {
            Some(Variant::Stable)
        } else {
            None
        }
    }

    /// The variant a request is sent to by its `header_value` and `cookie_value` (what it
    /// carries under [`Self::header`] and [`Self::cookie`]), when `has_servers` says which
    /// variants have servers; `None` = the normal split. The rules of the type's docs, as a
    /// function: the reference a balancer's tests compare its routing against.
    pub fn choose(
        &self,
        header_value: Option<&str>,
        cookie_value: Option<&str>,
        has_servers: impl Fn(Variant) -> bool,
    ) -> Option<Variant> {
        let pick = |named: bool, value: Option<&str>| {
            value
                .filter(|_| named)
                .and_then(Self::variant_named)
                .filter(|&v| has_servers(v))
        };
        pick(self.header.is_some(), header_value)
            .or_else(|| pick(self.cookie.is_some(), cookie_value))
    }
}

impl Route {
    /// `service`'s route in `desired`, listening on `listen`, to `service`'s servers in
    /// `upstreams`. A service the desired state does not mention gets all its traffic on
    /// stable (no rollout).
    pub fn for_service(
        service: &str,
        listen: &str,
        desired: &DesiredState,
        upstreams: &Upstreams,
    ) -> Route {
        let traffic = desired.services.iter().find(|s| s.service == service);
        Route {
            service: service.to_owned(),
            listen: listen.to_owned(),
            servers: upstreams.of(service).to_vec(),
            canary_weight: traffic.map_or(0, |t| t.canary_weight),
            sticky_key: traffic.and_then(|t| t.sticky_key.clone()),
            stable_version: traffic
                .map(|t| t.stable_version.clone())
                .unwrap_or_default(),
            canary_version: traffic
                .map(|t| t.canary_version.clone())
                .unwrap_or_default(),
            overrides: VariantOverride {
                header: traffic.and_then(|t| t.override_header.clone()),
                cookie: traffic.and_then(|t| t.override_cookie.clone()),
            },
        }
    }

    /// The servers of `variant`, in order.
    pub fn servers_of(&self, variant: Variant) -> impl Iterator<Item = &Server> {
        self.servers.iter().filter(move |s| s.variant == variant)
    }
}

/// The exact-share weight rule, shared with the coordinator's inventory.
pub use serin_proto::weights::server_weights;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Generation, ServiceTraffic, UpstreamServer};
    use crate::test_support::traffic;

    fn server(name: &str, port: u16, variant: Variant) -> Server {
        Server {
            name: name.into(),
            address: format!("127.0.0.1:{port}"),
            variant,
        }
    }

    #[test]
    fn upstreams_keep_each_services_servers_in_the_order_added() {
        let upstreams: Upstreams = [
            ("web", server("web-2", 8002, Variant::Canary)),
            ("api", server("api-1", 8003, Variant::Stable)),
            ("web", server("web-1", 8001, Variant::Stable)),
        ]
        .into_iter()
        .map(|(s, server)| (s.to_owned(), server))
        .collect();
        let names = |service| -> Vec<&str> {
            upstreams
                .of(service)
                .iter()
                .map(|s| s.name.as_str())
                .collect()
        };
        assert_eq!(names("web"), ["web-2", "web-1"]);
        assert_eq!(names("api"), ["api-1"]);
        assert!(upstreams.of("bot").is_empty());
    }

    fn inventory(service: &str, servers: &[(&str, u16, Variant)]) -> ServiceTraffic {
        ServiceTraffic {
            servers: servers
                .iter()
                .map(|(name, port, variant)| UpstreamServer {
                    instance: (*name).into(),
                    address: format!("10.0.0.9:{port}"),
                    variant: *variant,
                    weight: 1,
                    agent: "app-9".into(),
                })
                .collect(),
            from_inventory: true,
            ..traffic(service, 10, None)
        }
    }

    fn carried(services: &[&str]) -> Vec<String> {
        services.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn upstreams_for_a_desired_state_take_the_inventory_when_sent_else_the_local_servers() {
        let local: Upstreams = [
            ("web", server("web-local", 8001, Variant::Stable)),
            ("api", server("api-local", 8003, Variant::Stable)),
        ]
        .into_iter()
        .map(|(s, server)| (s.to_owned(), server))
        .collect();
        let desired = DesiredState {
            generation: Generation { term: 1, index: 2 },
            services: vec![
                inventory(
                    "web",
                    &[
                        ("web-a", 9001, Variant::Stable),
                        ("web-b", 9002, Variant::Canary),
                    ],
                ),
                // Servers without the flag (an older coordinator's state, say) are not used.
                ServiceTraffic {
                    from_inventory: false,
                    ..inventory("api", &[("api-x", 9003, Variant::Stable)])
                },
                // Not carried: ignored, even with an empty inventory.
                inventory("bot", &[]),
            ],
        };
        let upstreams =
            Upstreams::for_desired(&desired, &local, &carried(&["web", "api", "lone"])).unwrap();
        let of = |service| -> Vec<(String, String, Variant)> {
            upstreams
                .of(service)
                .iter()
                .map(|s| (s.name.clone(), s.address.clone(), s.variant))
                .collect()
        };
        assert_eq!(
            of("web"),
            [
                ("web-a".into(), "10.0.0.9:9001".into(), Variant::Stable),
                ("web-b".into(), "10.0.0.9:9002".into(), Variant::Canary),
            ]
        );
        assert_eq!(
            of("api"),
            [("api-local".into(), "127.0.0.1:8003".into(), Variant::Stable)]
        );
        assert!(of("lone").is_empty(), "no local servers, no inventory");
        assert!(of("bot").is_empty());
    }

    #[test]
    fn an_inventory_without_a_stable_server_or_with_an_unusable_one_is_refused_per_service() {
        let desired = DesiredState {
            generation: Generation { term: 1, index: 2 },
            services: vec![
                inventory("web", &[("web-c", 9002, Variant::Canary)]),
                ServiceTraffic {
                    invalid_servers: Some("service 'api': bad server 0".into()),
                    ..inventory("api", &[])
                },
                inventory("ok", &[("ok-s", 9004, Variant::Stable)]),
            ],
        };
        let refusals = Upstreams::for_desired(
            &desired,
            &Upstreams::default(),
            &carried(&["web", "api", "ok"]),
        )
        .unwrap_err();
        let services: Vec<&str> = refusals.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(services, ["web", "api"]);
        assert!(
            refusals[0].error.contains("service 'web'")
                && refusals[0].error.contains("no stable server"),
            "{refusals:?}"
        );
        assert_eq!(refusals[1].error, "service 'api': bad server 0");
    }

    #[test]
    fn a_route_takes_the_desired_traffic_or_else_all_stable() {
        let upstreams: Upstreams = [
            ("web".to_owned(), server("web-s", 8001, Variant::Stable)),
            ("web".to_owned(), server("web-c", 8002, Variant::Canary)),
        ]
        .into_iter()
        .collect();
        let desired = DesiredState {
            generation: Generation { term: 1, index: 2 },
            services: vec![ServiceTraffic {
                override_header: Some("X-Serin-Variant".into()),
                override_cookie: Some("serin_variant".into()),
                ..traffic("web", 25, Some("$cookie_uid"))
            }],
        };
        let route = Route::for_service("web", "0.0.0.0:80", &desired, &upstreams);
        assert_eq!(
            route,
            Route {
                service: "web".into(),
                listen: "0.0.0.0:80".into(),
                servers: upstreams.of("web").to_vec(),
                canary_weight: 25,
                sticky_key: Some("$cookie_uid".into()),
                stable_version: "v1".into(),
                canary_version: "v2".into(),
                overrides: VariantOverride {
                    header: Some("X-Serin-Variant".into()),
                    cookie: Some("serin_variant".into()),
                },
            }
        );
        let canary: Vec<&str> = route
            .servers_of(Variant::Canary)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(canary, ["web-c"]);

        let route = Route::for_service("api", "0.0.0.0:81", &desired, &upstreams);
        assert_eq!(
            (route.canary_weight, route.sticky_key, route.servers.len()),
            (0, None, 0)
        );
        assert_eq!(
            (route.stable_version, route.canary_version),
            ("".into(), "".into())
        );
        assert!(route.overrides.is_none());
    }

    fn both() -> VariantOverride {
        VariantOverride {
            header: Some("X-Serin-Variant".into()),
            cookie: Some("serin_variant".into()),
        }
    }

    #[test]
    fn override_values_are_canary_or_stable_in_any_ascii_case_and_nothing_else() {
        for v in ["canary", "Canary", "CANARY", "cAnArY"] {
            assert_eq!(
                VariantOverride::variant_named(v),
                Some(Variant::Canary),
                "{v}"
            );
        }
        for v in ["stable", "Stable", "STABLE"] {
            assert_eq!(
                VariantOverride::variant_named(v),
                Some(Variant::Stable),
                "{v}"
            );
        }
        for v in [
            "", "canary ", " canary", "canary-1", "can", "1", "v2", "ſtable",
        ] {
            assert_eq!(VariantOverride::variant_named(v), None, "{v:?}");
        }
    }

    #[test]
    fn the_header_wins_then_the_cookie_and_a_variant_without_servers_takes_the_split() {
        use Variant::{Canary, Stable};
        let all = |_: Variant| true;
        let o = both();
        assert_eq!(o.choose(Some("canary"), None, all), Some(Canary));
        assert_eq!(o.choose(None, Some("stable"), all), Some(Stable));
        assert_eq!(o.choose(Some("stable"), Some("canary"), all), Some(Stable));
        // An unrecognised header is as if absent: the cookie decides.
        assert_eq!(o.choose(Some("bogus"), Some("canary"), all), Some(Canary));
        assert_eq!(o.choose(Some("bogus"), Some("bogus"), all), None);
        assert_eq!(o.choose(None, None, all), None);
        // The named variant has no servers: the next rule, then the split.
        let no_canary = |v: Variant| v == Stable;
        assert_eq!(o.choose(Some("canary"), None, no_canary), None);
        assert_eq!(
            o.choose(Some("canary"), Some("stable"), no_canary),
            Some(Stable)
        );
        // A value under a name the strategy did not name does nothing.
        let header_only = VariantOverride {
            cookie: None,
            ..both()
        };
        assert_eq!(header_only.choose(None, Some("canary"), all), None);
        assert_eq!(
            VariantOverride::default().choose(Some("canary"), Some("canary"), all),
            None
        );
    }

    #[test]
    fn override_names_from_the_wire_are_checked_naming_the_field() {
        assert_eq!(both().check(), Ok(()));
        assert_eq!(VariantOverride::default().check(), Ok(()));
        let bad_header = VariantOverride {
            header: Some("X-Serin\"; return 200".into()),
            ..both()
        };
        let e = bad_header.check().unwrap_err();
        assert!(
            e.starts_with("override_header \"X-Serin\\\"; return 200\""),
            "{e}"
        );
        let bad_cookie = VariantOverride {
            cookie: Some("serin-variant".into()),
            ..both()
        };
        let e = bad_cookie.check().unwrap_err();
        assert!(e.starts_with("override_cookie \"serin-variant\""), "{e}");
    }
}
