//! The `plexus` command. Thin on purpose: parse flags, load configuration, run, and map errors
//! to exit codes. Everything else lives in the library crates.
//!
//! Exit codes: 0 success; 1 runtime failure (cannot connect, I/O error); 2 bad usage or
//! configuration; 3 a listener address is in use; 4 `connect` saw an abnormal close.

mod bench;
mod config;
mod connect;
mod publish;
mod serve;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc: idle WebSockets cost less resident memory than with glibc's malloc, and less
/// unpredictably (ARCHITECTURE.md, "Dependencies and why").
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "plexus", version, about = "Plexus real-time messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (no configuration needed)
    Serve(Box<serve::ServeArgs>),
    /// Open a WebSocket: stdin lines are sent, received messages printed
    Connect(connect::ConnectArgs),
    /// Publish into a channel through the server HTTP API
    Publish(Box<publish::PublishArgs>),
    /// Print a connection (or subscription) token signed with the server's HMAC secret
    Token(Box<token::TokenArgs>),
    /// Load a running server: idle connections, fan-out latency, echo round trips, churn
    Bench(Box<bench::BenchArgs>),
    /// Check a configuration without starting the server
    Config(config::ConfigArgs),
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Connect(args) => connect::run(args).await,
            Command::Publish(args) => publish::run(*args).await,
            Command::Token(args) => token::run(*args),
            Command::Bench(args) => bench::run(*args).await,
            Command::Config(args) => config::run(args),
        }
    });
    // A blocking stdin read (connect) may still be parked in the blocking pool: do not wait
    // for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
