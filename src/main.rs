//! The `sluice` binary: `serve` runs the broker, `token …` talks to a
//! running broker's admin API. All logic lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

/// glibc's allocator serialises on arena locks when one thread frees what
/// another allocated, which is the ingest path's shape (request bodies are
/// allocated on tokio workers and released by the writer thread).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use sluice::client::AdminClient;
use sluice::config::{Config, Overrides};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "IoT state broker: attenuable tokens, acknowledgements after the write-ahead log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Manage tokens through a running broker's admin API.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Back up a running broker's store (history, composite state and
    /// tokens; not the root admin token) while it serves. The broker
    /// writes the backup, so DIR is a path on the broker's machine.
    Backup {
        /// Directory to create (or an empty one); relative paths are taken
        /// from the current directory.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Cluster mode: this broker's view of the cluster, and moving a
    /// standalone broker's tokens into the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Restore a backup into a new data directory, then check that the
    /// store opens and its tokens load. Refuses a non-empty directory.
    Restore {
        /// A directory written by `sluice backup`.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The data directory to create (or an empty one).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Parser)]
struct ServeArgs {
    /// Config file (TOML); built-in defaults equal config/sluice.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// MQTT over TLS (used when tls.cert and tls.key are set).
    #[arg(long, value_name = "ADDR")]
    mqtts_listen: Option<String>,
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Allow the admin listener on a non-loopback address.
    #[arg(long)]
    admin_allow_public: bool,
    /// Cluster mode: NATS server URL(s), comma-separated (sets
    /// cluster.nats_urls). One is enough; the others are learnt from it.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    cluster: Vec<String>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print a running broker's view of the cluster (GET /cluster): every
    /// broker, the token-bucket revision it has applied, its last
    /// heartbeat, and whether it is stale.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Copy a standalone broker's tokens into the cluster's token bucket,
    /// ids, hashes and tree intact; refuses (and copies nothing) if the
    /// bucket holds any of their ids. Stop that broker first.
    Import {
        /// The standalone broker's data directory.
        #[arg(long, value_name = "DIR")]
        from_data_dir: PathBuf,
        /// Config file with the [cluster] section (NATS URLs, credentials,
        /// TLS, prefix, replicas); environment variables apply as for serve.
        #[arg(long)]
        config: Option<PathBuf>,
        /// NATS server URL(s), comma-separated (sets cluster.nats_urls).
        #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
        cluster: Vec<String>,
    },
}

#[derive(Parser)]
struct AdminArgs {
    /// Admin API base URL. Default: the admin address in
    /// <data-dir>/listening, else http://127.0.0.1:9090.
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// Where to find `listening` and `admin.token` (SLUICE_ADMIN_TOKEN wins).
    #[arg(long, value_name = "DIR", default_value = "./data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints the record including the secret (shown once).
    Create {
        #[arg(long)]
        app: String,
        /// Scope(s), repeatable or comma-separated, e.g. device.sendState.
        #[arg(long, required = true, value_delimiter = ',')]
        scope: Vec<String>,
        /// Device id(s), repeatable; default every device the minter covers.
        #[arg(long)]
        device: Vec<String>,
        /// Lifetime, e.g. 30d, 12h, 90m.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long, default_value = "cli token")]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the tokens of an application.
    List {
        #[arg(long)]
        app: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deactivate a token (and with it its subtree); --delete removes it
    /// and its subtree permanently.
    Revoke {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        delete: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(cmd) => token(cmd),
        Command::Backup { to, admin } => backup(&to, &admin),
        Command::Restore { from, data_dir } => restore(&from, &data_dir),
        Command::Cluster(ClusterCommand::Status { admin }) => cluster_status(&admin),
        Command::Cluster(ClusterCommand::Import {
            from_data_dir,
            config,
            cluster,
        }) => cluster_import(&from_data_dir, config.as_deref(), cluster),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        mqtt_listen: args.mqtt_listen,
        http_listen: args.http_listen,
        admin_listen: args.admin_listen,
        mqtts_listen: args.mqtts_listen,
        data_dir: args.data_dir,
        admin_allow_public: args.admin_allow_public,
        cluster: (!args.cluster.is_empty()).then_some(args.cluster),
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let admin_token = std::env::var("SLUICE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    // A weak root token is a configuration error, reported with the rest.
    let token_problem = admin_token
        .as_deref()
        .filter(|t| !sluice::admin_token::acceptable(t))
        .map(|_| sluice::admin_token::AdminTokenError::BadEnv.to_string());
    let config = match Config::load(args.config.as_deref(), &env, &overrides) {
        Ok(c) if token_problem.is_none() => c,
        Ok(_) => {
            let e = sluice::config::ConfigErrors(token_problem.into_iter().collect());
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
        Err(mut e) => {
            e.0.extend(token_problem);
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    let level = sluice::logging::init(&config.log, rust_log.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async move {
        // SIGHUP hands re-read configurations to the server. A watch
        // channel holds only the latest one, so it is never full: a burst
        // of SIGHUPs coalesces into the last configuration read.
        let (reloads, reloaded) = tokio::sync::watch::channel(config.clone());
        // Installed before anything is announced: SIGHUP's default action
        // would end the process.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => {
                tokio::spawn(reload_on_hangup(
                    hangups,
                    args.config,
                    env,
                    overrides,
                    level,
                    reloads,
                ));
            }
            Err(e) => tracing::warn!(error = %e, "no SIGHUP handler: reloading needs a restart"),
        }
        let listeners = sluice::Listeners::bind(&config).await?;
        sluice::run(config, listeners, admin_token, shutdown_signal(), reloaded).await
    });
    // After a failure (the writer thread died, say) connections may still
    // wait on requests nobody will answer: do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(e) = result {
        // Through the log, so a JSON log stays one object per line.
        tracing::error!(error = %e, "the broker stopped on an error");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// On each SIGHUP, re-reads the configuration the way start-up read it
/// (file, environment, flags), applies `log.level` here and hands the new
/// configuration to the server, which re-reads the TLS pair. A
/// configuration that does not load changes nothing.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    overrides: Overrides,
    level: sluice::logging::LogLevel,
    reloads: tokio::sync::watch::Sender<Config>,
) {
    while hangups.recv().await.is_some() {
        let (file, env, overrides) = (file.clone(), env.clone(), overrides.clone());
        let loaded =
            tokio::task::spawn_blocking(move || Config::load(file.as_deref(), &env, &overrides))
                .await;
        let config = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(problems)) => {
                tracing::error!(%problems, "SIGHUP: configuration not reloaded; keeping the running one");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
                continue;
            }
        };
        match level.set(&config.log.level) {
            Ok(true) => tracing::info!(level = %config.log.level, "SIGHUP: log level set"),
            Ok(false) => tracing::info!("SIGHUP: RUST_LOG is set, so log.level is not applied"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: log level not changed"),
        }
        if reloads.send(config).is_err() {
            return;
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
/// The handlers are installed when this is called, not when the future is
/// first polled, so a signal that arrives as soon as the listeners are
/// announced still drains instead of killing the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without signal handlers the broker still runs; it just cannot
            // drain on a signal.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received; send another to exit immediately");
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::warn!("second signal: exiting without draining");
            std::process::exit(130);
        });
    }
}

fn admin_url(args: &AdminArgs) -> String {
    if let Some(u) = &args.admin {
        return u.clone();
    }
    std::fs::read_to_string(args.data_dir.join("listening"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("listening admin ")
                    .map(|a| format!("http://{}", a.trim()))
            })
        })
        .unwrap_or_else(|| "http://127.0.0.1:9090".to_string())
}

fn client(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let env = std::env::var("SLUICE_ADMIN_TOKEN").ok();
    let token = sluice::admin_token::read_for_client(Path::new(&args.data_dir), env.as_deref())
        .context(
        "no admin token: set SLUICE_ADMIN_TOKEN or point --data-dir at the broker's data directory",
    )?;
    Ok(AdminClient::new(
        &admin_url(args),
        &token,
        std::time::Duration::from_secs(30),
    )?)
}

fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = runtime.block_on(async move {
        match cmd {
            TokenCommand::Create {
                app,
                scope,
                device,
                expires,
                name,
                admin,
            } => {
                let mut body = serde_json::json!({ "name": name, "scope": scope });
                if !device.is_empty() {
                    body["devices"] = serde_json::json!(device);
                }
                if let Some(e) = expires {
                    let d = humantime::parse_duration(&e).with_context(|| {
                        format!("--expires {e:?}: use a duration like 30d or 12h")
                    })?;
                    let at = sluice::timefmt::now_ms() + d.as_millis() as i64;
                    body["expirationDate"] = serde_json::json!(sluice::timefmt::format_rfc3339(at));
                }
                Ok::<_, anyhow::Error>(client(&admin)?.create_token(&app, &body).await?)
            }
            TokenCommand::List { app, admin } => Ok(client(&admin)?.list_tokens(&app).await?),
            TokenCommand::Revoke {
                app,
                id,
                delete,
                admin,
            } => {
                let c = client(&admin)?;
                if delete {
                    c.delete_token(&app, &id).await?;
                    Ok(serde_json::json!({ "id": id, "deleted": true }))
                } else {
                    Ok(c.set_status(&app, &id, "inactive").await?)
                }
            }
        }
    });
    match out {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let Some(sluice::client::ClientError::Api { body, .. }) = e.downcast_ref() {
                println!("{body}");
            }
            bail!(e)
        }
    }
}

fn backup(to: &Path, admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let to = std::path::absolute(to).with_context(|| format!("--to {}", to.display()))?;
    let to = to
        .to_str()
        .with_context(|| format!("--to {}: not UTF-8", to.display()))?
        .to_string();
    let client = client(admin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(client.backup(&to)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let sluice::client::ClientError::Api { body, .. } = &e {
                println!("{body}");
            }
            bail!(e)
        }
    }
}

fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let restored = sluice::backup::restore(from, data_dir)?;
    println!("{}", serde_json::to_string_pretty(&restored)?);
    eprintln!(
        "restored into {}; the root admin token is not part of a backup: start with SLUICE_ADMIN_TOKEN, or a new {}/admin.token is generated",
        data_dir.display(),
        data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cluster_status(admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = client(admin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(client.cluster_status()) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let sluice::client::ClientError::Api { body, .. } = &e {
                println!("{body}");
            }
            bail!(e)
        }
    }
}

fn cluster_import(
    from: &Path,
    config_file: Option<&Path>,
    urls: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let overrides = Overrides {
        cluster: (!urls.is_empty()).then_some(urls),
        ..Default::default()
    };
    let config = Config::load(config_file, &env, &overrides)?;
    if !config.cluster.enabled() {
        bail!("no NATS server: pass --cluster URL or set cluster.nats_urls");
    }
    let db = from.join("db");
    if !db.is_dir() {
        bail!("{} holds no store (no db directory)", from.display());
    }
    let store =
        sluice::store::Store::open(&db, sluice::config::SyncMode::None).with_context(|| {
            format!(
                "opening {} (is a broker still running on it?)",
                db.display()
            )
        })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let imported = runtime.block_on(async {
        let nats = sluice::cluster::connect(&config.cluster, "sluice-import").await?;
        let spec =
            sluice::tokens::PlaneConfig::new(&config.cluster, "sluice-import".into()).bucket();
        let deadline = tokio::time::Instant::now() + config.cluster.connect_timeout;
        let bucket = sluice::cluster::kv::Kv::open(&nats, &spec, deadline).await?;
        anyhow::Ok(sluice::tokens::import(&store, &bucket).await?)
    })?;
    println!("{}", serde_json::to_string_pretty(&imported)?);
    Ok(ExitCode::SUCCESS)
}
