//! A fleet on one machine: one host per network namespace, for end-to-end tests that need
//! several hosts with their own addresses and the means to kill one or cut it off.
//!
//! Why: serin runs one agent per host, and what matters in a fleet (an agent that vanishes, a
//! host that is partitioned while its processes run on, instances reachable only at their
//! host's address) cannot be shown with processes on 127.0.0.x: loopback cannot be cut. A
//! network namespace is a real host as far as the network goes, costs a few milliseconds, and
//! needs only root and iproute2's `ip`.
//!
//! Topology of [`Fleet::new`]`(n)`, where `<id>` is `<pid>-<f>` (this test process's pid and a
//! per-process fleet number, so parallel test processes and parallel tests never collide) and
//! `X` is a third octet free on this machine:
//!
//! ```text
//!  root namespace                  serin-<id>-sw (the switch)      serin-<id>-h<k> (host k)
//!  sn<id> 10.213.X.1/24 ── veth ── gw ─┐
//!                                      sw0 ── h1 ── veth ── eth0 10.213.X.11/24, lo
//!                                          ── h2 ── veth ── eth0 10.213.X.12/24, lo
//! ```
//!
//! The bridge lives in a namespace of its own rather than in the root namespace: where
//! `br_netfilter` is loaded (Docker loads it) bridged frames traverse the root namespace's
//! iptables FORWARD chain, whose policy Docker sets to DROP, so host-to-host traffic on a
//! root-namespace bridge vanishes. A new namespace has no rules, and no firewall is touched.
//! Processes in the root namespace (the coordinator, the CLI, the test itself) reach every host,
//! and every host reaches them at [`Fleet::gateway`] (`10.213.X.1`). Only these addresses and
//! loopback are ever used.
//!
//! Faults: [`Host::cut`] sets the host's switch port down, so its packets are dropped silently
//! both ways (no reset, as in a partition) while its processes run on; [`Host::heal`] sets it
//! up again. [`Host::kill_all`] SIGKILLs every process in the host's namespace, daemons that
//! forked included.
//!
//! Cleanup: dropping the fleet (also while a test panics) kills every process in its hosts and
//! deletes its namespaces and the root-side veth (the other veth ends and the bridge go with
//! their namespaces). A test process killed before its drop runs leaves them behind; the next
//! [`Fleet::new`] deletes every fleet resource whose pid no longer exists. Subnets are chosen
//! under a file lock, starting at `pid % 256`, skipping third octets any root-namespace
//! interface already uses.
//!
//! Not root, or no `ip`: [`Fleet::new`] fails naming what is missing; tests do not skip.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Proc, SERIN, tail};

/// First two octets of every fleet subnet.
pub const SUBNET_PREFIX: [u8; 2] = [10, 213];
/// Host `k` has the address `.HOST_BASE + k` in its fleet's subnet.
pub const HOST_BASE: u8 = 10;
/// Most hosts in one fleet.
pub const MAX_HOSTS: usize = 200;
/// How long killing a namespace's processes may take before it is an error.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Prefix of every namespace a fleet creates.
const NETNS_PREFIX: &str = "serin-";
/// Prefix of the root-side veth of every fleet (interface names are at most 15 bytes).
const UPLINK_PREFIX: &str = "sn";

static NEXT_FLEET: AtomicU32 = AtomicU32::new(0);

/// What this machine lacks for a fleet, as an error message; `None` when nothing is missing.
/// Pure: the effective uid and where `ip` was found are passed in.
pub fn missing_requirements(euid: u32, ip: Option<&Path>) -> Option<String> {
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!(
            "root (creating network namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN; this \
             process runs as uid {euid})"
        ));
    }
    if ip.is_none() {
        missing.push(
            "the `ip` command (not found on PATH, /usr/sbin or /sbin; Debian package iproute2)"
                .to_owned(),
        );
    }
    (!missing.is_empty()).then(|| {
        format!(
            "a test fleet of network namespaces needs {}",
            missing.join(" and ")
        )
    })
}

/// The pid a fleet resource name carries, if `name` is one: `serin-<pid>-<f>-sw`,
/// `serin-<pid>-<f>-h<k>` (namespaces) or `sn<pid>-<f>` (root-side veths). Pure.
pub fn owner_pid(name: &str) -> Option<u32> {
    let (rest, netns) = match name.strip_prefix(NETNS_PREFIX) {
        Some(rest) => (rest, true),
        None => (name.strip_prefix(UPLINK_PREFIX)?, false),
    };
    let mut parts = rest.split('-');
    let pid = parts.next()?;
    let fleet = parts.next()?;
    let tail_ok = if netns {
        match (parts.next(), parts.next()) {
            (Some("sw"), None) => true,
            (Some(h), None) => h
                .strip_prefix('h')
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())),
            _ => false,
        }
    } else {
        parts.next().is_none()
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (tail_ok && digits(pid) && digits(fleet))
        .then(|| pid.parse().ok())
        .flatten()
}

fn find_ip() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("ip"))
        .find(|p| p.is_file())
}

/// Runs `ip ARGS`; an error names the command and what it printed.
fn run_ip(ip: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = StdCommand::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", ip.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pids of every process in namespace `netns`.
fn netns_pids(ip: &Path, netns: &str) -> anyhow::Result<Vec<i32>> {
    Ok(run_ip(ip, &["netns", "pids", netns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs every process in `netns` until none is left, for at most [`KILL_TIMEOUT`].
fn kill_netns(ip: &Path, netns: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let pids = netns_pids(ip, netns)?;
        if pids.is_empty() {
            return Ok(());
        }
        if start.elapsed() > KILL_TIMEOUT {
            bail!(
                "processes {pids:?} in namespace {netns} still run {KILL_TIMEOUT:?} after SIGKILL"
            );
        }
        for pid in pids
            .iter()
            .filter_map(|&p| rustix::process::Pid::from_raw(p))
        {
            // It may have exited since it was listed.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deletes every fleet namespace and root-side veth whose owner pid no longer exists; returns
/// their names.
fn sweep(ip: &Path) -> anyhow::Result<Vec<String>> {
    let me = std::process::id();
    let stale = |name: &str| {
        owner_pid(name).is_some_and(|pid| pid != me && !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut swept = Vec::new();
    for line in run_ip(ip, &["netns", "list"])?.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if stale(name) {
            kill_netns(ip, name)?;
            run_ip(ip, &["netns", "delete", name])?;
            swept.push(name.to_owned());
        }
    }
    // `7: sn123-0@if3: <BROADCAST,...`: a root-side veth whose switch namespace is gone already
    // went with it; this catches the rest.
    for line in run_ip(ip, &["-o", "link", "show"])?.lines() {
        let name = line
            .split(':')
            .nth(1)
            .map(|n| n.trim().split('@').next().unwrap_or(""))
            .unwrap_or("");
        if stale(name) {
            run_ip(ip, &["link", "delete", name])?;
            swept.push(name.to_owned());
        }
    }
    Ok(swept)
}

/// The first third octet from `start` (wrapping) that no root-namespace IPv4 address uses in
/// `10.213.0.0/16`.
fn free_subnet(ip: &Path, start: u8) -> anyhow::Result<u8> {
    let prefix = format!("{}.{}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1]);
    let used: HashSet<u8> = run_ip(ip, &["-o", "-4", "addr", "show"])?
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(&prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    (0..=255u8)
        .map(|i| start.wrapping_add(i))
        .find(|x| !used.contains(x))
        .with_context(|| format!("every subnet {prefix}X.0/24 is in use on this machine"))
}

/// A fleet of hosts, each in its own network namespace, on one bridge; see the module docs.
/// Dropping it kills every host's processes and deletes every namespace and link it made.
pub struct Fleet {
    ip: PathBuf,
    id: String,
    switch: String,
    uplink: String,
    subnet: u8,
    made_switch: bool,
    made_uplink: bool,
    hosts: Vec<Host>,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Builds `n` hosts `h1..hn` (host `k` at `10.213.X.(10+k)`) with the root namespace at
    /// `10.213.X.1`, after sweeping the leftovers of dead test processes. Fails naming what is
    /// missing when not root or `ip` is not installed, and naming the `ip` command that failed
    /// otherwise (whatever was made by then is deleted).
    pub fn new(n: usize) -> anyhow::Result<Fleet> {
        let euid = rustix::process::geteuid().as_raw();
        let ip = find_ip();
        if let Some(missing) = missing_requirements(euid, ip.as_deref()) {
            bail!("{missing}");
        }
        let ip = ip.expect("checked by missing_requirements");
        if n == 0 || n > MAX_HOSTS {
            bail!("Fleet::new({n}): a fleet has 1..={MAX_HOSTS} hosts");
        }
        let pid = std::process::id();
        let id = format!("{pid}-{}", NEXT_FLEET.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new()
            .prefix(&format!("serin-fleet-{id}-"))
            .tempdir()
            .context("creating the fleet's directory")?;

        // Sweeping and choosing a subnet happen under one machine-wide lock, so two test
        // processes starting together neither pick the same subnet nor delete each other's
        // half-built fleets.
        let lock_path = std::env::temp_dir().join("serin-netns.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let swept = sweep(&ip).context("sweeping the fleets of dead test processes")?;
        if !swept.is_empty() {
            eprintln!("fleet: deleted leftovers of dead test processes: {swept:?}");
        }
        let subnet = free_subnet(&ip, (pid % 256) as u8)?;
        let mut fleet = Fleet {
            switch: format!("{NETNS_PREFIX}{id}-sw"),
            uplink: format!("{UPLINK_PREFIX}{id}"),
            ip,
            id,
            subnet,
            made_switch: false,
            made_uplink: false,
            hosts: Vec::new(),
            dir,
        };
        // On error `fleet` drops here and deletes whatever was made.
        fleet.build_switch()?;
        drop(lock);
        for k in 1..=n {
            fleet.build_host(k)?;
        }
        Ok(fleet)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ip(&self.ip, args)
    }

    fn build_switch(&mut self) -> anyhow::Result<()> {
        let sw = self.switch.clone();
        let up = self.uplink.clone();
        let gateway = format!("{}/24", self.gateway());
        self.ip(&["netns", "add", &sw])?;
        self.made_switch = true;
        self.ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        self.ip(&["-n", &sw, "link", "add", "sw0", "type", "bridge"])?;
        self.ip(&["-n", &sw, "link", "set", "sw0", "up"])?;
        self.ip(&[
            "link", "add", &up, "type", "veth", "peer", "name", "gw", "netns", &sw,
        ])?;
        self.made_uplink = true;
        self.ip(&["-n", &sw, "link", "set", "gw", "master", "sw0", "up"])?;
        self.ip(&["addr", "add", &gateway, "dev", &up])?;
        self.ip(&["link", "set", &up, "up"])?;
        Ok(())
    }

    fn build_host(&mut self, k: usize) -> anyhow::Result<()> {
        let name = format!("h{k}");
        let netns = format!("{NETNS_PREFIX}{}-{name}", self.id);
        let addr = self.addr(k);
        let host_dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&host_dir)
            .with_context(|| format!("creating {}", host_dir.display()))?;
        self.ip(&["netns", "add", &netns])?;
        // Registered before it is complete, so a failure below still deletes it.
        self.hosts.push(Host {
            name: name.clone(),
            netns: netns.clone(),
            addr,
            switch: self.switch.clone(),
            ip: self.ip.clone(),
            dir: host_dir,
            cut: false,
            procs: Vec::new(),
        });
        let sw = &self.switch;
        self.ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        self.ip(&[
            "-n", sw, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        self.ip(&["-n", sw, "link", "set", &name, "master", "sw0", "up"])?;
        self.ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        self.ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn addr(&self, k: usize) -> Ipv4Addr {
        let [a, b] = SUBNET_PREFIX;
        Ipv4Addr::new(a, b, self.subnet, HOST_BASE + k as u8)
    }

    /// The root namespace's address on the fleet's network (`10.213.X.1`): where hosts reach
    /// processes of the root namespace, such as the coordinator.
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b] = SUBNET_PREFIX;
        Ipv4Addr::new(a, b, self.subnet, 1)
    }

    /// The fleet's subnet, `10.213.X.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b] = SUBNET_PREFIX;
        format!("{a}.{b}.{}.0/24", self.subnet)
    }

    /// Host `k` (`h<k>`, 1-based).
    pub fn host(&self, k: usize) -> &Host {
        &self.hosts[k.checked_sub(1).expect("hosts are numbered from 1")]
    }

    /// Host `k` (`h<k>`, 1-based), to spawn, kill or cut.
    pub fn host_mut(&mut self, k: usize) -> &mut Host {
        &mut self.hosts[k.checked_sub(1).expect("hosts are numbered from 1")]
    }

    /// Every host, `h1` first.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The fleet's directory: one subdirectory per host (its processes' logs and data). Kept
    /// when a test panics.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every namespace and root-namespace link this fleet made, by name.
    pub fn resource_names(&self) -> Vec<String> {
        let mut names = vec![self.switch.clone(), self.uplink.clone()];
        names.extend(self.hosts.iter().map(|h| h.netns.clone()));
        names
    }

    /// Each host's state, processes and log tails, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "=== fleet {} on {} (gateway {}), files kept in {}\n",
            self.id,
            self.subnet(),
            self.gateway(),
            self.dir().display()
        );
        for h in &self.hosts {
            out.push_str(&h.diagnostics());
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("{}", self.diagnostics());
        }
        let mut problems = Vec::new();
        for h in &mut self.hosts {
            if let Err(e) = h.kill_all() {
                problems.push(format!("{e:#}"));
            }
            if let Err(e) = run_ip(&self.ip, &["netns", "delete", &h.netns]) {
                problems.push(format!("{e:#}"));
            }
        }
        // Deleted explicitly (not only with the switch namespace, which the kernel dismantles
        // in the background) so the subnet is free again at once.
        let uplink = ["link", "delete", self.uplink.as_str()];
        let switch = ["netns", "delete", self.switch.as_str()];
        for args in [
            self.made_uplink.then_some(uplink),
            self.made_switch.then_some(switch),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = run_ip(&self.ip, &args) {
                problems.push(format!("{e:#}"));
            }
        }
        if !problems.is_empty() {
            eprintln!(
                "fleet {}: teardown incomplete (the next Fleet::new of another process sweeps \
                 the rest):\n  {}",
                self.id,
                problems.join("\n  ")
            );
        }
    }
}

/// One host of a [`Fleet`]: a network namespace with one address, and the processes spawned
/// in it.
pub struct Host {
    name: String,
    netns: String,
    addr: Ipv4Addr,
    switch: String,
    ip: PathBuf,
    dir: PathBuf,
    cut: bool,
    procs: Vec<Proc>,
}

impl Host {
    /// `h<k>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's address on the fleet's network.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's directory (logs of its processes; a place for their data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True between [`Host::cut`] and [`Host::heal`].
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Spawns `program ARGS` in the host's namespace (`ip netns exec`), with the conventions of
    /// [`Proc::spawn`]: output to `<host dir>/<name>.log`, `NO_COLOR=1`, killed on drop.
    pub fn spawn(&mut self, name: &str, program: &str, args: &[String]) -> &mut Proc {
        self.spawn_with_log(name, program, args, None)
    }

    /// Like [`Host::spawn`], with `SERIN_LOG` set to `filter` when given.
    pub fn spawn_with_log(
        &mut self,
        name: &str,
        program: &str,
        args: &[String],
        filter: Option<&str>,
    ) -> &mut Proc {
        let mut argv = vec![
            self.ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            self.netns.clone(),
            program.to_owned(),
        ];
        argv.extend_from_slice(args);
        let shown_program = Path::new(program)
            .file_name()
            .map_or_else(|| program.into(), |n| n.to_string_lossy());
        let shown = format!("[{}] {shown_program} {}", self.name, args.join(" "));
        let proc = Proc::spawn_argv(name, &self.dir, &argv, &shown, filter);
        self.procs.push(proc);
        self.procs.last_mut().expect("just pushed")
    }

    /// Like [`Host::spawn`], but the caller owns the process (a coordinator member that a
    /// test kills and restarts): `serin ARGS` in the namespace, output to `<host dir>/<name>.log`.
    pub fn spawn_serin_owned(&self, name: &str, args: &[String]) -> Proc {
        let mut argv = vec![
            self.ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            self.netns.clone(),
            SERIN.to_owned(),
        ];
        argv.extend_from_slice(args);
        let shown = format!("[{}] serin {}", self.name, args.join(" "));
        Proc::spawn_argv(name, &self.dir, &argv, &shown, None)
    }

    /// Spawns `serin ARGS` in the host's namespace; see [`Host::spawn`].
    pub fn serin(&mut self, name: &str, args: &[String]) -> &mut Proc {
        self.spawn(name, SERIN, args)
    }

    /// The process spawned as `name`.
    pub fn proc(&mut self, name: &str) -> &mut Proc {
        let host = self.name.clone();
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("host {host} spawned no process named {name}"))
    }

    /// Runs `program ARGS` in the host's namespace to completion, for at most `timeout`
    /// (then it is killed and this panics).
    pub async fn exec(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        let child = tokio::process::Command::new(&self.ip)
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(timeout, child)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "[{}] `{program} {}` did not finish within {timeout:?}",
                    self.name,
                    args.join(" ")
                )
            })
            .unwrap_or_else(|e| panic!("[{}] running {program}: {e}", self.name))
    }

    /// The pids of every process in the host's namespace.
    pub fn pids(&self) -> anyhow::Result<Vec<i32>> {
        netns_pids(&self.ip, &self.netns)
    }

    /// SIGKILLs every process in the host's namespace (not only those spawned through
    /// [`Host::spawn`]) and waits until none is left: the host died. The network stays.
    pub fn kill_all(&mut self) -> anyhow::Result<()> {
        let result = kill_netns(&self.ip, &self.netns);
        for p in &mut self.procs {
            // Reaps the killed child, so it is not left a zombie.
            let _ = p.exited();
        }
        result
    }

    /// Partitions the host: its switch port goes down, so every packet to or from it is
    /// dropped silently; its processes run on.
    pub fn cut(&mut self) -> anyhow::Result<()> {
        run_ip(
            &self.ip,
            &["-n", &self.switch, "link", "set", &self.name, "down"],
        )?;
        self.cut = true;
        Ok(())
    }

    /// Ends a [`Host::cut`]: the host's switch port comes up again.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        run_ip(
            &self.ip,
            &["-n", &self.switch, "link", "set", &self.name, "up"],
        )?;
        self.cut = false;
        Ok(())
    }

    /// The host's state and the tail of each of its processes' logs.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "=== host {} ({}, {}){}\n",
            self.name,
            self.addr,
            self.netns,
            if self.cut { ", CUT" } else { "" }
        );
        for p in &self.procs {
            let _ = writeln!(
                out,
                "--- [{}] {} ({})\n{}",
                self.name,
                p.name,
                p.log.display(),
                tail(&p.log, 30)
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// serin on the fleet: the pieces every fleet test starts the same way
// ---------------------------------------------------------------------------------------------

/// Port of the demo app on every host (each namespace has its own ports).
pub const APP_PORT: u16 = 8080;

/// Starts a coordinator in the root namespace on the fleet's gateway address, with
/// `remove_unhealthy_after` of `remove_after_secs`; returns it and its address.
pub fn spawn_coordinator(fleet: &Fleet, remove_after_secs: u64) -> (Proc, SocketAddr) {
    let coordinator_addr = SocketAddr::from((fleet.gateway(), super::free_port()));
    let coordinator_toml = fleet.dir().join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        format!(
            "listen = \"{coordinator_addr}\"\ndata_dir = \"{}\"\nremove_unhealthy_after = \"{remove_after_secs}s\"\n",
            fleet.dir().join("coordinator").display()
        ),
    )
    .expect("writing coordinator.toml");
    let coordinator = Proc::spawn(
        "coordinator",
        fleet.dir(),
        &[
            "coordinator".into(),
            "run".into(),
            "--config".into(),
            coordinator_toml.display().to_string(),
        ],
    );
    (coordinator, coordinator_addr)
}

/// Starts `serin demo-app` on `host` at [`APP_PORT`], answering `version` (1 ms latency).
pub fn spawn_demo_app(host: &mut Host, version: &str) {
    let addr = host.addr().to_string();
    host.serin(
        "app",
        &[
            "demo-app".into(),
            "--host".into(),
            addr,
            "--port".into(),
            APP_PORT.to_string(),
            "--version".into(),
            version.into(),
            "--latency-ms".into(),
            "1".into(),
        ],
    );
}

/// Starts an app host's demo app and its agent, which declares (and scrapes) only that
/// host's instance of `web`: the canary (`v2`) or a stable one (`v1`).
pub fn start_app_host(host: &mut Host, canary: bool, coordinator_addr: SocketAddr) {
    let variant = if canary { "canary" } else { "stable" };
    spawn_demo_app(host, if canary { "v2" } else { "v1" });
    let addr = host.addr();
    let config = format!(
        r#"name = "{name}"
coordinators = ["http://{coordinator_addr}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "web-{name}"
service = "web"
variant = "{variant}"
address = "{addr}:{APP_PORT}"
metrics_url = "http://{addr}:{APP_PORT}/metrics"
"#,
        name = host.name(),
        data = host.dir().join("agent-data").display(),
    );
    let file = host.dir().join("agent.toml");
    std::fs::write(&file, config).expect("writing agent.toml");
    host.serin(
        "agent",
        &[
            "agent".into(),
            "run".into(),
            "--config".into(),
            file.display().to_string(),
        ],
    );
}
