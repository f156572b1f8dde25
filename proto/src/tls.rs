//! TLS for both of a worker's connections (gRPC and data), from a credentials folder as
//! `forger-coordinator credentials` writes it. The coordinator tells the two apart by ALPN
//! after the handshake, so one port still serves both.
//!
//! rustls with the ring provider: pure Rust and C that builds with any C compiler, where
//! aws-lc would need cmake on every build machine.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::connection::Connection;
use crate::token::{AddToken, JobToken, RequireToken};

/// ALPN names: gRPC is HTTP/2's, the data connection has its own.
pub const ALPN_GRPC: &[u8] = b"h2";
pub const ALPN_DATA: &[u8] = b"forger-data/1";

/// The files of a credentials folder.
pub mod files {
    /// The cluster's certificate authority: both sides trust what it signed, and nothing else.
    pub const CA_CERT: &str = "ca.pem";
    /// Signs more certificates; needed by no running process, so keep it off the nodes.
    pub const CA_KEY: &str = "ca.key";
    pub const COORDINATOR_CERT: &str = "coordinator.pem";
    pub const COORDINATOR_KEY: &str = "coordinator.key";
    /// The workers' client certificate, shown only when the coordinator asks (mutual TLS).
    pub const WORKER_CERT: &str = "worker.pem";
    pub const WORKER_KEY: &str = "worker.key";
    pub const TOKEN: &str = "token";
}

/// A credentials file that is missing, unreadable or not what it should be.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("the TLS settings are refused: {0}")]
    Tls(String),
}

impl CredentialsError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        CredentialsError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            " (make a credentials folder with `forger-coordinator credentials --out DIR`)"
        } else {
            ""
        };
        CredentialsError::file(path, format!("cannot read: {e}{hint}"))
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialsError::file(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(CredentialsError::file(path, "holds no certificate"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredentialsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CredentialsError::file(path, format!("not a PEM private key: {e}")))
}

fn roots(path: &Path) -> Result<RootCertStore, CredentialsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| CredentialsError::file(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn tls_error(e: impl std::fmt::Display) -> CredentialsError {
    CredentialsError::Tls(e.to_string())
}

/// How the coordinator secures its port.
#[derive(Clone)]
pub enum ServerSecurity {
    /// Plain TCP and no token: `--insecure`.
    Insecure,
    Tls {
        acceptor: TlsAcceptor,
        token: JobToken,
        /// Whether workers must show a certificate the cluster's CA signed.
        mutual: bool,
    },
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerSecurity::Insecure => f.write_str("Insecure"),
            ServerSecurity::Tls { mutual, .. } => f.debug_struct("Tls").field("mutual", mutual).finish_non_exhaustive(),
        }
    }
}

impl ServerSecurity {
    /// The coordinator's certificate, key and token from `dir`; with `mutual`, also the CA
    /// that workers' certificates must chain to.
    pub fn load(dir: &Path, mutual: bool) -> Result<ServerSecurity, CredentialsError> {
        let certs = certificates(&dir.join(files::COORDINATOR_CERT))?;
        let key = private_key(&dir.join(files::COORDINATOR_KEY))?;
        let token = JobToken::read(&dir.join(files::TOKEN))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?;
        let builder = if mutual {
            let roots = roots(&dir.join(files::CA_CERT))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(tls_error)?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            CredentialsError::file(
                &dir.join(files::COORDINATOR_KEY),
                format!("does not go with {}: {e}", files::COORDINATOR_CERT),
            )
        })?;
        config.alpn_protocols = vec![ALPN_GRPC.to_vec(), ALPN_DATA.to_vec()];
        Ok(ServerSecurity::Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            token,
            mutual,
        })
    }

    /// In words, for logs and the run's event history.
    pub fn describe(&self) -> &'static str {
        match self {
            ServerSecurity::Insecure => "insecure",
            ServerSecurity::Tls { mutual: false, .. } => "TLS",
            ServerSecurity::Tls { mutual: true, .. } => "mutual TLS",
        }
    }

    /// The interceptor every RPC passes through.
    pub fn require_token(&self) -> RequireToken {
        match self {
            ServerSecurity::Insecure => RequireToken(None),
            ServerSecurity::Tls { token, .. } => RequireToken(Some(token.clone())),
        }
    }
}

/// How a worker (or a test's fake one) reaches the coordinator.
#[derive(Debug, Clone)]
pub enum ClientSecurity {
    Insecure,
    Tls(Arc<ClientTls>),
}

/// A worker's TLS settings.
pub struct ClientTls {
    ca_pem: Vec<u8>,
    /// Certificate and key PEM, when the folder has the workers' certificate.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    token: JobToken,
    /// The name the coordinator's certificate must carry; by default the URL's host.
    server_name: Option<String>,
    data: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and the token stay out of logs.
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientSecurity {
    /// The CA and token from `dir`, and the workers' certificate if the folder has one (the
    /// coordinator may not ask for it, but a folder made for mutual TLS must work either way).
    pub fn load(dir: &Path, server_name: Option<String>) -> Result<ClientSecurity, CredentialsError> {
        let ca_path = dir.join(files::CA_CERT);
        let ca_pem = read(&ca_path)?;
        let roots = roots(&ca_path)?;
        let token = JobToken::read(&dir.join(files::TOKEN))?;
        let (cert_path, key_path) = (dir.join(files::WORKER_CERT), dir.join(files::WORKER_KEY));
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_root_certificates(roots);
        let (mut config, identity) = if cert_path.exists() {
            let config = builder
                .with_client_auth_cert(certificates(&cert_path)?, private_key(&key_path)?)
                .map_err(|e| {
                    CredentialsError::file(&key_path, format!("does not go with {}: {e}", files::WORKER_CERT))
                })?;
            (config, Some((read(&cert_path)?, read(&key_path)?)))
        } else {
            (builder.with_no_client_auth(), None)
        };
        config.alpn_protocols = vec![ALPN_DATA.to_vec()];
        Ok(ClientSecurity::Tls(Arc::new(ClientTls {
            ca_pem,
            identity,
            token,
            server_name,
            data: TlsConnector::from(Arc::new(config)),
        })))
    }

    /// The interceptor that puts the job token on every call.
    pub fn add_token(&self) -> AddToken {
        match self {
            ClientSecurity::Insecure => AddToken(None),
            ClientSecurity::Tls(tls) => AddToken(Some(tls.token.clone())),
        }
    }

    /// The gRPC endpoint for the coordinator at `host:port`. Over TLS the URL is https:
    /// tonic silently skips TLS for an http URL even with a TLS config.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, String> {
        match self {
            ClientSecurity::Insecure => Endpoint::from_shared(format!("http://{address}")).map_err(|e| e.to_string()),
            ClientSecurity::Tls(tls) => {
                let endpoint = Endpoint::from_shared(format!("https://{address}")).map_err(|e| e.to_string())?;
                let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                if let Some(name) = &tls.server_name {
                    config = config.domain_name(name.clone());
                }
                endpoint.tls_config(config).map_err(|e| e.to_string())
            }
        }
    }

    /// Secures a dialled data connection to `host` (the coordinator URL's host).
    pub async fn wrap_data(&self, stream: TcpStream, host: &str) -> io::Result<Connection> {
        let (local, peer) = (stream.local_addr().ok(), stream.peer_addr().ok());
        match self {
            ClientSecurity::Insecure => Ok(Connection::new(stream, local, peer)),
            ClientSecurity::Tls(tls) => {
                let name = tls.server_name.as_deref().unwrap_or(host);
                // Brackets are URL syntax; a certificate names the address itself.
                let name = name.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(name.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}`: {e}")))?;
                let stream = tls.data.connect(name, stream).await?;
                Ok(Connection::new(stream, local, peer))
            }
        }
    }
}
