#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the per-request path allocates many small, short-lived objects across two worker
/// threads, where glibc malloc cost ~20% of the gateway's CPU (docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Work with Cedar policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the kubeconfig-format file kube-apiserver needs to call the gateway's webhooks.
    WebhookConfig {
        /// The gateway's URL as kube-apiserver reaches it, e.g. https://ztgate.ztgate-system.svc
        #[arg(long)]
        server: String,
        /// `tokenreview` or `subjectaccessreview`.
        #[arg(long, default_value = "tokenreview")]
        kind: String,
        /// CA that signs the gateway's serving certificate.
        #[arg(long)]
        ca: PathBuf,
        /// kube-apiserver's client certificate and key (from the gateway's caller bundle).
        #[arg(long)]
        client_cert: PathBuf,
        #[arg(long)]
        client_key: PathBuf,
    },
    /// Sign in (kubectl's exec credential plugin): prints an ExecCredential with an OIDC ID token
    /// from the cache, refreshed, or from a new browser or device-code sign-in.
    Login(ztgate::login::LoginArgs),
    /// Remove the tokens `ztgate login` keeps in its cache.
    Logout(ztgate::login::LogoutArgs),
    /// Write a kubeconfig for a gateway whose user runs `ztgate login`.
    Kubeconfig(ztgate::login::KubeconfigArgs),
    /// The device agent's commands.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Start a stand-in kube-apiserver, a gateway in front of it, and write a kubeconfig (in a
    /// build with the `demo` feature: `cargo run --release --features demo -- demo`).
    Demo {
        /// Where to write the demo kubeconfig.
        #[arg(long)]
        kubeconfig_out: Option<PathBuf>,
        /// Directory for the demo's certificates and config: a new path, which the demo creates
        /// with mode 0700 (an existing one is refused); a fresh temporary one by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Gateway port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Collect this machine's posture (os, version, disk encryption, firewall, screen lock, as
    /// far as they can be read without privileges) and post it to the gateway with the device
    /// certificate. Suitable for cron or a systemd timer; exits 1 when the gateway refuses.
    Report {
        /// The gateway's URL, e.g. https://ztgate.example.com:8443
        #[arg(long, env = "ZTGATE_SERVER", required_unless_present = "dry_run")]
        server: Option<String>,
        /// CA that signs the gateway's serving certificate.
        #[arg(long, env = "ZTGATE_CA")]
        ca: Option<PathBuf>,
        /// The device certificate (PEM) and its key.
        #[arg(long, env = "ZTGATE_DEVICE_CERT")]
        cert: Option<PathBuf>,
        #[arg(long, env = "ZTGATE_DEVICE_KEY")]
        key: Option<PathBuf>,
        /// Print the report as JSON instead of sending it.
        #[arg(long)]
        dry_run: bool,
    },
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files/directories against the schema: exits 1 with file:line:col messages.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Evaluate a hypothetical request, like `kubectl auth can-i`: prints yes/no and why; exits 0
    /// when allowed, 1 when denied.
    Check {
        /// Policy files or directories.
        #[arg(long = "policies", required = true)]
        policies: Vec<PathBuf>,
        #[arg(long)]
        user: String,
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long)]
        verb: String,
        /// e.g. `pods`, `pods/exec`, `deployments`.
        #[arg(long)]
        resource: Option<String>,
        #[arg(long, default_value = "")]
        api_group: String,
        #[arg(long, short = 'n', default_value = "")]
        namespace: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        non_resource_url: Option<String>,
        #[arg(long, default_value = "127.0.0.1")]
        source_ip: std::net::IpAddr,
        #[arg(long, default_value = "oidc")]
        auth_method: String,
        #[arg(long)]
        amr: Vec<String>,
        /// Device facts as JSON: {"id":"…","bound":true,"postureAgeSeconds":60,"posture":{"managed":true,…}}
        #[arg(long)]
        device: Option<String>,
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
        Command::Policy {
            command: PolicyCommand::Validate { paths },
        } => match ztgate::cli::policy_validate(&paths) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command:
                PolicyCommand::Check {
                    policies,
                    user,
                    groups,
                    verb,
                    resource,
                    api_group,
                    namespace,
                    name,
                    non_resource_url,
                    source_ip,
                    auth_method,
                    amr,
                    device,
                },
        } => {
            let req = ztgate::cli::CheckRequest {
                user,
                groups,
                verb,
                resource,
                api_group,
                namespace,
                name,
                non_resource_url,
                source_ip,
                auth_method,
                amr,
                device_json: device,
            };
            match ztgate::cli::policy_check(&policies, &req) {
                Ok((allowed, text)) => {
                    println!("{text}");
                    if allowed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::WebhookConfig {
            server,
            kind,
            ca,
            client_cert,
            client_key,
        } => match ztgate::cli::webhook_config(&server, &kind, &ca, &client_cert, &client_key) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Login(args) => ztgate::login::main_login(args),
        Command::Logout(args) => ztgate::login::main_logout(args),
        Command::Kubeconfig(args) => ztgate::login::main_kubeconfig(args),
        Command::Device {
            command:
                DeviceCommand::Report {
                    server,
                    ca,
                    cert,
                    key,
                    dry_run,
                },
        } => runtime().block_on(async {
            let report = ztgate::posture::collect::collect_report().await;
            if dry_run {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
                return ExitCode::SUCCESS;
            }
            let (Some(server), Some(ca_file), Some(cert_file), Some(key_file)) =
                (server, ca, cert, key)
            else {
                eprintln!("ztgate device report needs --server, --ca, --cert and --key");
                return ExitCode::FAILURE;
            };
            let target = ztgate::posture::collect::ReportTarget {
                server,
                ca_file,
                cert_file,
                key_file,
            };
            match ztgate::posture::collect::post_report(&target, &report).await {
                Ok(record) => {
                    println!("{record}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Serve { config } => {
            let cfg = match ztgate::config::load_file(&config) {
                Ok(c) => c,
                Err(errs) => {
                    eprintln!("{errs}");
                    return ExitCode::FAILURE;
                }
            };
            ztgate::telemetry::logging::init(cfg.logging.format, &cfg.logging.level);
            runtime().block_on(serve(cfg, config))
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => {
            eprintln!("{NO_DEMO}");
            ExitCode::FAILURE
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

/// What `ztgate demo` says in a build without the demo.
#[cfg(not(feature = "demo"))]
const NO_DEMO: &str = "\
ztgate demo: this build has no demo. The product build leaves out the stand-in kube-apiserver
and the development token issuer the demo runs. Run the demo from a checkout of the source,
which builds ztgate with it:

  cargo run --release --features demo -- demo --kubeconfig-out ~/ztgate-demo.kubeconfig";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn serve(cfg: ztgate::config::GatewayConfig, path: PathBuf) -> ExitCode {
    let reload = cfg.listener.reload_interval.get();
    let running = match ztgate::gateway::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    ztgate::gateway::spawn_config_reloader(running.gateway.clone(), path, reload);
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
