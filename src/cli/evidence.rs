//! `serin rollout evidence ID`: what the coordinator measured and decided at every stage end and
//! rollback, with the rollout's audit trail, as Markdown (for a change ticket) or JSON.

use serin_coordinator::analysis::Window;
use serin_coordinator::limits::{KEEP_FIRST_EVENTS, KEEP_LAST_EVENTS};
use serin_coordinator::rollout::{Evidence, Rollout};

use super::output::timestamp_utc;

/// Decodes the full rollout record carried in `Rollout.detail_json`.
pub fn decode(detail_json: &str) -> anyhow::Result<Rollout> {
    serde_json::from_str(detail_json).map_err(|e| {
        anyhow::anyhow!(
            "the coordinator sent an unreadable rollout record ({e}); is it a newer version?"
        )
    })
}

/// Evidence and history as JSON: `{id, service, version, stable_version, state, events, evidence}`.
pub fn to_json(r: &Rollout) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "service": r.service,
        "version": r.version,
        "stable_version": r.stable_version,
        "state": r.state,
        "events": r.events,
        "evidence": r.evidence,
    })
}

fn variant_row(name: &str, w: &Window) -> String {
    let rate = w
        .error_rate()
        .map_or("-".to_owned(), |r| format!("{:.3}%", r * 100.0));
    let p95 = w
        .quantile(0.95)
        .map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1000.0));
    let p99 = w
        .quantile(0.99)
        .map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1000.0));
    format!(
        "| {name} | {} | {} | {rate} | {p95} | {p99} | {} |\n",
        w.requests, w.errors, w.missing
    )
}

fn evidence_section(e: &Evidence) -> String {
    let mut out = format!(
        "### Stage {} ({}%) — {} at {}\n\n",
        e.stage_index + 1,
        e.canary_weight,
        e.outcome.replace('_', " "),
        timestamp_utc(e.at)
    );
    out.push_str("| variant | requests | errors | error rate | p95 | p99 | missing scrapes |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    out.push_str(&variant_row("canary", &e.analysis.data.canary));
    out.push_str(&variant_row("stable", &e.analysis.data.stable));
    out.push('\n');
    if e.analysis.checks.is_empty() {
        out.push_str("No checks configured.\n\n");
    } else {
        for c in &e.analysis.checks {
            out.push_str(&format!("- {}\n", c.describe()));
        }
        out.push('\n');
    }
    out
}

/// Text for one Markdown table cell, whole: `|` escaped, line breaks as `<br>`.
fn markdown_cell(text: &str) -> String {
    text.trim()
        .lines()
        .map(|l| l.trim_end().replace('|', "\\|"))
        .collect::<Vec<_>>()
        .join("<br>")
}

/// Evidence and history as Markdown.
pub fn to_markdown(r: &Rollout) -> String {
    let mut out = format!(
        "# Rollout {} — {} {} → {}\n\nFinal state: **{}** (stage {}/{}, canary weight {}%).\n\n",
        r.id,
        r.service,
        r.stable_version,
        r.version,
        r.state,
        r.stage_index + 1,
        r.strategy.stages.len(),
        r.canary_weight()
    );
    out.push_str("## History\n\n| time (UTC) | event | stage | weight | by | reason |\n|---|---|---:|---:|---|---|\n");
    for (i, e) in r.events.iter().enumerate() {
        if i == KEEP_FIRST_EVENTS && r.events_dropped > 0 {
            out.push_str(&format!(
                "| | events_dropped | | | | {} events not kept: a rollout keeps its first {KEEP_FIRST_EVENTS} and its last {KEEP_LAST_EVENTS} |\n",
                r.events_dropped
            ));
        }
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push_str(&format!(
            "| {} | {kind} | {} | {}% | {} | {} |\n",
            timestamp_utc(e.at),
            e.stage_index + 1,
            e.canary_weight,
            e.actor,
            markdown_cell(&e.reason)
        ));
    }
    out.push_str("\n## Evidence\n\n");
    if r.evidence.is_empty() {
        out.push_str("No stage has ended yet.\n");
    }
    for e in &r.evidence {
        out.push_str(&evidence_section(e));
    }
    out
}

#[cfg(test)]
mod tests {
    use serin_coordinator::analysis::{Pair, analyse_stage};
    use serin_coordinator::rollout::{
        Actor, Command, Generation, Registry, RolloutId, RolloutState,
    };
    use serin_coordinator::strategy::Strategy;

    use super::*;

    fn rolled_back() -> Rollout {
        let strategy = Strategy::from_toml(
            "[[stages]]\nweight = 5\n[[stages]]\nweight = 50\n[[checks]]\nname = \"errors\"\nmetric = \"error_rate\"\nmax = 0.05\nmin_requests = 10\n",
        )
        .unwrap();
        let checks = strategy.checks.clone();
        let mut reg = Registry::default();
        let id = RolloutId("api-1".into());
        let g = |index| Generation { term: 1, index };
        reg.apply(
            Command::Start {
                id: id.clone(),
                service: "api".into(),
                version: "v2".into(),
                stable_version: Some("v1".into()),
                strategy,
                actor: Actor::Operator("ana".into()),
                at: 1_000,
            },
            g(1),
        )
        .unwrap();
        let data = |errors| Pair {
            canary: Window::from_counts(100, errors, &[(0.1, 100), (f64::INFINITY, 100)], 1.0),
            stable: Window::from_counts(900, 1, &[(0.1, 900), (f64::INFINITY, 900)], 9.0),
        };
        reg.apply(
            Command::StagePassed {
                id: id.clone(),
                stage: 0,
                analysis: analyse_stage(&checks, data(0), 5),
                at: 2_000,
            },
            g(2),
        )
        .unwrap();
        reg.apply(
            Command::RollBack {
                id: id.clone(),
                reason: "check errors: fail (error_rate 0.5 > 0.05) at stage 2 (50%)".into(),
                analysis: Some(analyse_stage(&checks, data(50), 50)),
                at: 3_000,
            },
            g(3),
        )
        .unwrap();
        let r = reg.rollouts[&id].clone();
        assert_eq!(r.state, RolloutState::RolledBack);
        r
    }

    #[test]
    fn markdown_has_history_and_one_section_per_stage_end() {
        let md = to_markdown(&rolled_back());
        assert!(md.contains("Final state: **rolled_back**"), "{md}");
        assert!(md.contains("| started |"), "{md}");
        assert!(md.contains("| rolled_back |"), "{md}");
        assert!(md.contains("### Stage 1 (5%) — passed"), "{md}");
        assert!(md.contains("### Stage 2 (50%) — rolled back"), "{md}");
        assert!(md.contains("| canary | 100 | 50 | 50.000% |"), "{md}");
        assert!(
            md.contains("- errors: fail (error_rate 0.5 > 0.05)"),
            "{md}"
        );
    }

    #[test]
    fn multi_line_reasons_stay_whole_in_one_markdown_row() {
        let mut r = rolled_back();
        r.events[2].reason = "nginx -t failed:\nnginx: [emerg] a | b\nnginx: test failed\n".into();
        let md = to_markdown(&r);
        assert!(
            md.contains("| nginx -t failed:<br>nginx: [emerg] a \\| b<br>nginx: test failed |\n"),
            "{md}"
        );
        assert!(!md.contains("events_dropped"), "{md}");
        r.events_dropped = 7;
        r.events = std::iter::repeat_n(r.events[0].clone(), KEEP_FIRST_EVENTS + 1).collect();
        let md = to_markdown(&r);
        assert!(
            md.contains("| events_dropped | | | | 7 events not kept"),
            "{md}"
        );
    }

    #[test]
    fn json_round_trips_the_record() {
        let r = rolled_back();
        let detail = serde_json::to_string(&r).unwrap();
        let decoded = decode(&detail).unwrap();
        assert_eq!(decoded, r);
        let json = to_json(&decoded);
        assert_eq!(json["evidence"].as_array().unwrap().len(), 2);
        assert_eq!(json["evidence"][1]["outcome"], "rolled_back");
        assert_eq!(json["state"], "rolled_back");
        assert!(decode("{not json").is_err());
    }
}
