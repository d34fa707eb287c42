#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ztgate: a zero-trust gateway in front of kube-apiserver.
#[derive(Parser)]
#[command(name = "ztgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Path to the GatewayConfig YAML file.
        #[arg(long, short = 'c', env = "ZTGATE_CONFIG")]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Start a stand-in kube-apiserver, a gateway in front of it, and write a kubeconfig.
    #[cfg(feature = "demo")]
    Demo {
        /// Where to write the demo kubeconfig.
        #[arg(long)]
        kubeconfig_out: Option<PathBuf>,
        /// Directory for the demo's certificates and config (a temporary one by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Gateway port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file: exits 0 when it is good, 1 with every problem found otherwise.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match ztgate::config::load_file(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errs) => {
                eprintln!("{errs}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let cfg = match ztgate::config::load_file(&config) {
                Ok(c) => c,
                Err(errs) => {
                    eprintln!("{errs}");
                    return ExitCode::FAILURE;
                }
            };
            ztgate::telemetry::logging::init(cfg.logging.format, &cfg.logging.level);
            runtime().block_on(serve(cfg))
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            kubeconfig_out,
            dir,
            port,
        } => {
            ztgate::telemetry::logging::init(ztgate::config::LogFormat::Text, "warn");
            runtime().block_on(async {
                match ztgate::demo::run(ztgate::demo::DemoOptions {
                    kubeconfig_out,
                    dir,
                    port,
                })
                .await
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("demo failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn serve(cfg: ztgate::config::GatewayConfig) -> ExitCode {
    let running = match ztgate::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
