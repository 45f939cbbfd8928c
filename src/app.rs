//! Wires the rooms together: store, flush epoch, culler, commands, server; and shutdown.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::command::{Ctx, Settings};
use crate::config::Config;
use crate::culler::{Culler, CullerConfig, WriteHint};
use crate::flush::Flush;
use crate::peers::Peers;
use crate::stats::Stats;
use crate::store::dir::{DirStore, DEFAULT_OPEN_FILES};
use crate::store::s3::S3Store;
use crate::store::Store;
use crate::tier::disk::DiskTier;
use crate::tier::{TierConfig, Tiered};

/// How long shutdown waits for connections to finish their commands.
pub const SHUTDOWN_DRAIN_SECS: u64 = 10;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the local store: {0}")]
    Dir(std::io::Error),
    #[error("cannot open the disk tier: {0}")]
    DiskTier(std::io::Error),
    #[error("cannot use the S3 store: {0}")]
    Store(crate::store::StoreError),
    #[error("cannot listen for peers: {0}")]
    PeerListen(std::io::Error),
    #[error("cannot write the address file: {0}")]
    AddrFile(std::io::Error),
    #[error("cannot load the TLS certificates: {0}")]
    Tls(crate::tls::TlsError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// A running server.
pub struct App {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub ctx: Arc<Ctx>,
    pub culler: Arc<Culler>,
    /// The admin listener's address (`admin_listen`), when one runs.
    pub admin_addr: Option<SocketAddr>,
    /// This replica's side of the peer protocol, when it has peers or hears them.
    pub peers: Option<Arc<Peers>>,
    shutdown: CancellationToken,
    server: JoinHandle<TaskTracker>,
    culler_task: JoinHandle<()>,
}

/// Pause before restarting a background task that panicked, in milliseconds.
pub const RESTART_PAUSE_MS: u64 = 1000;

/// Sets up tracing from the config (text or JSON) on standard output; colours only when
/// that is a terminal and NO_COLOR is unset, so files and log collectors get plain text.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(&config.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(colour);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// AWS SDK modules that log the access key ID (in the signing details and the resolved
/// identity) at debug and trace level.
const SECRET_LOGGING_TARGETS: [&str; 2] = ["aws_sigv4", "aws_smithy_runtime"];

/// The log filter for `log_level`: the SDK modules that log credentials are held at info
/// unless the filter names them itself (someone debugging request signing asked for it).
pub fn log_filter(log_level: &str) -> String {
    let mut filter = log_level.to_owned();
    for target in SECRET_LOGGING_TARGETS {
        if !log_level.contains(target) {
            filter.push_str(&format!(",{target}=info"));
        }
    }
    filter
}

/// Opens the store the config names: S3 when a bucket is set, else the local directory.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, AppError> {
    Ok(open_store_and_clock(config).await?.0)
}

/// Opens the store the config names, with the clock to stamp items by: the S3 store's
/// time when items live in S3 (so replicas agree on flush moments), else this machine's.
pub async fn open_store_and_clock(config: &Config) -> Result<(Arc<dyn Store>, Clock), AppError> {
    let codec = config.codec();
    // Raised whatever the store: connections need their descriptors on S3 too.
    let open_files = open_files_budget(config.client_sockets());
    if config.uses_s3() {
        let store = S3Store::connect(config.s3_settings())
            .await
            .map_err(AppError::Store)?;
        let clock = store.clock();
        Ok((Arc::new(store), clock))
    } else {
        let store = DirStore::open_with(
            Path::new(&config.data_dir),
            &config.location,
            codec,
            config.dir_fsync,
            open_files,
        )
        .map_err(AppError::Dir)?;
        tracing::info!(dir = %config.data_dir.display(), "no bucket configured: serving from a local directory");
        let clock = match config.clock_offset_ms {
            0 => Clock::System,
            skew_ms => Clock::Store(crate::clock::StoreTime::leak(skew_ms)),
        };
        Ok((Arc::new(store), clock))
    }
}

/// File descriptors kept for everything but connections and the directory store's open item
/// files: listeners, the disk tier, the S3 client's connections, files opened per request.
const SPARE_FILES: u64 = 256;

/// How many item files the directory store may keep open, after raising this process's
/// open-file limit (as memcached does for its connections) towards what the client sockets,
/// those files and [`SPARE_FILES`] need, as far as the hard limit allows.
fn open_files_budget(client_sockets: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let connections = client_sockets as u64;
    let wanted = connections + SPARE_FILES + DEFAULT_OPEN_FILES as u64;
    let limit = getrlimit(Resource::Nofile);
    let mut current = limit.current.unwrap_or(u64::MAX);
    if current < wanted {
        let raised = limit.maximum.map_or(wanted, |max| max.min(wanted));
        let set = Rlimit {
            current: Some(raised),
            maximum: limit.maximum,
        };
        if raised > current && setrlimit(Resource::Nofile, set).is_ok() {
            current = raised;
        }
    }
    let budget = current
        .saturating_sub(connections + SPARE_FILES)
        .min(DEFAULT_OPEN_FILES as u64) as usize;
    if budget < DEFAULT_OPEN_FILES {
        tracing::info!(
            open_file_limit = current,
            client_sockets,
            kept_open = budget,
            "the open-file limit leaves room for few kept-open item files"
        );
    }
    budget
}

/// Starts the server on the config's address with the store it names.
pub async fn start(config: Config) -> Result<App, AppError> {
    let (store, clock) = open_store_and_clock(&config).await?;
    start_with(config, store, clock).await
}

/// Binds `addr`, returning the listener and the address it got (a port of 0 picks one).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let bound = async {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    bound
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

/// Starts the server with a given store and clock (tests use the memory store and tokio time).
pub async fn start_with(
    config: Config,
    store: Arc<dyn Store>,
    clock: Clock,
) -> Result<App, AppError> {
    let tls = load_tls(&config)?;
    let addr = config.listen_addr();
    let (listener, addr) = bind(addr).await?;
    let (ctx, culler) = wire(&config, addr, store, clock).await?;
    let shutdown = CancellationToken::new();
    let culler_task = spawn_culler(culler.clone(), ctx.stats.clone(), shutdown.clone());
    tokio::spawn(ctx.flush.clone().run_refresher(shutdown.clone()));
    if ctx.store.has_disk() {
        tokio::spawn(watch_disk_tier(ctx.store.clone(), shutdown.clone()));
    }
    let peers = match config.peer_settings(ctx.store.window()) {
        Some(settings) => {
            let started = Peers::start(
                settings,
                ctx.store.clone(),
                ctx.flush.clone(),
                ctx.stats.clone(),
                shutdown.clone(),
            );
            Some(started.await.map_err(AppError::PeerListen)?)
        }
        None => None,
    };
    let peer_addr = peers.as_ref().and_then(|p| p.listening());
    let connection_config = config.connection_config(ctx.stats.clone())?;
    let admin_addr = start_admin(&config, &ctx, &shutdown).await?;
    let server = tokio::spawn(crate::server::run(
        listener,
        ctx.clone(),
        connection_config,
        config.max_connections,
        tls.clone(),
        shutdown.clone(),
    ));
    if let Some(tls) = tls {
        tokio::spawn(crate::tls::reload_on_hangup(tls, shutdown.clone()));
    }
    tracing::info!(%addr, backend = ctx.store.info().kind, "s3cached listening");
    let addrs = [
        ("listen", Some(addr)),
        ("admin", admin_addr),
        ("peer", peer_addr),
    ];
    write_addr_file(&config.addr_file, &addrs).map_err(AppError::AddrFile)?;
    Ok(App {
        addr,
        ctx,
        culler,
        admin_addr,
        peers,
        shutdown,
        server,
        culler_task,
    })
}

/// Writes the bound addresses (`listen`, then `admin` and `peer` when they run) to `path`
/// (nothing when it is empty): complete or absent, never half-written, since the file is
/// written beside and renamed into place.
fn write_addr_file(
    path: &std::path::Path,
    addrs: &[(&str, Option<SocketAddr>)],
) -> std::io::Result<()> {
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for (name, addr) in addrs {
        if let Some(addr) = addr {
            text.push_str(&format!("{name} {addr}\n"));
        }
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

/// Reads the TLS certificates the config names, before any port is bound.
fn load_tls(config: &Config) -> Result<Option<Arc<crate::tls::Tls>>, AppError> {
    let Some(files) = config.tls_files() else {
        return Ok(None);
    };
    let tls = crate::tls::Tls::load(files, config.tls_handshakes()).map_err(AppError::Tls)?;
    tracing::info!(cert = %config.tls_cert.display(), client_certificates = tls_client_auth(config), "TLS on");
    Ok(Some(Arc::new(tls)))
}

fn tls_client_auth(config: &Config) -> &'static str {
    if config.tls_ca.as_os_str().is_empty() {
        "not asked"
    } else {
        "required"
    }
}

/// Binds the admin listener when `admin_listen` is set and serves it until shutdown.
async fn start_admin(
    config: &Config,
    ctx: &Arc<Ctx>,
    shutdown: &CancellationToken,
) -> Result<Option<SocketAddr>, AppError> {
    let Some(addr) = config.admin_addr() else {
        return Ok(None);
    };
    let (listener, addr) = bind(addr).await?;
    tokio::spawn(crate::admin::serve(listener, ctx.clone(), shutdown.clone()));
    tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
    Ok(Some(addr))
}

/// Builds the rooms around the store: near tier, flush epoch, the commands' context and
/// the culler, which hears of the commands' writes.
async fn wire(
    config: &Config,
    addr: SocketAddr,
    store: Arc<dyn Store>,
    clock: Clock,
) -> Result<(Arc<Ctx>, Arc<Culler>), AppError> {
    let stats = Arc::new(Stats::with_s3(store.request_counts()));
    let window = match config.revalidate_after_ms {
        // Only this process writes the store (the directory store, or a replica configured
        // alone): what the tier holds is never stale (strict mode, 0, still asks every time).
        ms if ms > 0 && (store.info().exclusive || config.alone()) => crate::tier::AUTHORITATIVE,
        ms => Duration::from_millis(ms),
    };
    let longest = config.peer_settings(window).map_or(window, |p| p.long);
    let tier = TierConfig {
        ram_bytes: config.ram_cache_bytes,
        revalidate_after: window,
        longest,
        stream_above: config.stream_above_bytes,
    };
    let mut tiered = Tiered::new(store, tier, stats.clone());
    stats
        .tier_window_ms
        .store(window.as_millis().try_into().unwrap_or(u64::MAX), Relaxed);
    if let Some(disk) = config.disk_tier() {
        let opened = DiskTier::open(&disk).await.map_err(AppError::DiskTier)?;
        tracing::info!(dir = %disk.dir.display(), bytes = disk.bytes, "disk tier on");
        tiered = tiered.with_disk(opened);
    }
    let store = Arc::new(tiered);
    let flush = Arc::new(
        Flush::load(store.clone(), window)
            .await
            .map_err(AppError::Store)?,
    );
    let hint = Arc::new(WriteHint::new(config.max_entries));
    let settings = Settings {
        // Appends hold the value whole: a longer one would be streamed.
        max_item_bytes: config.whole_value_bytes(),
        flush_enabled: config.flush_enabled,
        miss_on_backend_error: config.miss_on_backend_error,
        shutdown_enabled: config.shutdown_enabled,
        settings_rows: settings_rows(config, addr),
    };
    let ctx = Arc::new(Ctx::new(
        store.clone(),
        flush.clone(),
        stats.clone(),
        clock,
        settings,
        hint.clone(),
    ));
    let culler_config = CullerConfig {
        max_entries: config.max_entries,
        cull_frequency: config.cull_frequency,
        max_bytes: config.max_bytes,
        interval: Duration::from_secs(config.cull_interval_secs),
    };
    let culler = Culler::new(store, flush, stats, clock, culler_config, hint);
    Ok((ctx, Arc::new(culler)))
}

/// The rows of `stats settings`: first memcached's names that mean something here, in
/// memcached's order and words (clients and tools read them), then every option. The report
/// fills in those that commands change (`maxbytes`, `verbosity`, `detail_enabled`,
/// `lru_crawler`, `ram_cache_bytes`).
fn settings_rows(config: &Config, addr: SocketAddr) -> Vec<(String, String)> {
    let yes = |on: bool| if on { "yes" } else { "no" }.to_owned();
    let memcached = [
        ("maxbytes", config.ram_cache_bytes.to_string()),
        ("maxconns", config.max_connections.to_string()),
        ("tcpport", addr.port().to_string()),
        ("udpport", "0".into()),
        ("inter", addr.ip().to_string()),
        ("verbosity", "0".into()),
        ("evictions", "on".into()),
        ("domain_socket", "NULL".into()),
        ("shutdown_command", yes(config.shutdown_enabled)),
        ("stat_key_prefix", ":".into()),
        ("detail_enabled", yes(false)),
        ("cas_enabled", yes(true)),
        ("binding_protocol", "auto-negotiate".into()),
        (
            "auth_enabled_sasl",
            yes(!config.sasl_users_file.as_os_str().is_empty()),
        ),
        ("auth_enabled_ascii", yes(config.text_auth)),
        ("item_size_max", config.max_item_size.to_string()),
        ("maxconns_fast", yes(true)),
        ("lru_crawler", yes(false)),
        ("flush_enabled", yes(config.flush_enabled)),
        ("dump_enabled", yes(true)),
        ("idle_timeout", config.idle_timeout_secs.to_string()),
        ("ssl_enabled", yes(config.tls_files().is_some())),
    ];
    let mut rows: Vec<(String, String)> = memcached
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    // An option named as memcached names a setting (`flush_enabled`) shows once, in
    // memcached's words.
    let options: Vec<_> = (config.rows().into_iter())
        .filter(|(name, _)| !rows.iter().any(|(m, _)| m == name))
        .collect();
    rows.extend(options);
    rows
}

/// How often the disk tier's size is measured for `stats` (`tier_disk_bytes`).
const DISK_TIER_WATCH_MS: u64 = 1000;

/// Keeps the disk tier's size gauge current until shutdown.
async fn watch_disk_tier(tier: Arc<Tiered>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_millis(DISK_TIER_WATCH_MS));
    loop {
        tokio::select! {
            _ = every.tick() => {
                let tier = tier.clone();
                let _ = tokio::task::spawn_blocking(move || tier.refresh_disk_bytes()).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Runs the culler under supervision until shutdown.
fn spawn_culler(
    culler: Arc<Culler>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(supervise(
        "culler",
        {
            let shutdown = shutdown.clone();
            move || culler.clone().run(shutdown.clone())
        },
        move || Stats::incr(&stats.culler_restarts),
        Duration::from_millis(RESTART_PAUSE_MS),
        shutdown,
    ))
}

impl App {
    /// Stops accepting, lets connections finish their commands (up to `drain`), stops the culler.
    pub async fn shutdown(self, drain: Duration) {
        self.shutdown.cancel();
        let _ = self.culler_task.await;
        if let Ok(connections) = self.server.await {
            if tokio::time::timeout(drain, connections.wait())
                .await
                .is_err()
            {
                tracing::warn!("connections still open at the shutdown deadline");
            }
        }
        // What the disk tier has queued is written out, so the next start is warm.
        self.ctx.store.close().await;
    }
}

/// Runs the task `start` makes until it returns or `shutdown` fires; when it panics, logs
/// the panic, calls `restarted` and starts a new one after `pause`.
pub async fn supervise<F, Fut>(
    name: &'static str,
    mut start: F,
    restarted: impl Fn(),
    pause: Duration,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let err = match tokio::spawn(start()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => e.into_panic(),
            Err(_) => return,
        };
        let cause = err
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| err.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(task = name, %cause, "background task panicked; restarting it");
        restarted();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Runs until SIGINT, SIGTERM or an enabled `shutdown` command, then drains.
pub async fn run_until_signal(config: Config) -> Result<(), AppError> {
    let app = start(config).await?;
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = app.ctx.stop.cancelled() => {}
    }
    tracing::info!("shutting down");
    app.shutdown(Duration::from_secs(SHUTDOWN_DRAIN_SECS)).await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    #[test]
    fn the_sdk_modules_that_log_credentials_are_held_at_info_unless_named() {
        assert_eq!(
            log_filter("trace"),
            "trace,aws_sigv4=info,aws_smithy_runtime=info"
        );
        assert_eq!(
            log_filter("info,aws_sigv4=debug"),
            "info,aws_sigv4=debug,aws_smithy_runtime=info"
        );
    }

    /// The open-file limit is raised as far as the hard limit allows towards what the
    /// connections and the kept-open files need, and the budget fits under it.
    #[test]
    fn the_open_file_limit_makes_room_for_connections_and_kept_files() {
        use rustix::process::{getrlimit, Resource};
        let connections = 100;
        let budget = open_files_budget(connections);
        let limit = getrlimit(Resource::Nofile);
        let current = limit.current.unwrap_or(u64::MAX);
        assert!(budget <= DEFAULT_OPEN_FILES);
        assert!(budget as u64 + connections as u64 + SPARE_FILES <= current);
        let wanted = connections as u64 + SPARE_FILES + DEFAULT_OPEN_FILES as u64;
        assert!(current >= limit.maximum.unwrap_or(u64::MAX).min(wanted));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_counted() {
        let starts = Arc::new(AtomicU64::new(0));
        let restarts = Arc::new(AtomicU64::new(0));
        let make = {
            let starts = starts.clone();
            move || {
                let n = starts.fetch_add(1, Relaxed);
                async move {
                    if n < 2 {
                        panic!("culler bug {n}");
                    }
                }
            }
        };
        let counted = {
            let restarts = restarts.clone();
            move || {
                restarts.fetch_add(1, Relaxed);
            }
        };
        let pause = Duration::from_secs(1);
        let begun = tokio::time::Instant::now();
        supervise("test", make, counted, pause, CancellationToken::new()).await;
        assert_eq!(starts.load(Relaxed), 3);
        assert_eq!(restarts.load(Relaxed), 2);
        assert!(begun.elapsed() >= 2 * pause, "restarts wait their pause");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_supervision_during_the_pause() {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let make = move || {
            stop.cancel();
            async { panic!("always") }
        };
        let restarts = Arc::new(AtomicU64::new(0));
        let counted = {
            let restarts = restarts.clone();
            move || {
                restarts.fetch_add(1, Relaxed);
            }
        };
        let hour = Duration::from_secs(3600);
        let begun = tokio::time::Instant::now();
        supervise("test", make, counted, hour, shutdown).await;
        assert_eq!(restarts.load(Relaxed), 1);
        assert!(begun.elapsed() < hour);
    }
}
