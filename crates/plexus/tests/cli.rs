//! The `plexus` binary as a user runs it: `serve` with flags, environment and files, and
//! `connect` driven through a pipe.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn plexus() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plexus"));
    // Keep the user's environment from leaking into the tests.
    for (key, _) in std::env::vars() {
        if key.starts_with("PLEXUS_") {
            command.env_remove(key);
        }
    }
    // Generated secrets and history go to a scratch directory, not the source tree.
    command.env("PLEXUS_DATA_DIR", data_dir());
    command
}

/// The test's own scratch data directory (tests of one process run on threads named after
/// them, so they do not share it).
fn data_dir() -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    temp_dir(&format!("data-{test}"))
}

/// A running `plexus serve`, killed on drop.
struct Served {
    child: Child,
    /// The `ws://…` base printed at start-up, e.g. `ws://127.0.0.1:41234`.
    ws_base: String,
    lines: Vec<String>,
}

/// Reads `plexus serve`'s start-up lines; returns the `ws://` base (e.g. `ws://127.0.0.1:41234`)
/// and every line.
fn read_banner(child: &mut Child) -> (String, Vec<String>) {
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = Vec::new();
    let mut ws_base = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("plexus: websocket") {
            let url = rest.split_whitespace().next().unwrap();
            ws_base = url.trim_end_matches("/echo").to_owned();
        }
        let done = line.starts_with("plexus: tcp chat");
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(!ws_base.is_empty(), "no websocket line in {lines:?}");
    (ws_base, lines)
}

impl Served {
    fn spawn(mut command: Command) -> Served {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("plexus serve starts");
        let (ws_base, lines) = read_banner(&mut child);
        Served {
            child,
            ws_base,
            lines,
        }
    }

    fn start(args: &[&str], envs: &[(&str, &str)]) -> Served {
        let mut command = plexus();
        command
            .arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--tcp-echo",
                "off",
                "--tcp-chat",
                "off",
            ])
            .args(args)
            .envs(envs.iter().copied());
        Served::spawn(command)
    }

    /// Like `start`, but with `--config FILE` and without forcing `--listen`.
    fn start_with_config(file: &str, args: &[&str], envs: &[(&str, &str)]) -> Served {
        let mut command = plexus();
        command
            .args([
                "serve",
                "--config",
                file,
                "--tcp-echo",
                "off",
                "--tcp-chat",
                "off",
            ])
            .args(args)
            .envs(envs.iter().copied());
        Served::spawn(command)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `plexus connect` with `input` on stdin.
fn connect(args: &[&str], input: &str) -> Output {
    let mut child = plexus()
        .arg("connect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plexus-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn connect_echoes_lines_through_a_pipe() {
    let served = Served::start(&[], &[]);
    let output = connect(&[&format!("{}/echo", served.ws_base)], "hello\nworld ✓\n");
    assert_eq!(text(&output.stdout), "hello\nworld ✓\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("(HTTP 101)"), "{stderr}");
    assert!(stderr.contains("closed: 1000"), "{stderr}");
    assert!(output.status.success());
}

#[test]
fn connect_binary_and_rooms() {
    let served = Served::start(&[], &[]);
    let output = connect(
        &["--binary", &format!("{}/chat/cli", served.ws_base)],
        "AB\n",
    );
    assert_eq!(text(&output.stdout), "[binary 2 bytes] 4142\n");
    assert!(output.status.success());
}

#[test]
fn connect_reports_an_abnormal_close_with_exit_status_4() {
    let served = Served::start(&["--max-message-size", "10"], &[]);
    let output = connect(
        &[&format!("{}/echo", served.ws_base)],
        "this line is too long\n",
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("closed: 1009"), "{stderr}");
    assert_eq!(output.status.code(), Some(4), "{stderr}");
}

#[test]
fn connect_to_nothing_fails_with_status_1() {
    let output = connect(&["ws://127.0.0.1:9/echo"], "");
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("cannot connect"));
    let output = connect(&["not a url"], "");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut served = Served::start(&[], &[]);
    let mut client = plexus()
        .args(["connect", &format!("{}/echo", served.ws_base)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, "before").unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");
    let status = served.terminate();
    assert!(status.success(), "server exit status {status:?}");
    let output = client.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("closed: 1001 server shutting down"),
        "{stderr}"
    );
    assert!(
        output.status.success(),
        "1001 is a normal end for the client"
    );
    drop(stdin);
}

#[test]
fn flags_beat_environment_beat_file() {
    let dir = temp_dir("layers");
    let file = dir.join("plexus.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nmax_message_size = 5\n").unwrap();
    let file_arg = file.to_str().unwrap();
    // File only: its listen address and its limit.
    let served = Served::start_with_config(file_arg, &[], &[]);
    assert!(served.ws_base.starts_with("ws://127.0.0.1:"));
    let output = connect(&[&format!("{}/echo", served.ws_base)], "123456\n");
    assert!(text(&output.stderr).contains("closed: 1009"));
    drop(served);
    // Environment beats the file.
    let served = Served::start_with_config(file_arg, &[], &[("PLEXUS_LISTEN", "127.0.0.2:0")]);
    assert!(
        served.ws_base.starts_with("ws://127.0.0.2:"),
        "{:?}",
        served.lines
    );
    drop(served);
    // A flag beats both.
    let served = Served::start_with_config(
        file_arg,
        &["--listen", "127.0.0.3:0"],
        &[("PLEXUS_LISTEN", "127.0.0.2:0")],
    );
    assert!(
        served.ws_base.starts_with("ws://127.0.0.3:"),
        "{:?}",
        served.lines
    );
    std::fs::remove_dir_all(dir).ok();
}

fn serve_fails(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let output = plexus()
        .arg("serve")
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (output.status.code().unwrap(), text(&output.stderr))
}

#[test]
fn bad_configuration_is_a_clear_error_with_status_2() {
    let (code, stderr) = serve_fails(&["--config", "/nonexistent/plexus.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read config file /nonexistent/plexus.toml"),
        "{stderr}"
    );

    let dir = temp_dir("bad");
    let file = dir.join("typo.toml");
    std::fs::write(&file, "pnig_interval = \"5s\"\n").unwrap();
    let (code, stderr) = serve_fails(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pnig_interval"), "{stderr}");

    let (code, stderr) = serve_fails(&[], &[("PLEXUS_PING_INTERVAL", "soon")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid ping_interval"), "{stderr}");
    std::fs::remove_dir_all(dir).ok();
}

/// The README's example configuration is valid as written (a user copies it).
#[test]
fn the_readme_example_configuration_checks() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml example in the README");
    let dir = temp_dir("readme");
    let file = dir.join("plexus.toml");
    std::fs::write(&file, example).unwrap();
    let output = plexus()
        .args(["config", "check", "--config", file.to_str().unwrap()])
        .env("PLEXUS_DATA_DIR", dir.join("data"))
        .output()
        .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(
        stdout.contains("prices (history 1 for 1h, recovers the latest only, fossil deltas)"),
        "{stdout}"
    );
}

/// `plexus config check`: the same layers as `serve`, the resolved values printed (secrets
/// only said to be set), a bad value named with status 2, and nothing started or written.
#[test]
fn config_check_prints_the_resolved_configuration_or_the_offending_key() {
    let dir = temp_dir("check");
    let file = dir.join("plexus.toml");
    std::fs::write(
        &file,
        "listen = \"0.0.0.0:9000\"\napi_key = \"hunter2\"\n[[namespaces]]\nname = \"news\"\nhistory_size = 10\nhistory_ttl = \"1h\"\n",
    )
    .unwrap();
    let check = |args: &[&str], envs: &[(&str, &str)]| {
        let output = plexus()
            .args(["config", "check", "--config", file.to_str().unwrap()])
            .args(args)
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        let stdout = text(&output.stdout);
        (output.status.code().unwrap(), stdout, text(&output.stderr))
    };
    let (code, stdout, _) = check(&["--tcp-chat", "off"], &[("PLEXUS_ENGINE", "memory")]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.starts_with("configuration ok"), "{stdout}");
    for expected in [
        "listen               0.0.0.0:9000 (http, ws)",
        "tcp_chat             off",
        "engine               memory",
        "news (history 10 for 1h)",
        "api_key              set",
        "connect_proxy_url    none",
        "proxy_http_headers   none",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    assert!(!stdout.contains("hunter2"), "{stdout}");

    let (code, _, stderr) = check(&[], &[("PLEXUS_PING_INTERVAL", "soon")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid ping_interval"), "{stderr}");
    let (code, _, stderr) = check(&["--tls-cert", "/nonexistent.pem", "--tls-key", "/k"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent.pem"), "{stderr}");
    // A key `serve` would refuse at start is refused here too.
    let bad_key = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    let flag = format!("--token-rsa-public-key={bad_key}");
    let (code, _, stderr) = check(&[&flag], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("RSA"), "{stderr}");
    // Nothing was started or written: no data directory appeared.
    assert!(!std::path::Path::new(&data_dir())
        .join("secrets.toml")
        .exists());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn address_in_use_exits_with_status_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = serve_fails(
        &["--listen", &addr, "--tcp-echo", "off", "--tcp-chat", "off"],
        &[],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn wss_with_insecure_for_a_self_signed_certificate() {
    let dir = temp_dir("wss");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let served = Served::start(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(served.ws_base.starts_with("wss://"), "{:?}", served.lines);
    let url = format!("{}/echo", served.ws_base);
    let output = connect(&["--insecure", &url], "secret\n");
    assert_eq!(text(&output.stdout), "secret\n", "{}", text(&output.stderr));
    assert!(output.status.success());
    // Without --insecure the self-signed certificate is refused.
    let output = connect(&[&url], "secret\n");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).to_lowercase().contains("certificate"),
        "{}",
        text(&output.stderr)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn raises_the_file_limit_and_survives_running_out_of_descriptors() {
    let dir = temp_dir("fds");
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("prlimit")
        .args(["--nofile=24:40", "--"])
        .arg(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tcp-echo",
            "off",
            "--tcp-chat",
            "off",
        ])
        .args(["--log-format", "json", "--log-level", "info"])
        .env("PLEXUS_DATA_DIR", dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("prlimit runs plexus");
    let (ws_base, _) = read_banner(&mut child);
    let addr = ws_base.trim_start_matches("ws://").to_owned();
    // Hold more connections than the server has descriptors for.
    let held: Vec<_> = (0..60)
        .map(|_| std::net::TcpStream::connect(&addr).expect("the kernel accepts into the backlog"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(held);
    // The listener survived: once descriptors are free, requests are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let response = loop {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        if response.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let _ = child.kill();
    let _ = child.wait();
    // Logs are JSON, one object a line; they say the limit was raised and descriptors ran out.
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let events: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let limit = events
        .iter()
        .find(|event| event["fields"]["message"] == "open files limit")
        .expect("the limit is logged");
    assert_eq!(limit["fields"]["before"], 24);
    assert_eq!(limit["fields"]["after"], 40);
    assert!(
        events.iter().any(|event| event["level"] == "WARN"
            && event["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("out of file descriptors")),
        "{logs}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
// tungstenite's handshake callback type returns its large error response by value.
#[allow(clippy::result_large_err)]
fn connect_sends_headers_and_offers_subprotocols() {
    // A separate WebSocket server (tungstenite) that records what the client sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (mut header, mut offered) = (String::new(), String::new());
        let callback =
            |request: &tungstenite::handshake::server::Request,
             mut response: tungstenite::handshake::server::Response| {
                let get = |name: &str| {
                    request
                        .headers()
                        .get(name)
                        .map(|value| value.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                header = get("x-test");
                offered = get("sec-websocket-protocol");
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", "chat.v2".parse().unwrap());
                Ok(response)
            };
        let mut socket = tungstenite::accept_hdr(stream, callback).unwrap();
        let message = socket.read().unwrap();
        socket.send(message).unwrap();
        while socket.read().is_ok() {}
        (header, offered)
    });
    let url = format!("ws://{addr}/");
    let output = connect(
        &["-H", "X-Test: yes", "-s", "chat.v1", "-s", "chat.v2", &url],
        "ping\n",
    );
    assert_eq!(text(&output.stdout), "ping\n");
    assert!(
        text(&output.stderr).contains("subprotocol chat.v2"),
        "{}",
        text(&output.stderr)
    );
    let (header, offered) = peer.join().unwrap();
    assert_eq!(header, "yes");
    assert_eq!(offered, "chat.v1, chat.v2");
    let output = connect(&["-H", "no colon here", &url], "");
    assert_eq!(output.status.code(), Some(2));
}

/// A raw WebSocket client of `/chat/{room}`, known to be subscribed (its own message came back).
fn chat_subscriber(
    served: &Served,
    room: &str,
) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>> {
    let url = format!("{}/chat/{room}", served.ws_base);
    let (mut socket, _) = tungstenite::connect(url).expect("WebSocket connects");
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    socket.send("ready".into()).unwrap();
    assert_eq!(next_ws_text(&mut socket), "ready");
    socket
}

fn next_ws_text<S: std::io::Read + std::io::Write>(
    socket: &mut tungstenite::WebSocket<S>,
) -> String {
    loop {
        match socket.read().expect("a message in time") {
            tungstenite::Message::Text(text) => return text.to_string(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// A server with the memory engine and its own data directory (for generated secrets).
fn served_with_data_dir(name: &str) -> (Served, PathBuf) {
    let dir = temp_dir(name).join("data");
    let served = Served::start(&["--memory"], &[("PLEXUS_DATA_DIR", dir.to_str().unwrap())]);
    (served, dir)
}

/// Runs `plexus ARGS` with `PLEXUS_DATA_DIR=data_dir`.
fn plexus_with_data_dir(data_dir: &std::path::Path, args: &[&str]) -> Output {
    plexus()
        .env("PLEXUS_DATA_DIR", data_dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn token_uses_the_servers_generated_secret() {
    let (served, data_dir) = served_with_data_dir("token");
    let output = plexus_with_data_dir(&data_dir, &["token", "--user", "u1", "--ttl", "1h"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let token = text(&output.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    assert_eq!(text(&output.stdout), format!("{token}\n"), "only the token");

    // The server accepts it: a native-protocol connect succeeds as u1.
    let url = format!("{}/connection/websocket", served.ws_base);
    let (mut socket, _) = tungstenite::connect(url).expect("WebSocket connects");
    let connect = serde_json::json!({"id": 1, "connect": {"token": token}});
    socket.send(connect.to_string().into()).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&next_ws_text(&mut socket)).unwrap();
    assert!(reply["connect"]["client"].is_string(), "{reply}");

    // A subscription token carries its channel, signed with the same secret.
    let output = plexus_with_data_dir(
        &data_dir,
        &[
            "token",
            "--user",
            "u1",
            "--sub-channel",
            "chat:private",
            "--info",
            r#"{"role":"x"}"#,
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let config = plexus_server::Config {
        data_dir: data_dir.clone(),
        ..plexus_server::Config::default()
    };
    let secret = plexus_server::secrets::resolve(&config)
        .unwrap()
        .token_hmac_secret;
    let verifier = plexus_auth::TokenVerifier::new(&plexus_auth::VerifierKeys {
        hmac_secret: Some(secret),
        rsa_public_key_pem: None,
        ecdsa_public_key_pem: None,
    })
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = verifier
        .verify_subscription(text(&output.stdout).trim(), now)
        .unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.channel.as_str()),
        ("u1", "chat:private")
    );
    assert!(
        claims.exp.is_some_and(|exp| exp > now + 23 * 3600),
        "24h by default"
    );

    let output = plexus_with_data_dir(&data_dir, &["token", "--user", "u1", "--info", "{oops"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    drop(served);
}

#[test]
fn publish_reaches_a_raw_subscriber() {
    let (served, data_dir) = served_with_data_dir("publish");
    let mut subscriber = chat_subscriber(&served, "cli");
    let http = served.ws_base.replace("ws://", "http://");
    let output = plexus_with_data_dir(
        &data_dir,
        &["publish", "chat:cli", r#"{"x":1}"#, "--url", &http],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let result: serde_json::Value = serde_json::from_str(&text(&output.stdout)).unwrap();
    assert_eq!(result["offset"], 2, "{result}"); // after the subscriber's "ready"
    assert!(result["epoch"].is_string(), "{result}");
    assert_eq!(next_ws_text(&mut subscriber), r#"{"x":1}"#);

    // Without --url: the configured listen address; text that is not JSON goes as a string.
    let addr = served.ws_base.trim_start_matches("ws://").to_owned();
    let output = plexus_with_data_dir(
        &data_dir,
        &["publish", "--listen", &addr, "chat:cli", "plain words"],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(next_ws_text(&mut subscriber), r#""plain words""#);

    // With --idempotency-key, run twice: one publication, the same answer.
    let keyed = [
        "publish",
        "chat:cli",
        "once",
        "--url",
        &http,
        "--idempotency-key",
        "k1",
    ];
    let first = plexus_with_data_dir(&data_dir, &keyed);
    let again = plexus_with_data_dir(&data_dir, &keyed);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&first.stdout), text(&again.stdout));
    let result: serde_json::Value = serde_json::from_str(&text(&again.stdout)).unwrap();
    assert_eq!(result["offset"], 4, "{result}");
    assert_eq!(next_ws_text(&mut subscriber), r#""once""#);

    // The server's own error: exit status 1, and what it said.
    let output = plexus_with_data_dir(&data_dir, &["publish", "nope:x", "1", "--url", &http]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("unknown channel (code 102)"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn publish_with_a_wrong_key_or_no_server_fails_clearly() {
    let (served, data_dir) = served_with_data_dir("publish-key");
    let http = served.ws_base.replace("ws://", "http://");
    let output = plexus_with_data_dir(
        &data_dir,
        &[
            "publish",
            "--api-key",
            "wrong",
            "--url",
            &http,
            "chat:x",
            "1",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("refused the API key (HTTP 401"), "{stderr}");
    // Another data directory holds another generated key.
    let other = temp_dir("publish-other").join("data");
    let output = plexus_with_data_dir(&other, &["publish", "--url", &http, "chat:x", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("HTTP 401"));

    let output = plexus_with_data_dir(
        &data_dir,
        &["publish", "--url", "http://127.0.0.1:9", "chat:x", "1"],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("cannot connect to 127.0.0.1:9"));
    let output = plexus_with_data_dir(&data_dir, &["publish", "--url", "https://x", "chat:x", "1"]);
    assert_eq!(output.status.code(), Some(2));
}

/// Runs `plexus bench ARGS --json --quiet`; returns the exit status, stdout and stderr.
fn bench_json_status(args: &[&str]) -> (Option<i32>, String, String) {
    let output = plexus()
        .arg("bench")
        .args(args)
        .args(["--json", "--quiet"])
        .output()
        .unwrap();
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Runs `plexus bench ARGS --json --quiet`; returns the exit status and the parsed report.
fn bench_json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let (status, stdout, stderr) = bench_json_status(args);
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("no JSON report: stdout {stdout:?}, stderr {stderr}"));
    (status, report, stderr)
}

#[test]
fn bench_conns_opens_and_holds_every_connection() {
    let served = Served::start(&["--memory"], &[]);
    let url = format!("{}/chat/bench", served.ws_base);
    let pid = served.child.id().to_string();
    let (status, report, stderr) = bench_json(&[
        "conns",
        &url,
        "--count",
        "20",
        "--duration",
        "2s",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["bench"], "conns", "{report}");
    assert_eq!(report["requested"], 20, "{report}");
    assert_eq!(report["connected"], 20, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["held"], 20, "{report}");
    assert_eq!(report["connect_latency_us"]["count"], 20, "{report}");
    assert_eq!(report["failures"], serde_json::json!({}), "{report}");
    assert!(report["fd_limit"].is_null(), "{report}");
    assert!(
        report["server_rss_kib"]["before"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["server_rss_kib"]["after"].as_u64().unwrap() > 0,
        "{report}"
    );
}

#[test]
fn bench_fanout_delivers_every_message_once_in_order() {
    let served = Served::start(&["--memory"], &[]);
    let url = format!("{}/chat/fan", served.ws_base);
    let (status, report, stderr) = bench_json(&[
        "fanout",
        &url,
        "--subscribers",
        "10",
        "--rate",
        "20/s",
        "--duration",
        "2s",
        "--size",
        "100",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["bench"], "fanout", "{report}");
    assert_eq!(report["channel"], "chat:fan", "{report}");
    assert_eq!(report["connected"], 10, "{report}");
    assert_eq!(report["ready"], 10, "{report}");
    assert_eq!(report["planned"], 40, "{report}");
    assert_eq!(report["sent"], 40, "{report}");
    assert_eq!(report["deliveries"], 10 * 40, "{report}");
    assert_eq!(report["expected_deliveries"], 10 * 40, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["out_of_order"], 0, "{report}");
    assert_eq!(report["latency_us"]["count"], 10 * 40, "{report}");
}

#[test]
fn bench_fanout_over_the_native_protocol_and_the_api() {
    let secrets = [
        ("PLEXUS_API_KEY", "bench-api-key"),
        ("PLEXUS_TOKEN_HMAC_SECRET", "bench-token-secret"),
    ];
    let served = Served::start(&["--memory"], &secrets);
    let token = plexus()
        .args(["token", "--user", "bench"])
        .envs(secrets)
        .output()
        .unwrap();
    assert!(token.status.success(), "{}", text(&token.stderr));
    let token = text(&token.stdout).trim().to_owned();
    let native = format!("{}/connection/websocket", served.ws_base);
    let (status, report, stderr) = bench_json(&[
        "fanout",
        &native,
        "--protocol",
        "native",
        "--token",
        &token,
        "--channel",
        "chat:native",
        "--subscribers",
        "5",
        "--rate",
        "20/s",
        "--duration",
        "1s",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["publisher"], "native", "{report}");
    assert_eq!(report["sent"], 20, "{report}");
    assert_eq!(report["publish_errors"], 0, "{report}");
    assert_eq!(report["deliveries"], 5 * 20, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["out_of_order"], 0, "{report}");

    // Raw subscribers, publications through the HTTP API.
    let raw = format!("{}/chat/api", served.ws_base);
    let api = format!("{}/api/publish", served.ws_base.replace("ws://", "http://"));
    let (status, report, stderr) = bench_json(&[
        "fanout",
        &raw,
        "--publish-api",
        &api,
        "--api-key",
        "bench-api-key",
        "--subscribers",
        "5",
        "--rate",
        "20/s",
        "--duration",
        "1s",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["publisher"], "api", "{report}");
    assert_eq!(report["sent"], 20, "{report}");
    assert_eq!(report["deliveries"], 5 * 20, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["out_of_order"], 0, "{report}");
}

#[test]
fn bench_echo_and_churn_complete_their_cycles() {
    let served = Served::start(&["--memory"], &[]);
    let url = format!("{}/echo", served.ws_base);
    let (status, report, stderr) = bench_json(&[
        "echo",
        &url,
        "--connections",
        "3",
        "--duration",
        "1s",
        "--inflight",
        "2",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["connected"], 3, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["unreadable"], 0, "{report}");
    assert!(report["round_trips"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["latency_us"]["count"], report["round_trips"]);

    let (status, report, stderr) =
        bench_json(&["churn", &url, "--rate", "20/s", "--duration", "1s"]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["attempted"], 20, "{report}");
    assert_eq!(report["succeeded"], 20, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["connect_latency_us"]["count"], 20, "{report}");
}

#[test]
fn bench_publish_counts_acknowledged_publishes_natively_and_through_the_api() {
    // The durable embedded engine: a publish is acknowledged once it is on disk.
    let data_dir = temp_dir("bench-publish").join("data");
    let env = [
        ("PLEXUS_API_KEY", "bench-api-key"),
        ("PLEXUS_TOKEN_HMAC_SECRET", "bench-token-secret"),
        ("PLEXUS_DATA_DIR", data_dir.to_str().unwrap()),
    ];
    let served = Served::start(&[], &env);
    let token = plexus()
        .args(["token", "--user", "bench"])
        .envs(env)
        .output()
        .unwrap();
    assert!(token.status.success(), "{}", text(&token.stderr));
    let token = text(&token.stdout).trim().to_owned();
    let native = format!("{}/connection/websocket", served.ws_base);
    let (status, report, stderr) = bench_json(&[
        "publish",
        &native,
        "--token",
        &token,
        "--publishers",
        "4",
        "--duration",
        "1s",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["bench"], "publish", "{report}");
    assert_eq!(report["via"], "native", "{report}");
    assert_eq!(report["channel"], "chat:bench", "{report}");
    assert_eq!(report["connected"], 4, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let published = report["published"].as_u64().unwrap();
    assert!(published > 0, "{report}");
    assert_eq!(report["latency_us"]["count"], published, "{report}");

    let api = format!("{}/api/publish", served.ws_base.replace("ws://", "http://"));
    let (status, report, stderr) = bench_json(&[
        "publish",
        &api,
        "--api-key",
        "bench-api-key",
        "--publishers",
        "3",
        "--channels",
        "2",
        "--duration",
        "1s",
        // The generator as before it kept polling: the same counts.
        "--sleep-when-idle",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["via"], "api", "{report}");
    assert_eq!(report["channels"], 2, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["published"].as_u64().unwrap() > 0, "{report}");

    // A wrong key is a clear error before any load.
    let (status, _, stderr) =
        bench_json_status(&["publish", &api, "--api-key", "wrong", "--duration", "1s"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
}

#[test]
fn bench_overload_reports_slow_subscribers_cut_with_3008_and_probes() {
    let env = [("PLEXUS_API_KEY", "bench-api-key")];
    // A small outbox (still 16 messages), so slow subscribers are cut within a second or two
    // once the kernel's buffers (a few MiB) are full.
    let served = Served::start(&["--memory", "--outbox-limit", "262144"], &env);
    let http = served.ws_base.replace("ws://", "http://");
    let pid = served.child.id().to_string();
    let (status, report, stderr) = bench_json(&[
        "overload",
        &format!("{}/chat/slow", served.ws_base),
        "--subscribers",
        "3",
        "--fast-subscribers",
        "2",
        "--rate",
        "200/s",
        "--read-rate",
        "10/s",
        "--size",
        "16384",
        "--duration",
        "4s",
        "--drain",
        "5s",
        "--probe-ws",
        &format!("{}/echo", served.ws_base),
        "--probe-get",
        &format!("{http}/health"),
        "--probe-api",
        &format!("{http}/api/info"),
        "--api-key",
        "bench-api-key",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(report["bench"], "overload", "{report}");
    assert_eq!(report["sent"], 800, "{report}");
    assert_eq!(report["slow"]["connected"], 3, "{report}");
    assert_eq!(report["slow"]["closed_slow"], 3, "{report}");
    assert_eq!(report["fast"]["connected"], 2, "{report}");
    assert_eq!(report["fast"]["closed_slow"], 0, "{report}");
    assert_eq!(report["fast"]["lost"], 0, "{report}");
    assert_eq!(report["fast"]["deliveries"], 2 * 800, "{report}");
    let probes = report["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 3, "{report}");
    for probe in probes {
        assert!(probe["attempts"].as_u64().unwrap() >= 3, "{probe}");
        assert_eq!(probe["ok"], probe["attempts"], "{probe}");
    }
    let rss = &report["server_rss_kib"];
    assert!(
        rss["max"].as_u64().unwrap() >= rss["before"].as_u64().unwrap(),
        "{rss}"
    );
}

/// `--tags-filter` must be a well-formed filter: a usage error (2) that names the flag.
#[test]
fn bench_refuses_a_malformed_tags_filter() {
    for filter in ["not json", r#"{"key":"x","cmp":"like","val":"y"}"#] {
        let output = plexus()
            .args([
                "bench",
                "fanout",
                "ws://127.0.0.1:9/connection/websocket",
                "--protocol",
                "native",
                "--token",
                "t",
                "--channel",
                "ticks:x",
                "--subscribers",
                "1",
                "--tags-filter",
                filter,
            ])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
        assert!(
            text(&output.stderr).contains("--tags-filter"),
            "{}",
            text(&output.stderr)
        );
    }
}

#[test]
fn bench_refuses_remote_targets_and_explains_a_refused_connection() {
    let output = plexus()
        .args([
            "bench",
            "echo",
            "ws://10.0.0.1:8000/echo",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("--allow-remote"),
        "{}",
        text(&output.stderr)
    );
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = plexus()
        .args(["bench", "conns", &format!("ws://127.0.0.1:{port}/chat/x")])
        .args(["--count", "5", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("connection refused"),
        "{}",
        text(&output.stderr)
    );
}
