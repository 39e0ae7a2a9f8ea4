//! Every size limit of what operators send and of what the coordinator keeps, in one place.
//!
//! Why: every operator-supplied string ends up in the replicated log, in every snapshot and in
//! the replies of the operator API, all of which travel in gRPC messages of at most 4 MiB. An
//! unbounded reason or name would make a rollout, or the whole list, unreadable for good. The
//! limits are in bytes of UTF-8 and are checked before anything is proposed; the README lists
//! them.

/// Longest service name, in bytes.
pub const MAX_SERVICE: usize = 64;
/// Longest version (`version`, `stable_version`), in bytes.
pub const MAX_VERSION: usize = 64;
/// Longest operator name recorded as the actor of a command, in bytes.
pub const MAX_ACTOR: usize = 64;
/// Longest operator reason of pause, resume, promote and abort, in bytes.
pub const MAX_REASON: usize = 1024;
/// Longest rollout id accepted by the API (generated ids are `<service>-<6 hex>`), in bytes.
pub const MAX_ROLLOUT_ID: usize = MAX_SERVICE + 16;
/// Largest strategy file, in bytes.
pub const MAX_STRATEGY_TOML: usize = 64 * 1024;
/// Longest name of a check or trigger in a strategy, in bytes.
pub const MAX_STRATEGY_NAME: usize = 64;
/// Longest `traffic.sticky_key` of a strategy, in bytes.
pub const MAX_STICKY_KEY: usize = 64;
/// Longest `traffic.override_header` of a strategy, in bytes (the rule agents check too).
pub const MAX_OVERRIDE_HEADER: usize = serin_proto::overrides::MAX_NAME_BYTES;
/// Longest `traffic.override_cookie` of a strategy, in bytes (the rule agents check too).
pub const MAX_OVERRIDE_COOKIE: usize = serin_proto::overrides::MAX_NAME_BYTES;
/// Most `[[hooks]]` in one strategy.
pub const MAX_HOOKS: usize = 16;
/// Longest hook `url`, in bytes.
pub const MAX_HOOK_URL: usize = 2048;
/// Longest hook `timeout` (one attempt): a slow hook only delays its own rollout, but a hook
/// that may take minutes per attempt holds a stage for longer than any stage is meant to last.
pub const MAX_HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Most `retries` of a hook (so at most 6 calls per run).
pub const MAX_HOOK_RETRIES: u32 = 5;
/// Most `headers` of one hook.
pub const MAX_HOOK_HEADERS: usize = 16;
/// Longest hook header name, in bytes.
pub const MAX_HOOK_HEADER_NAME: usize = 64;
/// Longest hook header value, in bytes.
pub const MAX_HOOK_HEADER_VALUE: usize = 1024;
/// How much of a hook's response body is kept in its event, in characters.
pub const HOOK_BODY_EXCERPT_CHARS: usize = 200;
/// How much of a hook's response body is read at most, in bytes (the rest is not waited for).
pub const HOOK_BODY_READ_BYTES: usize = 4096;
/// Most `[deploy] env` entries.
pub const MAX_DEPLOY_ENV: usize = 64;
/// Longest `[deploy] env` name, in bytes.
pub const MAX_DEPLOY_ENV_NAME: usize = 128;
/// Longest `[deploy] env` value, in bytes.
pub const MAX_DEPLOY_ENV_VALUE: usize = 4096;
/// Longest `[deploy] health_path`, in bytes.
pub const MAX_DEPLOY_HEALTH_PATH: usize = 1024;
/// Longest `[deploy.docker] image`, in bytes (placeholders included).
pub const MAX_DEPLOY_IMAGE: usize = 512;
/// Most `[deploy.docker] args`.
pub const MAX_DEPLOY_ARGS: usize = 64;
/// Longest single `[deploy.docker] args` entry, and longest `[deploy.command]` command, in bytes.
pub const MAX_DEPLOY_COMMAND: usize = 4096;
/// Longest page token of `ListRollouts`, in bytes.
pub const MAX_PAGE_TOKEN: usize = 256;

/// Longest reason stored with an event (controller reasons may carry an agent's error output);
/// longer reasons are cut, marked with `…`. In bytes.
pub const MAX_EVENT_REASON: usize = 2048;
/// Oldest events of a rollout always kept (its start and first stages).
pub const KEEP_FIRST_EVENTS: usize = 20;
/// Most recent events of a rollout kept; older ones beyond [`KEEP_FIRST_EVENTS`] are dropped
/// and counted.
pub const KEEP_LAST_EVENTS: usize = 180;

/// `ListRollouts` page size when the request leaves it at 0.
pub const DEFAULT_LIST_LIMIT: u32 = 50;
/// Largest `ListRollouts` page size.
pub const MAX_LIST_LIMIT: u32 = 500;
/// Longest `last_reason` in a rollout summary, in characters (folded to one line).
pub const SUMMARY_REASON_CHARS: usize = 200;

/// A value longer than its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {length} bytes is longer than the limit of {limit} bytes")]
pub struct TooLong {
    /// The field, as the operator knows it (`reason`, `checks[2].name`).
    pub field: String,
    /// Its limit in bytes.
    pub limit: usize,
    /// Its length in bytes.
    pub length: usize,
}

/// Refuses `value` when it is longer than `limit` bytes.
pub fn check_len(field: &str, value: &str, limit: usize) -> Result<(), TooLong> {
    if value.len() > limit {
        Err(TooLong {
            field: field.to_owned(),
            limit,
            length: value.len(),
        })
    } else {
        Ok(())
    }
}

/// At most `limit` bytes of `text`, cut at a character boundary and ending in `…` when cut.
pub fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mark = '…';
    let mut end = limit.saturating_sub(mark.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = text[..end].to_owned();
    out.push(mark);
    out
}

/// Workload statuses read from one report (one per managed instance of the agent); more are
/// dropped.
pub const MAX_WORKLOADS_PER_REPORT: usize = 256;

/// Driver actions kept of one workload status (the newest).
pub const MAX_ACTIONS_PER_WORKLOAD: usize = 16;
/// Longest action detail and output kept.
pub const MAX_ACTION_TEXT: usize = 2048;

/// Keeps the newest [`MAX_ACTIONS_PER_WORKLOAD`] actions, each text at most
/// [`MAX_ACTION_TEXT`] bytes: a report's actions end up in the replicated log.
pub fn bound_actions(actions: &mut Vec<serin_proto::v1::WorkloadAction>) {
    if actions.len() > MAX_ACTIONS_PER_WORKLOAD {
        actions.drain(..actions.len() - MAX_ACTIONS_PER_WORKLOAD);
    }
    for a in actions {
        for text in [
            &mut a.detail,
            &mut a.output,
            &mut a.action,
            &mut a.version,
            &mut a.rollout_id,
        ] {
            if text.len() > MAX_ACTION_TEXT {
                let mut end = MAX_ACTION_TEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reports_actions_keep_the_newest_with_their_texts_cut_on_characters() {
        let mut actions: Vec<serin_proto::v1::WorkloadAction> = (0..20u64)
            .map(|seq| serin_proto::v1::WorkloadAction {
                seq,
                output: "é".repeat(MAX_ACTION_TEXT),
                ..Default::default()
            })
            .collect();
        bound_actions(&mut actions);
        assert_eq!(actions.len(), MAX_ACTIONS_PER_WORKLOAD);
        assert_eq!(actions[0].seq, 4, "the oldest go");
        assert!(actions.iter().all(|a| a.output.len() <= MAX_ACTION_TEXT));
        assert!(actions[0].output.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_value_over_its_limit_is_refused_naming_field_limit_and_length() {
        assert!(check_len("reason", &"x".repeat(MAX_REASON), MAX_REASON).is_ok());
        let err = check_len("reason", &"x".repeat(MAX_REASON + 1), MAX_REASON).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reason: 1025 bytes is longer than the limit of 1024 bytes"
        );
    }

    #[test]
    fn cutting_keeps_whole_characters_and_marks_the_cut() {
        assert_eq!(cut("short", 10), "short");
        let cut_text = cut(&"é".repeat(100), 11);
        assert!(cut_text.len() <= 11, "{cut_text}");
        assert!(cut_text.ends_with('…'), "{cut_text}");
        assert_eq!(cut_text, format!("{}…", "é".repeat(4)));
    }
}
