//! The daemon's phases on fakes: a memory routing table, a memory device,
//! resolver files in a temporary directory, and a link that answers (or
//! fails) on cue. No root, no sockets.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Parser;
use forwarder::dns::SplitDns;
use ipnet::IpNet;
use routing::{Interface, MemoryTable, Route, RouteEntry, RouteTable};
use tunnel::{Device, MemoryDevice, MemoryPeer, TunConfig};

use super::*;
use crate::daemon::dns::Backend;

const ETH0: u32 = 2;
const TUN: u32 = 9;

struct FakeDevice {
    inner: MemoryDevice,
    _peer: MemoryPeer,
    addresses: Vec<IpNet>,
}

impl Device for FakeDevice {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn mtu(&self) -> u16 {
        self.inner.mtu()
    }
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.recv(buf).await
    }
    async fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        self.inner.send(packet).await
    }
}

impl TunnelDevice for FakeDevice {
    fn index(&self) -> u32 {
        TUN
    }
    fn addresses(&self) -> Vec<IpNet> {
        self.addresses.clone()
    }
}

struct FakePlatform {
    table: MemoryTable,
    dir: tempfile::TempDir,
    /// Every device made, to tell whether any is still alive.
    devices: Mutex<Vec<std::sync::Weak<FakeDevice>>>,
}

impl FakePlatform {
    fn new() -> Self {
        let default = RouteEntry {
            route: Route {
                dest: "0.0.0.0/0".parse().expect("net"),
                gateway: Some("192.168.1.1".parse().expect("ip")),
                ifindex: ETH0,
            },
            ifname: "eth0".into(),
            scoped: false,
        };
        FakePlatform {
            table: MemoryTable::new(vec![default]),
            dir: tempfile::tempdir().expect("tempdir"),
            devices: Mutex::default(),
        }
    }

    fn resolver_dir(&self) -> PathBuf {
        self.dir.path().join("etc/resolver")
    }

    fn live_devices(&self) -> usize {
        self.devices.lock().expect("lock").iter().filter(|w| w.strong_count() > 0).count()
    }

    /// Files left anywhere under the run directory and the resolver directory.
    fn files_left(&self) -> Vec<String> {
        fn walk(dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

impl Platform for FakePlatform {
    type Device = FakeDevice;

    fn route_table(&self) -> anyhow::Result<Box<dyn RouteTable>> {
        Ok(Box::new(self.table.clone()))
    }

    fn interfaces(&self) -> anyhow::Result<Vec<Interface>> {
        Ok(vec![Interface {
            name: "eth0".into(),
            index: ETH0,
            networks: vec!["192.168.1.10/24".parse().expect("net")],
            up: true,
        }])
    }

    fn create_device(&self, config: &TunConfig) -> anyhow::Result<Arc<FakeDevice>> {
        let (inner, peer) = MemoryDevice::pair("utun7", config.mtu, 16);
        let mut addresses = vec![IpNet::V4(config.ipv4.block())];
        addresses.extend(config.ipv6.map(IpNet::V6));
        let device = Arc::new(FakeDevice { inner, _peer: peer, addresses });
        self.devices.lock().expect("lock").push(Arc::downgrade(&device));
        Ok(device)
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn dns_backend(&self) -> Backend {
        Backend::ResolverDir(self.resolver_dir())
    }
}

#[derive(Default)]
struct Script {
    fail_connect: bool,
    fail_serve: bool,
}

/// What the fake link saw at each phase.
#[derive(Default, Debug)]
struct Seen {
    /// Route adds the table had seen when the agent answered.
    adds_at_connect: Option<usize>,
    /// Our routes (all but the default) while serving.
    routes_while_serving: Vec<Route>,
    resolver_files_while_serving: usize,
    finished: bool,
}

struct FakeLink<'a> {
    platform: &'a FakePlatform,
    script: Script,
    seen: Seen,
}

fn adds(table: &MemoryTable) -> usize {
    table.ops().iter().filter(|op| matches!(op, routing::Op::Add(_))).count()
}

impl Link<FakeDevice> for FakeLink<'_> {
    async fn connect(&mut self, _args: &StartArgs, plan: &Plan) -> anyhow::Result<Answered> {
        self.seen.adds_at_connect = Some(adds(&self.platform.table));
        if self.script.fail_connect {
            bail!("no instance answered");
        }
        let dns = SplitDns::new(
            vec![IpAddr::V4(plan.ipv4.peer)],
            vec![forwarder::dns::Domain::parse("corp.internal").expect("domain")],
        );
        // The stream endpoint falls inside the routed CIDR: it must be pinned off the tunnel.
        Ok(Answered { endpoints: vec!["10.20.5.5".parse().expect("ip")], split_dns: Some(Arc::new(dns)) })
    }

    async fn serve(
        &mut self,
        _args: &StartArgs,
        _plan: &Plan,
        _installed: &Installed<FakeDevice>,
    ) -> anyhow::Result<()> {
        let entries = self.platform.table.entries();
        self.seen.routes_while_serving = entries.iter().skip(1).map(|e| e.route.clone()).collect();
        self.seen.resolver_files_while_serving =
            std::fs::read_dir(self.platform.resolver_dir()).map(|d| d.count()).unwrap_or(0);
        if self.script.fail_serve {
            bail!("the link broke for good");
        }
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        self.seen.finished = true;
        Ok(())
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    start: StartArgs,
}

fn args(extra: &[&str]) -> StartArgs {
    let mut argv = vec!["start", "--instance-id", "i-0123456789abcdef0", "--cidr", "10.20.0.0/16", "--name", "t1"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("arguments").start
}

async fn run_with(platform: &FakePlatform, script: Script, args: &StartArgs) -> (anyhow::Result<()>, Seen) {
    let mut link = FakeLink { platform, script, seen: Seen::default() };
    let result = run_on(platform, args, &mut link).await;
    (result, link.seen)
}

#[tokio::test]
async fn routes_and_dns_come_after_the_agent_answered_and_go_at_the_end() {
    let platform = FakePlatform::new();
    let (result, seen) = run_with(&platform, Script::default(), &args(&[])).await;
    result.expect("the tunnel ran and stopped");
    assert_eq!(seen.adds_at_connect, Some(0), "nothing was routed before the agent answered");
    let pin = Route {
        dest: "10.20.5.5/32".parse().expect("net"),
        gateway: Some("192.168.1.1".parse().expect("ip")),
        ifindex: ETH0,
    };
    let tunnel = Route::via_interface("10.20.0.0/16".parse().expect("net"), TUN);
    assert_eq!(seen.routes_while_serving, vec![pin, tunnel], "the endpoint pinned first, then the CIDR");
    assert_eq!(seen.resolver_files_while_serving, 1, "corp.internal resolves through the tunnel");
    assert!(seen.finished, "the session was closed");
    assert_eq!(platform.table.entries().len(), 1, "only the default route is left: {:?}", platform.table.entries());
    assert_eq!(platform.live_devices(), 0, "the device is gone");
    assert!(platform.files_left().is_empty(), "left behind: {:?}", platform.files_left());
}

#[tokio::test]
async fn a_failed_connect_changes_nothing() {
    let platform = FakePlatform::new();
    let script = Script { fail_connect: true, ..Script::default() };
    let (result, seen) = run_with(&platform, script, &args(&[])).await;
    assert!(result.is_err());
    assert_eq!(adds(&platform.table), 0, "no route was touched");
    assert_eq!(platform.live_devices(), 0);
    assert!(seen.finished, "whatever session there was is closed");
    assert!(platform.files_left().is_empty(), "left behind: {:?}", platform.files_left());
}

#[tokio::test]
async fn a_route_that_cannot_be_added_takes_the_others_back_with_it() {
    let platform = FakePlatform::new();
    // The pin goes in, the first CIDR's route fails.
    platform.table.fail_add(1, nix::libc::EPERM);
    let (result, seen) = run_with(&platform, Script::default(), &args(&["--cidr", "10.30.0.0/16"])).await;
    let err = format!("{:#}", result.expect_err("install failed"));
    assert!(err.contains("adding the route for 10.20.0.0/16"), "{err}");
    assert!(seen.finished, "the session was closed");
    assert!(seen.routes_while_serving.is_empty(), "never served");
    assert_eq!(platform.table.entries().len(), 1, "the pin was removed again: {:?}", platform.table.entries());
    assert_eq!(platform.live_devices(), 0, "the device is gone");
    assert!(platform.files_left().is_empty(), "left behind: {:?}", platform.files_left());
}

#[tokio::test]
async fn a_failed_serve_still_tears_everything_down() {
    let platform = FakePlatform::new();
    let script = Script { fail_serve: true, ..Script::default() };
    let (result, seen) = run_with(&platform, script, &args(&[])).await;
    assert!(format!("{:#}", result.expect_err("serve failed")).contains("broke for good"));
    assert_eq!(seen.routes_while_serving.len(), 2);
    assert_eq!(platform.table.entries().len(), 1);
    assert_eq!(platform.live_devices(), 0);
    assert!(platform.files_left().is_empty(), "left behind: {:?}", platform.files_left());
}

#[tokio::test]
async fn a_cidr_that_conflicts_stops_before_any_session() {
    let platform = FakePlatform::new();
    let (result, seen) = run_with(&platform, Script::default(), &args(&["--cidr", "192.168.1.0/24"])).await;
    let err = format!("{:#}", result.expect_err("conflict"));
    assert!(err.contains("would conflict"), "{err}");
    assert_eq!(seen.adds_at_connect, None, "no session was started");
    assert_eq!(adds(&platform.table), 0);
}
