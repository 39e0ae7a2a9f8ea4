//! Pure rendering of the serin-owned HAProxy config file: no I/O, no clock.
//!
//! The whole file is serin's (HAProxy runs with `-W -S <master_socket> -f <config>`; an
//! operator's own sections go in further `-f` files):
//!
//! - `global`: the admin socket the agent drives (`stats socket <socket> level admin`).
//! - `defaults`: HTTP mode, timeouts.
//! - per service `svc` (identifier `serin_<svc>`, the name mapped to `[A-Za-z0-9_]`):
//!   `frontend serin_<svc>` binding the service's listen address, `default_backend
//!   serin_<svc>`; `backend serin_<svc>` with the service's balancing algorithm and its
//!   slots `slot0..slotN`, each holding a server (`server slotI IP:PORT weight W`) or parked
//!   (`server slotI 127.0.0.1:1 weight 0 disabled`).
//!
//! The file is rewritten with the live slots on every change (without a reload when only
//! slots changed), so an HAProxy restarted from it comes back with the current traffic.

use std::fmt::Write as _;
use std::path::Path;

use super::plan::{SlotServer, slot_name};
use super::settings::Algorithm;

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
}

/// The HAProxy name of a service's frontend and backend: `serin_<svc>`.
pub fn backend_name(service: &str) -> String {
    format!("serin_{}", crate::nginx::identifier(service))
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
        let name = backend_name(&s.service);
        if let Some(first) = names.insert(name.clone(), &s.service) {
            return Err(RenderError::DuplicateService {
                identifier: name.trim_start_matches("serin_").to_owned(),
                first: first.to_owned(),
                second: s.service.clone(),
            });
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
    for s in services {
        let name = backend_name(&s.service);
        let _ = write!(
            out,
            "\n# service {:?}\nfrontend {name}\n    bind {}\n    default_backend {name}\n",
            s.service, s.listen
        );
        let _ = write!(
            out,
            "\nbackend {name}\n    balance {}\n",
            s.algorithm.keyword()
        );
        for (i, slot) in s.slots.iter().enumerate() {
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
    Ok(out)
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
        }
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
}
