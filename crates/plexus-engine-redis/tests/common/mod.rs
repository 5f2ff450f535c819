//! A redis-server of the test's own, on a free port, plain or TLS.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use plexus_core::conformance::TestPki;
pub use plexus_core::conformance::{free_port, ServerProcess};

/// Starts servers; each is a [`ServerProcess`], killed when dropped.
pub struct RedisServer;

impl RedisServer {
    pub fn start(port: u16) -> ServerProcess {
        RedisServer::spawn(port, &["--port", &port.to_string()])
    }

    /// TLS only, on `port`, with a new certificate for `localhost` and 127.0.0.1 from a new
    /// CA, files in `dir`; returns the server and the CA's certificate (PEM).
    pub fn start_tls(port: u16, dir: &Path) -> (ServerProcess, String) {
        let (server, pki) = RedisServer::tls(port, dir, false);
        (server, pki.ca)
    }

    /// The same, and only for clients with a certificate from that CA
    /// (`tls-auth-clients yes`).
    pub fn start_mutual_tls(port: u16, dir: &Path) -> (ServerProcess, TestPki) {
        RedisServer::tls(port, dir, true)
    }

    fn tls(port: u16, dir: &Path, verify_clients: bool) -> (ServerProcess, TestPki) {
        let pki = TestPki::new();
        let (ca, cert, key) = pki.write_server_files(dir);
        let server = RedisServer::spawn(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                ca.to_str().unwrap(),
                "--tls-auth-clients",
                if verify_clients { "yes" } else { "no" },
            ],
        );
        (server, pki)
    }

    /// A server that replicates to its replicas at once (the default waits 5 s to start a
    /// full sync, in case more replicas come).
    pub fn start_master(port: u16) -> ServerProcess {
        RedisServer::spawn(
            port,
            &[
                "--port",
                &port.to_string(),
                "--repl-diskless-sync-delay",
                "0",
            ],
        )
    }

    /// A replica of the server on `master`.
    pub fn start_replica(port: u16, master: u16) -> ServerProcess {
        let master = master.to_string();
        RedisServer::spawn(
            port,
            &[
                "--port",
                &port.to_string(),
                "--replicaof",
                "127.0.0.1",
                &master,
            ],
        )
    }

    /// A sentinel on `port` watching the master on `master` as `mymaster`, quick to fail
    /// over (half a second down); its config file (sentinels rewrite theirs) goes to `dir`.
    pub fn start_sentinel(port: u16, master: u16, dir: &Path) -> ServerProcess {
        let config = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds mymaster 500\n\
                 sentinel failover-timeout mymaster 2000\n"
            ),
        )
        .unwrap();
        RedisServer::spawn(port, &[config.to_str().unwrap(), "--sentinel"])
    }

    /// A master, a replica of it and a sentinel watching it (as `mymaster`), all on TLS only
    /// with certificates from one new CA (files in `dir`; clients need no certificate);
    /// replication and the sentinel's own links use TLS too. Returns the master, the replica,
    /// the sentinel and the CA's certificate (PEM).
    pub fn start_tls_sentinel_set(
        (master, replica, sentinel): (u16, u16, u16),
        dir: &Path,
    ) -> (ServerProcess, ServerProcess, ServerProcess, String) {
        let pki = TestPki::new();
        let (ca, cert, key) = pki.write_server_files(dir);
        let files = [
            ("tls-cert-file", cert.to_str().unwrap()),
            ("tls-key-file", key.to_str().unwrap()),
            ("tls-ca-cert-file", ca.to_str().unwrap()),
            ("tls-auth-clients", "no"),
            ("tls-replication", "yes"),
        ];
        let tls_args = |port: u16| {
            let mut args = vec![
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                port.to_string(),
                "--repl-diskless-sync-delay".to_owned(),
                "0".to_owned(),
            ];
            for (name, value) in files {
                args.push(format!("--{name}"));
                args.push(value.to_owned());
            }
            args
        };
        let spawn = |port: u16, args: Vec<String>| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            RedisServer::spawn(port, &args)
        };
        let master_process = spawn(master, tls_args(master));
        let mut replica_args = tls_args(replica);
        replica_args.extend(["--replicaof", "127.0.0.1"].map(str::to_owned));
        replica_args.push(master.to_string());
        let replica_process = spawn(replica, replica_args);
        let config = dir.join(format!("sentinel-{sentinel}.conf"));
        let mut text = format!("port 0\ntls-port {sentinel}\nbind 127.0.0.1\n");
        for (name, value) in files {
            text.push_str(&format!("{name} {value}\n"));
        }
        text.push_str(&format!(
            "sentinel monitor mymaster 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds mymaster 500\n\
             sentinel failover-timeout mymaster 2000\n"
        ));
        std::fs::write(&config, text).unwrap();
        let sentinel_process =
            RedisServer::spawn(sentinel, &[config.to_str().unwrap(), "--sentinel"]);
        (master_process, replica_process, sentinel_process, pki.ca)
    }

    /// A Redis Cluster of `masters` masters with `replicas_each` replicas each, on free ports,
    /// quick to fail over (a node is down after 1 s); node files go to `dir`. Returns the
    /// nodes (masters first, as `redis-cli --cluster create` assigns them) and their ports,
    /// once every node reports the cluster `ok`.
    pub fn start_cluster(
        masters: usize,
        replicas_each: usize,
        dir: &Path,
    ) -> (Vec<ServerProcess>, Vec<u16>) {
        RedisServer::cluster(masters, replicas_each, dir, None)
    }

    /// The same, TLS only (clients, the cluster bus and replication), with certificates for
    /// `localhost` and 127.0.0.1 from a new CA (files in `dir`); returns the CA too.
    pub fn start_tls_cluster(masters: usize, dir: &Path) -> (Vec<ServerProcess>, Vec<u16>, String) {
        let pki = TestPki::new();
        let files = pki.write_server_files(dir);
        let (nodes, ports) = RedisServer::cluster(masters, 0, dir, Some(&files));
        (nodes, ports, pki.ca)
    }

    fn cluster(
        masters: usize,
        replicas_each: usize,
        dir: &Path,
        tls: Option<&(PathBuf, PathBuf, PathBuf)>,
    ) -> (Vec<ServerProcess>, Vec<u16>) {
        let count = masters * (1 + replicas_each);
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .map(|&port| {
                let config = dir.join(format!("nodes-{port}.conf"));
                let mut args: Vec<String> = match tls {
                    None => vec!["--port".into(), port.to_string()],
                    Some((ca, cert, key)) => vec![
                        "--port".into(),
                        "0".into(),
                        "--tls-port".into(),
                        port.to_string(),
                        "--tls-cluster".into(),
                        "yes".into(),
                        "--tls-replication".into(),
                        "yes".into(),
                        "--tls-auth-clients".into(),
                        "no".into(),
                        "--tls-cert-file".into(),
                        cert.display().to_string(),
                        "--tls-key-file".into(),
                        key.display().to_string(),
                        "--tls-ca-cert-file".into(),
                        ca.display().to_string(),
                    ],
                };
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        // The bus port is port + 10000 unless named: take a free one.
                        "--cluster-port",
                        &free_port().to_string(),
                        "--cluster-config-file",
                        config.to_str().unwrap(),
                        "--cluster-node-timeout",
                        "1000",
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(str::to_owned),
                );
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                RedisServer::spawn(port, &args)
            })
            .collect();
        let mut create = RedisServer::cli(tls);
        create.arg("--cluster").arg("create");
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args([
                "--cluster-replicas",
                &replicas_each.to_string(),
                "--cluster-yes",
            ])
            .output()
            .expect("redis-cli");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for port in &ports {
            RedisServer::wait_cluster_ok(*port, tls);
        }
        (nodes, ports)
    }

    /// `redis-cli`, with TLS and the CA when `tls` names the files.
    fn cli(tls: Option<&(PathBuf, PathBuf, PathBuf)>) -> Command {
        let mut cli = Command::new("redis-cli");
        if let Some((ca, _, _)) = tls {
            cli.arg("--tls").arg("--cacert").arg(ca);
        }
        cli
    }

    /// Waits (at most 20 s) until the node on `port` says `cluster_state:ok`.
    fn wait_cluster_ok(port: u16, tls: Option<&(PathBuf, PathBuf, PathBuf)>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let info = RedisServer::cli(tls)
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster node on {port} is not ok: {}",
                String::from_utf8_lossy(&info.stdout)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn spawn(port: u16, args: &[&str]) -> ServerProcess {
        let mut command = Command::new("redis-server");
        command
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir());
        ServerProcess::spawn(command, port)
    }
}
