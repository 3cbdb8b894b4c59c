//! `ssm-proxy forward` end to end: the real binary and the real AWS SDK
//! against the in-process emulator, carrying TCP connections to a local echo
//! server. Everything listens on 127.0.0.1 port 0.

mod forwardkit;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use forwardkit::*;
use ssm_emulator::config::{TEST_ACCESS_KEY, TEST_SECRET_KEY};
use ssm_emulator::{Config, Faults, Profile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Moves 64 MiB each way over 8 concurrent connections through `forward` and
/// the emulator with `faults`, checks every byte, and checks that the faults
/// and websocket recycling really happened.
async fn sixty_four_mib_echo(profile: Profile, faults: Faults) {
    let echo = echo_server().await;
    let recycle = faults.close_every;
    // Every open, the resumes after each recycle too, must be signed.
    let config =
        Config { profile, faults, require_signed_open: true, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emulator = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward(&emulator, echo.port());

    let started = std::time::Instant::now();
    let per_conn = 8 << 20;
    let tasks: Vec<_> = (0..8u64).map(|i| tokio::spawn(echo_round_trip(addr, i, per_conn))).collect();
    let all = async {
        for t in tasks {
            t.await.expect("connection task");
        }
    };
    tokio::time::timeout(Duration::from_secs(900), all).await.expect("64 MiB echo finished within 15 minutes");
    let elapsed = started.elapsed();
    let c = &emulator.shared.counters;
    use std::sync::atomic::Ordering::Relaxed;
    eprintln!(
        "{profile:?}: 64 MiB each way in {elapsed:?} ({:.2} MB/s each way); websockets {}, forced closes {}, dropped {}, duplicated {}, reordered {}",
        64.0 * 1.048576 / elapsed.as_secs_f64(),
        c.websockets.load(Relaxed),
        c.forced_closes.load(Relaxed),
        c.frames_dropped.load(Relaxed),
        c.frames_duplicated.load(Relaxed),
        c.frames_reordered.load(Relaxed)
    );
    assert!(c.frames_dropped.load(Relaxed) > 0, "no frame was dropped");
    assert!(c.frames_duplicated.load(Relaxed) > 0, "no frame was duplicated");
    assert!(c.frames_reordered.load(Relaxed) > 0, "no frame was reordered");
    let recycles = recycle.map(|r| (elapsed.as_secs_f64() / r.as_secs_f64()) as u64).unwrap_or(0);
    if recycles >= 2 {
        assert!(c.forced_closes.load(Relaxed) >= 1, "the websocket was never recycled");
        assert!(c.websockets.load(Relaxed) >= 2, "the client never reconnected");
    }
    let err = stop(guard, stderr);
    assert!(err.contains("ended"), "no clean end message:\n{err}");
    assert_eq!(c.auth_failures.load(Relaxed), 0, "an open was refused");
}

/// On a clean link nothing may go missing between the websocket and the session:
/// a message lost on our side shows up as later ones arriving out of order (and
/// as the agent's resends, which cost 100 ms each). A duplicate is allowed only
/// as the copy of a message the agent resent: its RTO is the RTT plus 10 ms, and
/// on a loaded machine an ack can come later than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_link_delivers_every_message_in_order_the_first_time() {
    let echo = echo_server().await;
    let config = Config { profile: Profile::Fast, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emulator = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward(&emulator, echo.port());
    let tasks: Vec<_> = (0..4u64).map(|i| tokio::spawn(echo_round_trip(addr, i, 4 << 20))).collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("echo within 2 minutes").expect("echo task");
    }
    let err = stop(guard, stderr);
    let summary = err.lines().find(|l| l.contains("session summary")).unwrap_or_else(|| panic!("no summary:\n{err}"));
    assert!(summary.contains("out_of_order=0"), "{summary}");
    let duplicates: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("duplicates="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duplicates count: {summary}"));
    let resends = emulator.shared.counters.agent_resends.load(std::sync::atomic::Ordering::Relaxed);
    assert!(duplicates <= resends, "{duplicates} duplicates but the agent resent {resends}: {summary}");
}

/// Full speed (no pacing): a drop is repaired by the agent's head-only resend
/// at 10 messages per second, so the drop rate is one the upstream design can
/// sustain at this speed; duplicates and reordering cost nothing to repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_fast_with_faults_and_websocket_recycled_every_second() {
    let faults = Faults {
        drop: 0.0001,
        duplicate: 0.001,
        reorder: 0.002,
        close_every: Some(Duration::from_secs(1)),
        ..Faults::default()
    };
    sixty_four_mib_echo(Profile::Fast, faults).await;
}

/// The real agent's pacing (one 1024-byte message per millisecond), with the
/// websocket recycled every 5 s as the issue asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_stock_with_faults_and_websocket_recycled_every_five_seconds() {
    let faults = Faults {
        drop: 0.001,
        duplicate: 0.001,
        reorder: 0.002,
        close_every: Some(Duration::from_secs(5)),
        ..Faults::default()
    };
    sixty_four_mib_echo(Profile::Stock, faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_port_closes_that_connection_and_says_why() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let emu = emulator(Config::default().with_instance(INSTANCE, "127.0.0.1")).await;
    let (guard, addr, stderr) = spawn_forward(&emu, closed_port);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "expected the connection to close, got {n:?}");
    let err = stop(guard, stderr);
    assert!(err.contains("could not connect to port"), "no explanation in stderr:\n{err}");
}

/// Runs `forward` to completion (for runs expected to fail) and returns its stderr.
async fn forward_fails(url: String, secret: &'static str, instance: &'static str) -> String {
    forward_fails_with(url, secret, instance, &[]).await
}

async fn forward_fails_with(
    url: String,
    secret: &'static str,
    instance: &'static str,
    env: &'static [(&'static str, &'static str)],
) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
            .args(["forward", "--instance-id", instance, "--remote-port", "22"])
            .env_clear()
            .envs(env.iter().copied())
            .env("AWS_ENDPOINT_URL", url)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .expect("run ssm-proxy")
    })
    .await
    .expect("join");
    assert!(!out.status.success(), "forward should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instance_bad_credentials_and_bad_ids_fail_with_clear_errors() {
    let empty = emulator(Config::default()).await;
    let err = forward_fails(empty.endpoint_url(), TEST_SECRET_KEY, INSTANCE).await;
    assert!(err.contains("is not a managed node in us-east-1"), "{err}");

    let known = emulator(Config::default().with_instance(INSTANCE, "127.0.0.1")).await;
    let err = forward_fails(known.endpoint_url(), "not-the-secret", INSTANCE).await;
    assert!(err.contains("credentials were rejected (InvalidSignatureException)"), "{err}");

    let err = forward_fails(known.endpoint_url(), TEST_SECRET_KEY, "web-server").await;
    assert!(err.contains("is not an instance id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_is_reported() {
    let config = Config { faults: Faults { reject_tokens: true, ..Faults::default() }, ..Config::default() }
        .with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let err = forward_fails(emu.endpoint_url(), TEST_SECRET_KEY, INSTANCE).await;
    assert!(err.contains("rejected the session token (websocket close 1003"), "{err}");
}

const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ca.pem");

/// A TLS front end for the emulator, with the test CA's server certificate for
/// `localhost`: the API and the websocket both go through it.
async fn tls_front(backend: SocketAddr) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(format!("{dir}/server.pem"))
        .expect("server.pem")
        .collect::<Result<_, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).expect("server.key");
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_ca_bundle_is_trusted_by_the_api_and_the_websocket() {
    let echo = echo_server().await;
    let config = Config { stream_url_scheme: "wss".into(), ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let front = tls_front(emu.addr).await;
    let url = format!("https://localhost:{}", front.port());

    // Without the bundle the test CA is unknown: the API call fails on the certificate.
    let err = forward_fails_with(url.clone(), TEST_SECRET_KEY, INSTANCE, &[]).await;
    assert!(err.to_lowercase().contains("certificate"), "expected a certificate error:\n{err}");
    assert_eq!(emu.shared.counters.api_calls.load(std::sync::atomic::Ordering::Relaxed), 0);

    // With it, StartSession over https and the data channel over wss both work.
    let (guard, addr, stderr) = spawn_forward_to(&url, echo.port(), &[("AWS_CA_BUNDLE", TEST_CA)]);
    echo_round_trip(addr, 99, 1 << 20).await;
    assert!(emu.shared.counters.websockets.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    stop(guard, stderr);
}

/// `--remote-host 127.0.0.1` (or localhost, ::1) is the instance itself: it
/// uses the local-port document, which reaches the instance's loopback on
/// every agent. Here the remote-host document is refused outright (as an IAM
/// policy, or the newest agents' loopback deny list, would refuse it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_host_loopback_uses_the_local_port_document() {
    let echo = echo_server().await;
    let config =
        Config { denied_documents: vec!["AWS-StartPortForwardingSessionToRemoteHost".into()], ..Config::default() }
            .with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        let (guard, addr, stderr) = spawn_forward_args(&emu.endpoint_url(), echo.port(), &[], &["--remote-host", host]);
        echo_round_trip(addr, 7, 64 << 10).await;
        let err = stop(guard, stderr);
        assert!(!err.contains("not authorized"), "{host}: {err}");
    }
}

/// A StreamUrl naming a host the laptop cannot reach (as behind PrivateLink,
/// where ssmmessages' public name is not the way in): without an endpoint the
/// data channel fails; with AWS_ENDPOINT_URL_SSMMESSAGES, or
/// --ssmmessages-endpoint, it goes to the endpoint, session path intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssmmessages_endpoint_carries_the_data_channel_the_stream_url_cannot() {
    let echo = echo_server().await;
    // Nothing listens on the discard port.
    let config =
        Config { stream_host: Some("127.0.0.1:9".into()), ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let url = format!("http://{}", emu.addr);
    let err = forward_fails_with(url.clone(), TEST_SECRET_KEY, INSTANCE, &[]).await;
    assert!(err.contains("127.0.0.1:9"), "expected the StreamUrl's host to fail:\n{err}");

    let (guard, addr, stderr) = spawn_forward_to(&url, echo.port(), &[("AWS_ENDPOINT_URL_SSMMESSAGES", &url)]);
    echo_round_trip(addr, 7, 256 << 10).await;
    stop(guard, stderr);
    let (guard, addr, stderr) = spawn_forward_args(&url, echo.port(), &[], &["--ssmmessages-endpoint", &url]);
    echo_round_trip(addr, 8, 256 << 10).await;
    stop(guard, stderr);
}

/// `forward ARGS` against `url`, which must end on its own within `limit`:
/// how long it took, and its stderr.
fn forward_ends_within(url: &str, args: &[&str], limit: Duration) -> (Duration, String) {
    use std::io::Read;
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        .args(["forward", "--instance-id", INSTANCE, "--local-port", "0"])
        .args(args)
        .env_clear()
        .env("AWS_ENDPOINT_URL", url)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ssm-proxy");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut guard = ChildGuard(child);
    let status = wait_timeout(&mut guard.0, limit);
    let took = started.elapsed();
    if status.is_none() {
        let _ = guard.0.kill();
    }
    let err = reader.join().unwrap_or_default();
    assert!(status.is_some(), "forward {args:?} still ran after {limit:?}:\n{err}");
    assert!(status.is_some_and(|s| !s.success()), "forward {args:?} succeeded:\n{err}");
    (took, err)
}

/// The newest agent (3.3.4851.0) refuses loopback, in any spelling, and the
/// credential endpoints to the remote-host document: forward ends within 5 s
/// with the agent's words. The instance's own loopback is still reachable
/// through the local-port document, which `--remote-host 127.0.0.1` uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_agents_deny_list_is_a_clear_error_within_five_seconds() {
    let echo = echo_server().await;
    let config =
        Config { agent_version: "3.3.4851.0".into(), ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    for host in ["127.0.0.1", "localhost"] {
        let (guard, addr, stderr) = spawn_forward_args(&emu.endpoint_url(), echo.port(), &[], &["--remote-host", host]);
        echo_round_trip(addr, 9, 64 << 10).await;
        stop(guard, stderr);
    }
    let url = emu.endpoint_url();
    for host in ["127.1", "0x7f000001", "169.254.170.2", "169.254.169.254"] {
        let args = ["--remote-host", host, "--remote-port", "80"];
        let (took, err) = tokio::task::spawn_blocking({
            let url = url.clone();
            move || forward_ends_within(&url, &args, Duration::from_secs(5))
        })
        .await
        .expect("join");
        assert!(err.contains(&format!("Forwarding to IP address {host} is forbidden.")), "{host}: {err}");
        eprintln!("{host}: refused in {took:?}");
    }
}

/// An agent before 3.3.4851.0 lets the remote-host document reach loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agent_forwards_to_loopback_through_the_remote_host_document() {
    let echo = echo_server().await;
    let config = Config { agent_version: "3.3.987.0".into(), ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    // 127.1 is not recognised as loopback by the client: the remote-host document carries it.
    let (guard, addr, stderr) = spawn_forward_args(&emu.endpoint_url(), echo.port(), &[], &["--remote-host", "127.1"]);
    echo_round_trip(addr, 10, 64 << 10).await;
    stop(guard, stderr);
}

/// The emulator, like the service for plugin 1.2.764.0 and later, wants the
/// websocket upgrade SigV4-signed for ssmmessages: `forward` signs it; the
/// same upgrade without the signature, or signed with a wrong secret, is
/// refused with 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_channel_open_is_signed_and_an_unsigned_one_is_refused() {
    use ssm_channel::transport::{connect, Dialer, Endpoint};
    let echo = echo_server().await;
    let config = Config { require_signed_open: true, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward(&emu, echo.port());
    echo_round_trip(addr, 11, 256 << 10).await;
    stop(guard, stderr);
    assert_eq!(emu.shared.counters.auth_failures.load(std::sync::atomic::Ordering::Relaxed), 0);

    let url = format!("ws://{}/v1/data-channel/emulator-0000000000000001?role=publish_subscribe", emu.addr);
    let unsigned =
        Endpoint { stream_url: url.clone(), token: "t".into(), client_id: uuid::Uuid::new_v4(), headers: vec![] };
    let err = connect(&unsigned, &Dialer::default()).await.expect_err("unsigned open").to_string();
    assert!(err.contains("403"), "{err}");
    let forged = vec![
        ("x-amz-date".to_owned(), "20261203T102030Z".to_owned()),
        (
            "authorization".to_owned(),
            "AWS4-HMAC-SHA256 Credential=AKIAEMULATOR00000001/20261203/us-east-1/ssmmessages/aws4_request, SignedHeaders=host;x-amz-date, Signature=00".to_owned(),
        ),
    ];
    let forged = Endpoint { headers: forged, ..unsigned };
    let err = connect(&forged, &Dialer::default()).await.expect_err("forged open").to_string();
    assert!(err.contains("403"), "{err}");
    assert_eq!(emu.shared.counters.auth_failures.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// Session Manager preferences with KMS encryption, and an agent that applies
/// them to Port sessions (the stock agent leaves Port out; the issue asks for
/// any Port session whose agent asks): the agent asks for the KMSEncryption action; `forward` gets a data key from KMS (aws-sdk-kms
/// against the emulator's KMS), passes the encryption challenge, and carries
/// the connection encrypted both ways. The session says it is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_encrypted_port_session_carries_data_both_ways() {
    let echo = echo_server().await;
    let config = Config { kms_key_id: Some("alias/ssm-sessions".into()), kms_port_sessions: true, ..Config::default() }
        .with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward(&emu, echo.port());
    let tasks: Vec<_> = (0..2u64).map(|i| tokio::spawn(echo_round_trip(addr, 20 + i, 2 << 20))).collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("echo within 2 minutes").expect("echo task");
    }
    let err = stop(guard, stderr);
    assert!(err.contains("This session is encrypted using AWS KMS."), "{err}");
    assert!(err.contains("GenerateDataKey"), "{err}");
}

/// Removes a directory when dropped, pass or fail.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// tinyproxy on loopback, for as long as the guard lives; its port and log.
fn tinyproxy() -> (ChildGuard, u16, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ssm-proxy-tinyproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("proxy dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let log = dir.join("tinyproxy.log");
    let conf = format!(
        "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nMaxClients 50\nTimeout 120\nLogLevel Info\nLogFile \"{}\"\n",
        log.display()
    );
    std::fs::write(dir.join("tinyproxy.conf"), conf).expect("proxy conf");
    let child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(dir.join("tinyproxy.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tinyproxy (make test installs it; apt-get install tinyproxy)");
    let guard = ChildGuard(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "tinyproxy did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (guard, port, log)
}

/// HTTPS behind a real proxy, as on a corporate laptop: HTTPS_PROXY carries
/// the API calls and the wss data channel as CONNECT tunnels, and TLS inside
/// them is verified against AWS_CA_BUNDLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_go_through_a_real_proxy_with_the_ca_bundle() {
    let echo = echo_server().await;
    let config = Config { stream_url_scheme: "wss".into(), ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emu = emulator(config).await;
    let front = tls_front(emu.addr).await;
    let url = format!("https://localhost:{}", front.port());
    let (_proxy, port, log) = tinyproxy();
    let _cleanup = RemoveOnDrop(log.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let proxy = format!("http://127.0.0.1:{port}");
    let (guard, addr, stderr) =
        spawn_forward_to(&url, echo.port(), &[("AWS_CA_BUNDLE", TEST_CA), ("HTTPS_PROXY", &proxy)]);
    echo_round_trip(addr, 30, 1 << 20).await;
    stop(guard, stderr);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let connects = log.matches(&format!("CONNECT localhost:{}", front.port())).count();
    assert!(connects >= 2, "the API and the websocket each go through CONNECT ({connects}):\n{log}");
}
