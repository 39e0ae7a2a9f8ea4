//! `[deploy]`: defaults, every refusal by field, templates, the example files.

use super::*;
use crate::strategy::{Strategy, StrategyError};

const STAGES: &str = "[[stages]]\nweight = 5\n";

fn parse(deploy: &str) -> Result<Strategy, StrategyError> {
    Strategy::from_toml(&format!("{STAGES}{deploy}"))
}

fn problems(deploy: &str) -> Vec<String> {
    match parse(deploy) {
        Ok(_) => vec![],
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

fn fields(deploy: &str) -> Vec<String> {
    match parse(deploy) {
        Ok(_) => vec![],
        Err(e) => e.problems().into_iter().map(|p| p.field).collect(),
    }
}

const DOCKER: &str = "[deploy.docker]\nimage = \"api:{version}\"\nport = 8080\n";
const COMMAND: &str = "[deploy.command]\nstart = \"run {version}\"\nstop = \"stop\"\n";

#[test]
fn a_minimal_docker_deploy_gets_every_default() {
    let s = parse(DOCKER).unwrap();
    let d = s
        .deploy
        .expect("a [deploy.docker] alone is a deploy section");
    assert_eq!(d.model, DeployModel::Weighted);
    assert_eq!(d.health_path, None);
    assert_eq!(d.health_timeout, DEFAULT_HEALTH_TIMEOUT);
    assert!(d.env.is_empty());
    assert_eq!(
        d.driver,
        DeployDriver::Docker(DockerDeploy {
            image: "api:{version}".into(),
            port: Some(8080),
            args: vec![],
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        })
    );
}

#[test]
fn a_minimal_command_deploy_gets_every_default() {
    let d = parse(COMMAND).unwrap().deploy.unwrap();
    assert_eq!(
        d.driver,
        DeployDriver::Command(CommandDeploy {
            start: "run {version}".into(),
            stop: "stop".into(),
            deploy: None,
            health: None,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        })
    );
}

#[test]
fn a_strategy_without_deploy_has_none_and_old_records_still_read() {
    assert_eq!(parse("").unwrap().deploy, None);
    let stored =
        r#"{"stages":[],"checks":[],"triggers":[],"traffic":{"sticky_key":null},"hooks":[]}"#;
    let s: Strategy = serde_json::from_str(stored).unwrap();
    assert_eq!(s.deploy, None);
}

#[test]
fn every_field_is_read_and_survives_serde() {
    let s = parse(
        r#"
[deploy]
model = "hosts"
health_path = "/healthz?deep=1"
health_timeout = "2m"
env = { LOG_LEVEL = "info", _X = "{instance}" }
[deploy.command]
start = "start {version}"
stop = "stop {instance}"
deploy = "fetch {version}"
health = "curl -f http://{address}/"
timeout = "10s"
"#,
    )
    .unwrap();
    let d = s.deploy.clone().unwrap();
    assert_eq!(d.model, DeployModel::Hosts);
    assert_eq!(d.health_path.as_deref(), Some("/healthz?deep=1"));
    assert_eq!(d.health_timeout, Duration::from_secs(120));
    assert_eq!(d.env["_X"], "{instance}");
    let DeployDriver::Command(c) = &d.driver else {
        panic!("a command driver")
    };
    assert_eq!(c.deploy.as_deref(), Some("fetch {version}"));
    assert_eq!(c.health.as_deref(), Some("curl -f http://{address}/"));
    assert_eq!(c.timeout, Duration::from_secs(10));
    let back: Strategy = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn unknown_fields_are_refused_in_every_deploy_table() {
    for (text, name) in [
        (format!("[deploy]\nmodle = \"hosts\"\n{DOCKER}"), "modle"),
        (format!("{DOCKER}imgae = \"x\"\n"), "imgae"),
        (format!("{COMMAND}restart = \"x\"\n"), "restart"),
    ] {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(&format!("unknown field `{name}`")), "{e}");
    }
}

#[test]
fn a_deploy_needs_exactly_one_driver() {
    assert_eq!(
        fields("[deploy]\nhealth_timeout = \"5s\"\n"),
        ["deploy"],
        "neither"
    );
    let p = problems(&format!("{DOCKER}{COMMAND}"));
    assert_eq!(
        p,
        ["deploy: set either [deploy.docker] or [deploy.command], not both"]
    );
}

#[test]
fn an_unknown_model_is_named() {
    assert_eq!(
        problems(&format!("[deploy]\nmodel = \"blue-green\"\n{DOCKER}")),
        ["deploy.model: must be \"weighted\", \"hosts\" or \"shards\", got \"blue-green\""]
    );
}

#[test]
fn a_sticky_split_with_the_hosts_model_is_refused() {
    let text =
        format!("[traffic]\nsticky_key = \"$cookie_uid\"\n[deploy]\nmodel = \"hosts\"\n{COMMAND}");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("deploy.model: \"hosts\" cannot have a sticky split"));
    // The same split with the weighted model is fine.
    let weighted = format!("[traffic]\nsticky_key = \"$cookie_uid\"\n{DOCKER}");
    assert!(parse(&weighted).is_ok());
}

#[test]
fn health_paths_must_start_with_a_slash_and_be_plain() {
    assert_eq!(
        problems(&format!("[deploy]\nhealth_path = \"healthz\"\n{DOCKER}")),
        ["deploy.health_path: must start with '/', e.g. \"/healthz\", got \"healthz\""]
    );
    assert_eq!(
        fields(&format!("[deploy]\nhealth_path = \"/a b\"\n{DOCKER}")),
        ["deploy.health_path"]
    );
    let long = format!("/{}", "a".repeat(1024));
    assert_eq!(
        problems(&format!("[deploy]\nhealth_path = \"{long}\"\n{DOCKER}")),
        ["deploy.health_path: 1025 bytes is longer than the limit of 1024 bytes"]
    );
}

#[test]
fn timeouts_are_bounded_and_malformed_ones_named() {
    let p = problems(&format!("[deploy]\nhealth_timeout = \"500ms\"\n{DOCKER}"));
    assert_eq!(
        p,
        ["deploy.health_timeout: must be between 1s and 10m, got 500ms"]
    );
    assert_eq!(
        fields(&format!("[deploy]\nhealth_timeout = \"11m\"\n{DOCKER}")),
        ["deploy.health_timeout"]
    );
    assert_eq!(
        fields(&format!("[deploy]\nhealth_timeout = \"soon\"\n{DOCKER}")),
        ["deploy.health_timeout"]
    );
    assert_eq!(
        problems(&format!("{DOCKER}stop_timeout = \"6m\"\n")),
        ["deploy.docker.stop_timeout: must be between 0s and 5m, got 6m"]
    );
    assert!(parse(&format!("{DOCKER}stop_timeout = \"0s\"\n")).is_ok());
    assert_eq!(
        fields(&format!("{COMMAND}timeout = \"0s\"\n")),
        ["deploy.command.timeout"]
    );
    assert_eq!(
        fields(&format!("{COMMAND}timeout = \"11m\"\n")),
        ["deploy.command.timeout"]
    );
    let d = parse(&format!(
        "[deploy]\nhealth_timeout = \"10m\"\n{DOCKER}stop_timeout = \"5m\"\n"
    ))
    .unwrap()
    .deploy
    .unwrap();
    assert_eq!(
        d.health_timeout, MAX_HEALTH_TIMEOUT,
        "the bounds are inclusive"
    );
}

#[test]
fn environment_names_and_values_are_checked() {
    let p = fields(
        "[deploy]\nenv = { 9LIVES = \"x\", \"A-B\" = \"x\", SERIN_VARIANT = \"x\", OK = \"{nope}\", \"\" = \"x\" }\n[deploy.docker]\nimage = \"a\"\nport = 1\n",
    );
    assert_eq!(
        p,
        [
            "deploy.env.",
            "deploy.env.9LIVES",
            "deploy.env.A-B",
            "deploy.env.OK",
            "deploy.env.SERIN_VARIANT",
        ]
    );
    let p = problems(&format!("[deploy]\nenv = {{ SERIN_X = \"1\" }}\n{DOCKER}"));
    assert_eq!(
        p,
        [
            "deploy.env.SERIN_X: \"SERIN_X\": names starting with SERIN_ are reserved for what serin sets itself"
        ]
    );
    let big = "v".repeat(4097);
    assert_eq!(
        problems(&format!("[deploy]\nenv = {{ BIG = \"{big}\" }}\n{DOCKER}")),
        ["deploy.env.BIG: 4097 bytes is longer than the limit of 4096 bytes"]
    );
    let fine = "v".repeat(4096);
    assert!(parse(&format!("[deploy]\nenv = {{ BIG = \"{fine}\" }}\n{DOCKER}")).is_ok());
    let many: Vec<_> = (0..65).map(|i| format!("E{i} = \"1\"")).collect();
    assert_eq!(
        problems(&format!(
            "[deploy]\nenv = {{ {} }}\n{DOCKER}",
            many.join(", ")
        )),
        ["deploy.env: at most 64 entries, got 65"]
    );
    let nul = "[deploy]\nenv = { A = \"x\\u0000y\" }\n";
    assert_eq!(
        problems(&format!("{nul}{DOCKER}")),
        ["deploy.env.A: must not contain a NUL character"]
    );
}

#[test]
fn docker_fields_are_checked() {
    assert_eq!(
        problems("[deploy.docker]\nport = 8080\n"),
        ["deploy.docker.image: required, e.g. image = \"api:{version}\""]
    );
    assert_eq!(
        fields("[deploy.docker]\nimage = \"  \"\nport = 8080\n"),
        ["deploy.docker.image"]
    );
    assert_eq!(
        fields("[deploy.docker]\nimage = \"api v2\"\nport = 8080\n"),
        ["deploy.docker.image"]
    );
    for port in ["0", "65536", "-1"] {
        assert_eq!(
            problems(&format!("[deploy.docker]\nimage = \"a\"\nport = {port}\n")),
            [format!(
                "deploy.docker.port: must be in 1..=65535, got {port}"
            )]
        );
    }
    assert!(parse("[deploy.docker]\nimage = \"a\"\nport = 65535\n").is_ok());
    let args: Vec<_> = (0..65).map(|i| format!("\"a{i}\"")).collect();
    assert_eq!(
        problems(&format!("{DOCKER}args = [{}]\n", args.join(", "))),
        ["deploy.docker.args: at most 64 entries, got 65"]
    );
    assert_eq!(
        fields(&format!("{DOCKER}args = [\"ok\", \"{{verison}}\"]\n")),
        ["deploy.docker.args[1]"]
    );
}

#[test]
fn the_docker_port_is_required_where_something_must_reach_the_container() {
    assert_eq!(
        problems("[deploy.docker]\nimage = \"a\"\n"),
        ["deploy.docker.port: required with model \"weighted\": the balancer sends requests to it"]
    );
    assert_eq!(
        problems(
            "[deploy]\nmodel = \"hosts\"\nhealth_path = \"/h\"\n[deploy.docker]\nimage = \"a\"\n"
        ),
        [
            "deploy.docker.port: required with deploy.health_path: the probe reaches the container on it"
        ]
    );
    // A worker judged on its own metrics needs no port.
    let d = parse("[deploy]\nmodel = \"hosts\"\n[deploy.docker]\nimage = \"a\"\n")
        .unwrap()
        .deploy
        .unwrap();
    assert!(matches!(
        d.driver,
        DeployDriver::Docker(DockerDeploy { port: None, .. })
    ));
}

#[test]
fn commands_are_required_non_empty_and_bounded() {
    assert_eq!(
        problems("[deploy.command]\n"),
        [
            "deploy.command.start: required",
            "deploy.command.stop: required"
        ]
    );
    assert_eq!(
        fields("[deploy.command]\nstart = \" \"\nstop = \"x\"\nhealth = \"\"\n"),
        ["deploy.command.start", "deploy.command.health"]
    );
    let long = "x".repeat(4097);
    assert_eq!(
        problems(&format!(
            "[deploy.command]\nstart = \"x\"\nstop = \"x\"\ndeploy = \"{long}\"\n"
        )),
        ["deploy.command.deploy: 4097 bytes is longer than the limit of 4096 bytes"]
    );
    // A multi-line command is fine (it runs through a shell).
    assert!(parse("[deploy.command]\nstart = \"\"\"a\nb\"\"\"\nstop = \"x\"\n").is_ok());
}

#[test]
fn an_unknown_placeholder_is_named_with_its_field_and_shell_variables_pass() {
    let p = problems("[deploy.command]\nstart = \"run {verison}\"\nstop = \"echo ${HOME}\"\n");
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].starts_with(
            "deploy.command.start: unknown placeholder {verison}: use one of {version}, {service}, {instance}, {variant}, {address}, {host}, {port}"
        ),
        "{p:#?}"
    );
}

#[test]
fn every_problem_of_a_deploy_is_reported_at_once() {
    let f = fields(
        r#"
[deploy]
model = "hosts"
health_path = "x"
health_timeout = "0s"
env = { SERIN_A = "1" }
[deploy.docker]
image = "a:{x}"
args = ["{y}"]
stop_timeout = "1h"
"#,
    );
    assert_eq!(
        f,
        [
            "deploy.health_path",
            "deploy.health_timeout",
            "deploy.env.SERIN_A",
            "deploy.docker.image",
            "deploy.docker.port",
            "deploy.docker.args[0]",
            "deploy.docker.stop_timeout",
        ]
    );
}

#[test]
fn templates_accept_known_placeholders_escaped_braces_and_shell_variables_only() {
    for good in [
        "",
        "plain",
        "{version}",
        "{service}-{instance}-{variant}@{address} {host}:{port}",
        "awk '{{print $1}}'",
        "echo ${HOME}",
        "é{version}é",
    ] {
        assert_eq!(check_template(good), Ok(()), "{good}");
    }
    for (bad, why) in [
        ("{", "unclosed placeholder"),
        ("a {version", "unclosed placeholder"),
        ("{}", "unknown placeholder {}"),
        ("{Version}", "unknown placeholder {Version}"),
    ] {
        let e = check_template(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn the_example_deploy_strategies_are_valid() {
    let docker = Strategy::from_toml(include_str!(
        "../../../../deploy/strategies/docker-canary.toml"
    ))
    .expect("deploy/strategies/docker-canary.toml is valid");
    let d = docker.deploy.unwrap();
    assert_eq!(d.model, DeployModel::Weighted);
    assert!(matches!(
        &d.driver,
        DeployDriver::Docker(DockerDeploy { image, port: Some(8080), .. }) if image == "serin-demo:{version}"
    ));
    let hosts = Strategy::from_toml(include_str!(
        "../../../../deploy/strategies/hosts-worker.toml"
    ))
    .expect("deploy/strategies/hosts-worker.toml is valid");
    let d = hosts.deploy.unwrap();
    assert_eq!(d.model, DeployModel::Hosts);
    assert!(matches!(d.driver, DeployDriver::Command(_)));
    let shards = Strategy::from_toml(include_str!(
        "../../../../deploy/strategies/discord-shards.toml"
    ))
    .expect("deploy/strategies/discord-shards.toml is valid");
    let d = shards.deploy.unwrap();
    assert_eq!(d.model, DeployModel::Shards);
    assert_eq!(
        d.shards,
        Some(ShardSpec {
            count: 64,
            max_concurrency: Some(16),
            start_interval: Duration::from_secs(5),
        })
    );
}

#[test]
fn a_shards_deploy_reads_its_partition_and_start_limit_with_defaults() {
    let d = parse(&format!(
        "[deploy]\nmodel = \"shards\"\n[deploy.shards]\ncount = 16\n{COMMAND}"
    ))
    .unwrap()
    .deploy
    .unwrap();
    assert_eq!(d.model, DeployModel::Shards);
    assert_eq!(
        d.shards,
        Some(ShardSpec {
            count: 16,
            max_concurrency: None,
            start_interval: DEFAULT_SHARD_START_INTERVAL,
        })
    );
    let d = parse(&format!(
        "[deploy]\nmodel = \"shards\"\n[deploy.shards]\ncount = 16\nmax_concurrency = 4\n\
         start_interval = \"1s\"\n{DOCKER}"
    ))
    .unwrap()
    .deploy
    .unwrap();
    assert_eq!(d.shards.unwrap().max_concurrency, Some(4));
    assert_eq!(d.shards.unwrap().start_interval, Duration::from_secs(1));
}

#[test]
fn a_shards_deploy_refuses_a_missing_or_misplaced_partition_and_bad_numbers() {
    let shards = |body: &str| {
        problems(&format!(
            "[deploy]\nmodel = \"shards\"\n[deploy.shards]\n{body}{COMMAND}"
        ))
    };
    assert_eq!(
        problems(&format!("[deploy]\nmodel = \"shards\"\n{COMMAND}")),
        ["deploy.shards: required with model \"shards\", e.g. [deploy.shards] count = 16"]
    );
    assert_eq!(
        problems(&format!(
            "[deploy]\nmodel = \"hosts\"\n[deploy.shards]\ncount = 4\n{COMMAND}"
        )),
        ["deploy.shards: only with model \"shards\" (the model is \"hosts\")"]
    );
    assert_eq!(
        shards(""),
        ["deploy.shards.count: required, e.g. count = 16"]
    );
    assert_eq!(
        shards("count = 0\n"),
        ["deploy.shards.count: must be between 1 and 4096, got 0"]
    );
    assert_eq!(
        shards("count = 4097\n"),
        ["deploy.shards.count: must be between 1 and 4096, got 4097"]
    );
    assert_eq!(
        shards("count = 16\nmax_concurrency = 17\n"),
        ["deploy.shards.max_concurrency: must be between 1 and the shard count 16, got 17"]
    );
    assert_eq!(
        shards("count = 16\nmax_concurrency = 0\n"),
        ["deploy.shards.max_concurrency: must be between 1 and the shard count 16, got 0"]
    );
    assert_eq!(
        fields(
            "[deploy]\nmodel = \"shards\"\n[deploy.shards]\ncount = 16\nstart_interval = \"2m\"\n[deploy.command]\nstart = \"s\"\nstop = \"t\"\n"
        ),
        ["deploy.shards.start_interval"]
    );
    assert_eq!(
        fields(
            "[deploy]\nmodel = \"shards\"\n[deploy.shards]\ncount = 16\nlimit = 1\n[deploy.command]\nstart = \"s\"\nstop = \"t\"\n"
        ),
        ["line 7 (in [deploy.shards])"]
    );
    let sticky = Strategy::from_toml(&format!(
        "{STAGES}[traffic]\nsticky_key = \"$cookie_uid\"\n[deploy]\nmodel = \"shards\"\n\
         [deploy.shards]\ncount = 4\n{COMMAND}"
    ))
    .unwrap_err();
    assert!(
        sticky
            .to_string()
            .contains("\"shards\" cannot have a sticky split"),
        "{sticky}"
    );
}
