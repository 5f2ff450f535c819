use std::path::PathBuf;

use anyhow::Context as _;
use plexus_server::{Config, LogFormat, Server, Settings};
use tracing_subscriber::EnvFilter;

use crate::Failure;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in `plexus serve --help`, in snake_case)
    #[arg(long, env = "PLEXUS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

impl ServeArgs {
    pub fn config_file(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }
}

pub fn load(args: ServeArgs) -> Result<Config, Failure> {
    let file = match &args.config {
        Some(path) => Settings::load_file(path).map_err(|error| Failure::new(2, error))?,
        None => Settings::default(),
    };
    args.settings
        .or(file)
        .resolve()
        .map_err(|error| Failure::new(2, error))
}

/// The log filter of `log_level`, or why it is not one.
pub fn log_filter(config: &Config) -> Result<EnvFilter, Failure> {
    EnvFilter::try_new(&config.log_level).map_err(|error| {
        Failure::new(
            2,
            anyhow::anyhow!("invalid log_level {:?}: {error}", config.log_level),
        )
    })
}

fn init_logging(config: &Config) -> Result<(), Failure> {
    let filter = log_filter(config)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    let config = load(args)?;
    init_logging(&config)?;
    match plexus_server::raise_open_files_limit() {
        Ok((before, after)) => tracing::info!(before, after, "open files limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open files limit"),
    }
    let server = Server::bind(config).await.map_err(|error| {
        let code = if error.is_addr_in_use() { 3 } else { 1 };
        Failure::new(code, error)
    })?;
    let (http, ws) = if server.is_tls() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let addr = server.http_addr();
    println!("plexus: chat page     {http}://{addr}/");
    println!("plexus: websocket     {ws}://{addr}/echo  {ws}://{addr}/chat/{{room}}");
    println!("plexus: health        {http}://{addr}/health  {http}://{addr}/metrics");
    println!("plexus: protocol      {ws}://{addr}/connection/websocket");
    println!("plexus: server api    {http}://{addr}/api/{{method}}");
    println!("plexus: admin         {http}://{addr}/admin  (sign in with the API key)");
    println!(
        "plexus: history       {}",
        crate::config::engine_summary(server.config())
    );
    let secrets = server.secrets();
    if let Some(file) = &secrets.file {
        let verb = if secrets.generated {
            "generated in"
        } else {
            "read from"
        };
        println!(
            "plexus: secrets       {} {verb} {}",
            secrets.stored.join(" and "),
            file.display()
        );
    }
    match server.tcp_echo_addr() {
        Some(addr) => println!("plexus: tcp echo      {addr}"),
        None => println!("plexus: tcp echo      off"),
    }
    match server.tcp_chat_addr() {
        Some(addr) => println!("plexus: tcp chat      {addr}"),
        None => println!("plexus: tcp chat      off"),
    }
    let signal = shutdown_signal()
        .await
        .context("cannot install signal handlers")
        .map_err(|error| Failure::new(1, error))?;
    tracing::info!(signal, "shutting down");
    let report = server.shutdown().await;
    if report.abandoned > 0 {
        tracing::warn!(
            abandoned = report.abandoned,
            "shutdown timeout: connections dropped"
        );
    } else {
        tracing::info!("shutdown complete");
    }
    Ok(())
}
