//! TLS loading, handshakes, client certificates, reload and the handshake deadline, with
//! certificates made by the openssl command-line tool in a temporary directory.

use super::*;
use std::process::Command;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const HANDSHAKE: HandshakeLimits = HandshakeLimits {
    timeout: Duration::from_secs(5),
    max_in_progress: 16,
};

/// A CA and certificates it signed, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes a CA; `None` (and a line on stderr) when openssl is not installed.
    fn new() -> Option<Pki> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("skipped: the openssl command is not installed");
            return None;
        }
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=s3cached test CA",
        ]);
        Some(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// Issues `name.pem` and `name.key` for `usage` (serverAuth or clientAuth).
    fn issue(&self, name: &str, usage: &str) {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.path(&ext),
            format!("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }

    fn files(&self, ca: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            ca: ca.then(|| self.path("ca.pem")),
        }
    }

    /// A client that trusts the CA, presenting `client` when given.
    fn connector(&self, client: Option<&str>) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&self.path("ca.pem")).unwrap() {
            roots.add(cert).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let certs = read_certs(&self.path(&format!("{name}.pem"))).unwrap();
                let key = PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
        };
        TlsConnector::from(Arc::new(config))
    }
}

/// Connects a client to `tls` over an in-memory pipe; the server side echoes one line.
/// Returns what the client read back and the certificate the server showed.
async fn round_trip(tls: &Tls, connector: TlsConnector) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let serving = async {
        let mut stream = tls.accept(server).await?;
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf).await?;
        stream.write_all(&buf).await?;
        stream.shutdown().await?;
        Ok::<(), io::Error>(())
    };
    let talking = async {
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = connector.connect(name, client).await?;
        stream.write_all(b"hello\n").await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok::<_, io::Error>((back, shown))
    };
    let (served, talked) = tokio::join!(serving, talking);
    served?;
    talked
}

fn first_cert(path: &Path) -> Vec<u8> {
    read_certs(path).unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_talks_through_the_handshake() {
    let Some(pki) = Pki::new() else { return };
    pki.issue("server", "serverAuth");
    let tls = Tls::load(pki.files(false), HANDSHAKE).unwrap();
    let (back, shown) = round_trip(&tls, pki.connector(None)).await.unwrap();
    assert_eq!(back, b"hello\n");
    assert_eq!(shown, first_cert(&pki.path("server.pem")));
}

#[tokio::test]
async fn with_a_ca_a_client_certificate_is_required_and_checked() {
    let Some(pki) = Pki::new() else { return };
    pki.issue("server", "serverAuth");
    pki.issue("client", "clientAuth");
    let tls = Tls::load(pki.files(true), HANDSHAKE).unwrap();
    let (back, _) = round_trip(&tls, pki.connector(Some("client")))
        .await
        .unwrap();
    assert_eq!(back, b"hello\n");
    let refused = round_trip(&tls, pki.connector(None)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through"
    );
    // A certificate from another CA is refused too.
    let Some(other) = Pki::new() else { return };
    other.issue("client", "clientAuth");
    std::fs::copy(other.path("client.pem"), pki.path("stranger.pem")).unwrap();
    std::fs::copy(other.path("client.key"), pki.path("stranger.key")).unwrap();
    let refused = round_trip(&tls, pki.connector(Some("stranger"))).await;
    assert!(refused.is_err(), "a client of another CA got through");
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_certificate_and_a_good_one_replaces_it() {
    let Some(pki) = Pki::new() else { return };
    pki.issue("server", "serverAuth");
    let tls = Tls::load(pki.files(false), HANDSHAKE).unwrap();
    let old = first_cert(&pki.path("server.pem"));
    let before = tls.current();

    std::fs::write(pki.path("server.pem"), "not a certificate").unwrap();
    assert!(matches!(tls.reload(), Err(TlsError::File { .. })));
    assert!(Arc::ptr_eq(&before, &tls.current()));
    let (_, shown) = round_trip(&tls, pki.connector(None)).await.unwrap();
    assert_eq!(shown, old);

    pki.issue("server", "serverAuth");
    let new = first_cert(&pki.path("server.pem"));
    assert_ne!(new, old);
    tls.reload().unwrap();
    let (_, shown) = round_trip(&tls, pki.connector(None)).await.unwrap();
    assert_eq!(shown, new);
}

#[tokio::test]
async fn unusable_files_are_named_in_the_error() {
    let Some(pki) = Pki::new() else { return };
    pki.issue("server", "serverAuth");
    pki.issue("other", "serverAuth");
    let mut files = pki.files(false);
    files.cert = pki.path("missing.pem");
    let err = Tls::load(files, HANDSHAKE).unwrap_err().to_string();
    assert!(err.contains("missing.pem"), "{err}");

    let mut files = pki.files(false);
    files.key = pki.path("other.key");
    let err = Tls::load(files, HANDSHAKE).unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err}");

    let mut files = pki.files(true);
    files.ca = Some(pki.path("server.key"));
    let err = Tls::load(files, HANDSHAKE).unwrap_err().to_string();
    assert!(err.contains("server.key"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_at_the_handshake_deadline() {
    let Some(pki) = Pki::new() else { return };
    pki.issue("server", "serverAuth");
    let tls = Tls::load(pki.files(false), HANDSHAKE).unwrap();
    let (_client, server) = tokio::io::duplex(1024);
    let begun = tokio::time::Instant::now();
    let err = tls.accept(server).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(begun.elapsed(), HANDSHAKE.timeout);
}
