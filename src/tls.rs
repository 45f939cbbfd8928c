//! TLS on the memcached port: certificates read from PEM files, re-read on SIGHUP, and every
//! handshake under a deadline.
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
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

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

/// The server's TLS state: the configuration new handshakes use, replaced on reload.
pub struct Tls {
    files: TlsFiles,
    handshake_timeout: Duration,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files once; an error here stops the server before it binds its port.
    pub fn load(files: TlsFiles, handshake_timeout: Duration) -> Result<Tls, TlsError> {
        let config = server_config(&files)?;
        Ok(Tls {
            files,
            handshake_timeout,
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

    /// Runs the server side of a handshake, giving up after the handshake timeout so a
    /// silent or slow client cannot hold a connection slot.
    pub async fn accept<S>(&self, socket: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.current());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(socket)).await {
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
