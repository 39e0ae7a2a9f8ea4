//! `[[hooks]]` of a strategy: HTTP webhooks the coordinator calls around a rollout's
//! transitions, parsed then validated like the rest of the file (every problem at once, each
//! naming its field, e.g. `hooks[1].url`).
//!
//! What a hook does at run time (when it is called, what its failure means, at-least-once
//! delivery across leader changes) lives in [`crate::hooks`]; this module only says what a
//! valid hook is.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, too_long};
use crate::limits::{
    MAX_HOOK_HEADER_NAME, MAX_HOOK_HEADER_VALUE, MAX_HOOK_HEADERS, MAX_HOOK_RETRIES,
    MAX_HOOK_TIMEOUT, MAX_HOOK_URL, MAX_HOOKS, MAX_STRATEGY_NAME, check_len,
};

/// Default time one attempt of a hook may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of further attempts after a failed one.
pub const DEFAULT_HOOK_RETRIES: u32 = 2;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookOn {
    /// After the rollout is accepted, before the canary gets any traffic; failure aborts.
    PreRollout,
    /// After a stage passed its checks, before the next stage (or promotion) is committed;
    /// failure holds the stage (paused, actor `hook:<name>`).
    PreAdvance,
    /// After the promotion is committed; recorded only.
    PostPromote,
    /// After a rollback or abort is committed; recorded only.
    PostRollback,
}

impl HookOn {
    /// Every value with its TOML name.
    pub const ALL: [(&'static str, HookOn); 4] = [
        ("pre_rollout", HookOn::PreRollout),
        ("pre_advance", HookOn::PreAdvance),
        ("post_promote", HookOn::PostPromote),
        ("post_rollback", HookOn::PostRollback),
    ];

    /// Reads a TOML name.
    pub fn parse(name: &str) -> Option<HookOn> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, o)| *o)
    }

    /// The TOML name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, o)| *o == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// True for the hooks whose failure changes the rollout (`pre_*`).
    pub fn gates(self) -> bool {
        matches!(self, HookOn::PreRollout | HookOn::PreAdvance)
    }
}

impl fmt::Display for HookOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// Unique within the strategy; the actor of a hold is `hook:<name>`.
    pub name: String,
    /// When it runs.
    pub on: HookOn,
    /// `http://` URL the coordinator POSTs to.
    pub url: String,
    /// Time one attempt may take, connection included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts after a failed one (so at most `retries + 1` calls).
    pub retries: u32,
    /// Extra request headers (e.g. an authorization token).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A `[[hooks]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    name: Option<String>,
    on: String,
    url: String,
    timeout: Option<String>,
    retries: Option<i64>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Headers serin sets itself or that would break the request's framing.
const RESERVED_HEADERS: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Validates every `[[hooks]]` entry; unnamed hooks are named after their `on` (`pre_advance`,
/// then `pre_advance-2`, … for further unnamed ones of the same kind).
pub(super) fn validate_hooks(raw: &[RawHook], p: &mut Problems) -> Vec<Hook> {
    if raw.len() > MAX_HOOKS {
        p.push(
            "hooks",
            format!("at most {MAX_HOOKS} hooks per strategy, got {}", raw.len()),
        );
        return Vec::new();
    }
    let mut hooks = Vec::with_capacity(raw.len());
    let mut names = std::collections::BTreeSet::new();
    let mut unnamed: BTreeMap<HookOn, usize> = BTreeMap::new();
    for (i, h) in raw.iter().enumerate() {
        let field = format!("hooks[{i}]");
        let before = p.0.len();
        let on = HookOn::parse(&h.on);
        if on.is_none() {
            let known: Vec<_> = HookOn::ALL
                .iter()
                .map(|(n, _)| format!("\"{n}\""))
                .collect();
            p.push(
                format!("{field}.on"),
                format!("must be one of {}, got \"{}\"", known.join(", "), h.on),
            );
        }
        let name = match (&h.name, on) {
            (Some(n), _) => {
                if let Err(reason) = validate_hook_name(n) {
                    p.push(format!("{field}.name"), reason);
                } else if let Err(e) = check_len(&format!("{field}.name"), n, MAX_STRATEGY_NAME) {
                    p.0.push(too_long(e));
                }
                n.clone()
            }
            (None, Some(on)) => {
                let count = unnamed.entry(on).or_insert(0);
                *count += 1;
                if *count == 1 {
                    on.name().to_owned()
                } else {
                    format!("{}-{count}", on.name())
                }
            }
            (None, None) => String::new(),
        };
        if !name.is_empty() && !names.insert(name.clone()) {
            p.push(
                format!("{field}.name"),
                format!("duplicate hook name '{name}'; give each hook its own `name`"),
            );
        }
        if let Err(e) = check_len(&format!("{field}.url"), &h.url, MAX_HOOK_URL) {
            p.0.push(too_long(e));
        } else if let Err(reason) = validate_hook_url(&h.url) {
            p.push(format!("{field}.url"), reason);
        }
        let timeout = p
            .duration(&format!("{field}.timeout"), h.timeout.as_deref())
            .unwrap_or(DEFAULT_HOOK_TIMEOUT);
        if timeout < Duration::from_millis(10) || timeout > MAX_HOOK_TIMEOUT {
            p.push(
                format!("{field}.timeout"),
                format!(
                    "must be between 10ms and {}, got {}",
                    humantime::format_duration(MAX_HOOK_TIMEOUT),
                    humantime::format_duration(timeout)
                ),
            );
        }
        let retries = match h.retries {
            None => DEFAULT_HOOK_RETRIES,
            Some(n) if (0..=i64::from(MAX_HOOK_RETRIES)).contains(&n) => n as u32,
            Some(n) => {
                p.push(
                    format!("{field}.retries"),
                    format!("must be in 0..={MAX_HOOK_RETRIES}, got {n}"),
                );
                0
            }
        };
        if h.headers.len() > MAX_HOOK_HEADERS {
            p.push(
                format!("{field}.headers"),
                format!(
                    "at most {MAX_HOOK_HEADERS} headers, got {}",
                    h.headers.len()
                ),
            );
        }
        for (header, value) in &h.headers {
            let header_field = format!("{field}.headers.{header}");
            if let Err(e) = check_len(&header_field, header, MAX_HOOK_HEADER_NAME) {
                p.0.push(too_long(e));
            } else if let Err(reason) = validate_header_name(header) {
                p.push(&header_field, reason);
            }
            if let Err(e) = check_len(&header_field, value, MAX_HOOK_HEADER_VALUE) {
                p.0.push(too_long(e));
            } else if !value.chars().all(|c| c == '\t' || (' '..='~').contains(&c)) {
                p.push(
                    &header_field,
                    "value must be printable ASCII (no control characters or line breaks)",
                );
            }
        }
        if p.0.len() > before {
            continue;
        }
        if let Some(on) = on {
            hooks.push(Hook {
                name,
                on,
                url: h.url.clone(),
                timeout,
                retries,
                headers: h.headers.clone(),
            });
        }
    }
    hooks
}

/// Letters, digits, `-`, `_` and `.`: the name is shown as the actor `hook:<name>`.
fn validate_hook_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!(
            "may hold only letters, digits, '-', '_' and '.', got \"{name}\""
        ))
    }
}

/// An absolute `http://` URL with a host. `https://` is refused for now: this build's HTTP
/// client has no TLS (README, current limits), and a hook that can never succeed would only
/// show up when it first fails a rollout.
fn validate_hook_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        format!("not a valid URL ({e}); write e.g. \"http://smoke.internal:8080/run\"")
    })?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "https hooks are not supported yet (this build has no TLS client); use an http:// URL, got \"{url}\""
            ));
        }
        other => {
            return Err(format!("must be an http:// URL, got scheme \"{other}\""));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("must name a host, got \"{url}\""));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not carry credentials (they would be shown in every status); send them in `headers`"
                .into(),
        );
    }
    Ok(())
}

/// An HTTP token (RFC 9110), and not one serin sets itself.
fn validate_header_name(name: &str) -> Result<(), String> {
    let token = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if !token {
        return Err(format!(
            "\"{name}\" is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "\"{name}\" is set by serin and cannot be overridden"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;

    const STAGE: &str = "[[stages]]\nweight = 5\n";

    fn problems(hooks: &str) -> Vec<String> {
        match Strategy::from_toml(&format!("{STAGE}{hooks}")) {
            Ok(_) => vec![],
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn hooks_parse_with_defaults_and_derived_names() {
        let s = Strategy::from_toml(&format!(
            r#"{STAGE}
[[hooks]]
on = "pre_advance"
url = "http://smoke.internal:8080/run"

[[hooks]]
on = "pre_advance"
url = "http://10.0.0.7/second"
timeout = "750ms"
retries = 0
headers = {{ Authorization = "Bearer abc", "X-Team" = "payments" }}

[[hooks]]
name = "tell-chat"
on = "post_promote"
url = "http://chat.internal/hook"

[[hooks]]
on = "pre_rollout"
url = "http://[::1]:9000/"

[[hooks]]
on = "post_rollback"
url = "http://localhost/rollback"
"#
        ))
        .expect("valid");
        let names: Vec<_> = s.hooks.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pre_advance",
                "pre_advance-2",
                "tell-chat",
                "pre_rollout",
                "post_rollback"
            ]
        );
        assert_eq!(s.hooks[0].timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(s.hooks[0].retries, DEFAULT_HOOK_RETRIES);
        assert!(s.hooks[0].headers.is_empty());
        assert_eq!(s.hooks[1].timeout, Duration::from_millis(750));
        assert_eq!(s.hooks[1].retries, 0);
        assert_eq!(s.hooks[1].headers["Authorization"], "Bearer abc");
        assert_eq!(s.hooks[2].on, HookOn::PostPromote);
        assert_eq!(s.hooks_on(HookOn::PreAdvance).count(), 2, "in file order");
        assert_eq!(s.hook("tell-chat").map(|h| h.on), Some(HookOn::PostPromote));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), s);
    }

    #[test]
    fn a_strategy_without_hooks_reads_from_old_records() {
        // Records written before hooks existed have no `hooks` key.
        let s = Strategy::from_toml(STAGE).unwrap();
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        json.as_object_mut().unwrap().remove("hooks");
        let back: Strategy = serde_json::from_value(json).unwrap();
        assert!(back.hooks.is_empty());
    }

    #[test]
    fn every_bad_field_of_a_hook_is_named_at_once() {
        let p = problems(
            r#"
[[hooks]]
name = "smoke test"
on = "before_advance"
url = "ftp://files/x"
timeout = "2 minutes"
retries = 9
headers = { "Content-Type" = "text/plain", "X Bad" = "v", "X-Ok" = "line\nbreak" }
"#,
        );
        let fields: Vec<_> = p.iter().map(|l| l.split(": ").next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "hooks[0].on",
                "hooks[0].name",
                "hooks[0].url",
                "hooks[0].timeout",
                "hooks[0].retries",
                "hooks[0].headers.Content-Type",
                "hooks[0].headers.X Bad",
                "hooks[0].headers.X-Ok",
            ],
            "{p:#?}"
        );
        assert!(
            p[0].contains("\"pre_rollout\", \"pre_advance\""),
            "{}",
            p[0]
        );
        assert!(p[4].contains("0..=5, got 9"), "{}", p[4]);
    }

    #[test]
    fn urls_must_be_plain_http_with_a_host_and_no_credentials() {
        for (url, needle) in [
            ("smoke.internal/run", "not a valid URL"),
            (
                "https://smoke.internal/run",
                "https hooks are not supported yet",
            ),
            ("file:///etc/passwd", "scheme \"file\""),
            ("http://user:secret@smoke.internal/", "credentials"),
            ("http://:8080/run", "empty host"),
            ("", "not a valid URL"),
        ] {
            let p = problems(&format!(
                "[[hooks]]\non = \"pre_advance\"\nurl = \"{url}\"\n"
            ));
            assert_eq!(p.len(), 1, "{url}: {p:?}");
            assert!(
                p[0].starts_with("hooks[0].url: ") && p[0].contains(needle),
                "{url}: {p:?}"
            );
        }
        let long = format!("http://h/{}", "x".repeat(MAX_HOOK_URL));
        let p = problems(&format!(
            "[[hooks]]\non = \"pre_advance\"\nurl = \"{long}\"\n"
        ));
        assert_eq!(
            p,
            [format!(
                "hooks[0].url: {} bytes is longer than the limit of {MAX_HOOK_URL} bytes",
                long.len()
            )]
        );
    }

    #[test]
    fn timeouts_and_retries_are_bounded() {
        let hook = |extra: &str| {
            problems(&format!(
                "[[hooks]]\non = \"pre_advance\"\nurl = \"http://h/\"\n{extra}\n"
            ))
        };
        assert!(hook("timeout = \"10ms\"").is_empty());
        assert!(hook("timeout = \"60s\"").is_empty());
        assert!(hook("retries = 0").is_empty());
        assert!(hook("retries = 5").is_empty());
        assert_eq!(
            hook("timeout = \"5ms\""),
            ["hooks[0].timeout: must be between 10ms and 1m, got 5ms"]
        );
        assert_eq!(
            hook("timeout = \"61s\""),
            ["hooks[0].timeout: must be between 10ms and 1m, got 1m 1s"]
        );
        assert_eq!(
            hook("retries = -1"),
            ["hooks[0].retries: must be in 0..=5, got -1"]
        );
        assert!(hook("retry = 1")[0].contains("unknown field `retry`"));
    }

    #[test]
    fn duplicate_names_too_many_hooks_and_headers_are_refused() {
        let p = problems(
            "[[hooks]]\nname = \"smoke\"\non = \"pre_advance\"\nurl = \"http://h/\"\n\
             [[hooks]]\nname = \"smoke\"\non = \"pre_rollout\"\nurl = \"http://h/\"\n",
        );
        assert_eq!(
            p,
            ["hooks[1].name: duplicate hook name 'smoke'; give each hook its own `name`"]
        );
        // An explicit name may not take a derived one either.
        let p = problems(
            "[[hooks]]\non = \"pre_advance\"\nurl = \"http://h/\"\n\
             [[hooks]]\nname = \"pre_advance\"\non = \"pre_rollout\"\nurl = \"http://h/\"\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        let many = "[[hooks]]\non = \"post_promote\"\nurl = \"http://h/\"\n".repeat(MAX_HOOKS + 1);
        assert_eq!(
            problems(&many),
            [format!(
                "hooks: at most {MAX_HOOKS} hooks per strategy, got 17"
            )]
        );
        let headers: Vec<String> = (0..=MAX_HOOK_HEADERS)
            .map(|i| format!("X-{i} = \"v\""))
            .collect();
        let p = problems(&format!(
            "[[hooks]]\non = \"pre_advance\"\nurl = \"http://h/\"\nheaders = {{ {} }}\n",
            headers.join(", ")
        ));
        assert_eq!(p, ["hooks[0].headers: at most 16 headers, got 17"]);
    }

    #[test]
    fn the_example_strategy_with_hooks_is_valid() {
        let s = Strategy::from_toml(include_str!("../../../deploy/strategies/smoke-hooks.toml"))
            .expect("deploy/strategies/smoke-hooks.toml is valid");
        let kinds: Vec<_> = s.hooks.iter().map(|h| h.on).collect();
        assert_eq!(
            kinds,
            [
                HookOn::PreRollout,
                HookOn::PreAdvance,
                HookOn::PostPromote,
                HookOn::PostRollback
            ]
        );
    }

    #[test]
    fn hook_kinds_round_trip_their_names() {
        for (name, on) in HookOn::ALL {
            assert_eq!(HookOn::parse(name), Some(on));
            assert_eq!(on.name(), name);
            assert_eq!(serde_json::to_value(on).unwrap(), name);
        }
        assert!(HookOn::PreRollout.gates() && HookOn::PreAdvance.gates());
        assert!(!HookOn::PostPromote.gates() && !HookOn::PostRollback.gates());
    }
}
