//! Pacing of traffic changes (pure): when the applier may apply a new desired state through
//! an actuator that asks for a [`min_change_interval`](crate::actuator::TrafficActuator::min_change_interval)
//! (nginx: at most one reload per second).
//!
//! Why: every nginx reload resets the idle keep-alive connections of the old workers (about
//! 2 failed keep-alive requests per reload, docs/benchmarks.md §8), and an nginx apply takes
//! ~0.3 s, so applying each state of a burst as soon as the previous apply finished reloads
//! ~3 times a second. Holding the states of a burst and applying only the newest one, once
//! the interval since the previous change has passed, bounds that cost; nothing is applied
//! out of order, and the generations skipped are acknowledged implicitly by the newer one
//! (the coordinator counts an ack of generation *g* as applied for everything up to *g*).
//!
//! The rule ([`hold_until`], then [`takes_traffic_away`]):
//! - a state is held only when the previous change went live less than the interval ago;
//! - a state that **takes traffic away** is never held: the canary's share of a service
//!   drops to 0 (a rollback, an abort, an undo to stable), a server the live state routes to
//!   is no longer listed (an instance taken out for its health, the canary's servers
//!   removed), or an override header or cookie is removed (testers lose the canary too).
//!   These are the coordinator's reactions to something going wrong, and their latency is a
//!   feature (docs/benchmarks.md §2 measures the rollback's); one extra reload for them
//!   costs less than a second more of a bad canary or a dead server.
//! - everything else (a stage's share going up, a server added, a share lowered but not to 0)
//!   waits until the interval has passed since the previous change.
//!
//! No clock and no I/O here: the applier passes the instants in, so every case is tested
//! without time passing.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{DesiredState, ServiceTraffic};
use crate::traffic::Upstreams;

/// When a new desired state may be applied, given the actuator's minimum change interval
/// and when the previous change went live: `None` at once, `Some(at)` not before `at`.
pub(super) fn hold_until(
    min_interval: Option<Duration>,
    last_change: Option<Instant>,
    now: Instant,
) -> Option<Instant> {
    let at = last_change? + min_interval?;
    (now < at).then_some(at)
}

/// Why a desired state takes traffic away from something the live state sends it to, and so
/// is applied without waiting for the change interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TakesAway {
    /// The canary's share of `service` drops from `from` % to 0.
    CanaryShareToZero { service: String, from: u32 },
    /// `address` is no longer among `service`'s servers.
    ServerRemoved { service: String, address: String },
    /// The override header or cookie `name` of `service` is removed (or renamed).
    OverrideRemoved { service: String, name: String },
}

impl fmt::Display for TakesAway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TakesAway::CanaryShareToZero { service, from } => {
                write!(f, "the canary share of '{service}' drops from {from}% to 0")
            }
            TakesAway::ServerRemoved { service, address } => {
                write!(f, "server {address} of '{service}' is taken out")
            }
            TakesAway::OverrideRemoved { service, name } => {
                write!(f, "the override '{name}' of '{service}' is removed")
            }
        }
    }
}

/// The first way in which `next` (with its upstreams) takes traffic away from what `live`
/// (with its upstreams) routes to, over the `carried` services; `None` when it takes none.
/// A carried service a state does not mention has a canary share of 0 and no overrides.
pub(super) fn takes_traffic_away(
    carried: &[String],
    live: (&DesiredState, &Upstreams),
    next: (&DesiredState, &Upstreams),
) -> Option<TakesAway> {
    let (live, live_upstreams) = live;
    let (next, next_upstreams) = next;
    for service in carried {
        let find = |d: &DesiredState| d.services.iter().find(|s| &s.service == service).cloned();
        let (was, will) = (find(live), find(next));
        let share = |t: &Option<ServiceTraffic>| t.as_ref().map_or(0, |t| t.canary_weight);
        let from = share(&was);
        if from > 0 && share(&will) == 0 {
            return Some(TakesAway::CanaryShareToZero {
                service: service.clone(),
                from,
            });
        }
        let next_servers = next_upstreams.of(service);
        if let Some(gone) = live_upstreams
            .of(service)
            .iter()
            .find(|s| !next_servers.iter().any(|n| n.address == s.address))
        {
            return Some(TakesAway::ServerRemoved {
                service: service.clone(),
                address: gone.address.clone(),
            });
        }
        let names = |t: &Option<ServiceTraffic>| {
            t.as_ref().map_or((None, None), |t| {
                (t.override_header.clone(), t.override_cookie.clone())
            })
        };
        let ((header_was, cookie_was), (header_will, cookie_will)) = (names(&was), names(&will));
        for (was, will) in [(header_was, header_will), (cookie_was, cookie_will)] {
            if let Some(name) = was.filter(|name| will.as_ref() != Some(name)) {
                return Some(TakesAway::OverrideRemoved {
                    service: service.clone(),
                    name,
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Generation;
    use crate::test_support::traffic;
    use crate::traffic::{Server, Variant};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_state_is_held_only_within_the_interval_after_the_previous_change() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // No interval, or no change yet: at once.
        assert_eq!(hold_until(None, Some(t0), t0), None);
        assert_eq!(hold_until(Some(SECOND), None, t0), None);
        // Within the interval: until its end, wherever in it the state arrives.
        for after in [ms(0), ms(1), ms(300), ms(999)] {
            assert_eq!(
                hold_until(Some(SECOND), Some(t0), t0 + after),
                Some(t0 + SECOND),
                "{after:?} after the change"
            );
        }
        // At or after its end: at once.
        for after in [ms(1000), ms(1001), ms(60_000)] {
            assert_eq!(hold_until(Some(SECOND), Some(t0), t0 + after), None);
        }
        // A zero interval never holds.
        assert_eq!(hold_until(Some(Duration::ZERO), Some(t0), t0), None);
    }

    fn server(address: &str, variant: Variant) -> Server {
        Server {
            name: address.into(),
            address: address.into(),
            variant,
        }
    }

    fn upstreams(servers: &[(&str, &str, Variant)]) -> Upstreams {
        servers
            .iter()
            .map(|(service, address, variant)| ((*service).to_owned(), server(address, *variant)))
            .collect()
    }

    fn state(services: Vec<ServiceTraffic>) -> DesiredState {
        DesiredState {
            generation: Generation { term: 1, index: 1 },
            services,
        }
    }

    fn shares(services: &[(&str, u32)]) -> DesiredState {
        state(services.iter().map(|(s, w)| traffic(s, *w, None)).collect())
    }

    fn carried() -> Vec<String> {
        vec!["web".into(), "api".into()]
    }

    /// `takes_traffic_away` with the same upstreams on both sides.
    fn shares_change(live: &[(&str, u32)], next: &[(&str, u32)]) -> Option<TakesAway> {
        let up = upstreams(&[
            ("web", "10.0.0.1:80", Variant::Stable),
            ("web", "10.0.0.2:80", Variant::Canary),
        ]);
        takes_traffic_away(&carried(), (&shares(live), &up), (&shares(next), &up))
    }

    #[test]
    fn the_canary_share_dropping_to_zero_takes_traffic_away() {
        let to_zero = |service: &str, from| {
            Some(TakesAway::CanaryShareToZero {
                service: service.into(),
                from,
            })
        };
        assert_eq!(
            shares_change(&[("web", 25)], &[("web", 0)]),
            to_zero("web", 25)
        );
        assert_eq!(
            shares_change(&[("web", 100)], &[("web", 0)]),
            to_zero("web", 100)
        );
        // A service no longer mentioned goes all-stable: the same.
        assert_eq!(shares_change(&[("web", 5)], &[]), to_zero("web", 5));
        assert_eq!(
            shares_change(&[("web", 5), ("api", 50)], &[("web", 5), ("api", 0)]),
            to_zero("api", 50)
        );
    }

    #[test]
    fn a_share_going_up_or_down_but_not_to_zero_takes_nothing_away() {
        for (live, next) in [
            (0, 5),
            (5, 10),
            (50, 25),
            (25, 1),
            (100, 50),
            (0, 0),
            (10, 10),
        ] {
            assert_eq!(
                shares_change(&[("web", live)], &[("web", next)]),
                None,
                "{live}% -> {next}%"
            );
        }
        assert_eq!(shares_change(&[], &[("web", 5)]), None);
        // A service not carried here does not count.
        assert_eq!(shares_change(&[("bot", 50)], &[("bot", 0)]), None);
    }

    #[test]
    fn a_server_taken_out_takes_traffic_away_one_added_does_not() {
        let both = upstreams(&[
            ("web", "10.0.0.1:80", Variant::Stable),
            ("web", "10.0.0.2:80", Variant::Stable),
            ("web", "10.0.0.3:80", Variant::Canary),
        ]);
        let no_canary = upstreams(&[
            ("web", "10.0.0.1:80", Variant::Stable),
            ("web", "10.0.0.2:80", Variant::Stable),
        ]);
        let one_stable = upstreams(&[
            ("web", "10.0.0.1:80", Variant::Stable),
            ("web", "10.0.0.3:80", Variant::Canary),
        ]);
        let s = shares(&[("web", 10)]);
        let removed = |address: &str| {
            Some(TakesAway::ServerRemoved {
                service: "web".into(),
                address: address.into(),
            })
        };
        assert_eq!(
            takes_traffic_away(&carried(), (&s, &both), (&s, &no_canary)),
            removed("10.0.0.3:80")
        );
        assert_eq!(
            takes_traffic_away(&carried(), (&s, &both), (&s, &one_stable)),
            removed("10.0.0.2:80")
        );
        assert_eq!(
            takes_traffic_away(&carried(), (&s, &no_canary), (&s, &both)),
            None
        );
        assert_eq!(
            takes_traffic_away(&carried(), (&s, &both), (&s, &both)),
            None
        );
        // The same address under another variant is still served: nothing taken away.
        let relabelled = upstreams(&[
            ("web", "10.0.0.1:80", Variant::Stable),
            ("web", "10.0.0.2:80", Variant::Stable),
            ("web", "10.0.0.3:80", Variant::Stable),
        ]);
        assert_eq!(
            takes_traffic_away(&carried(), (&s, &both), (&s, &relabelled)),
            None
        );
    }

    #[test]
    fn an_override_removed_or_renamed_takes_traffic_away_one_added_does_not() {
        let up = upstreams(&[("web", "10.0.0.1:80", Variant::Stable)]);
        let with = |header: Option<&str>, cookie: Option<&str>| {
            state(vec![ServiceTraffic {
                override_header: header.map(Into::into),
                override_cookie: cookie.map(Into::into),
                ..traffic("web", 10, None)
            }])
        };
        let check = |live: &DesiredState, next: &DesiredState| {
            takes_traffic_away(&carried(), (live, &up), (next, &up))
        };
        let removed = |name: &str| {
            Some(TakesAway::OverrideRemoved {
                service: "web".into(),
                name: name.into(),
            })
        };
        let header = with(Some("X-Serin-Variant"), None);
        let cookie = with(None, Some("serin_variant"));
        let none = with(None, None);
        assert_eq!(check(&header, &none), removed("X-Serin-Variant"));
        assert_eq!(check(&cookie, &none), removed("serin_variant"));
        assert_eq!(
            check(&header, &with(Some("X-Other"), None)),
            removed("X-Serin-Variant")
        );
        assert_eq!(check(&none, &header), None);
        assert_eq!(check(&header, &header), None);
        assert_eq!(
            check(
                &header,
                &with(Some("X-Serin-Variant"), Some("serin_variant"))
            ),
            None
        );
    }

    #[test]
    fn the_reasons_read_as_sentences() {
        let texts = [
            TakesAway::CanaryShareToZero {
                service: "web".into(),
                from: 25,
            },
            TakesAway::ServerRemoved {
                service: "web".into(),
                address: "10.0.0.3:80".into(),
            },
            TakesAway::OverrideRemoved {
                service: "web".into(),
                name: "X-Serin-Variant".into(),
            },
        ]
        .map(|t| t.to_string());
        assert_eq!(
            texts,
            [
                "the canary share of 'web' drops from 25% to 0",
                "server 10.0.0.3:80 of 'web' is taken out",
                "the override 'X-Serin-Variant' of 'web' is removed",
            ]
        );
    }
}
