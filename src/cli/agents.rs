//! `serin agent list`: the agents the coordinator knows, whether they are connected, what they
//! applied and the last error they reported.

use std::process::ExitCode;

use serde_json::{Value, json};
use serin_proto::v1::{AgentInfo, ForgetAgentRequest, ListAgentsRequest, Variant};

use super::output::{Table, one_line, short_duration};
use super::rollout::describe_status;
use super::{CoordinatorArgs, connect};

/// Longest error shown in the table.
const ERROR_CHARS: usize = 70;

fn variant_name(v: i32) -> &'static str {
    match Variant::try_from(v) {
        Ok(Variant::Stable) => "stable",
        Ok(Variant::Canary) => "canary",
        _ => "?",
    }
}

fn applied_text(a: &AgentInfo) -> String {
    a.applied
        .map_or("-".to_owned(), |g| format!("{}.{}", g.term, g.index))
}

/// The agents as a table.
pub fn render(agents: &[AgentInfo], now_ms: i64) -> String {
    if agents.is_empty() {
        return "no agents have connected to this coordinator\n".to_owned();
    }
    let mut table = Table::new(&[
        "AGENT",
        "CONNECTED",
        "LAST REPORT",
        "APPLIED",
        "INSTANCES",
        "LAST ERROR",
    ]);
    for a in agents {
        let instances = a
            .targets
            .iter()
            .map(|t| {
                let mut text = format!("{}/{}", t.service, variant_name(t.variant));
                if !t.version.is_empty() {
                    text.push('@');
                    text.push_str(&t.version);
                }
                text
            })
            .collect::<Vec<_>>()
            .join(",");
        table.row(vec![
            a.name.clone(),
            if a.connected { "yes" } else { "no" }.to_owned(),
            if a.last_report_ms > 0 {
                format!("{} ago", short_duration(now_ms - a.last_report_ms))
            } else {
                "-".to_owned()
            },
            applied_text(a),
            instances,
            if a.last_error.is_empty() {
                "-".to_owned()
            } else {
                one_line(&a.last_error, ERROR_CHARS)
            },
        ]);
    }
    table.render("")
}

/// The agents as JSON.
pub fn to_json(agents: &[AgentInfo]) -> Value {
    Value::Array(
        agents
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "connected": a.connected,
                    "labels": a.labels,
                    "last_report_ms": (a.last_report_ms > 0).then_some(a.last_report_ms),
                    "applied": a.applied.map(|g| json!({"term": g.term, "index": g.index})),
                    "last_error": (!a.last_error.is_empty()).then(|| a.last_error.clone()),
                    "instances": a.targets.iter().map(|t| json!({
                        "name": t.name,
                        "service": t.service,
                        "variant": variant_name(t.variant),
                        "address": t.address,
                        "version": (!t.version.is_empty()).then_some(&t.version),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Runs `serin agent list`.
pub async fn list(json: bool, coordinator: &CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(coordinator).await?;
    let agents = client
        .list_agents(ListAgentsRequest {})
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?
        .into_inner()
        .agents;
    if json {
        println!("{:#}", to_json(&agents));
    } else {
        let now = serin_coordinator::control::now_millis();
        print!("{}", render(&agents, now));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `serin agent forget NAME`.
pub async fn forget(name: &str, coordinator: &CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(coordinator).await?;
    client
        .forget_agent(ForgetAgentRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?;
    println!("forgot agent '{name}'");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serin_proto::v1::{Generation, Target};

    use super::*;

    fn agent(connected: bool, error: &str) -> AgentInfo {
        AgentInfo {
            name: "host-a".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            targets: vec![
                Target {
                    name: "api-1".into(),
                    service: "api".into(),
                    variant: Variant::Stable as i32,
                    address: "127.0.0.1:8081".into(),
                    version: String::new(),
                    managed: false,
                },
                Target {
                    name: "api-2".into(),
                    service: "api".into(),
                    variant: Variant::Canary as i32,
                    address: "127.0.0.1:8082".into(),
                    version: "v2".into(),
                    managed: false,
                },
            ],
            connected,
            applied: Some(Generation { term: 2, index: 17 }),
            last_error: error.into(),
            last_report_ms: 9_000,
        }
    }

    #[test]
    fn the_table_shows_connection_generation_instances_and_errors() {
        let text = render(
            &[agent(true, ""), agent(false, "api: nginx -t failed")],
            10_000,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{text}");
        assert!(
            lines[1].contains("yes") && lines[1].contains("1s ago"),
            "{text}"
        );
        assert!(
            lines[1].contains("2.17") && lines[1].contains("api/stable,api/canary@v2"),
            "{text}"
        );
        assert!(
            lines[2].contains("no") && lines[2].ends_with("api: nginx -t failed"),
            "{text}"
        );
        assert_eq!(
            render(&[], 0),
            "no agents have connected to this coordinator\n"
        );
    }

    #[test]
    fn a_multi_line_error_is_one_line_in_the_table_and_whole_in_json() {
        let error = "web: nginx -t failed:\nnginx: [emerg] bad\nnginx: test failed\n";
        let a = agent(false, error);
        let text = render(std::slice::from_ref(&a), 10_000);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .ends_with("web: nginx -t failed: ⏎ nginx: [emerg] bad ⏎ nginx: test failed"),
            "{text}"
        );
        assert_eq!(to_json(&[a])[0]["last_error"], error);
    }

    #[test]
    fn json_has_nulls_for_what_is_unknown() {
        let mut a = agent(true, "");
        a.applied = None;
        a.last_report_ms = 0;
        let v = to_json(&[a]);
        assert_eq!(v[0]["applied"], Value::Null);
        assert_eq!(v[0]["last_report_ms"], Value::Null);
        assert_eq!(v[0]["last_error"], Value::Null);
        assert_eq!(v[0]["instances"][1]["variant"], "canary");
        assert_eq!(v[0]["instances"][0]["version"], Value::Null, "not declared");
        assert_eq!(v[0]["instances"][1]["version"], "v2");
        assert_eq!(v[0]["labels"]["zone"], "a");
    }
}
