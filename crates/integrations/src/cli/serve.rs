//! `integrations serve`: the HTTP API, the background refresher, the event
//! purge and, with no `DATABASE_URL`, an embedded PostgreSQL kept in
//! `--data-dir`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use db_pool::{Pool, PoolConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pg_cluster::LocalCluster;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::DatabaseArgs;
use crate::changes::{self, ChangeFeed};
use crate::http::{self, app_with_deadline, AppState};
use crate::oauth::{TokenClient, TokenClientConfig};
use crate::service::api_keys::{ApiKeys, DEFAULT_VERIFY_TTL};
use crate::service::IntegrationsService;
use crate::settings::{process_env, ServiceSettings};
use crate::telemetry::{self, LogFormat};

/// Options of `integrations serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// Address and port to listen on (port 0 picks a free one; the chosen
    /// address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Log line format: text for people, json for log pipelines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Seconds requests in flight may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,

    /// Do not run the background refresher in this instance.
    #[arg(long)]
    no_refresher: bool,
}

/// Runs the server until SIGTERM or Ctrl-C; exit 0 after a clean shutdown.
pub fn run(args: ServeArgs) -> ExitCode {
    telemetry::init(args.log_format);
    let mut settings = match ServiceSettings::from_env(&process_env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(super::EXIT_INVALID_INPUT);
        }
    };
    let embedded = args.db.database_url.is_none();
    if embedded {
        settings.service.redirect_origins = settings.service.redirect_origins.with_loopback();
    } else if settings.service.callback_url.is_some()
        && settings.service.redirect_origins.is_empty()
    {
        eprintln!(
            "error: {} is not set: the connect flow (INTEGRATIONS_CALLBACK_URL is set) sends users back only to the application's origins; set it, e.g. {}=https://app.example.com",
            crate::service::REDIRECT_ORIGINS_ENV,
            crate::service::REDIRECT_ORIGINS_ENV
        );
        return ExitCode::from(super::EXIT_INVALID_INPUT);
    }
    let pool_cfg = if embedded {
        None
    } else {
        let direct = super::direct_config(&args.db).and_then(|direct| {
            let main = super::pool_config(&args.db)?;
            super::direct_or_main(&main, direct.as_ref(), "the change listener and migrations")?;
            Ok((main, direct))
        });
        match direct {
            Ok(cfgs) => Some(cfgs),
            Err(code) => return code,
        }
    };
    if !embedded && settings.encryption_keys.is_none() {
        if let Err(e) = settings.keyring() {
            eprintln!("{e}");
            return ExitCode::from(super::EXIT_INVALID_INPUT);
        }
    }
    super::block_on(async move {
        match serve(args, settings, pool_cfg).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "integrations serve failed");
                super::report_failure(&e)
            }
        }
    })
}

/// How often histogram samples are folded into the exported summaries.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// `serve`'s database configurations: the pool's (`DATABASE_URL`) and,
/// when set, the server's own (`DIRECT_URL`) for the change listener and
/// migrations.
type DatabaseConfigs = (PoolConfig, Option<PoolConfig>);

async fn serve(
    args: ServeArgs,
    settings: ServiceSettings,
    pool_cfg: Option<DatabaseConfigs>,
) -> anyhow::Result<()> {
    // Installed before the pool exists, so its histograms are recorded.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    telemetry::describe_metrics();
    let background = Background::new();
    background.metrics_upkeep(metrics.clone());
    let built = build(&args, &settings, pool_cfg, metrics, &background).await?;
    let served = listen_and_serve(&args, &settings, built.app).await;
    shut_down(background, built.pool, built.cluster).await?;
    served
}

/// The server's background tasks (metrics upkeep, the change feed, the
/// refresher, the webhook dispatcher, the event purge): started in one tracked set, stopped with
/// one token.
struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    fn new() -> Background {
        Background {
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Folds histogram samples into the exported summaries every
    /// [`METRICS_UPKEEP`]: without it, a server nobody scrapes grows by
    /// every request's sample.
    fn metrics_upkeep(&self, metrics: PrometheusHandle) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => metrics.run_upkeep(),
                }
            }
        });
    }

    /// Stops every task and waits for them (the refresher finishes the
    /// page it is on).
    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What [`build`] made: the application to serve and what to close after.
struct Built {
    app: axum::Router,
    pool: Pool,
    /// The embedded PostgreSQL, when this process started it.
    cluster: Option<LocalCluster>,
}

/// The database (the embedded one started when there is no URL), the
/// migrations, the service, the change feed and the refresher.
async fn build(
    args: &ServeArgs,
    settings: &ServiceSettings,
    pool_cfg: Option<DatabaseConfigs>,
    metrics: PrometheusHandle,
    background: &Background,
) -> anyhow::Result<Built> {
    let (cluster, (mut pool_cfg, direct_cfg), keys) = match pool_cfg {
        Some(cfgs) => (None, cfgs, settings.keyring()?),
        None => {
            let data_dir = &args.db.embedded.data_dir;
            let embedded = super::embedded::open(
                data_dir,
                args.db.profile.as_deref(),
                super::embedded::IfRunning::Refuse,
            )
            .await?;
            tracing::info!(
                data_dir = %data_dir.display(),
                socket_dir = %embedded.socket_dir.display(),
                "no DATABASE_URL: using the embedded PostgreSQL (data kept between runs); set DATABASE_URL for production"
            );
            let keys = match settings.encryption_keys {
                Some(_) => settings.keyring()?,
                None => super::embedded::development_keyring(data_dir)?,
            };
            (embedded.cluster, (embedded.cfg, None), keys)
        }
    };
    log_pool_config(&pool_cfg);
    if !pool_cfg.pgbouncer {
        // Names this instance in the change feed's payloads, so it skips its
        // own writes (PgBouncer refuses the `options` startup parameter:
        // behind it, an instance hears its own writes too, harmlessly).
        pool_cfg.options = Some(changes::with_instance_option(
            pool_cfg.options.as_deref(),
            &settings.service.instance_id,
        ));
    }
    let pool = Pool::new(pool_cfg.clone())?;
    let applied = match &direct_cfg {
        Some(direct) => crate::store::migrations::run_on(direct).await,
        None => crate::store::migrations::run(&pool).await,
    }
    .context("applying migrations")?;
    for m in &applied.applied {
        tracing::info!(migration = %m, "migration applied");
    }
    let providers = settings.providers(&process_env)?;
    tracing::info!(providers = %providers.names().join(", "), source = providers.source(), "provider registry");
    // Every series at zero before anything records one (the change
    // listener and the dispatcher start below).
    telemetry::init_metrics(&pool_cfg.application_name, &providers.names());
    let service = Arc::new(IntegrationsService::new(
        pool.clone(),
        keys,
        providers,
        TokenClient::new(&TokenClientConfig::default())?,
        settings.service.clone(),
    ));
    let api_keys = Arc::new(ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL));
    let state = AppState::new(service.clone(), api_keys.clone(), Some(metrics));

    // Without DIRECT_URL the pool's own server (not PgBouncer: checked).
    let listen_cfg = direct_cfg.unwrap_or_else(|| pool_cfg.clone());
    tracing::info!(
        url = %listen_cfg.redacted_url(),
        "change listener: one connection outside the pool (this instance uses connection_limit + 1)"
    );
    // Its first attempt before the server listens: caches on from the first
    // request when the database is there.
    ChangeFeed::new(listen_cfg, service.clone(), api_keys)
        .start(&background.tasks, background.stop.clone())
        .await;
    if !args.no_refresher {
        background.tasks.spawn(
            service
                .clone()
                .run_refresher(settings.refresher.clone(), background.stop.clone()),
        );
    }
    // Every instance delivers webhooks (claims skip rows another holds).
    background.tasks.spawn(
        service
            .clone()
            .run_webhook_dispatcher(background.stop.clone()),
    );
    // Every instance purges (batches skip rows another is deleting).
    background.tasks.spawn(
        service
            .clone()
            .run_event_purge(settings.events.clone(), background.stop.clone()),
    );
    Ok(Built {
        app: app_with_deadline(state, settings.request_timeout),
        pool,
        cluster,
    })
}

fn log_pool_config(pool_cfg: &PoolConfig) {
    tracing::info!(
        url = %pool_cfg.redacted_url(),
        connection_limit = pool_cfg.connection_limit,
        pool_timeout_secs = pool_cfg.pool_timeout.map(|d| d.as_secs()),
        connect_timeout_secs = pool_cfg.connect_timeout.map(|d| d.as_secs()),
        socket_timeout_secs = pool_cfg.socket_timeout.map(|d| d.as_secs()),
        keepalives = pool_cfg.keepalives,
        statement_cache_size = pool_cfg.effective_statement_cache_size(),
        pgbouncer = pool_cfg.pgbouncer,
        profile = pool_cfg.profile.map(|p| p.as_str()),
        "database pool"
    );
    for p in &pool_cfg.ignored_parameters {
        tracing::warn!(parameter = %p, "unknown DATABASE_URL parameter ignored");
    }
}

/// Listens and serves `app` until SIGTERM or Ctrl-C, then lets requests in
/// flight finish within `--shutdown-timeout`.
async fn listen_and_serve(
    args: &ServeArgs,
    settings: &ServiceSettings,
    app: axum::Router,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Signal handlers first: a SIGTERM from the moment we say we listen is
    // a graceful shutdown.
    let signals = Signals::install()?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        signal.cancel();
    });
    let (cap, open_files) = http::connection_cap(settings.http.max_connections);
    tracing::info!(
        header_timeout_secs = settings.http.header_read_timeout.as_secs(),
        idle_timeout_secs = settings.http.idle_timeout.as_secs(),
        request_timeout_secs = settings.request_timeout.as_secs(),
        max_connections = cap,
        open_files_limit = open_files,
        "HTTP limits"
    );
    tracing::info!(address = %local, "listening on http://{local}");
    let server = http::serve(listener, app, &settings.http, cap, shutdown.clone());
    let deadline = Duration::from_secs(args.shutdown_timeout);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = async { shutdown.cancelled().await; tokio::time::sleep(deadline).await } => {
            tracing::warn!(timeout_secs = deadline.as_secs(), "requests still in flight at the shutdown deadline; stopping anyway");
        }
    }
    Ok(())
}

/// The shutdown order: background tasks (the refresher's page finished),
/// then the pool, then the embedded PostgreSQL.
async fn shut_down(
    background: Background,
    pool: Pool,
    cluster: Option<LocalCluster>,
) -> anyhow::Result<()> {
    background.stop().await;
    pool.close(Duration::from_secs(10)).await;
    if let Some(mut cluster) = cluster {
        tracing::info!("stopping the embedded PostgreSQL");
        cluster.stop().await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), registered when created.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
