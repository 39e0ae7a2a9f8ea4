//! Pure rendering of the serin-owned HAProxy config file: no I/O, no clock.
//!
//! The whole file is serin's (HAProxy runs with `-W -S <master_socket> -f <config>`; an
//! operator's own sections go in further `-f` files):
//!
//! - `global`: the admin socket the agent drives (`stats socket <socket> level admin`).
//! - `defaults`: HTTP mode, timeouts, `option idle-close-on-response` (reloads keep idle
//!   client connections until their next answer).
//! - per service `svc` (identifier `serin_<svc>`, the name mapped to `[A-Za-z0-9_]`):
//!   `frontend serin_<svc>` binding the service's listen address, `default_backend
//!   serin_<svc>`; `backend serin_<svc>` with the service's balancing algorithm and its
//!   slots `slot0..slotN`, each holding a server (`server slotI IP:PORT weight W`) or parked
//!   (`server slotI 127.0.0.1:1 weight 0 disabled`).
//! - per service with overrides (see [`VariantOverride`]): two more backends,
//!   `serin_<svc>_stable` and `serin_<svc>_canary`, with as many slots as the main one, each
//!   holding that variant's servers at weight 1; and in the frontend, before
//!   `default_backend`, one `use_backend` rule per (name, value): the header's first, then
//!   the cookie's, each `if { req.fhdr(NAME) -m str -i canary } { nbsrv(serin_<svc>_canary)
//!   gt 0 }` (or `req.cook(NAME)`). `-i` makes the value ASCII case-insensitive; `req.fhdr`
//!   takes a header line whole (`req.hdr` would split `canary, x` at the comma and match,
//!   where the reference rules see one unrecognised value); `nbsrv` counts only usable
//!   servers (not parked in maintenance, weight above 0), so a variant whose servers all
//!   left falls through to the next rule and then to the split with no reload: membership
//!   stays runtime state. Without overrides none of this is rendered.
//!
//! The file is rewritten with the live slots on every change (without a reload when only
//! slots changed), so an HAProxy restarted from it comes back with the current traffic.

use std::fmt::Write as _;
use std::path::Path;

use super::plan::{SlotServer, slot_name};
use super::settings::Algorithm;
use crate::traffic::{Variant, VariantOverride};

/// What a parked slot points at until it holds a server: never contacted (the slot is in
/// maintenance), and valid for HAProxy.
pub const PARKED_ADDRESS: &str = "127.0.0.1:1";

/// One carried service as rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedService {
    pub service: String,
    /// `host:port` the frontend binds.
    pub listen: String,
    pub algorithm: Algorithm,
    /// What each slot holds (`None`: parked).
    pub slots: Vec<Option<SlotServer>>,
    /// The header and cookie that pick a variant; none = no override backends or rules.
    pub overrides: VariantOverride,
    /// The slots of `serin_<svc>_stable` (rendered only with overrides).
    pub stable_slots: Vec<Option<SlotServer>>,
    /// The slots of `serin_<svc>_canary` (rendered only with overrides).
    pub canary_slots: Vec<Option<SlotServer>>,
}

impl RenderedService {
    /// Every backend this service renders, with its slots: `serin_<svc>`, then (with
    /// overrides) `serin_<svc>_stable` and `serin_<svc>_canary`.
    pub fn backends(&self) -> Vec<(String, &[Option<SlotServer>])> {
        let mut backends = vec![(backend_name(&self.service), self.slots.as_slice())];
        if !self.overrides.is_none() {
            backends.push((
                variant_backend_name(&self.service, Variant::Stable),
                self.stable_slots.as_slice(),
            ));
            backends.push((
                variant_backend_name(&self.service, Variant::Canary),
                self.canary_slots.as_slice(),
            ));
        }
        backends
    }
}

/// Why a config cannot be rendered; each message names the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "admin socket path '{}' cannot be written into haproxy.cfg (no spaces, quotes, '#' or \
         control characters)",
        path.display()
    )]
    SocketPath { path: std::path::PathBuf },
    #[error("service '{service}': listen {value:?} is not a host:port address")]
    Listen { service: String, value: String },
    #[error(
        "services '{first}' and '{second}' map to the same HAProxy name 'serin_{identifier}' \
         (service names are reduced to [A-Za-z0-9_])"
    )]
    DuplicateService {
        identifier: String,
        first: String,
        second: String,
    },
    #[error("service '{service}': {reason}")]
    InvalidOverride {
        service: String,
        /// Names the field (`override_header`, `override_cookie`) and quotes the value.
        reason: String,
    },
}

/// The HAProxy name of a service's frontend and backend: `serin_<svc>`.
pub fn backend_name(service: &str) -> String {
    format!("serin_{}", crate::nginx::identifier(service))
}

/// The backend an override sends `variant`'s requests to: `serin_<svc>_stable` or
/// `serin_<svc>_canary`.
pub fn variant_backend_name(service: &str, variant: Variant) -> String {
    let suffix = match variant {
        Variant::Stable => "stable",
        Variant::Canary => "canary",
    };
    format!("{}_{suffix}", backend_name(service))
}

fn plain_path(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| {
        !s.is_empty()
            && !s.chars().any(|c| {
                c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#' | '\\')
            })
    })
}

/// Renders the whole file.
pub fn render_config(socket: &Path, services: &[RenderedService]) -> Result<String, RenderError> {
    let socket = plain_path(socket).ok_or_else(|| RenderError::SocketPath {
        path: socket.to_owned(),
    })?;
    let mut names: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for s in services {
        if !crate::nginx::is_address(&s.listen) {
            return Err(RenderError::Listen {
                service: s.service.clone(),
                value: s.listen.clone(),
            });
        }
        s.overrides
            .check()
            .map_err(|reason| RenderError::InvalidOverride {
                service: s.service.clone(),
                reason,
            })?;
        for (name, _) in s.backends() {
            if let Some(first) = names.insert(name.clone(), &s.service) {
                return Err(RenderError::DuplicateService {
                    identifier: name.trim_start_matches("serin_").to_owned(),
                    first: first.to_owned(),
                    second: s.service.clone(),
                });
            }
        }
    }

    let mut out = String::new();
    out.push_str("# Managed by serin agent — do not edit: rewritten on every traffic change.\n");
    out.push_str("global\n");
    let _ = writeln!(out, "    stats socket {socket} level admin");
    out.push_str("    stats timeout 30s\n");
    out.push_str("\ndefaults\n");
    out.push_str("    mode http\n");
    out.push_str("    option redispatch\n");
    out.push_str("    retries 3\n");
    out.push_str("    timeout connect 5s\n");
    out.push_str("    timeout client 60s\n");
    out.push_str("    timeout server 60s\n");
    out.push_str("    timeout http-keep-alive 60s\n");
    // On a reload the old process keeps its idle client connections and closes each after
    // answering its next request, instead of closing them at once: a keep-alive client that
    // sent a request as the connection closed saw a transport error (tests/fleet_haproxy.rs,
    // 1 in ~1500 requests under a parallel test run).
    out.push_str("    option idle-close-on-response\n");
    for s in services {
        let name = backend_name(&s.service);
        let _ = write!(
            out,
            "\n# service {:?}\nfrontend {name}\n    bind {}\n",
            s.service, s.listen
        );
        override_rules(&mut out, s);
        let _ = writeln!(out, "    default_backend {name}");
        for (backend, slots) in s.backends() {
            let _ = write!(
                out,
                "\nbackend {backend}\n    balance {}\n",
                s.algorithm.keyword()
            );
            for (i, slot) in slots.iter().enumerate() {
                let slot_name = slot_name(i);
                match slot {
                    Some(server) => {
                        let address = std::net::SocketAddr::new(server.ip, server.port);
                        let _ = writeln!(
                            out,
                            "    server {slot_name} {address} weight {}  # {}",
                            server.weight,
                            sanitize_comment(&server.name)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "    server {slot_name} {PARKED_ADDRESS} weight 0 disabled"
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The frontend's `use_backend` rules of `s`'s overrides (nothing without): the header's
/// before the cookie's, `canary` before `stable` (a value names one of them, so their order
/// does not matter), each only while that variant's backend has a usable server.
fn override_rules(out: &mut String, s: &RenderedService) {
    let fetches = [
        s.overrides
            .header
            .as_ref()
            .map(|h| format!("req.fhdr({h})")),
        s.overrides
            .cookie
            .as_ref()
            .map(|c| format!("req.cook({c})")),
    ];
    for fetch in fetches.into_iter().flatten() {
        for (variant, value) in [
            (Variant::Canary, serin_proto::overrides::CANARY_VALUE),
            (Variant::Stable, serin_proto::overrides::STABLE_VALUE),
        ] {
            let backend = variant_backend_name(&s.service, variant);
            let _ = writeln!(
                out,
                "    use_backend {backend} if {{ {fetch} -m str -i {value} }} {{ nbsrv({backend}) gt 0 }}"
            );
        }
    }
}

fn sanitize_comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn service(name: &str, listen: &str, slots: Vec<Option<SlotServer>>) -> RenderedService {
        RenderedService {
            service: name.into(),
            listen: listen.into(),
            algorithm: Algorithm::RoundRobin,
            slots,
            overrides: VariantOverride::default(),
            stable_slots: Vec::new(),
            canary_slots: Vec::new(),
        }
    }

    fn slot(name: &str, last: u8, weight: u32) -> Option<SlotServer> {
        Some(SlotServer {
            name: name.into(),
            ip: IpAddr::from([10, 0, 0, last]),
            port: 8080,
            weight,
        })
    }

    fn with_overrides(
        mut s: RenderedService,
        header: Option<&str>,
        cookie: Option<&str>,
    ) -> RenderedService {
        s.overrides = VariantOverride {
            header: header.map(Into::into),
            cookie: cookie.map(Into::into),
        };
        s
    }

    #[test]
    fn a_service_is_a_frontend_and_a_backend_of_slots() {
        let server = SlotServer {
            name: "web-1".into(),
            ip: IpAddr::from([10, 0, 0, 11]),
            port: 8080,
            weight: 3,
        };
        let text = render_config(
            Path::new("/run/serin/haproxy.sock"),
            &[service("web", "0.0.0.0:80", vec![Some(server), None])],
        )
        .unwrap();
        assert!(
            text.contains("    stats socket /run/serin/haproxy.sock level admin\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "frontend serin_web\n    bind 0.0.0.0:80\n    default_backend serin_web\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "backend serin_web\n    balance roundrobin\n    server slot0 10.0.0.11:8080 weight 3  # web-1\n    server slot1 127.0.0.1:1 weight 0 disabled\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_ipv6_server_is_bracketed_and_the_algorithm_is_the_services() {
        let server = SlotServer {
            name: "v6".into(),
            ip: "fd00::5".parse().unwrap(),
            port: 81,
            weight: 1,
        };
        let mut svc = service("api.v2", "127.0.0.1:81", vec![Some(server)]);
        svc.algorithm = Algorithm::LeastConn;
        let text = render_config(Path::new("/s"), &[svc]).unwrap();
        assert!(
            text.contains("backend serin_api_v2\n    balance leastconn\n"),
            "{text}"
        );
        assert!(
            text.contains("server slot0 [fd00::5]:81 weight 1"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_them() {
        let err = render_config(Path::new("/tmp/my socket"), &[]).unwrap_err();
        assert!(err.to_string().contains("'/tmp/my socket'"), "{err}");
        let err = render_config(
            Path::new("/s"),
            &[service("web", "0.0.0.0:80\n bind", vec![])],
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("service 'web': listen"),
            "{err}"
        );
        let err = render_config(
            Path::new("/s"),
            &[
                service("a.b", "1.2.3.4:1", vec![]),
                service("a-b", "1.2.3.4:2", vec![]),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("'a.b' and 'a-b'"), "{err}");
    }

    #[test]
    fn overrides_add_a_backend_per_variant_and_rules_header_first_before_the_default() {
        let mut svc = with_overrides(
            service(
                "web",
                "0.0.0.0:80",
                vec![slot("s1", 1, 3), slot("c1", 2, 1), None],
            ),
            Some("X-Serin-Variant"),
            Some("serin_variant"),
        );
        svc.stable_slots = vec![slot("s1", 1, 1), None, None];
        svc.canary_slots = vec![slot("c1", 2, 1), None, None];
        let text = render_config(Path::new("/s"), &[svc]).unwrap();
        let c = "use_backend serin_web_canary if";
        let st = "use_backend serin_web_stable if";
        let frontend = format!(
            "frontend serin_web\n    bind 0.0.0.0:80\n\
             \x20   {c} {{ req.fhdr(X-Serin-Variant) -m str -i canary }} {{ nbsrv(serin_web_canary) gt 0 }}\n\
             \x20   {st} {{ req.fhdr(X-Serin-Variant) -m str -i stable }} {{ nbsrv(serin_web_stable) gt 0 }}\n\
             \x20   {c} {{ req.cook(serin_variant) -m str -i canary }} {{ nbsrv(serin_web_canary) gt 0 }}\n\
             \x20   {st} {{ req.cook(serin_variant) -m str -i stable }} {{ nbsrv(serin_web_stable) gt 0 }}\n\
             \x20   default_backend serin_web\n"
        );
        assert!(text.contains(&frontend), "{text}");
        assert!(
            text.contains(
                "backend serin_web_stable\n    balance roundrobin\n    server slot0 10.0.0.1:8080 weight 1  # s1\n    server slot1 127.0.0.1:1 weight 0 disabled\n    server slot2 127.0.0.1:1 weight 0 disabled\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "backend serin_web_canary\n    balance roundrobin\n    server slot0 10.0.0.2:8080 weight 1  # c1\n"
            ),
            "{text}"
        );
        // The main backend keeps the split's weights.
        assert!(
            text.contains("backend serin_web\n    balance roundrobin\n    server slot0 10.0.0.1:8080 weight 3  # s1\n    server slot1 10.0.0.2:8080 weight 1  # c1\n"),
            "{text}"
        );
    }

    #[test]
    fn either_override_name_works_alone_and_without_overrides_nothing_is_added() {
        let header_only =
            with_overrides(service("web", "0.0.0.0:80", vec![None]), Some("X-V"), None);
        let text = render_config(Path::new("/s"), &[header_only]).unwrap();
        assert_eq!(text.matches("use_backend").count(), 2, "{text}");
        assert!(
            text.contains("req.fhdr(X-V)") && !text.contains("req.cook"),
            "{text}"
        );
        let cookie_only = with_overrides(service("web", "0.0.0.0:80", vec![None]), None, Some("v"));
        let text = render_config(Path::new("/s"), &[cookie_only]).unwrap();
        assert_eq!(text.matches("use_backend").count(), 2, "{text}");
        assert!(
            text.contains("req.cook(v)") && !text.contains("req.fhdr"),
            "{text}"
        );
        assert!(text.contains("backend serin_web_canary\n"), "{text}");

        // Variant slots without override names are not rendered: the file is as before.
        let mut plain = service("web", "0.0.0.0:80", vec![slot("s1", 1, 1)]);
        plain.stable_slots = vec![slot("s1", 1, 1)];
        let text = render_config(Path::new("/s"), &[plain]).unwrap();
        assert!(
            !text.contains("use_backend") && !text.contains("serin_web_stable"),
            "{text}"
        );
    }

    #[test]
    fn an_unusable_override_name_or_a_clashing_backend_is_refused_naming_it() {
        for (header, cookie, expected) in [
            (Some("X_Serin"), None, "override_header \"X_Serin\""),
            (Some("X-V) -m found }"), None, "override_header"),
            (None, Some("a b"), "override_cookie \"a b\""),
            (
                None,
                Some("serin-variant"),
                "override_cookie \"serin-variant\"",
            ),
        ] {
            let err = render_config(
                Path::new("/s"),
                &[with_overrides(
                    service("web", "0.0.0.0:80", vec![]),
                    header,
                    cookie,
                )],
            )
            .unwrap_err();
            assert!(
                matches!(&err, RenderError::InvalidOverride { service, .. } if service == "web"),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with("service 'web': ") && text.contains(expected),
                "{text}"
            );
        }
        // A service named like another's override backend.
        let err = render_config(
            Path::new("/s"),
            &[
                with_overrides(service("web", "1.2.3.4:1", vec![]), Some("X-V"), None),
                service("web_canary", "1.2.3.4:2", vec![]),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("'web' and 'web_canary'"), "{err}");
    }
}
