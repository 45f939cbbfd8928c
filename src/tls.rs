//! TLS on the memcached port: certificates read from PEM files, re-read on SIGHUP, and every
//! handshake under a deadline and in a bounded pool of its own ([`Handshakes`]).
//!
//! memcached's `-Z` with `ssl_chain_cert`, `ssl_key` and `ssl_ca_cert` (with
//! `ssl_verify_mode` requiring a client certificate) maps to `tls_cert`, `tls_key` and
//! `tls_ca`. Both protocols are served inside TLS: the handshake comes first, then the
//! connection reads memcached bytes from the decrypted stream as it would from a socket.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

mod handshakes;

pub use handshakes::{Handshakes, Slot};

/// Where the server's certificate chain, its key and (optionally) the client CA live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they signed.
    pub ca: Option<PathBuf>,
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable, or holds no usable PEM item.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The files read but do not make a server configuration (say, a key of another cert).
    #[error("{0}")]
    Config(String),
}

/// How handshakes are bounded: each by a deadline, all of them together by a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// A handshake not done within this is dropped.
    pub timeout: Duration,
    /// Most handshakes in progress at once; a newcomer past it takes the place of the
    /// oldest silent one ([`Handshakes`]).
    pub max_in_progress: usize,
}

/// The server's TLS state: the configuration new handshakes use, replaced on reload.
pub struct Tls {
    /// Where the certificates are read from, again on reload.
    files: TlsFiles,
    /// A handshake not done within this is dropped.
    handshake_timeout: Duration,
    /// The handshakes in progress.
    handshakes: Arc<Handshakes>,
    /// The configuration new handshakes use.
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshakes", &self.handshakes)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files once; an error here stops the server before it binds its port.
    pub fn load(files: TlsFiles, limits: HandshakeLimits) -> Result<Tls, TlsError> {
        let config = server_config(&files)?;
        Ok(Tls {
            files,
            handshake_timeout: limits.timeout,
            handshakes: Handshakes::new(limits.max_in_progress),
            current: RwLock::new(config),
        })
    }

    /// Re-reads the files; on success new handshakes use them (open connections keep theirs),
    /// on failure the previous certificates stay in use and the error is logged.
    pub fn reload(&self) -> Result<(), TlsError> {
        match server_config(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(cause = %e, "TLS reload failed; keeping the previous certificates");
                Err(e)
            }
        }
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A place in the handshake pool for a client just accepted: taken before its task is
    /// spawned, so the pool's order is the order of arrival.
    pub fn enter(&self) -> Slot {
        self.handshakes.enter()
    }

    /// Runs the server side of a handshake, giving up after the handshake timeout so a
    /// silent or slow client cannot hold its socket for long.
    pub async fn accept<S>(&self, socket: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.current());
        self.within_deadline(acceptor.accept(socket)).await
    }

    /// Runs the handshake of a client in `slot`: its first bytes mark it heard from (no
    /// longer the first to give way), then [`Tls::accept`]'s handshake; all under the one
    /// deadline.
    pub async fn accept_in(
        &self,
        slot: &Slot,
        socket: TcpStream,
    ) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.current());
        let handshake = async {
            if socket.peek(&mut [0u8; 1]).await? > 0 {
                slot.heard();
            }
            acceptor.accept(socket).await
        };
        self.within_deadline(handshake).await
    }

    /// Runs `handshake` until the handshake timeout.
    async fn within_deadline<T>(
        &self,
        handshake: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(done) => done,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// Watches SIGHUP now (so a signal sent once the server is up is never missed) and returns
/// the task that reloads the certificates on each one until `shutdown` fires.
pub fn reload_on_hangup(
    tls: Arc<Tls>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hangups = match hangups {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(cause = %e, "cannot watch SIGHUP; TLS certificates will not reload");
                    return;
                }
            };
            loop {
                tokio::select! {
                    Some(()) = hangups.recv() => {
                        let _ = tls.reload();
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tls;
            shutdown.cancelled().await;
        }
    }
}

/// The crypto provider of the rustls the AWS SDK already links, named explicitly so the
/// choice never depends on a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds a server configuration from the files: TLS 1.2 and 1.3, client certificates
/// required when a CA is given.
fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_pem(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| file_error(&files.key, e))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "{} and {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A PEM file's bytes: a regular file of bounded size (a device would be read forever).
fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read_regular(path).map_err(|e| file_error(path, e))
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
