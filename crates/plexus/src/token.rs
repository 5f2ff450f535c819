//! `plexus token`: mints an HS256 connection or subscription token with the server's secret.
//!
//! The secret is found exactly as `plexus serve` finds it (flags, `PLEXUS_*` environment,
//! `--config FILE`, then `data_dir/secrets.toml`), so a token minted on the server's machine is
//! accepted without any setup. [`ServerConfig`] is that lookup, shared with `plexus publish`.

use std::path::PathBuf;
use std::time::Duration;

use plexus_server::{secrets, Config, Settings};

use crate::Failure;

/// The server's configuration, resolved as `plexus serve` resolves it.
#[derive(Debug, clap::Args)]
pub struct ServerConfig {
    /// The server's TOML configuration file
    #[arg(long, env = "PLEXUS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(
        flatten,
        next_help_heading = "Server configuration (as for plexus serve)"
    )]
    settings: Settings,
}

impl ServerConfig {
    /// The checked configuration; a bad one is a usage error (exit status 2).
    pub fn load(self) -> Result<Config, Failure> {
        let file = match &self.config {
            Some(path) => Settings::load_file(path).map_err(|error| Failure::new(2, error))?,
            None => Settings::default(),
        };
        self.settings
            .or(file)
            .resolve()
            .map_err(|error| Failure::new(2, error))
    }
}

/// The server's secrets: configured ones, else those in `data_dir/secrets.toml` (created there
/// on first use, as the server does).
pub fn server_secrets(config: &Config) -> Result<secrets::Secrets, Failure> {
    secrets::resolve(config).map_err(|error| Failure::new(1, error))
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user id (`sub`); an empty string for an anonymous connection
    #[arg(long, value_name = "ID")]
    user: String,
    /// Lifetime, e.g. 30m, 1h, 7d; 0 for a token that never expires
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
    /// Channel the connection is subscribed to server-side (repeatable)
    #[arg(
        long = "channel",
        value_name = "CHANNEL",
        conflicts_with = "sub_channel"
    )]
    channels: Vec<String>,
    /// Mint a subscription token for this channel instead of a connection token
    #[arg(long, value_name = "CHANNEL")]
    sub_channel: Option<String>,
    /// Connection (or channel) info shown to others: a JSON value
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    info: Option<serde_json::Value>,
    #[command(flatten)]
    server: ServerConfig,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("{text:?} is not a duration like 30m or 1h ({error})"))
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The claims to sign, from the flags.
fn mint_request(args: &TokenArgs, now_unix: u64) -> plexus_auth::MintRequest {
    plexus_auth::MintRequest {
        sub: args.user.clone(),
        ttl: (!args.ttl.is_zero()).then_some(args.ttl),
        channels: args.channels.clone(),
        info: args.info.clone(),
        channel: args.sub_channel.clone(),
        now_unix,
        meta: None,
    }
}

pub fn run(args: TokenArgs) -> Result<(), Failure> {
    let request = mint_request(&args, now_unix());
    let config = args.server.load()?;
    let secrets = server_secrets(&config)?;
    println!(
        "{}",
        plexus_auth::mint_hs256(&secrets.token_hmac_secret, &request)
    );
    Ok(())
}
