//! `plexus config check`: loads the configuration exactly as `serve` would (file, then
//! `PLEXUS_*` environment, then flags), checks what `serve` would only find at start (the log
//! filter, the TLS certificate and key), and prints the result without starting anything.

use plexus_server::config::EngineKind;
use plexus_server::Config;

use crate::serve::{self, ServeArgs};
use crate::Failure;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Check a configuration (file, environment, flags as for `serve`) and print what it
    /// resolves to; exit code 2 and the offending key when it is not valid
    Check(Box<ServeArgs>),
}

pub fn run(args: ConfigArgs) -> Result<(), Failure> {
    let ConfigCommand::Check(args) = args.command;
    let source = match args.config_file() {
        Some(path) => format!("{}, PLEXUS_* environment and flags", path.display()),
        None => "defaults, PLEXUS_* environment and flags".to_owned(),
    };
    let config = serve::load(*args)?;
    serve::log_filter(&config)?;
    if let Some(files) = &config.tls {
        plexus_server::tls_acceptor(files).map_err(|error| Failure::new(2, error))?;
    }
    // The token keys, as `serve` reads them (the HMAC secret may still be generated).
    plexus_auth::TokenVerifier::new(&plexus_auth::VerifierKeys {
        hmac_secret: None,
        rsa_public_key_pem: config.token_rsa_public_key.clone(),
        ecdsa_public_key_pem: config.token_ecdsa_public_key.clone(),
    })
    .map_err(|error| Failure::new(2, error))?;
    println!("configuration ok ({source})");
    print!("{}", summary(&config));
    Ok(())
}

/// What a configuration amounts to, one setting a line; secrets are only said to be set.
/// Where history lives, for people: the engine and its servers (without credentials).
pub fn engine_summary(config: &Config) -> String {
    match config.engine {
        EngineKind::Embedded => format!("embedded, durable in {}", config.data_dir.display()),
        EngineKind::Memory => "memory (history lost on restart)".to_owned(),
        EngineKind::Redis => {
            let servers = match (&config.redis_cluster, &config.redis_sentinel) {
                (Some(nodes), _) if config.redis_cluster_sharded_pubsub => {
                    format!("redis cluster at {} (sharded pub/sub)", nodes.join(", "))
                }
                (Some(nodes), _) => format!("redis cluster at {}", nodes.join(", ")),
                (None, Some((sentinels, master))) => {
                    format!(
                        "redis master {master:?} from sentinels {}",
                        sentinels.join(", ")
                    )
                }
                (None, None) => format!("redis at {}", without_credentials(&config.redis_url)),
            };
            format!("{servers}, prefix {:?}", config.redis_prefix)
        }
        EngineKind::Nats => format!(
            "nats at {}, prefix {:?}",
            without_credentials(&config.nats_url),
            config.nats_prefix
        ),
    }
}

/// `url` (or a comma-separated list of them) without `user:password@`.
fn without_credentials(url: &str) -> String {
    url.split(',')
        .map(|url| {
            let url = url.trim();
            match url.split_once("://") {
                Some((scheme, rest)) => {
                    let authority_end = rest.find('/').unwrap_or(rest.len());
                    match rest[..authority_end].rfind('@') {
                        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                        None => url.to_owned(),
                    }
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary(config: &Config) -> String {
    let off = |addr: Option<std::net::SocketAddr>| addr.map_or("off".to_owned(), |a| a.to_string());
    let set = |value: bool| {
        if value {
            "set"
        } else {
            "generated in data_dir"
        }
    };
    let scheme = if config.tls.is_some() {
        "https, wss"
    } else {
        "http, ws"
    };
    let engine = engine_summary(config);
    let namespaces: Vec<String> = config
        .namespaces
        .named()
        .into_iter()
        .map(|(name, options)| {
            let mut traits = Vec::new();
            if options.has_history() {
                traits.push(format!(
                    "history {} for {}",
                    options.history_size,
                    humantime::format_duration(options.history_ttl)
                ));
            }
            if options.recovers_latest_only() {
                traits.push("recovers the latest only".to_owned());
            }
            if options.gives_fossil_deltas() {
                traits.push("fossil deltas".to_owned());
            }
            if options.allow_tags_filter {
                traits.push("tags filters".to_owned());
            }
            if options.presence {
                traits.push("presence".to_owned());
            }
            if options.private {
                traits.push("private".to_owned());
            }
            if options.allow_publish_for_client {
                traits.push("clients publish".to_owned());
            }
            if options.proxy_subscribe {
                traits.push("subscribe proxy".to_owned());
            }
            if options.proxy_publish {
                traits.push("publish proxy".to_owned());
            }
            format!("{name} ({})", traits.join(", "))
        })
        .collect();
    let origins = if config.allowed_origins.is_empty() {
        "same origin only".to_owned()
    } else {
        config.allowed_origins.join(", ")
    };
    let mut out = String::new();
    let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<21}{value}\n"));
    line("listen", format!("{} ({scheme})", config.listen));
    line("tcp_echo", off(config.tcp_echo));
    line("tcp_chat", off(config.tcp_chat));
    line("engine", engine);
    line("namespaces", namespaces.join("; "));
    line("api_key", set(config.api_key.is_some()).to_owned());
    line(
        "token_hmac_secret",
        set(config.token_hmac_secret.is_some()).to_owned(),
    );
    line("allowed_origins", origins);
    line(
        "limits",
        format!(
            "{} connections, {} per IP, {} B messages, {} B outbox",
            config.max_connections,
            config.max_connections_per_ip,
            config.max_message_size,
            config.outbox_limit
        ),
    );
    line(
        "heartbeat",
        format!(
            "ping every {}, pong within {}",
            humantime::format_duration(config.ping_interval),
            humantime::format_duration(config.pong_timeout)
        ),
    );
    let per_second = match config.max_messages_per_second {
        0 => "no limit".to_owned(),
        n => format!("{n} a second per connection"),
    };
    line("message rate", per_second);
    let fetch = |url: &Option<String>| match url {
        // Only where it points, not what credentials it may carry.
        Some(url) => url
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| {
                Some(format!(
                    "{}://{}",
                    uri.scheme_str()?,
                    uri.authority()?.host()
                ))
            })
            .unwrap_or_else(|| "set".to_owned()),
        None => "none".to_owned(),
    };
    line("rpc_proxy_url", fetch(&config.rpc_proxy_url));
    line("connect_proxy_url", fetch(&config.connect_proxy_url));
    line("refresh_proxy_url", fetch(&config.refresh_proxy_url));
    line("subscribe_proxy_url", fetch(&config.subscribe_proxy_url));
    line("publish_proxy_url", fetch(&config.publish_proxy_url));
    let headers: Vec<&str> = config
        .proxy_http_headers
        .iter()
        .map(|name| name.as_str())
        .collect();
    line(
        "proxy_http_headers",
        if headers.is_empty() {
            "none".to_owned()
        } else {
            headers.join(", ")
        },
    );
    line("token_jwks_url", fetch(&config.token_jwks_url));
    line(
        "logs",
        format!("{:?}, {}", config.log_format, config.log_level).to_lowercase(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_summary_names_the_servers_without_credentials() {
        assert_eq!(
            without_credentials("redis://:secret@10.0.0.1:6379/2"),
            "redis://10.0.0.1:6379/2"
        );
        assert_eq!(
            without_credentials("nats://ann:pw@a:4222, tls://b:4222"),
            "nats://a:4222, tls://b:4222"
        );
        assert_eq!(without_credentials("redis://h/x@y"), "redis://h/x@y");
        let redis = |cluster: Option<Vec<String>>| Config {
            engine: EngineKind::Redis,
            redis_url: "rediss://:secret@redis:6380".into(),
            redis_cluster: cluster,
            ..Config::default()
        };
        assert_eq!(
            engine_summary(&redis(None)),
            "redis at rediss://redis:6380, prefix \"plexus\""
        );
        assert_eq!(
            engine_summary(&redis(Some(vec!["a:7000".into(), "b:7000".into()]))),
            "redis cluster at a:7000, b:7000, prefix \"plexus\""
        );
        let memory = Config {
            engine: EngineKind::Memory,
            ..Config::default()
        };
        assert_eq!(engine_summary(&memory), "memory (history lost on restart)");
    }
}
