//! `serin demo`, end to end: the binary runs its whole scenario on the fleet shape (a
//! coordinator, a balancer host and six app hosts, one agent process per host) with short
//! stages, and must exit 0 with `RESULT: ok`, leaving no process behind.
//!
//! The demo runs in a process group of its own, so the test can tell that every process it
//! started (agents, demo apps, nginx) is gone once it exits, and can kill them all if the demo
//! hangs or the test fails. Needs nginx, like the other end-to-end tests.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

const SERIN: &str = env!("CARGO_BIN_EXE_serin");

/// Longest the demo may take here before the test kills it (it takes ~45 s with 2 s stages).
const DEMO_DEADLINE: Duration = Duration::from_secs(110);

/// A child in its own process group; dropping it kills the whole group.
struct Group {
    child: Child,
    pgid: Pid,
}

impl Group {
    fn spawn(args: &[&str], out: &std::path::Path) -> Group {
        let file = std::fs::File::create(out).expect("creating the output file");
        let err = file.try_clone().expect("cloning the output file handle");
        let child = Command::new(SERIN)
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("SERIN_LOG")
            .env_remove("SERIN_COORDINATOR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {SERIN}: {e}"));
        let pgid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
        Group { child, pgid }
    }

    /// Waits for the child to exit, up to `deadline`.
    fn wait(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(status) = self.child.try_wait().expect("waiting for the demo") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }

    /// Whether any process of the group still exists, polled for up to 5 s (a process the demo
    /// killed may take a moment to be reaped).
    fn anyone_left(&self) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if test_kill_process_group(self.pgid).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = kill_process_group(self.pgid, Signal::KILL);
        let _ = self.child.wait();
    }
}

fn read(path: &std::path::Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

#[test]
fn the_demo_runs_on_the_fleet_shape_promotes_the_good_canary_rolls_back_the_bad_one_and_exits_0() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("demo.out");
    let files = dir.path().join("files");
    let mut demo = Group::spawn(
        &[
            "demo",
            "--stage-seconds",
            "2",
            "--dir",
            &files.display().to_string(),
        ],
        &out,
    );
    let status = demo.wait(DEMO_DEADLINE);
    let text = read(&out);
    let status = status.unwrap_or_else(|| {
        panic!("the demo did not finish within {DEMO_DEADLINE:?}; its output:\n{text}")
    });
    assert!(status.success(), "the demo exited {status}:\n{text}");
    for expected in [
        "one agent process per host",
        "RESULT: ok",
        "demo finished in",
        "▸ promoted",
        "▸ rolled_back",
        "out of the upstream, applied by lb",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    // The fleet table: every host on its own address, each with its own agent process.
    for (host, address) in [
        ("lb", "127.0.1.1 "),
        ("web-1", "127.0.1.11"),
        ("web-2", "127.0.1.12"),
        ("web-3", "127.0.1.13"),
        ("api-1", "127.0.1.21"),
        ("api-2", "127.0.1.22"),
        ("api-3", "127.0.1.23"),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{host} ")))
            .unwrap_or_else(|| panic!("no fleet line for {host} in:\n{text}"));
        assert!(
            line.contains(address) && line.contains("serin agent (") && line.contains("agent "),
            "{line}"
        );
        // Each host's agent had its own config, declaring only its own instance (or none).
        let config = read(&files.join(host).join("agent.toml"));
        assert_eq!(
            config
                .lines()
                .filter(|l| l.trim() == "[[instances]]")
                .count(),
            usize::from(host != "lb"),
            "{host}:\n{config}"
        );
    }
    // Every verification line held.
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with('✗')),
        "{text}"
    );
    assert!(
        !demo.anyone_left(),
        "processes of the demo were still running after it exited"
    );
}

#[test]
fn the_demo_refuses_a_stage_time_of_zero_naming_the_option_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let files = dir.path().join("files");
    let out = Command::new(SERIN)
        .args([
            "demo",
            "--stage-seconds",
            "0",
            "--dir",
            &files.display().to_string(),
        ])
        .output()
        .expect("running serin demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--stage-seconds"), "{stderr}");
    assert!(!files.exists(), "the demo created {}", files.display());
}
