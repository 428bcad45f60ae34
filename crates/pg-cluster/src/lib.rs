//! A private PostgreSQL cluster launcher.
//!
//! [`LocalCluster`] runs a PostgreSQL server from the locally installed server
//! binaries (`initdb` and `postgres`), either in a throw-away temporary
//! directory ([`LocalCluster::start_temporary`], used by the test harness) or
//! in a persistent data directory ([`LocalCluster::open_or_init`], used by the
//! service's embedded mode).
//!
//! By default the server listens on `127.0.0.1` (on a free port unless one is
//! requested) and on a Unix socket in a directory private to the cluster, and
//! trusts every local connection: any local user can connect as superuser.
//! That suits the test harness. With [`ClusterOptions::socket_only`] (the
//! service's embedded mode) it listens on no TCP address at all, only on the
//! Unix socket in a `0700` directory owned by the server's account, and
//! `pg_hba.conf` admits only that account (and the user running this
//! process, e.g. root) through peer authentication; see
//! [`ClusterOptions::socket_only`].
//!
//! By default the server runs with durability turned off (`fsync=off`,
//! `synchronous_commit=off`, `full_page_writes=off`), as suits tests;
//! [`ClusterOptions::durable`] keeps PostgreSQL's own durable defaults, for
//! data that must survive a power cut (the service's embedded mode).
//!
//! # Lifetime
//!
//! The server never outlives the process that started it:
//!
//! * dropping the [`LocalCluster`] stops it (fast shutdown);
//! * if the process dies without running destructors (it is killed, it
//!   aborts, a `static` cluster is never dropped), the kernel sends the
//!   server `SIGINT` — a fast shutdown — through `PR_SET_PDEATHSIG`. The
//!   server is spawned from a dedicated helper thread that lives as long as
//!   the process, because the parent-death signal fires when the *thread*
//!   that forked the child exits.
//!
//! Temporary directories are named `db-pool-cluster-*` and record the pid of
//! the process that owns them; directories left behind by dead processes are
//! removed the next time a temporary cluster starts.
//!
//! # Root
//!
//! PostgreSQL refuses to run as root. When the current process is root, the
//! server binaries are run as the `postgres` system account (created by
//! Debian's `postgresql` package) and the directories they need are handed
//! over to it.

#![warn(missing_docs)]

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{chown, DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tempfile::TempDir;

/// The TCP address a cluster listens on (unless socket-only).
const HOST: &str = "127.0.0.1";
/// The port of a socket-only cluster: it only names the socket file
/// (`.s.PGSQL.5432`), in a private directory, so it cannot collide; libpq's
/// default, so `psql -h <socket dir>` needs no `-p`.
const SOCKET_ONLY_PORT: u16 = 5432;
/// The `pg_ident.conf` map of a socket-only cluster.
const PEER_MAP: &str = "local_cluster";
/// The superuser created by `initdb`.
const SUPERUSER: &str = "postgres";
/// The system account the server runs as when the current process is root.
const SERVER_ACCOUNT: &str = "postgres";
/// Name prefix of temporary cluster directories.
const CLUSTER_DIR_PREFIX: &str = "db-pool-cluster-";
/// Name prefix of temporary socket directories (used when the cluster's own
/// socket directory path would be too long for a Unix socket).
const SOCKET_DIR_PREFIX: &str = "db-pool-sock-";
/// File in a temporary directory recording the process that owns it.
const OWNER_FILE: &str = "owner.pid";
/// Server log file name, in the cluster's base directory.
const LOG_FILE: &str = "postgres.log";
/// Subdirectory of the base directory holding the PostgreSQL data directory.
const PGDATA_DIR: &str = "pgdata";
/// Subdirectory of the base directory holding the Unix socket.
const SOCKET_DIR: &str = "sock";
/// Longest socket directory path we use: `sun_path` holds 107 bytes plus the
/// NUL, and PostgreSQL appends `/.s.PGSQL.<port>` (up to 15 bytes).
const MAX_SOCKET_DIR_LEN: usize = 90;
/// Default `max_connections` (PostgreSQL's own default is 100).
const DEFAULT_MAX_CONNECTIONS: &str = "200";
/// Default deadline for the server to accept connections after a start.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits after `SIGINT` (fast shutdown) before escalating.
const FAST_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `Drop` waits after `SIGINT` before escalating.
const DROP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait after `SIGQUIT` (immediate shutdown) before `SIGKILL`.
const IMMEDIATE_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// Number of lines [`LocalCluster::log_tail`] returns.
const LOG_TAIL_LINES: usize = 40;
/// The server log is truncated at start when it grows beyond this size.
const MAX_LOG_SIZE: u64 = 16 * 1024 * 1024;
/// Attempts to start a server on a freshly picked port when the previous one
/// was taken in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// Characters escaped in a database name placed in a URL path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// Errors starting, stopping or preparing a [`LocalCluster`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// `initdb` and `postgres` were found neither on `PATH` nor under
    /// `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found (searched {searched}); \
         install Debian's `postgresql` package (`apt-get install postgresql`) \
         or set DATABASE_URL to use an existing server"
    )]
    BinariesNotFound {
        /// The directories that were searched.
        searched: String,
    },
    /// The process runs as root but there is no `postgres` account to run the
    /// server as.
    #[error(
        "running as root, but there is no `postgres` system account to run the server as \
         (PostgreSQL refuses to run as root); install Debian's `postgresql` package \
         (`apt-get install postgresql`, which creates it), create the account \
         (`useradd --system --user-group postgres`), run as a non-root user, \
         or set DATABASE_URL to use an existing server"
    )]
    NoPostgresUser,
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `initdb` failed.
    #[error(
        "`initdb` failed to create a PostgreSQL data directory in {} ({status}); \
         remove the directory if it is a leftover, then retry. Its output:\n{output}",
        data_dir.display()
    )]
    InitdbFailed {
        /// The data directory being initialised.
        data_dir: PathBuf,
        /// How `initdb` exited.
        status: String,
        /// What `initdb` printed.
        output: String,
    },
    /// The server exited or did not accept connections in time.
    #[error(
        "the PostgreSQL server for {} did not start: {reason}. \
         Server log {} ends with:\n{log_tail}",
        data_dir.display(),
        log.display()
    )]
    StartFailed {
        /// The data directory.
        data_dir: PathBuf,
        /// What went wrong.
        reason: String,
        /// The server log file.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// Another server is already running on the data directory.
    #[error(
        "a PostgreSQL server (pid {pid}) is already running on {}; \
         stop it first or use another data directory",
        data_dir.display()
    )]
    AlreadyRunning {
        /// The running server's process id.
        pid: i32,
        /// The data directory.
        data_dir: PathBuf,
        /// Its port (from its `postmaster.pid`), if known: the TCP port, and
        /// the number in its socket's name.
        port: Option<u16>,
        /// Its Unix socket directory (from its `postmaster.pid`), if any.
        socket_dir: Option<PathBuf>,
    },
    /// A socket-only cluster's directory belongs to another account.
    #[error(
        "{} belongs to the account with uid {owner}, not to this user (uid {user}){}: \
         a private PostgreSQL cluster can only be used by the account that created it; \
         run as that account or use another data directory",
        path.display(),
        server.as_ref().map(|s| format!(" nor to the `{s}` account that runs the server")).unwrap_or_default()
    )]
    ForeignOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        user: u32,
        /// The account the server runs as, when not this user.
        server: Option<String>,
    },
    /// The server account cannot reach the data directory.
    #[error(
        "the `{user}` system account, which runs the server because this process is root, \
         cannot enter {}; choose a data directory it can reach (for example under /var/lib \
         or /tmp), or make that directory traversable (`chmod o+x`)",
        path.display()
    )]
    Inaccessible {
        /// The directory that cannot be entered.
        path: PathBuf,
        /// The account the server runs as.
        user: String,
    },
    /// The operation needs a running server.
    #[error("the PostgreSQL server for {} is not running; call start() first", data_dir.display())]
    NotRunning {
        /// The data directory.
        data_dir: PathBuf,
    },
}

impl ClusterError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Wraps an [`io::Error`] with a description of what was being done.
trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, ClusterError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, ClusterError> {
        self.map_err(|source| ClusterError::io(what(), source))
    }
}

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Server settings, passed as `-c name=value`. They win over the
    /// launcher's defaults (`max_connections=200`, `fsync=off`, ...).
    pub settings: Vec<(String, String)>,
    /// The TCP port to listen on; `None` picks a free one.
    pub port: Option<u16>,
    /// The directory holding `initdb` and `postgres`; `None` searches `PATH`
    /// and `/usr/lib/postgresql/*/bin` (see [`find_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the server to accept connections after a start
    /// (crash recovery of a persistent cluster counts against it).
    pub start_timeout: Duration,
    /// Lock the server down to its own account; see
    /// [`socket_only`](Self::socket_only).
    pub socket_only: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            settings: Vec::new(),
            port: None,
            bin_dir: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            socket_only: false,
        }
    }
}

impl ClusterOptions {
    /// Default options: a free port, the launcher's default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a server setting, e.g. `.setting("max_connections", "20")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        set_in(&mut self.settings, name.into(), value.into());
        self
    }

    /// Listens on this TCP port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Uses the server binaries in this directory.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Waits this long for the server to accept connections after a start.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Keeps PostgreSQL's durable defaults (`fsync`, `synchronous_commit`
    /// and `full_page_writes` on) instead of the test launcher's fast,
    /// non-durable ones: a power loss must not corrupt the data directory.
    pub fn durable(self) -> Self {
        self.setting("fsync", "on")
            .setting("synchronous_commit", "on")
            .setting("full_page_writes", "on")
    }

    /// Makes the server reachable only by the account it runs as and by the
    /// user running this process (the same account, or root), for a
    /// database other local users must not touch:
    ///
    /// * no TCP at all (`listen_addresses` empty): only a Unix socket, with
    ///   permissions `0700`, in a `0700` directory owned by the server's
    ///   account (the port, 5432 unless one is given, only names the socket
    ///   file);
    /// * `pg_hba.conf` and `pg_ident.conf` are rewritten at every start: peer
    ///   authentication over the socket, mapping only those two operating
    ///   system users to the superuser, and every TCP connection rejected
    ///   (this also upgrades a directory a default cluster created);
    /// * the cluster's base directory is `0700` and handed to the server's
    ///   account; one owned by any other account is refused
    ///   ([`ClusterError::ForeignOwner`]).
    ///
    /// These settings win over [`setting`](Self::setting). Connect with
    /// [`LocalCluster::url`] (a socket URL) or [`socket_url`].
    pub fn socket_only(mut self) -> Self {
        self.socket_only = true;
        self
    }
}

/// `postgresql://postgres@localhost:<port>/<database>?host=<socket dir>`:
/// the URL of a cluster's superuser over its Unix socket, e.g. for a server
/// found running with [`ClusterError::AlreadyRunning`]. The `host=`
/// parameter (a directory) wins over the authority, whose `localhost` is
/// only there because a URL cannot carry a user and a port without a host.
pub fn socket_url(socket_dir: &Path, port: u16, database: &str) -> String {
    format!(
        "postgresql://{SUPERUSER}@localhost:{port}/{}?host={}",
        utf8_percent_encode(database, PATH_SEGMENT),
        utf8_percent_encode(&socket_dir.display().to_string(), NON_ALPHANUMERIC)
    )
}

fn set_in(settings: &mut Vec<(String, String)>, name: String, value: String) {
    match settings.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = value,
        None => settings.push((name, value)),
    }
}

/// The system account the server binaries run as when this process is root.
#[derive(Debug, Clone)]
struct Account {
    name: String,
    uid: Uid,
    gid: Gid,
}

/// `None` when the server can run as the current user, the `postgres`
/// account when the current user is root.
fn server_account() -> Result<Option<Account>, ClusterError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name(SERVER_ACCOUNT) {
        Ok(Some(user)) => Ok(Some(Account {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })),
        Ok(None) => Err(ClusterError::NoPostgresUser),
        Err(errno) => Err(ClusterError::io(
            format!("looking up the `{SERVER_ACCOUNT}` system account"),
            io::Error::from(errno),
        )),
    }
}

fn give_to(account: Option<&Account>, path: &Path) -> Result<(), ClusterError> {
    if let Some(account) = account {
        chown(path, Some(account.uid.as_raw()), Some(account.gid.as_raw())).context(|| {
            format!(
                "handing {} over to the `{}` account",
                path.display(),
                account.name
            )
        })?;
    }
    Ok(())
}

/// Creates `path` (mode 0700) unless it exists, and hands it to `account`.
/// An existing directory is set to 0700 too (an earlier version may have
/// created it otherwise).
fn private_dir(path: &Path, account: Option<&Account>) -> Result<(), ClusterError> {
    if !path.is_dir() {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .context(|| format!("creating directory {}", path.display()))?;
    }
    restrict(path)?;
    give_to(account, path)
}

/// Sets `path` to mode 0700 unless it is already.
fn restrict(path: &Path) -> Result<(), ClusterError> {
    let mode = fs::metadata(path)
        .context(|| format!("reading the permissions of {}", path.display()))?
        .mode();
    if mode & 0o777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .context(|| format!("setting the permissions of {} to 0700", path.display()))?;
    }
    Ok(())
}

/// Makes a socket-only cluster's base directory private: refuses one owned
/// by an account other than this user and the server's, then sets it to
/// 0700 and hands it to the server's account.
fn lock_down_base(base: &Path, account: Option<&Account>) -> Result<(), ClusterError> {
    let owner = fs::metadata(base)
        .context(|| format!("reading the owner of {}", base.display()))?
        .uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != me && account.map(|a| a.uid.as_raw()) != Some(owner) {
        return Err(ClusterError::ForeignOwner {
            path: base.to_path_buf(),
            owner,
            user: me,
            server: account.map(|a| a.name.clone()),
        });
    }
    private_dir(base, account)
}

/// The operating-system users a socket-only cluster admits (peer
/// authentication): the user running this process and, when that is root,
/// the account the server runs as.
fn peer_users(account: Option<&Account>) -> Result<Vec<String>, ClusterError> {
    let uid = nix::unistd::geteuid();
    let me = match User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        Ok(None) => {
            return Err(ClusterError::io(
                format!("looking up the name of the current user (uid {uid})"),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such user in the user database; PostgreSQL needs one",
                ),
            ))
        }
        Err(errno) => {
            return Err(ClusterError::io(
                format!("looking up the name of the current user (uid {uid})"),
                io::Error::from(errno),
            ))
        }
    };
    let mut users = vec![me];
    if let Some(account) = account {
        if !users.contains(&account.name) {
            users.push(account.name.clone());
        }
    }
    Ok(users)
}

/// `pg_hba.conf` of a socket-only cluster: peer authentication through the
/// socket, mapped by [`PEER_MAP`]; every TCP connection rejected (there is
/// no TCP listener either; this is a second lock).
fn socket_only_hba() -> String {
    format!(
        "# Written at every start by db-pool's LocalCluster (socket-only mode):\n\
         # only the operating-system users in pg_ident.conf, through the Unix\n\
         # socket; nothing over TCP. Edits are overwritten.\n\
         local all all peer map={PEER_MAP}\n\
         host all all all reject\n"
    )
}

/// `pg_ident.conf` of a socket-only cluster: each of `users` may log in as
/// the superuser.
fn socket_only_ident(users: &[String]) -> Result<String, ClusterError> {
    let mut out = String::from(
        "# Written at every start by db-pool's LocalCluster (socket-only mode).\n\
         # MAPNAME SYSTEM-USERNAME PG-USERNAME\n",
    );
    for user in users {
        // Quoted, so any user name is one token; a quote or control
        // character cannot be (and is not found in real user names).
        if user.chars().any(|c| c == '"' || c.is_control()) {
            return Err(ClusterError::io(
                "writing pg_ident.conf",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the user name {user:?} cannot be written to pg_ident.conf"),
                ),
            ));
        }
        out.push_str(&format!("{PEER_MAP} \"{user}\" {SUPERUSER}\n"));
    }
    Ok(out)
}

/// Writes the access files of a socket-only cluster into `pgdata`. Returns
/// whether `pg_hba.conf` changed (only for a directory created otherwise).
fn write_socket_only_access(
    pgdata: &Path,
    account: Option<&Account>,
) -> Result<bool, ClusterError> {
    let ident = socket_only_ident(&peer_users(account)?)?;
    write_private_file(
        &pgdata.join("pg_ident.conf"),
        ident.as_bytes(),
        0o600,
        account,
    )?;
    let hba_path = pgdata.join("pg_hba.conf");
    let hba = socket_only_hba();
    let changed = fs::read(&hba_path).ok().as_deref() != Some(hba.as_bytes());
    write_private_file(&hba_path, hba.as_bytes(), 0o600, account)?;
    Ok(changed)
}

/// Writes `path` with the given permission bits, owned by `account`.
fn write_private_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    account: Option<&Account>,
) -> Result<(), ClusterError> {
    fs::write(path, contents).context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("setting the permissions of {}", path.display()))?;
    give_to(account, path)
}

/// Checks that `account` can enter every directory from `/` down to `path`.
fn check_traversable(path: &Path, account: &Account) -> Result<(), ClusterError> {
    let mut current = PathBuf::new();
    for component in path.components() {
        current.push(component);
        let meta = fs::metadata(&current)
            .context(|| format!("reading the permissions of {}", current.display()))?;
        let mode = meta.mode();
        let allowed = if meta.uid() == account.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == account.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !allowed {
            return Err(ClusterError::Inaccessible {
                path: current,
                user: account.name.clone(),
            });
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

/// Parses a `/usr/lib/postgresql/<version>` directory name ("15", "9.6").
fn parse_version(name: &str) -> Option<(u32, u32)> {
    let mut parts = name.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        Some(minor) => minor.parse().ok()?,
        None => 0,
    };
    Some((major, minor))
}

/// Finds the directory holding the PostgreSQL server binaries (`initdb`,
/// `postgres`): the first `PATH` entry that has both, else the highest
/// version under `/usr/lib/postgresql/*/bin` (Debian's layout).
///
/// Symbolic links are resolved, so a `PATH` entry linking to a real
/// installation yields the installation's own `bin` directory.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let mut searched = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.as_os_str().is_empty() {
                continue;
            }
            if has_server_binaries(&dir) {
                return Ok(resolve_bin_dir(&dir));
            }
            searched.push(dir.display().to_string());
        }
    }
    let debian = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<((u32, u32), PathBuf)> = fs::read_dir(debian)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(resolve_bin_dir(&bin));
    }
    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    Err(ClusterError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

/// The real directory of `dir/initdb` when it also holds `postgres`, else `dir`.
fn resolve_bin_dir(dir: &Path) -> PathBuf {
    fs::canonicalize(dir.join("initdb"))
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
        .filter(|real| has_server_binaries(real))
        .unwrap_or_else(|| dir.to_path_buf())
}

fn pick_bin_dir(explicit: Option<&Path>) -> Result<PathBuf, ClusterError> {
    match explicit {
        Some(dir) if has_server_binaries(dir) => Ok(dir.to_path_buf()),
        Some(dir) => Err(ClusterError::BinariesNotFound {
            searched: dir.display().to_string(),
        }),
        None => find_bin_dir(),
    }
}

/// Picks a free TCP port on 127.0.0.1.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context(|| "picking a free TCP port on 127.0.0.1".to_owned())?;
    let port = listener
        .local_addr()
        .context(|| "picking a free TCP port on 127.0.0.1".to_owned())?
        .port();
    Ok(port)
}

// ---------------------------------------------------------------------------
// Spawning children that die with this process.

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The helper thread that forks every server process. It never exits, so the
/// parent-death signal of its children fires only when the process dies.
fn spawner() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("db-pool-cluster-spawner".to_owned())
                .spawn(move || {
                    // The sender lives in a static, so this loop never ends.
                    while let Ok(mut request) = rx.recv() {
                        let result = request.command.spawn();
                        let _ = request.reply.send(result);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("could not start the process spawner thread"))
}

/// Spawns `command` from the spawner thread, arranging for the child to get
/// `signal` when this process dies.
fn spawn_supervised(mut command: Command, signal: Signal) -> io::Result<Child> {
    let parent = nix::unistd::getpid();
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before `exec`, after the
    // uid/gid switch (which would clear the parent-death signal). It only
    // calls prctl(2) and getppid(2), which are async-signal-safe, and builds
    // its error from a raw errno without allocating.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (parent, signal);
    let (reply, response) = mpsc::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?
}

// ---------------------------------------------------------------------------
// Owned temporary directories and their cleanup.

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`).
fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a live (not zombie) process.
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        return !matches!(state, Some("Z" | "X"));
    }
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn owner_record() -> String {
    let pid = std::process::id();
    let start = i32::try_from(pid)
        .ok()
        .and_then(process_start_time)
        .unwrap_or(0);
    format!("{pid} {start}\n")
}

/// Whether the process recorded in `dir/owner.pid` is gone. `false` when
/// unsure.
fn owner_is_gone(dir: &Path) -> bool {
    let Ok(record) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut fields = record.split_whitespace();
    let Some(pid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    let start: u64 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if !process_alive(pid) {
        return true;
    }
    // Alive: gone only if the pid now belongs to another process.
    match process_start_time(pid) {
        Some(now) if start != 0 => now != start,
        _ => false,
    }
}

/// The pid recorded in a `postmaster.pid` lock file.
fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    postmaster_line(pgdata, 0)
}

/// Line `n` of a `postmaster.pid`, parsed (0: the pid, 3: the port, 4: the
/// first socket directory, 5: the first listen address).
fn postmaster_line<T: std::str::FromStr>(pgdata: &Path, n: usize) -> Option<T> {
    let contents = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    contents.lines().nth(n)?.trim().parse().ok()
}

/// Removes temporary directories left behind by dead processes. Best effort.
fn remove_stale_dirs() {
    let mut parents = vec![std::env::temp_dir()];
    let tmp = PathBuf::from("/tmp");
    if !parents.contains(&tmp) {
        parents.push(tmp);
    }
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with(CLUSTER_DIR_PREFIX) || name.starts_with(SOCKET_DIR_PREFIX)) {
                continue;
            }
            let dir = entry.path();
            if !owner_is_gone(&dir) {
                continue;
            }
            // The server of a dead owner gets SIGINT and may still be
            // shutting down.
            if postmaster_pid(&dir.join(PGDATA_DIR)).is_some_and(process_alive) {
                continue;
            }
            tracing::debug!(dir = %dir.display(), "removing stale PostgreSQL cluster directory");
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Creates a temporary directory named `<prefix>*` in `parent`, records this
/// process as its owner and hands it to `account`.
fn owned_temp_dir(
    parent: &Path,
    prefix: &str,
    account: Option<&Account>,
) -> Result<TempDir, ClusterError> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let owner = dir.path().join(OWNER_FILE);
    fs::write(&owner, owner_record()).context(|| format!("writing {}", owner.display()))?;
    give_to(account, dir.path())?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// The cluster.

/// A PostgreSQL server run by this process from the local server binaries.
///
/// The superuser is `postgres`. By default every local connection is
/// trusted, and the server listens on `127.0.0.1:<port>` and on a Unix
/// socket in [`socket_dir`](Self::socket_dir); with
/// [`ClusterOptions::socket_only`], only on that socket and only for its own
/// account. Dropping the cluster stops the server
/// (and removes the directory of a temporary cluster); see the
/// [module documentation](self) for what happens when the process dies.
#[derive(Debug)]
pub struct LocalCluster {
    bin_dir: PathBuf,
    base_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    start_timeout: Duration,
    socket_only: bool,
    account: Option<Account>,
    child: Option<Child>,
    /// Fields drop after `Drop::drop` has stopped the server, so the
    /// directories are removed only once the server is gone.
    _socket_temp: Option<TempDir>,
    temp: Option<TempDir>,
}

impl LocalCluster {
    /// Creates a cluster in a fresh temporary directory (`initdb` with trust
    /// authentication, superuser `postgres`, UTF8, locale C) and starts it.
    ///
    /// The directory is removed when the cluster is dropped.
    pub async fn start_temporary(opts: ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let bin_dir = pick_bin_dir(opts.bin_dir.as_deref())?;
        let account = server_account()?;
        remove_stale_dirs();
        let temp = owned_temp_dir(&std::env::temp_dir(), CLUSTER_DIR_PREFIX, account.as_ref())?;
        let base_dir = temp.path().to_path_buf();
        if let Some(account) = &account {
            check_traversable(&base_dir, account)?;
        }
        let pgdata = base_dir.join(PGDATA_DIR);
        private_dir(&pgdata, account.as_ref())?;
        run_initdb(&bin_dir, &pgdata, &base_dir, account.as_ref()).await?;
        if opts.socket_only {
            write_socket_only_access(&pgdata, account.as_ref())?;
        }
        let (socket_dir, socket_temp) = socket_dir_for(&base_dir, true, account.as_ref())?;
        let mut cluster = LocalCluster {
            bin_dir,
            log_path: base_dir.join(LOG_FILE),
            base_dir,
            pgdata,
            socket_dir,
            port: 0,
            settings: opts.settings,
            start_timeout: opts.start_timeout,
            socket_only: opts.socket_only,
            account,
            child: None,
            _socket_temp: socket_temp,
            temp: Some(temp),
        };
        cluster.first_start(opts.port).await?;
        Ok(cluster)
    }

    /// Opens the persistent cluster in `data_dir`, creating it first if
    /// needed, and starts it.
    ///
    /// The PostgreSQL data directory is `data_dir/pgdata` (so other files can
    /// live beside it), or `data_dir` itself when it already is one (has a
    /// `PG_VERSION` file). `initdb` runs only when there is no `PG_VERSION`
    /// yet. The server log is `data_dir/postgres.log`. A `postmaster.pid` left
    /// by a crashed run does not prevent the start; a server still running on
    /// the directory does ([`ClusterError::AlreadyRunning`]).
    ///
    /// With [`ClusterOptions::socket_only`], `data_dir` is made private first
    /// (see there), and a data directory a default cluster created is locked
    /// down at this start.
    ///
    /// Dropping the cluster stops the server and keeps the files.
    pub async fn open_or_init(
        data_dir: &Path,
        opts: ClusterOptions,
    ) -> Result<LocalCluster, ClusterError> {
        let bin_dir = pick_bin_dir(opts.bin_dir.as_deref())?;
        let account = server_account()?;
        fs::create_dir_all(data_dir)
            .context(|| format!("creating data directory {}", data_dir.display()))?;
        let base_dir = fs::canonicalize(data_dir)
            .context(|| format!("resolving data directory {}", data_dir.display()))?;
        if opts.socket_only {
            lock_down_base(&base_dir, account.as_ref())?;
        }
        if let Some(account) = &account {
            check_traversable(&base_dir, account)?;
        }
        let is_pgdata = base_dir.join("PG_VERSION").is_file();
        let pgdata = if is_pgdata {
            base_dir.clone()
        } else {
            base_dir.join(PGDATA_DIR)
        };
        if !pgdata.join("PG_VERSION").is_file() {
            private_dir(&pgdata, account.as_ref())?;
            run_initdb(&bin_dir, &pgdata, &base_dir, account.as_ref()).await?;
            if opts.socket_only {
                write_socket_only_access(&pgdata, account.as_ref())?;
            }
        }
        remove_stale_dirs();
        let (socket_dir, socket_temp) = socket_dir_for(&base_dir, !is_pgdata, account.as_ref())?;
        let mut cluster = LocalCluster {
            bin_dir,
            log_path: base_dir.join(LOG_FILE),
            base_dir,
            pgdata,
            socket_dir,
            port: 0,
            settings: opts.settings,
            start_timeout: opts.start_timeout,
            socket_only: opts.socket_only,
            account,
            child: None,
            _socket_temp: socket_temp,
            temp: None,
        };
        cluster.first_start(opts.port).await?;
        Ok(cluster)
    }

    /// The TCP port the server listens on (socket-only: the number in its
    /// socket's name, `.s.PGSQL.<port>`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP address the server listens on: `127.0.0.1`, or `None` for a
    /// socket-only cluster.
    pub fn host(&self) -> Option<&str> {
        (!self.socket_only).then_some(HOST)
    }

    /// Whether the server listens only on its Unix socket, for its own
    /// account ([`ClusterOptions::socket_only`]).
    pub fn is_socket_only(&self) -> bool {
        self.socket_only
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`);
    /// usable as a libpq `host`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// `postgresql://postgres@127.0.0.1:<port>/<database>`; for a
    /// socket-only cluster, the [`socket_url`]
    /// `postgresql://postgres@localhost:<port>/<database>?host=<socket dir>`.
    pub fn url(&self, database: &str) -> String {
        if self.socket_only {
            return socket_url(&self.socket_dir, self.port, database);
        }
        format!(
            "postgresql://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            utf8_percent_encode(database, PATH_SEGMENT)
        )
    }

    /// The PostgreSQL data directory (`PGDATA`: `postgresql.conf`,
    /// `pg_hba.conf`, ...).
    pub fn data_dir(&self) -> &Path {
        &self.pgdata
    }

    /// The cluster's base directory: the temporary directory, or the
    /// directory given to [`open_or_init`](Self::open_or_init). It holds the
    /// data directory and the server log.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Whether this is a temporary cluster, removed when dropped.
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }

    /// The directory holding the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log file (the server's stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path, 0, LOG_TAIL_LINES)
    }

    /// The settings passed at each start, after the launcher's defaults.
    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// Adds or replaces a server setting. It takes effect at the next
    /// [`start`](Self::start) / [`restart`](Self::restart); settings given on
    /// the command line are not changed by [`reload`](Self::reload).
    pub fn set_setting(&mut self, name: impl Into<String>, value: impl Into<String>) {
        set_in(&mut self.settings, name.into(), value.into());
    }

    /// Removes a setting added with [`set_setting`](Self::set_setting) or
    /// [`ClusterOptions::setting`]; takes effect at the next start.
    pub fn remove_setting(&mut self, name: &str) {
        self.settings.retain(|(n, _)| n != name);
    }

    /// The postmaster's process id, if the server was started and has not
    /// been seen to exit.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Writes a file into the data directory (e.g. `server.crt`,
    /// `server.key`, `pg_hba.conf`) with the given permission bits, owned by
    /// the account the server runs as. Returns its path.
    pub fn write_data_file(
        &self,
        relative: impl AsRef<Path>,
        contents: impl AsRef<[u8]>,
        mode: u32,
    ) -> Result<PathBuf, ClusterError> {
        let path = self.pgdata.join(relative);
        write_private_file(&path, contents.as_ref(), mode, self.account.as_ref())?;
        Ok(path)
    }

    /// Stops the server with a fast shutdown (`SIGINT`: sessions are
    /// disconnected, a checkpoint is written) and waits until it has exited
    /// and the port no longer accepts connections. Escalates to an immediate
    /// shutdown and then `SIGKILL` if the server does not exit in time. Does
    /// nothing when the server is not running.
    pub async fn stop(&mut self) -> Result<(), ClusterError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let steps = [
            (Signal::SIGINT, FAST_SHUTDOWN_TIMEOUT),
            (Signal::SIGQUIT, IMMEDIATE_SHUTDOWN_TIMEOUT),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ];
        let mut exited = false;
        for (signal, timeout) in steps {
            send_signal(&mut child, signal);
            let deadline = Instant::now() + timeout;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => {
                        exited = true;
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(None) => break,
                    Err(source) => {
                        return Err(ClusterError::io(
                            format!(
                                "waiting for the server of {} to exit",
                                self.pgdata.display()
                            ),
                            source,
                        ))
                    }
                }
            }
            if exited {
                break;
            }
            tracing::warn!(
                data_dir = %self.pgdata.display(),
                signal = %signal,
                "PostgreSQL server did not exit in time; escalating"
            );
        }
        if !exited {
            self.child = Some(child);
            return Err(ClusterError::io(
                format!("stopping the server of {}", self.pgdata.display()),
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server did not exit after SIGKILL",
                ),
            ));
        }
        if self.socket_only {
            // No TCP port to wait for (and the port number may be another
            // server's); the socket closed with the process.
            return Ok(());
        }
        // The postmaster closes its listening socket on exit; wait (briefly)
        // until the port really refuses connections.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        Ok(())
    }

    /// Starts the server again (same data directory, port and settings) and
    /// waits until it accepts connections. Does nothing when it is running.
    pub async fn start(&mut self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        self.child = None;
        self.start_once().await.map_err(StartError::into_inner)
    }

    /// Stops and starts the server (applying changed settings).
    pub async fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop().await?;
        self.start().await
    }

    /// Makes the server re-read its configuration files (`SIGHUP`), e.g.
    /// after changing `pg_hba.conf` with
    /// [`write_data_file`](Self::write_data_file) or running `ALTER SYSTEM`.
    /// Settings passed on the command line are not affected.
    pub async fn reload(&mut self) -> Result<(), ClusterError> {
        if !self.is_running() {
            return Err(ClusterError::NotRunning {
                data_dir: self.pgdata.clone(),
            });
        }
        if let Some(child) = &mut self.child {
            send_signal(child, Signal::SIGHUP);
        }
        Ok(())
    }

    /// First start after creation: picks a port and retries on another free
    /// port if the picked one was taken in the meantime.
    async fn first_start(&mut self, port: Option<u16>) -> Result<(), ClusterError> {
        let port = match port {
            None if self.socket_only => Some(SOCKET_ONLY_PORT),
            port => port,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = match port {
                Some(port) => port,
                None => free_port()?,
            };
            match self.start_once().await {
                Ok(()) => return Ok(()),
                Err(StartError::PortTaken(error)) if port.is_none() && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(%error, "port taken, retrying on another one");
                }
                Err(StartError::PortTaken(error) | StartError::Other(error)) => return Err(error),
            }
        }
    }

    /// Spawns the postmaster and waits until it accepts connections.
    async fn start_once(&mut self) -> Result<(), StartError> {
        self.clear_stale_lock_file()?;
        // At every start, so a directory a default cluster created (or an
        // edited file) is locked down; not before a server found running
        // on it has been refused.
        if self.socket_only && write_socket_only_access(&self.pgdata, self.account.as_ref())? {
            tracing::info!(
                data_dir = %self.pgdata.display(),
                "locked down a PostgreSQL data directory that trusted local connections: \
                 now only its Unix socket (no TCP), only for its own account"
            );
        }
        let log_offset = self.prepare_log()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context(|| format!("opening server log {}", self.log_path.display()))?;
        let log_out = log
            .try_clone()
            .context(|| format!("opening server log {}", self.log_path.display()))?;

        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&self.pgdata)
            .args(self.server_args())
            .current_dir(&self.base_dir)
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log));
        if let Some(account) = &self.account {
            command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        let child = spawn_supervised(command, Signal::SIGINT)
            .context(|| format!("running {}", self.bin_dir.join("postgres").display()))?;
        tracing::debug!(
            pid = child.id(),
            port = self.port,
            data_dir = %self.pgdata.display(),
            "started PostgreSQL server"
        );
        self.child = Some(child);
        self.wait_ready(log_offset).await
    }

    fn server_args(&self) -> Vec<OsString> {
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), HOST.into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.socket_dir.display().to_string(),
            ),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("max_connections".into(), DEFAULT_MAX_CONNECTIONS.into()),
            ("logging_collector".into(), "off".into()),
        ];
        for (name, value) in &self.settings {
            set_in(&mut settings, name.clone(), value.clone());
        }
        if self.socket_only {
            // After the caller's settings: these cannot be overridden.
            for (name, value) in [
                ("listen_addresses", String::new()),
                (
                    "unix_socket_directories",
                    self.socket_dir.display().to_string(),
                ),
                ("unix_socket_permissions", "0700".to_owned()),
            ] {
                set_in(&mut settings, name.to_owned(), value);
            }
        }
        settings
            .into_iter()
            .flat_map(|(name, value)| {
                [
                    OsString::from("-c"),
                    OsString::from(format!("{name}={value}")),
                ]
            })
            .collect()
    }

    /// Removes a `postmaster.pid` whose process is gone (or is not a server
    /// for this data directory); refuses when a server runs on it.
    fn clear_stale_lock_file(&self) -> Result<(), ClusterError> {
        let lock = self.pgdata.join("postmaster.pid");
        if !lock.exists() {
            return Ok(());
        }
        let stale = match postmaster_pid(&self.pgdata) {
            None => true,
            Some(pid) if !process_alive(pid) => true,
            Some(pid) => match fs::read(format!("/proc/{pid}/cmdline")) {
                Ok(cmdline) => {
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    let data_dir = self.pgdata.display().to_string();
                    if cmdline.split('\0').any(|arg| arg == data_dir) {
                        return Err(ClusterError::AlreadyRunning {
                            pid,
                            data_dir: self.pgdata.clone(),
                            port: postmaster_line(&self.pgdata, 3),
                            socket_dir: postmaster_line::<PathBuf>(&self.pgdata, 4)
                                .filter(|dir| dir.is_absolute()),
                        });
                    }
                    // The pid was reused by an unrelated process.
                    true
                }
                // Unsure: let the server decide.
                Err(_) => false,
            },
        };
        if stale {
            tracing::info!(lock = %lock.display(), "removing stale postmaster.pid");
            fs::remove_file(&lock).context(|| format!("removing stale {}", lock.display()))?;
        }
        Ok(())
    }

    /// Truncates an oversized log; returns the log's current length.
    fn prepare_log(&self) -> Result<u64, ClusterError> {
        let len = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        if len > MAX_LOG_SIZE {
            File::create(&self.log_path)
                .context(|| format!("truncating server log {}", self.log_path.display()))?;
            return Ok(0);
        }
        Ok(len)
    }

    async fn wait_ready(&mut self, log_offset: u64) -> Result<(), StartError> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let status = match &mut self.child {
                Some(child) => child.try_wait().context(|| {
                    format!(
                        "waiting for the server of {} to start",
                        self.pgdata.display()
                    )
                })?,
                None => None,
            };
            if let Some(status) = status {
                self.child = None;
                return Err(self.exited_error(status, log_offset));
            }
            if self.accepts_connections().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let error = self.start_failed(format!(
                    "it did not accept connections within {:?}",
                    self.start_timeout
                ));
                // Do not leave a half-started server behind.
                let _ = self.stop().await;
                return Err(StartError::Other(error));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn exited_error(&self, status: ExitStatus, log_offset: u64) -> StartError {
        let error = self.start_failed(format!("the server exited ({status})"));
        let new_log = tail_of(&self.log_path, log_offset, usize::MAX);
        if new_log.contains("Address already in use") {
            StartError::PortTaken(error)
        } else {
            StartError::Other(error)
        }
    }

    fn start_failed(&self, reason: String) -> ClusterError {
        ClusterError::StartFailed {
            data_dir: self.pgdata.clone(),
            reason,
            log: self.log_path.clone(),
            log_tail: self.log_tail(),
        }
    }

    /// Whether a session can be opened, through the cluster's own Unix socket
    /// (so another server that took the port cannot answer for this one).
    async fn accepts_connections(&self) -> bool {
        let mut config = tokio_postgres::Config::new();
        let socket_overridden = !self.socket_only
            && self
                .settings
                .iter()
                .any(|(name, _)| name == "unix_socket_directories");
        if socket_overridden {
            config.host(HOST);
        } else {
            config.host_path(&self.socket_dir);
        }
        config
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        matches!(
            tokio::time::timeout(
                Duration::from_secs(3),
                config.connect(tokio_postgres::NoTls)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Synchronous stop for `Drop`: never blocks on a runtime.
    fn stop_blocking(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let steps = [
            (Signal::SIGINT, DROP_SHUTDOWN_TIMEOUT),
            (Signal::SIGQUIT, IMMEDIATE_SHUTDOWN_TIMEOUT),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ];
        for (signal, timeout) in steps {
            send_signal(&mut child, signal);
            let deadline = Instant::now() + timeout;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(None) => break,
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Internal start outcome: whether a retry on another port may help.
enum StartError {
    PortTaken(ClusterError),
    Other(ClusterError),
}

impl StartError {
    fn into_inner(self) -> ClusterError {
        match self {
            StartError::PortTaken(error) | StartError::Other(error) => error,
        }
    }
}

impl From<ClusterError> for StartError {
    fn from(error: ClusterError) -> Self {
        StartError::Other(error)
    }
}

/// Signals `child` unless it has already been reaped (its pid could then
/// belong to another process).
fn send_signal(child: &mut Child, signal: Signal) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Chooses the socket directory: `base/sock` when allowed and short enough,
/// else a fresh temporary directory under `/tmp`.
fn socket_dir_for(
    base: &Path,
    own_dir_allowed: bool,
    account: Option<&Account>,
) -> Result<(PathBuf, Option<TempDir>), ClusterError> {
    let own = base.join(SOCKET_DIR);
    if own_dir_allowed && own.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
        private_dir(&own, account)?;
        return Ok((own, None));
    }
    let temp = owned_temp_dir(Path::new("/tmp"), SOCKET_DIR_PREFIX, account)?;
    Ok((temp.path().to_path_buf(), Some(temp)))
}

async fn run_initdb(
    bin_dir: &Path,
    pgdata: &Path,
    cwd: &Path,
    account: Option<&Account>,
) -> Result<(), ClusterError> {
    let initdb = bin_dir.join("initdb");
    let mut command = Command::new(&initdb);
    command
        .arg("-D")
        .arg(pgdata)
        .args([
            "--username",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(cwd)
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(account) = account {
        command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
    }
    tracing::debug!(data_dir = %pgdata.display(), "running initdb");
    let output = tokio::task::spawn_blocking(move || {
        spawn_supervised(command, Signal::SIGKILL)?.wait_with_output()
    })
    .await
    .map_err(io::Error::other)
    .and_then(|result| result)
    .context(|| format!("running {}", initdb.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(ClusterError::InitdbFailed {
        data_dir: pgdata.to_path_buf(),
        status: output.status.to_string(),
        output: last_lines(&text, LOG_TAIL_LINES),
    })
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of `path` after byte `from` (reads at most the
/// last 64 KiB).
fn tail_of(path: &Path, from: u64, lines: usize) -> String {
    const MAX_READ: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(MAX_READ));
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(MAX_READ).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    last_lines(&String::from_utf8_lossy(&bytes), lines)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("15"), Some((15, 0)));
        assert_eq!(parse_version("9.6"), Some((9, 6)));
        assert_eq!(parse_version("x"), None);
    }

    #[test]
    fn user_settings_win() {
        let opts = ClusterOptions::new()
            .setting("max_connections", "17")
            .setting("max_connections", "18");
        assert_eq!(opts.settings, vec![("max_connections".into(), "18".into())]);
    }

    #[test]
    fn socket_only_access_files_admit_only_the_named_users_through_the_socket() {
        let hba = socket_only_hba();
        let rules: Vec<&str> = hba
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert_eq!(
            rules,
            [
                "local all all peer map=local_cluster",
                "host all all all reject"
            ]
        );
        let ident = socket_only_ident(&["root".into(), "postgres".into()]).unwrap();
        assert!(
            ident.contains("local_cluster \"root\" postgres\n"),
            "{ident}"
        );
        assert!(
            ident.contains("local_cluster \"postgres\" postgres\n"),
            "{ident}"
        );
        assert!(socket_only_ident(&["a\"b".into()]).is_err());
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("", 2), "");
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(process_alive(pid));
        assert!(process_start_time(pid).is_some());
    }
}
