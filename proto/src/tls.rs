//! Transport security for every Lockstep server and client (DESIGN §15): mutual TLS with one
//! CA, identities in certificate SAN URIs ([`crate::auth`]), bearer tokens for clients
//! without a certificate, and plaintext only when chosen.
//!
//! Servers accept connections through [`incoming`]: with TLS, each handshake runs in its own
//! task (bounded in number and time) and the client's certificate is verified against the CA
//! once, after the handshake, into the connection's [`Peer`]. [`server`] puts [`Authorize`]
//! in front of every service: a call with no valid certificate and no known token is refused
//! `UNAUTHENTICATED` with the reason (expired, another CA, none), a call its identity's role
//! may not make `PERMISSION_DENIED`, before any service sees it; the identity then travels
//! in the request's extensions (the WAL archive checks an agent puts only its own shard).
//! Verifying after the handshake, not during it, is what lets a refused client hear why in
//! a gRPC status instead of a bare TLS alert; nothing is served before [`Authorize`] ran.
//!
//! Clients connect to `https://HOST:PORT` through [`endpoint`], which checks the server's
//! certificate against the CA and its host name, and that it names the identity expected
//! there (the coordinator, or the agent of that shard).
//!
//! [`Tls::reload`] (SIGHUP) reads the files again: new connections use them, open ones keep
//! the identity they proved; files that do not load leave the old ones in place.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use lockstep_repository::{Error, ErrorCode, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::Status;

use crate::auth::{Identity, Tokens, certificate_identity};

/// The files of one process's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster's CA certificate (PEM): the only issuer trusted, for servers and clients.
    pub ca: PathBuf,
    /// This process's certificate (PEM, intermediates after it). A client without one
    /// authenticates with a bearer token.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Servers: the bearer tokens accepted ([`Tokens`]).
    #[serde(default)]
    pub tokens: Option<PathBuf>,
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most TLS handshakes a server runs at once; a connection arriving while as many are
/// running is closed at once (its client retries), so stalled handshakes cannot stop the
/// server from accepting.
const MAX_HANDSHAKES: usize = 256;

/// How often a connection's client certificate is verified again (against the CA loaded
/// then, at that time): an open connection keeps its role at most this long after its
/// certificate expired or its CA was replaced.
const RECHECK_EVERY_S: u64 = 60;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One process's TLS: as a server (when it has a certificate) and as a client.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    loaded: RwLock<Arc<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    /// This process's own identity, from its certificate.
    identity: Option<Identity>,
    server: Option<Arc<rustls::ServerConfig>>,
    client: Arc<rustls::ClientConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    tokens: Tokens,
}

fn invalid(message: String) -> Error {
    Error::new(ErrorCode::InvalidArgument, message)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("read the {what} {}", path.display()),
            err,
        )
    })
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("{what} {}: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Tls {
    /// Loads `files`: the CA, and the certificate and key when given (both or neither).
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>> {
        let loaded = Loaded::read(&files)?;
        Ok(Arc::new(Tls {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Reads the files again (SIGHUP). On failure the files loaded before stay in use; a
    /// certificate naming another identity than before is refused.
    pub fn reload(&self) -> Result<()> {
        let fresh = Loaded::read(&self.files)?;
        let before = self.current().identity.clone();
        if fresh.identity != before {
            return Err(invalid(format!(
                "the reloaded certificate {} names {}, not {}; keeping the loaded one",
                self.files
                    .cert
                    .as_deref()
                    .map_or_else(String::new, |p| p.display().to_string()),
                describe(fresh.identity.as_ref()),
                describe(before.as_ref()),
            )));
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The identity this process's certificate names, if it has one.
    pub fn identity(&self) -> Option<Identity> {
        self.current().identity.clone()
    }

    /// Refuses to serve as `expected` with a certificate naming someone else, or none.
    pub fn check_serves_as(&self, expected: &Identity) -> Result<()> {
        let loaded = self.current();
        if loaded.server.is_none() || loaded.identity.as_ref() != Some(expected) {
            return Err(invalid(format!(
                "TLS: this server is {expected}, but its certificate {} names {}; issue one with `lockstep cert issue --identity {expected}`",
                self.files
                    .cert
                    .as_deref()
                    .map_or_else(|| "(none)".to_string(), |p| p.display().to_string()),
                describe(loaded.identity.as_ref())
            )));
        }
        Ok(())
    }
}

fn describe(identity: Option<&Identity>) -> String {
    identity.map_or_else(|| "no identity".to_string(), Identity::to_string)
}

impl Loaded {
    fn read(files: &TlsFiles) -> Result<Loaded> {
        let provider = provider();
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates(&files.ca, "CA certificate")? {
            roots
                .add(ca)
                .map_err(|err| invalid(format!("CA certificate {}: {err}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|err| invalid(format!("CA certificate {}: {err}", files.ca.display())))?;
        let own = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert, "certificate")?;
                let key = PrivateKeyDer::from_pem_slice(&read(key, "private key")?)
                    .map_err(|err| invalid(format!("private key {}: {err}", key.display())))?;
                let identity = certificate_identity(&chain[0])
                    .map_err(|why| invalid(format!("certificate {}: {why}", cert.display())))?;
                Some((chain, key, identity))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "TLS: give a certificate and its key together".to_string(),
                ));
            }
        };
        let tls_error = |err: rustls::Error| invalid(format!("TLS: {err}"));
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_root_certificates(roots);
        let mut client = match &own {
            Some((chain, key, _)) => client
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(tls_error)?,
            None => client.with_no_client_auth(),
        };
        client.alpn_protocols = vec![b"h2".to_vec()];
        let server = match &own {
            Some((chain, key, _)) => {
                let mut server = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error)?
                    .with_client_cert_verifier(Arc::new(AfterHandshake(verifier.clone())))
                    .with_single_cert(chain.clone(), key.clone_key())
                    .map_err(tls_error)?;
                server.alpn_protocols = vec![b"h2".to_vec()];
                Some(Arc::new(server))
            }
            None => None,
        };
        let tokens = match &files.tokens {
            Some(path) => Tokens::load(path)?,
            None => Tokens::default(),
        };
        Ok(Loaded {
            identity: own.map(|(_, _, identity)| identity),
            server,
            client: Arc::new(client),
            verifier,
            tokens,
        })
    }

    /// The identity a client's certificate chain proves.
    fn verify(&self, chain: Option<&[CertificateDer<'_>]>) -> PeerCertificate {
        let Some([end, intermediates @ ..]) = chain else {
            return PeerCertificate::None;
        };
        if let Err(err) = self
            .verifier
            .verify_client_cert(end, intermediates, UnixTime::now())
        {
            return PeerCertificate::Refused(refusal(&err));
        }
        match certificate_identity(end) {
            Ok(identity) => PeerCertificate::Valid(identity),
            Err(why) => PeerCertificate::Refused(why),
        }
    }
}

fn refusal(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the client certificate has expired".to_string(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "the client certificate is not valid yet".to_string(),
        // Another CA: unknown by name, or one of the same name whose key did not sign it.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "the client certificate is not issued by this cluster's CA".to_string(),
        other => format!("the client certificate is refused: {other}"),
    }
}

/// The handshake half of client authentication: a client that sends a certificate must
/// prove it holds its key (the signature checks are the CA verifier's own); whether the CA
/// issued it, and whether it is still valid, is decided right after the handshake
/// (`Loaded::verify`) and refused by [`Authorize`] with a status that says why.
#[derive(Debug)]
struct AfterHandshake(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for AfterHandshake {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// How a server's connections are secured. Plaintext is only ever chosen explicitly (a
/// configuration's `plaintext = true`, an agent's `--plaintext`, the simulations).
#[derive(Debug, Clone)]
pub enum Security {
    Plaintext,
    Tls(Arc<Tls>),
}

impl Security {
    /// Reads the TLS files again on every SIGHUP until `stop`: new connections, in and out,
    /// use them; a reload that fails keeps the files loaded before, and says why.
    pub fn reload_on_hangup(&self, stop: tokio_util::sync::CancellationToken) {
        let Security::Tls(tls) = self else {
            return;
        };
        let tls = tls.clone();
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("SIGHUP cannot be watched: the TLS files reload only at a restart");
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                match tls.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: TLS certificate, key, CA and tokens reloaded")
                    }
                    Err(err) => {
                        tracing::error!(error = %err.chain(), "SIGHUP: the TLS files were not reloaded; the ones loaded before stay in use")
                    }
                }
            }
        });
    }
}

/// What a connection's client certificate proved.
#[derive(Debug, Clone)]
pub enum PeerCertificate {
    /// None sent (or a plaintext connection).
    None,
    Valid(Identity),
    /// Sent, and refused: why.
    Refused(String),
}

/// A connection as a server's services see it (in the request extensions).
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    pub certificate: PeerCertificate,
    /// The certificate chain the client sent, verified again every [`RECHECK_EVERY_S`].
    chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// When it was last verified (Unix seconds).
    checked: Arc<std::sync::atomic::AtomicU64>,
}

/// A server's connection: plaintext TCP, or TLS with the peer it proved.
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Peer),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Connection::Plain(tcp) => Peer {
                remote: tcp.peer_addr().ok(),
                certificate: PeerCertificate::None,
                chain: None,
                checked: Default::default(),
            },
            Connection::Tls(_, peer) => peer.clone(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(s) => s.is_write_vectored(),
            Connection::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_flush(cx),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A server's stream of connections on `listener`, with Nagle's algorithm off (a barrier's
/// replies are small writes; with Nagle on, one waiting for the ACK of the previous reply
/// meets the peer's delayed ACK, 40 ms on Linux, while every gate is closed: the barrier
/// pause went from 44 ms to a few ms at p50). With TLS, handshakes run concurrently, at most
/// [`MAX_HANDSHAKES`] at once and each for at most [`HANDSHAKE_TIMEOUT`], so a client that
/// stalls its handshake holds up no one.
pub fn incoming(
    listener: tokio::net::TcpListener,
    security: &Security,
) -> impl Stream<Item = io::Result<Connection>> + Send + 'static {
    let tls = match security {
        Security::Plaintext => {
            return tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|tcp| tcp.map(Connection::Plain))
                .boxed();
        }
        Security::Tls(tls) => tls.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, mostly: wait a moment instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "{MAX_HANDSHAKES} TLS handshakes running: connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let loaded = tls.current();
            let Some(config) = loaded.server.clone() else {
                tracing::error!("TLS without a server certificate: no connection is accepted");
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%remote, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                drop(permit);
                let chain = stream.get_ref().1.peer_certificates();
                let certificate = loaded.verify(chain);
                let peer = Peer {
                    remote: Some(remote),
                    certificate,
                    chain: chain
                        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
                    checked: Arc::new(unix_now().into()),
                };
                let _ = tx.send(Ok(Connection::Tls(Box::new(stream), peer))).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// The metadata key of a bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// What a command-line client proves: with a CA (for `https://` servers) its certificate
/// and key, or a token read from a file; plaintext without a CA. A token is never sent
/// without TLS.
pub fn client_credentials(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    token_file: Option<&Path>,
) -> Result<(Security, Bearer)> {
    let bearer = Bearer::from_file(token_file)?;
    let security = match ca {
        None if cert.is_some() || key.is_some() || bearer.0.is_some() => {
            return Err(invalid(
                "a certificate or a token needs --ca (LOCKSTEP_CA), the cluster's CA certificate: without TLS it would travel in the clear"
                    .to_string(),
            ));
        }
        None => Security::Plaintext,
        Some(ca) => Security::Tls(Tls::load(TlsFiles {
            ca: ca.to_path_buf(),
            cert: cert.map(Path::to_path_buf),
            key: key.map(Path::to_path_buf),
            tokens: None,
        })?),
    };
    Ok((security, bearer))
}

/// Sends `authorization: Bearer TOKEN` with every call, when there is a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(if self.0.is_some() {
            "Bearer(set)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// The token in `path` (its first line), if a path is given. A token is only ever read
    /// from a file, never taken from the command line, where `ps` shows it.
    pub fn from_file(path: Option<&Path>) -> Result<Bearer> {
        let Some(path) = path else {
            return Ok(Bearer(None));
        };
        let text = String::from_utf8(read(path, "token file")?)
            .map_err(|_| invalid(format!("token file {}: not text", path.display())))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(invalid(format!("token file {}: empty", path.display())));
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| invalid(format!("token file {}: not a token", path.display())))?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// Puts [`Authorize`] in front of a server's services.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer(pub Security);

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            security: self.0.clone(),
        }
    }
}

/// Refuses a call whose caller is unknown or whose role may not make it, before any service
/// sees it; hands the caller's [`Identity`] to the service in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    security: Security,
}

fn refused(code: ErrorCode, message: String) -> Status {
    crate::to_status(&Error::new(code, message))
}

impl Security {
    /// Who sent `request`, if it may make its call.
    fn admit<B>(&self, request: &mut http::Request<B>) -> std::result::Result<(), Status> {
        let Security::Tls(tls) = self else {
            return Ok(());
        };
        let path = request.uri().path().to_string();
        let peer = request.extensions().get::<Peer>();
        let who = match peer.map(|p| &p.certificate) {
            Some(PeerCertificate::Valid(identity)) => {
                let peer = peer.expect("matched Some");
                recheck(tls, peer, identity)?;
                identity.clone()
            }
            Some(PeerCertificate::Refused(why)) => {
                return Err(refused(ErrorCode::Unauthenticated, why.clone()));
            }
            Some(PeerCertificate::None) => {
                let token = request
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match token {
                    Some(token) => {
                        tls.current().tokens.identity(token.trim()).ok_or_else(|| {
                            refused(
                                ErrorCode::Unauthenticated,
                                "the bearer token is not one this server accepts".to_string(),
                            )
                        })?
                    }
                    None => {
                        return Err(refused(
                            ErrorCode::Unauthenticated,
                            "no client certificate and no bearer token".to_string(),
                        ));
                    }
                }
            }
            // Not a connection of `incoming`: nothing proved who it is.
            None => {
                return Err(refused(
                    ErrorCode::Unauthenticated,
                    "the connection carries no TLS identity".to_string(),
                ));
            }
        };
        if !who.may_call(&path) {
            tracing::warn!(identity = %who, call = %path, "call refused: the role may not make it");
            return Err(refused(
                ErrorCode::PermissionDenied,
                format!("{who} may not call {path}"),
            ));
        }
        request.extensions_mut().insert(who);
        Ok(())
    }
}

/// Verifies `peer`'s certificate again when [`RECHECK_EVERY_S`] passed since the last time:
/// expired since, or no longer the CA's (a reload replaced it), its calls are refused.
fn recheck(tls: &Tls, peer: &Peer, identity: &Identity) -> std::result::Result<(), Status> {
    use std::sync::atomic::Ordering;
    let now = unix_now();
    if now.saturating_sub(peer.checked.load(Ordering::Relaxed)) < RECHECK_EVERY_S {
        return Ok(());
    }
    match tls
        .current()
        .verify(peer.chain.as_deref().map(Vec::as_slice))
    {
        PeerCertificate::Valid(again) if again == *identity => {
            peer.checked.store(now, Ordering::Relaxed);
            Ok(())
        }
        PeerCertificate::Refused(why) => Err(refused(ErrorCode::Unauthenticated, why)),
        _ => Err(refused(
            ErrorCode::Unauthenticated,
            "the client certificate no longer proves this identity".to_string(),
        )),
    }
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, std::result::Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.security.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The caller a service's request comes from: `None` on a plaintext server.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request.extensions().get::<Identity>()
}

/// How a client reaches a server: the channel settings, and with TLS the connector that
/// checks the server is `expected`.
#[derive(Debug, Clone)]
pub struct Target {
    endpoint: tonic::transport::Endpoint,
    connector: Option<Connector>,
}

/// Who a client expects at the other end of an `https://` connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    Is(Identity),
    /// The agent of any shard (a Shard API client that names an address, not a shard).
    AnyAgent,
}

impl From<Identity> for Expected {
    fn from(identity: Identity) -> Expected {
        Expected::Is(identity)
    }
}

impl Expected {
    fn admits(&self, identity: &Identity) -> bool {
        match self {
            Expected::Is(expected) => expected == identity,
            Expected::AnyAgent => matches!(identity, Identity::Agent(_)),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Is(identity) => identity.fmt(f),
            Expected::AnyAgent => write!(f, "{}agent/SHARD", crate::auth::SCHEME),
        }
    }
}

/// `url` (`http://HOST:PORT`, or `https://HOST:PORT` with `security` TLS) as a client
/// target where `expected` must answer.
pub fn endpoint(url: &str, security: &Security, expected: impl Into<Expected>) -> Result<Target> {
    let expected = expected.into();
    let bad = |why: String| invalid(format!("endpoint {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|err| {
        bad(format!(
            "write http://HOST:PORT or https://HOST:PORT ({err})"
        ))
    })?;
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        return Err(bad(
            "write http://HOST:PORT or https://HOST:PORT".to_string()
        ));
    };
    let connector = match (uri.scheme_str(), security) {
        (Some("http"), Security::Plaintext) => None,
        (Some("http"), Security::Tls(_)) => {
            return Err(bad(
                "TLS is configured here: write https:// (http:// would send this client's calls, and any token, in the clear)"
                    .to_string(),
            ));
        }
        (Some("https"), Security::Tls(tls)) => Some(Connector {
            tls: tls.clone(),
            expected,
        }),
        (Some("https"), Security::Plaintext) => {
            return Err(bad(
                "https:// needs TLS configured here (a CA certificate, and a certificate or a token)"
                    .to_string(),
            ));
        }
        _ => return Err(bad("write http:// or https://".to_string())),
    };
    // The connector does TLS itself; tonic sees a plain http:// endpoint.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|err| bad(err.to_string()))?;
    Ok(Target {
        endpoint,
        connector,
    })
}

impl Target {
    /// Changes the channel settings (timeouts, keepalive).
    pub fn with(
        self,
        settings: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Target {
        Target {
            endpoint: settings(self.endpoint),
            ..self
        }
    }

    /// A channel that connects on first use and reconnects after a failure.
    pub fn lazy(&self) -> tonic::transport::Channel {
        match &self.connector {
            None => self.endpoint.connect_lazy(),
            Some(connector) => self.endpoint.connect_with_connector_lazy(connector.clone()),
        }
    }

    /// A channel connected now.
    pub async fn connect(
        &self,
    ) -> std::result::Result<tonic::transport::Channel, tonic::transport::Error> {
        match &self.connector {
            None => self.endpoint.connect().await,
            Some(connector) => {
                self.endpoint
                    .connect_with_connector(connector.clone())
                    .await
            }
        }
    }
}

/// Connects over TLS and checks the server's certificate names `expected`.
#[derive(Debug, Clone)]
struct Connector {
    tls: Arc<Tls>,
    expected: Expected,
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, expected) = (self.tls.clone(), self.expected.clone());
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
            let stream = tokio_rustls::TlsConnector::from(tls.current().client.clone())
                .connect(name, tcp)
                .await?;
            let presented = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|end| certificate_identity(end));
            match presented {
                Some(Ok(identity)) if expected.admits(&identity) => {
                    Ok(hyper_util::rt::TokioIo::new(stream))
                }
                Some(Ok(identity)) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port} is {identity}, not {expected}"),
                )),
                Some(Err(why)) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port}: {why}"),
                )),
                None => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port} sent no certificate"),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA in `dir`, and a certificate for `uri` named `name`, issued by it.
    fn issue(dir: &Path, ca: &rcgen::Issuer<'_, rcgen::KeyPair>, uri: &str, name: &str) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().expect("uri")));
        let cert = params.signed_by(&key, ca).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    }

    fn pki() -> (tempfile::TempDir, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write");
        (dir, rcgen::Issuer::new(params, key))
    }

    fn files(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: Some(dir.join(format!("{name}.pem"))),
            key: Some(dir.join(format!("{name}.key"))),
            tokens: None,
        }
    }

    #[test]
    fn a_reload_keeps_the_identity_and_refuses_another() -> Result<()> {
        let (dir, ca) = pki();
        issue(dir.path(), &ca, "lockstep://agent/shard-0", "agent");
        let tls = Tls::load(files(dir.path(), "agent"))?;
        let shard0 = Identity::parse("lockstep://agent/shard-0")?;
        tls.check_serves_as(&shard0)?;
        // A renewed certificate of the same identity is taken.
        std::fs::remove_file(dir.path().join("agent.pem")).expect("rm");
        issue(dir.path(), &ca, "lockstep://agent/shard-0", "agent");
        tls.reload()?;
        // One naming another shard is refused, and the loaded one stays.
        issue(dir.path(), &ca, "lockstep://agent/shard-1", "agent");
        let err = tls.reload().expect_err("another identity");
        assert!(err.message.contains("shard-1"), "{err}");
        assert_eq!(tls.identity(), Some(shard0));
        // Files that do not load leave the loaded ones in place too.
        std::fs::write(dir.path().join("agent.key"), "not a key").expect("write");
        assert!(tls.reload().is_err());
        assert!(tls.identity().is_some());
        Ok(())
    }

    #[test]
    fn a_tls_server_refuses_a_call_that_proved_nothing() -> Result<()> {
        let (dir, ca) = pki();
        issue(dir.path(), &ca, "lockstep://coordinator", "coordinator");
        let security = Security::Tls(Tls::load(files(dir.path(), "coordinator"))?);
        let path = "/lockstep.v1.Coordinator/ListBackups";
        // Not a connection of `incoming`: refused (fail closed).
        let mut bare = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        let status = security.admit(&mut bare).expect_err("no peer");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        // A refused certificate never falls back to a token.
        let mut refused_cert = http::Request::builder()
            .uri(path)
            .header(AUTHORIZATION, "Bearer x")
            .body(())
            .expect("request");
        refused_cert.extensions_mut().insert(Peer {
            remote: None,
            certificate: PeerCertificate::Refused("the client certificate has expired".into()),
            chain: None,
            checked: Default::default(),
        });
        let status = security.admit(&mut refused_cert).expect_err("expired");
        assert!(status.message().contains("expired"), "{status:?}");
        // A valid identity whose role may not make the call.
        let mut client = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        client.extensions_mut().insert(Peer {
            remote: None,
            certificate: PeerCertificate::Valid(Identity::parse("lockstep://client/app")?),
            chain: None,
            checked: Arc::new(unix_now().into()),
        });
        let status = security.admit(&mut client).expect_err("a client");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        // Plaintext, chosen explicitly, admits everything.
        let mut plain = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        assert!(Security::Plaintext.admit(&mut plain).is_ok());
        Ok(())
    }

    #[test]
    fn a_connection_past_its_recheck_is_verified_again() -> Result<()> {
        let (dir, ca) = pki();
        issue(dir.path(), &ca, "lockstep://coordinator", "coordinator");
        let tls = Tls::load(files(dir.path(), "coordinator"))?;
        // A chain the CA no longer (or never) issued, last checked long ago.
        let (other, other_ca) = pki();
        issue(other.path(), &other_ca, "lockstep://operator/old", "old");
        let pem = std::fs::read(other.path().join("old.pem")).expect("read");
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .expect("pem");
        let operator = Identity::parse("lockstep://operator/old")?;
        let peer = Peer {
            remote: None,
            certificate: PeerCertificate::Valid(operator.clone()),
            chain: Some(Arc::new(chain)),
            checked: Arc::new((unix_now() - RECHECK_EVERY_S - 1).into()),
        };
        let status = recheck(&tls, &peer, &operator).expect_err("no longer valid");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        // Checked recently: not verified again.
        peer.checked
            .store(unix_now(), std::sync::atomic::Ordering::Relaxed);
        assert!(recheck(&tls, &peer, &operator).is_ok());
        Ok(())
    }
}
