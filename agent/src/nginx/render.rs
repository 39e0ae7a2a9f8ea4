//! Pure rendering of the serin-owned nginx site file: no I/O, no clock.
//!
//! Per service `svc` (identifier `serin_<svc>`, the name mapped to `[A-Za-z0-9_]`):
//!
//! - weighted mode (`sticky_key: None`): `upstream serin_<svc>` holds the servers of each
//!   variant that gets traffic, with integer weights such that the canary *variant* receives
//!   exactly `canary_weight`% whatever the number of servers per variant. A variant at 0% is
//!   left out (nginx rejects `weight=0`).
//! - sticky mode: `split_clients "<key>" $serin_<svc>_upstream { W% serin_<svc>_canary; *
//!   serin_<svc>_stable; }`, canary bucket first so that users stay canary while the share
//!   grows; the key goes through a `map` that replaces an empty key with `$request_id`, so
//!   requests without it (first visits) split by weight instead of all hashing to the canary.
//! - no servers at all (a balancer whose servers come from the coordinator, before they
//!   arrive; only without a rollout): `location /` answers 503, no upstream is rendered.
//! - overrides (`route.overrides`, see [`crate::traffic::VariantOverride`]): a chain of `map`s
//!   in front of the choice above, `$http_<header>` first, then `$cookie_<cookie>`, each mapping
//!   `~*^canary$` to `serin_<svc>_canary` and `~*^stable$` to `serin_<svc>_stable` (only for a
//!   variant that has servers; otherwise that value falls through) and everything else to the
//!   next link, the last link being the normal weighted upstream or the sticky variable; `location
//!   /` proxies to the chain's head. Case-insensitive regexes because the contract is ASCII
//!   case-insensitive; no map at all without overrides, so such sites render as before.
//! - always: `upstream serin_<svc>_stable` / `serin_<svc>_canary` for each variant with
//!   servers, reachable directly under `/__serin/stable/` and `/__serin/canary/`, and
//!   `location = /__serin/generation` answering the generation marker, which the actuator
//!   polls to learn that a reload is live.

use std::collections::HashMap;

use serin_proto::overrides::{CANARY_VALUE, STABLE_VALUE};

use crate::traffic::{Route, Variant, server_weights};

/// Keep-alive connections each nginx worker holds open per upstream.
const UPSTREAM_KEEPALIVE: u32 = 16;
/// Path of the generation marker served on every listen address.
pub const GENERATION_PATH: &str = "/__serin/generation";

/// Why a set of routes cannot be rendered. Every message names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("route '{service}': canary_weight {weight} is out of range (0..=100)")]
    WeightOutOfRange { service: String, weight: u32 },
    #[error(
        "route '{service}': canary_weight is {canary_weight} so stable still gets traffic, \
         but upstreams has no stable server"
    )]
    NoStableUpstream { service: String, canary_weight: u32 },
    #[error(
        "route '{service}': canary_weight is {canary_weight} but upstreams has no canary server"
    )]
    NoCanaryUpstream { service: String, canary_weight: u32 },
    #[error(
        "route '{service}': sticky_key '{value}' is invalid: {reason} \
         (expected an nginx variable expression such as \"$cookie_uid\" or \"${{http_x_user}}\")"
    )]
    InvalidStickyKey {
        service: String,
        value: String,
        reason: &'static str,
    },
    #[error("routes '{first}' and '{second}' both use listen address '{listen}'")]
    DuplicateListen {
        listen: String,
        first: String,
        second: String,
    },
    #[error(
        "routes '{first}' and '{second}' map to the same nginx identifier 'serin_{identifier}' \
         (service names are reduced to [A-Za-z0-9_])"
    )]
    DuplicateService {
        identifier: String,
        first: String,
        second: String,
    },
    #[error("route service name {value:?} is invalid: it must be non-empty")]
    InvalidServiceName { value: String },
    #[error("{field} {value:?} is not a host:port address (allowed: A-Z a-z 0-9 . - _ : [ ] *)")]
    InvalidAddress { field: String, value: String },
    #[error("generation {value:?} is invalid: it must be 1-64 characters of A-Z a-z 0-9 . _ : -")]
    InvalidGeneration { value: String },
    #[error("route '{service}': {reason}")]
    InvalidOverride {
        service: String,
        /// Names the field (`override_header`, `override_cookie`) and quotes the value.
        reason: String,
    },
}

/// Renders the whole site file for `routes`, served generation `generation` (e.g. "3.17").
pub fn render_site(routes: &[Route], generation: &str) -> Result<String, RenderError> {
    validate_generation(generation)?;
    let mut identifiers: HashMap<String, &str> = HashMap::new();
    let mut listens: HashMap<&str, &str> = HashMap::new();
    for route in routes {
        validate_route(route)?;
        let ident = identifier(&route.service);
        if let Some(first) = identifiers.insert(ident.clone(), &route.service) {
            return Err(RenderError::DuplicateService {
                identifier: ident,
                first: first.to_owned(),
                second: route.service.clone(),
            });
        }
        if let Some(first) = listens.insert(&route.listen, &route.service) {
            return Err(RenderError::DuplicateListen {
                listen: route.listen.clone(),
                first: first.to_owned(),
                second: route.service.clone(),
            });
        }
    }

    let mut out = format!("# Managed by serin agent — do not edit; generation {generation}\n");
    for route in routes {
        out.push('\n');
        render_route(&mut out, route, generation);
    }
    Ok(out)
}

/// The nginx identifier suffix for a service: every character outside `[A-Za-z0-9_]`
/// becomes `_`.
pub fn identifier(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn validate_generation(generation: &str) -> Result<(), RenderError> {
    let ok = !generation.is_empty()
        && generation.len() <= 64
        && generation
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RenderError::InvalidGeneration {
            value: generation.to_owned(),
        })
    }
}

/// Characters allowed in listen and server addresses: enough for `host:port`, `[v6]:port`,
/// `*:port`, and nothing that could end an nginx directive or start a new one.
pub(crate) fn is_address(value: &str) -> bool {
    !value.is_empty()
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '*')
        })
}

fn validate_route(route: &Route) -> Result<(), RenderError> {
    let service = &route.service;
    if service.is_empty() {
        return Err(RenderError::InvalidServiceName {
            value: service.clone(),
        });
    }
    if route.canary_weight > 100 {
        return Err(RenderError::WeightOutOfRange {
            service: service.clone(),
            weight: route.canary_weight,
        });
    }
    if !is_address(&route.listen) {
        return Err(RenderError::InvalidAddress {
            field: format!("route '{service}' listen"),
            value: route.listen.clone(),
        });
    }
    for server in &route.servers {
        if !is_address(&server.address) {
            return Err(RenderError::InvalidAddress {
                field: format!("route '{service}' upstream address"),
                value: server.address.clone(),
            });
        }
    }
    let has = |v: Variant| route.servers_of(v).next().is_some();
    // No servers at all and no rollout: a balancer waiting for the coordinator's inventory,
    // rendered as a 503 (see `render_route`).
    let waiting = route.servers.is_empty() && route.canary_weight == 0;
    if route.canary_weight < 100 && !has(Variant::Stable) && !waiting {
        return Err(RenderError::NoStableUpstream {
            service: service.clone(),
            canary_weight: route.canary_weight,
        });
    }
    if route.canary_weight > 0 && !has(Variant::Canary) {
        return Err(RenderError::NoCanaryUpstream {
            service: service.clone(),
            canary_weight: route.canary_weight,
        });
    }
    route
        .overrides
        .check()
        .map_err(|reason| RenderError::InvalidOverride {
            service: service.clone(),
            reason,
        })?;
    if let Some(key) = &route.sticky_key {
        let reason = if !key.starts_with('$') {
            Some("it must start with '$'")
        } else if key.len() < 2 {
            Some("it names no variable")
        } else if !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '{' | '}'))
        {
            Some("it may contain only A-Z a-z 0-9 _ $ { }")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(RenderError::InvalidStickyKey {
                service: service.clone(),
                value: key.clone(),
                reason,
            });
        }
    }
    Ok(())
}

fn servers(route: &Route, variant: Variant) -> Vec<&str> {
    route
        .servers_of(variant)
        .map(|s| s.address.as_str())
        .collect()
}

fn upstream_block(out: &mut String, name: &str, servers: &[(&str, Option<u64>)]) {
    out.push_str(&format!("upstream {name} {{\n"));
    for (address, weight) in servers {
        match weight {
            Some(w) => out.push_str(&format!("    server {address} weight={w};\n")),
            None => out.push_str(&format!("    server {address};\n")),
        }
    }
    out.push_str(&format!("    keepalive {UPSTREAM_KEEPALIVE};\n}}\n"));
}

const PROXY_HEADERS: &str = "proxy_set_header Host $host; proxy_http_version 1.1; \
                             proxy_set_header Connection \"\";";

fn render_route(out: &mut String, route: &Route, generation: &str) {
    let ident = identifier(&route.service);
    let w = route.canary_weight;
    let stable = servers(route, Variant::Stable);
    let canary = servers(route, Variant::Canary);
    let stable_name = format!("serin_{ident}_stable");
    let canary_name = format!("serin_{ident}_canary");
    let mode = if route.sticky_key.is_some() {
        "sticky"
    } else {
        "weighted"
    };
    out.push_str(&format!(
        "# service {:?}: canary {w}% ({mode}), {} stable / {} canary servers\n",
        route.service,
        stable.len(),
        canary.len()
    ));
    if route.servers.is_empty() {
        // Validated: no rollout either. Nothing to proxy to until servers arrive.
        out.push_str(&format!(
            "server {{\n    listen {};\n    location = {GENERATION_PATH} {{ access_log off; \
             default_type text/plain; return 200 \"{generation}\\n\"; }}\n    location / {{ \
             default_type text/plain; return 503 \"no servers yet\\n\"; }}\n}}\n",
            route.listen
        ));
        return;
    }

    // Per-variant upstreams, for direct access and for sticky mode.
    for (name, list) in [(&stable_name, &stable), (&canary_name, &canary)] {
        if !list.is_empty() {
            let entries: Vec<(&str, Option<u64>)> = list.iter().map(|a| (*a, None)).collect();
            upstream_block(out, name, &entries);
        }
    }

    let target = match &route.sticky_key {
        None => {
            let name = format!("serin_{ident}");
            let mut entries: Vec<(&str, Option<u64>)> = Vec::new();
            match w {
                0 => entries.extend(stable.iter().map(|a| (*a, None))),
                100 => entries.extend(canary.iter().map(|a| (*a, None))),
                _ => {
                    let (ws, wc) = server_weights(w, stable.len(), canary.len());
                    entries.extend(stable.iter().map(|a| (*a, Some(ws))));
                    entries.extend(canary.iter().map(|a| (*a, Some(wc))));
                }
            }
            upstream_block(out, &name, &entries);
            name
        }
        Some(key) => {
            let var = format!("$serin_{ident}_upstream");
            // A request without the key (a first visit, before the cookie is set) would hash ""
            // into the first bucket, the canary's, at any weight: give it a random key instead
            // so key-less requests split by weight too.
            let split_key = format!("$serin_{ident}_split_key");
            out.push_str(&format!(
                "map \"{key}\" {split_key} {{\n    \"\" $request_id;\n    default \"{key}\";\n}}\n"
            ));
            out.push_str(&format!("split_clients \"{split_key}\" {var} {{\n"));
            match w {
                0 => out.push_str(&format!("    * {stable_name};\n")),
                100 => out.push_str(&format!("    * {canary_name};\n")),
                _ => {
                    // Canary bucket first: when the share grows, the hash ranges that were
                    // canary stay canary.
                    out.push_str(&format!("    {w}% {canary_name};\n"));
                    out.push_str(&format!("    * {stable_name};\n"));
                }
            }
            out.push_str("}\n");
            var
        }
    };
    let target = override_chain(out, route, &ident, &target, &stable_name, &canary_name);

    out.push_str("server {\n");
    out.push_str(&format!("    listen {};\n", route.listen));
    out.push_str(&format!(
        "    location = {GENERATION_PATH} {{ access_log off; default_type text/plain; \
         return 200 \"{generation}\\n\"; }}\n"
    ));
    for (variant, name, list) in [
        ("stable", &stable_name, &stable),
        ("canary", &canary_name, &canary),
    ] {
        if !list.is_empty() {
            out.push_str(&format!(
                "    location /__serin/{variant}/ {{ proxy_pass http://{name}/; {PROXY_HEADERS} }}\n"
            ));
        }
    }
    out.push_str(&format!(
        "    location / {{ proxy_pass http://{target}; {PROXY_HEADERS} }}\n"
    ));
    out.push_str("}\n");
}

/// Renders the `map`s that let the route's override header and cookie pick a variant, in
/// front of `normal` (the weighted upstream's name or the sticky variable), and returns what
/// `location /` proxies to: the chain's head, or `normal` itself without overrides.
fn override_chain(
    out: &mut String,
    route: &Route,
    ident: &str,
    normal: &str,
    stable_name: &str,
    canary_name: &str,
) -> String {
    let overrides = &route.overrides;
    if overrides.is_none() {
        return normal.to_owned();
    }
    let has = |v: Variant| route.servers_of(v).next().is_some();
    out.push_str(&format!(
        "# overrides: {}\n",
        [
            overrides.header.as_ref().map(|h| format!("header {h}")),
            overrides.cookie.as_ref().map(|c| format!("cookie {c}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    ));
    // Links in request order (header, then cookie), each with its nginx variable; rendered
    // last-first so each map can name the next link's variable as its default.
    let links: Vec<(String, String)> = [
        overrides.header.as_ref().map(|h| {
            (
                format!("$http_{}", h.to_ascii_lowercase().replace('-', "_")),
                "header",
            )
        }),
        overrides
            .cookie
            .as_ref()
            .map(|c| (format!("$cookie_{c}"), "cookie")),
    ]
    .into_iter()
    .flatten()
    .map(|(source, by)| (source, format!("$serin_{ident}_by_{by}")))
    .collect();
    let (canary_value, stable_value) = (CANARY_VALUE, STABLE_VALUE);
    let mut next = normal.to_owned();
    for (source, var) in links.iter().rev() {
        out.push_str(&format!("map {source} {var} {{\n"));
        if has(Variant::Canary) {
            out.push_str(&format!("    ~*^{canary_value}$ {canary_name};\n"));
        }
        if has(Variant::Stable) {
            out.push_str(&format!("    ~*^{stable_value}$ {stable_name};\n"));
        }
        out.push_str(&format!("    default {next};\n}}\n"));
        next = var.clone();
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{Server, VariantOverride};

    fn ups(n_stable: usize, n_canary: usize) -> Vec<Server> {
        let mut v = Vec::new();
        for i in 0..n_stable {
            v.push(Server {
                name: format!("stable-{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                variant: Variant::Stable,
            });
        }
        for i in 0..n_canary {
            v.push(Server {
                name: format!("canary-{i}"),
                address: format!("127.0.0.1:{}", 9500 + i),
                variant: Variant::Canary,
            });
        }
        v
    }

    fn route(n_stable: usize, n_canary: usize, w: u32, sticky: Option<&str>) -> Route {
        Route {
            service: "web-api".into(),
            listen: "127.0.0.1:8080".into(),
            servers: ups(n_stable, n_canary),
            canary_weight: w,
            sticky_key: sticky.map(str::to_owned),
            stable_version: "v1".into(),
            canary_version: "v2".into(),
            overrides: VariantOverride::default(),
        }
    }

    fn with_overrides(mut route: Route, header: Option<&str>, cookie: Option<&str>) -> Route {
        route.overrides = VariantOverride {
            header: header.map(str::to_owned),
            cookie: cookie.map(str::to_owned),
        };
        route
    }

    /// Lines of the `upstream <name> { ... }` block, if present.
    fn block<'a>(text: &'a str, header: &str) -> Option<Vec<&'a str>> {
        let start = text.find(&format!("{header} {{\n"))?;
        let body = &text[start..];
        let end = body.find("\n}\n")?;
        Some(body[..end].lines().skip(1).map(str::trim).collect())
    }

    /// (address, weight) of every server in the weighted upstream.
    fn weighted_servers(text: &str) -> Vec<(String, u64)> {
        block(text, "upstream serin_web_api")
            .expect("weighted upstream present")
            .into_iter()
            .filter_map(|l| l.strip_prefix("server "))
            .map(|l| {
                let l = l.trim_end_matches(';');
                match l.split_once(" weight=") {
                    Some((a, w)) => (a.to_owned(), w.parse().expect("numeric weight")),
                    None => (l.to_owned(), 1),
                }
            })
            .collect()
    }

    fn canary_share(text: &str) -> (u64, u64) {
        let servers = weighted_servers(text);
        let total: u64 = servers.iter().map(|(_, w)| w).sum();
        let canary: u64 = servers
            .iter()
            .filter(|(a, _)| a.starts_with("127.0.0.1:95"))
            .map(|(_, w)| w)
            .sum();
        (canary, total)
    }

    #[test]
    fn weights_realise_percentage_for_various_server_counts() {
        for (ns, nc) in [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (5, 7)] {
            for w in 1..100u32 {
                let text = render_site(&[route(ns, nc, w, None)], "1.1").unwrap();
                let (canary, total) = canary_share(&text);
                // canary/total == w/100 exactly, in integers.
                assert_eq!(
                    u64::from(w) * total,
                    100 * canary,
                    "{ns}x{nc} at {w}%: canary {canary} of {total}\n{text}"
                );
                assert_eq!(weighted_servers(&text).len(), ns + nc);
            }
        }
    }

    #[test]
    fn zero_and_hundred_percent_omit_a_variant() {
        let text = render_site(&[route(2, 1, 0, None)], "1.1").unwrap();
        let servers = weighted_servers(&text);
        assert_eq!(servers.len(), 2, "{text}");
        assert!(servers.iter().all(|(a, _)| a.starts_with("127.0.0.1:90")));
        // The canary variant is still reachable directly.
        assert!(block(&text, "upstream serin_web_api_canary").is_some());
        assert!(
            text.contains("location /__serin/canary/ { proxy_pass http://serin_web_api_canary/;")
        );

        let text = render_site(&[route(2, 1, 100, None)], "1.1").unwrap();
        let servers = weighted_servers(&text);
        assert_eq!(servers.len(), 1, "{text}");
        assert!(servers[0].0.starts_with("127.0.0.1:95"));

        // With no canary servers at all, 0% renders and there is no canary upstream.
        let text = render_site(&[route(1, 0, 0, None)], "1.1").unwrap();
        assert!(block(&text, "upstream serin_web_api_canary").is_none());
        assert!(!text.contains("/__serin/canary/"));
        let text = render_site(&[route(0, 1, 100, Some("$cookie_uid"))], "1.1").unwrap();
        assert!(block(&text, "upstream serin_web_api_stable").is_none());
        assert!(text.contains("    * serin_web_api_canary;\n"));
    }

    #[test]
    fn never_weight_zero() {
        for w in 0..=100u32 {
            for (ns, nc) in [(1, 1), (2, 1), (3, 2), (1, 5)] {
                for sticky in [None, Some("$cookie_uid")] {
                    let text = render_site(&[route(ns, nc, w, sticky)], "7.7").unwrap();
                    assert!(!text.contains("weight=0"), "w={w} {ns}x{nc}:\n{text}");
                    assert!(
                        !text.lines().any(|l| l.trim_start().starts_with("0%")),
                        "w={w} {ns}x{nc}:\n{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn sticky_lists_canary_bucket_first() {
        let text = render_site(&[route(2, 1, 30, Some("$cookie_uid"))], "1.1").unwrap();
        let lines = block(
            &text,
            "split_clients \"$serin_web_api_split_key\" $serin_web_api_upstream",
        )
        .expect("split_clients block");
        assert_eq!(
            lines,
            vec!["30% serin_web_api_canary;", "* serin_web_api_stable;"]
        );
        assert!(text.contains("proxy_pass http://$serin_web_api_upstream;"));
        // Requests without the key get a random one, not the canary's first bucket.
        let map = block(&text, "map \"$cookie_uid\" $serin_web_api_split_key").expect("map");
        assert_eq!(map, vec!["\"\" $request_id;", "default \"$cookie_uid\";"]);
        assert!(block(&text, "upstream serin_web_api").is_none());
        assert!(block(&text, "upstream serin_web_api_stable").is_some());
        assert!(block(&text, "upstream serin_web_api_canary").is_some());

        let text = render_site(&[route(2, 1, 0, Some("${cookie_uid}"))], "1.1").unwrap();
        let lines = block(
            &text,
            "split_clients \"$serin_web_api_split_key\" $serin_web_api_upstream",
        )
        .expect("split_clients block");
        assert_eq!(lines, vec!["* serin_web_api_stable;"]);
        let text = render_site(&[route(2, 1, 100, Some("$cookie_uid"))], "1.1").unwrap();
        let lines = block(
            &text,
            "split_clients \"$serin_web_api_split_key\" $serin_web_api_upstream",
        )
        .expect("split_clients block");
        assert_eq!(lines, vec!["* serin_web_api_canary;"]);
    }

    #[test]
    fn server_block_has_marker_and_variant_locations() {
        let text = render_site(&[route(1, 1, 25, None)], "3.17").unwrap();
        assert!(text.starts_with("# Managed by serin agent — do not edit; generation 3.17\n"));
        assert!(text.contains("    listen 127.0.0.1:8080;\n"));
        assert!(text.contains("return 200 \"3.17\\n\";"));
        assert!(text.contains("location = /__serin/generation {"));
        assert!(text.contains(
            "location / { proxy_pass http://serin_web_api; proxy_set_header Host $host; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
        ));
        assert!(
            text.contains("location /__serin/stable/ { proxy_pass http://serin_web_api_stable/;")
        );
        assert!(
            text.contains("location /__serin/canary/ { proxy_pass http://serin_web_api_canary/;")
        );
        assert_eq!(identifier("web-api.v2"), "web_api_v2");
    }

    #[test]
    fn render_errors() {
        let err = |r: Route| render_site(&[r], "1.1").unwrap_err();

        assert_eq!(
            err(route(1, 1, 101, None)),
            RenderError::WeightOutOfRange {
                service: "web-api".into(),
                weight: 101
            }
        );
        assert!(matches!(
            err(route(0, 1, 99, None)),
            RenderError::NoStableUpstream {
                canary_weight: 99,
                ..
            }
        ));
        assert!(matches!(
            err(route(1, 0, 1, None)),
            RenderError::NoCanaryUpstream {
                canary_weight: 1,
                ..
            }
        ));
        for bad in [
            "cookie_uid",
            "$cookie uid",
            "$cookie_uid;",
            "$",
            "$a\"b",
            "$x-y",
        ] {
            let e = err(route(1, 1, 5, Some(bad)));
            assert!(
                matches!(&e, RenderError::InvalidStickyKey { value, .. } if value == bad),
                "{bad}: {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("sticky_key") && msg.contains(bad), "{msg}");
        }
        let mut other = route(1, 1, 5, None);
        other.service = "other".into();
        let e = render_site(&[route(1, 1, 5, None), other], "1.1").unwrap_err();
        assert!(
            matches!(e, RenderError::DuplicateListen { ref listen, .. } if listen == "127.0.0.1:8080")
        );
        assert!(e.to_string().contains("127.0.0.1:8080"));

        let mut twin = route(1, 1, 5, None);
        twin.service = "web.api".into();
        twin.listen = "127.0.0.1:8081".into();
        let e = render_site(&[route(1, 1, 5, None), twin], "1.1").unwrap_err();
        assert!(matches!(e, RenderError::DuplicateService { .. }), "{e:?}");

        let mut bad_listen = route(1, 1, 5, None);
        bad_listen.listen = "127.0.0.1:80; include /etc/passwd".into();
        assert!(matches!(
            err(bad_listen),
            RenderError::InvalidAddress { .. }
        ));
        let mut bad_up = route(1, 1, 5, None);
        bad_up.servers[0].address = "a b".into();
        assert!(matches!(err(bad_up), RenderError::InvalidAddress { .. }));
        let mut nameless = route(1, 1, 5, None);
        nameless.service = String::new();
        assert!(matches!(
            err(nameless),
            RenderError::InvalidServiceName { .. }
        ));

        for g in ["", "1\"; return 500", "a\nb"] {
            assert!(matches!(
                render_site(&[route(1, 1, 5, None)], g),
                Err(RenderError::InvalidGeneration { .. })
            ));
        }
    }

    #[test]
    fn a_service_without_servers_answers_503_but_serves_its_generation() {
        for sticky in [None, Some("$cookie_uid")] {
            let text = render_site(&[route(0, 0, 0, sticky)], "2.3").unwrap();
            assert!(!text.contains("upstream "), "{text}");
            assert!(!text.contains("proxy_pass"), "{text}");
            assert!(!text.contains("split_clients"), "{text}");
            let server = block(&text, "server").expect("a server block");
            assert!(server.contains(&"listen 127.0.0.1:8080;"), "{text}");
            assert!(
                server
                    .iter()
                    .any(|l| l.starts_with("location = /__serin/generation") && l.contains("2.3")),
                "{text}"
            );
            assert!(
                server
                    .iter()
                    .any(|l| l.starts_with("location / {") && l.contains("return 503")),
                "{text}"
            );
        }
        // A rollout needs servers: with none at all, traffic for the canary is still refused.
        assert!(matches!(
            render_site(&[route(0, 0, 10, None)], "2.3"),
            Err(RenderError::NoStableUpstream { .. } | RenderError::NoCanaryUpstream { .. })
        ));
    }

    #[test]
    fn overrides_map_the_header_then_the_cookie_to_a_variant_before_the_weighted_split() {
        let text = render_site(
            &[with_overrides(
                route(2, 1, 5, None),
                Some("X-Serin-Variant"),
                Some("serin_variant"),
            )],
            "1.1",
        )
        .unwrap();
        let header = block(&text, "map $http_x_serin_variant $serin_web_api_by_header")
            .unwrap_or_else(|| panic!("header map missing:\n{text}"));
        assert_eq!(
            header,
            [
                "~*^canary$ serin_web_api_canary;",
                "~*^stable$ serin_web_api_stable;",
                "default $serin_web_api_by_cookie;",
            ]
        );
        let cookie = block(&text, "map $cookie_serin_variant $serin_web_api_by_cookie")
            .unwrap_or_else(|| panic!("cookie map missing:\n{text}"));
        assert_eq!(
            cookie,
            [
                "~*^canary$ serin_web_api_canary;",
                "~*^stable$ serin_web_api_stable;",
                "default serin_web_api;",
            ]
        );
        // Maps come before the server block that uses them; the split itself is unchanged.
        assert!(text.find("map $http_").unwrap() < text.find("server {").unwrap());
        assert!(text.contains("# overrides: header X-Serin-Variant, cookie serin_variant\n"));
        assert!(text.contains("location / { proxy_pass http://$serin_web_api_by_header;"));
        let (canary, total) = canary_share(&text);
        assert_eq!(100 * canary, 5 * total, "{text}");
        assert!(block(&text, "upstream serin_web_api_canary").is_some());
        assert!(block(&text, "upstream serin_web_api_stable").is_some());
    }

    #[test]
    fn overrides_fall_back_to_the_sticky_split_and_either_name_works_alone() {
        let text = render_site(
            &[with_overrides(
                route(2, 1, 30, Some("$cookie_uid")),
                None,
                Some("serin_variant"),
            )],
            "1.1",
        )
        .unwrap();
        assert!(!text.contains("$http_"), "{text}");
        let cookie = block(&text, "map $cookie_serin_variant $serin_web_api_by_cookie")
            .unwrap_or_else(|| panic!("cookie map missing:\n{text}"));
        assert_eq!(cookie[2], "default $serin_web_api_upstream;");
        assert!(text.contains("location / { proxy_pass http://$serin_web_api_by_cookie;"));
        assert!(
            block(
                &text,
                "split_clients \"$serin_web_api_split_key\" $serin_web_api_upstream"
            )
            .is_some()
        );

        let text = render_site(
            &[with_overrides(
                route(1, 1, 30, Some("$cookie_uid")),
                Some("X-Test"),
                None,
            )],
            "1.1",
        )
        .unwrap();
        assert!(!text.contains("$cookie_serin"), "{text}");
        let header = block(&text, "map $http_x_test $serin_web_api_by_header").expect("map");
        assert_eq!(header[2], "default $serin_web_api_upstream;");
        assert!(text.contains("location / { proxy_pass http://$serin_web_api_by_header;"));
    }

    #[test]
    fn overrides_reach_both_variants_at_0_and_100_percent_and_skip_a_variant_without_servers() {
        let header = |r: Route| {
            let text = render_site(&[with_overrides(r, Some("X-V"), None)], "1.1").unwrap();
            block(&text, "map $http_x_v $serin_web_api_by_header")
                .unwrap_or_else(|| panic!("map missing:\n{text}"))
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        for sticky in [None, Some("$cookie_uid")] {
            let normal = if sticky.is_some() {
                "$serin_web_api_upstream"
            } else {
                "serin_web_api"
            };
            for w in [0, 100] {
                assert_eq!(
                    header(route(1, 1, w, sticky)),
                    [
                        "~*^canary$ serin_web_api_canary;".to_owned(),
                        "~*^stable$ serin_web_api_stable;".to_owned(),
                        format!("default {normal};"),
                    ],
                    "{w}% {sticky:?}"
                );
            }
            // No canary server: "canary" takes the split, which has only stable.
            assert_eq!(
                header(route(2, 0, 0, sticky)),
                [
                    "~*^stable$ serin_web_api_stable;".to_owned(),
                    format!("default {normal};"),
                ]
            );
            assert_eq!(
                header(route(0, 2, 100, sticky)),
                [
                    "~*^canary$ serin_web_api_canary;".to_owned(),
                    format!("default {normal};"),
                ]
            );
        }
        // A service waiting for its servers keeps answering 503: no maps, no proxying.
        let text = render_site(
            &[with_overrides(route(0, 0, 0, None), Some("X-V"), Some("v"))],
            "1.1",
        )
        .unwrap();
        assert!(
            !text.contains("map ") && !text.contains("proxy_pass"),
            "{text}"
        );
    }

    #[test]
    fn without_overrides_no_map_is_rendered() {
        for sticky in [None, Some("$cookie_uid")] {
            let text = render_site(&[route(2, 1, 10, sticky)], "1.1").unwrap();
            assert!(
                !text.contains("_by_") && !text.contains("# overrides"),
                "{text}"
            );
        }
    }

    #[test]
    fn an_unusable_override_name_is_refused_naming_the_service_and_field() {
        for (header, cookie, field) in [
            (Some("X_Serin"), None, "override_header \"X_Serin\""),
            (Some("X;1"), None, "override_header \"X;1\""),
            (None, Some("a b"), "override_cookie \"a b\""),
            (
                None,
                Some("serin-variant"),
                "override_cookie \"serin-variant\"",
            ),
        ] {
            let e = render_site(
                &[with_overrides(route(1, 1, 5, None), header, cookie)],
                "1.1",
            )
            .unwrap_err();
            assert!(
                matches!(&e, RenderError::InvalidOverride { service, .. } if service == "web-api"),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with("route 'web-api': ") && msg.contains(field),
                "{msg}"
            );
        }
    }

    #[test]
    fn empty_route_list_renders_header_only() {
        let text = render_site(&[], "0.0").unwrap();
        assert_eq!(
            text,
            "# Managed by serin agent — do not edit; generation 0.0\n"
        );
    }
}
