//! `lockstep cert`: a cluster's CA, the certificates of its coordinator, agents, operators,
//! readers and clients, and bearer tokens, made on the machine that keeps the CA key.
//!
//! `ca` writes `ca.pem` and `ca.key`; `issue` writes `NAME.pem` and `NAME.key` for one
//! identity (its `lockstep://` URI and the host names it serves on), signed by that CA; a
//! certificate is valid for client and server authentication alike. `token` writes a random
//! token to a file and appends its hash to a server's token file. Every key and token file is
//! created readable by its owner only, and never overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use lockstep_proto::auth::{Identity, Tokens};
use lockstep_repository::{Error, ErrorCode, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The host names a certificate is issued for when none are given: this machine's loopback.
pub const LOCAL_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Create the cluster's CA: DIR/ca.pem (give it to every process) and DIR/ca.key (keep it
    /// on this machine only).
    Ca {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for one identity, signed by DIR's CA: DIR/NAME.pem and DIR/NAME.key.
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// lockstep://coordinator, lockstep://agent/SHARD, lockstep://operator/NAME,
        /// lockstep://reader/NAME or lockstep://client/NAME.
        #[arg(long, value_name = "URI")]
        identity: String,
        /// A host name or IP address the process serves on (repeat; default localhost,
        /// 127.0.0.1 and ::1).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// The files' name (default: from the identity, e.g. agent-shard-0).
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a bearer token for a client without a certificate: the token goes to --out, its
    /// hash and identity are appended to --tokens (a server's `tokens` file).
    Token {
        #[arg(long, value_name = "URI")]
        identity: String,
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn failed(what: String, err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(ErrorCode::InvalidArgument, what, err)
}

/// Writes `contents` to a new file at `path`; with `secret`, readable by its owner only.
fn create(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|err| {
        let hint = if err.kind() == std::io::ErrorKind::AlreadyExists {
            " (it exists; remove it first to replace it)"
        } else {
            ""
        };
        Error::io(
            ErrorCode::InvalidArgument,
            format!("create {}{hint}", path.display()),
            err,
        )
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("write {}", path.display()),
                err,
            )
        })
}

/// From an hour ago (clocks a little behind the issuer's still accept it) for `days`.
fn validity(days: u32) -> Result<Validity> {
    if days == 0 {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "--days must be at least 1",
        ));
    }
    let now = time::OffsetDateTime::now_utc();
    Ok((
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    ))
}

/// A certificate's not-before and not-after times.
pub type Validity = (time::OffsetDateTime, time::OffsetDateTime);

/// The CA's name and uses (its validity aside).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "Lockstep cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates DIR/ca.pem and DIR/ca.key.
pub fn create_ca(dir: &Path, days: u32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("create {}", dir.display()),
            err,
        )
    })?;
    let key = KeyPair::generate().map_err(|err| failed("generate the CA key".into(), err))?;
    let mut params = ca_params();
    (params.not_before, params.not_after) = validity(days)?;
    let cert = params
        .self_signed(&key)
        .map_err(|err| failed("sign the CA certificate".into(), err))?;
    create(&dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
    create(&dir.join("ca.pem"), cert.pem().as_bytes(), false)
}

/// The files' name for `identity`: `coordinator`, `agent-shard-0`, `operator-alice`.
pub fn file_name(identity: &Identity) -> String {
    identity
        .to_string()
        .trim_start_matches(lockstep_proto::auth::SCHEME)
        .replace('/', "-")
}

/// Issues DIR/NAME.pem and DIR/NAME.key for `identity`, valid for `days` from now, signed
/// by DIR's CA; returns their paths.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    hosts: &[String],
    days: u32,
    name: Option<&str>,
) -> Result<(PathBuf, PathBuf)> {
    issue_valid(dir, identity, hosts, validity(days)?, name)
}

/// [`issue`], valid between the two times given (the tests issue expired certificates).
pub fn issue_valid(
    dir: &Path,
    identity: &Identity,
    hosts: &[String],
    valid: Validity,
    name: Option<&str>,
) -> Result<(PathBuf, PathBuf)> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!(
                    "read {} (create the CA first: lockstep cert ca --dir {})",
                    path.display(),
                    dir.display()
                ),
                err,
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)
        .map_err(|err| failed(format!("the CA key in {}", dir.display()), err))?;
    // The CA as an issuer: its name and its key are all a signature needs (ca.pem, read to
    // check it is there, is what every process trusts).
    read("ca.pem")?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let hosts: Vec<String> = if hosts.is_empty() {
        LOCAL_HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        hosts.to_vec()
    };
    let mut params = CertificateParams::new(hosts)
        .map_err(|err| failed("a --host is not a host name or an IP address".into(), err))?;
    let uri = identity.to_string();
    params.subject_alt_names.push(SanType::URI(
        uri.as_str()
            .try_into()
            .map_err(|err| failed(format!("identity {uri}"), err))?,
    ));
    params
        .distinguished_name
        .push(DnType::CommonName, uri.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = valid;
    let key = KeyPair::generate().map_err(|err| failed("generate a key".into(), err))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|err| failed(format!("sign the certificate of {uri}"), err))?;
    let name = name.map_or_else(|| file_name(identity), str::to_string);
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    // Neither is written when either exists: no key is left without its certificate.
    if let Some(there) = [&cert_path, &key_path].into_iter().find(|p| p.exists()) {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("{} exists; remove it first to replace it", there.display()),
        ));
    }
    create(&key_path, key.serialize_pem().as_bytes(), true)?;
    create(&cert_path, cert.pem().as_bytes(), false)?;
    Ok((cert_path, key_path))
}

/// Writes a new random token for `identity` to `out` and appends its hash to `tokens`.
pub fn token(identity: &Identity, tokens: &Path, out: &Path) -> Result<()> {
    if !identity.may_hold_a_token() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "{identity} proves itself with its certificate; tokens are for lockstep://operator/, reader/ and client/ identities"
            ),
        ));
    }
    let secret: [u8; 32] = rand::random();
    let token = hex::encode(secret);
    create(out, format!("{token}\n").as_bytes(), true)?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(tokens)
        .map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("open {}", tokens.display()),
                err,
            )
        })?;
    writeln!(file, "{}", Tokens::line(&token, identity))
        .and_then(|()| file.sync_all())
        .map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("write {}", tokens.display()),
                err,
            )
        })
}

/// Runs `lockstep cert ...`.
pub fn run(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Ca { dir, days } => {
            create_ca(&dir, days)?;
            println!(
                "CA created: {} (give it to every process), {} (keep it here)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        CertCommand::Issue {
            dir,
            identity,
            hosts,
            days,
            name,
        } => {
            let identity = Identity::parse(&identity)?;
            let (cert, key) = issue(&dir, &identity, &hosts, days, name.as_deref())?;
            println!("{identity}: {} and {}", cert.display(), key.display());
        }
        CertCommand::Token {
            identity,
            tokens,
            out,
        } => {
            let identity = Identity::parse(&identity)?;
            token(&identity, &tokens, &out)?;
            println!(
                "{identity}: token written to {}, its hash appended to {}",
                out.display(),
                tokens.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_proto::auth::certificate_identity;

    #[test]
    fn a_certificate_names_its_identity_and_is_issued_by_the_ca() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        create_ca(dir.path(), 10)?;
        let agent = Identity::parse("lockstep://agent/shard-0")?;
        let (cert, key) = issue(dir.path(), &agent, &[], 1, None)?;
        assert!(cert.ends_with("agent-shard-0.pem"));
        let pem = std::fs::read(&cert).expect("read");
        let der = rustls_pem(&pem);
        assert_eq!(certificate_identity(&der), Ok(agent.clone()));
        let mode = std::fs::metadata(&key).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Loadable as a server identity, trusting the CA.
        let tls = lockstep_proto::tls::Tls::load(lockstep_proto::tls::TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: Some(cert),
            key: Some(key),
            tokens: None,
        })?;
        tls.check_serves_as(&agent)?;
        assert!(tls.check_serves_as(&Identity::Coordinator).is_err());
        // Never overwritten.
        let again = issue(dir.path(), &agent, &[], 1, None).expect_err("exists");
        assert!(again.message.contains("exists"), "{again}");
        Ok(())
    }

    #[test]
    fn a_token_file_holds_the_hash_and_the_token_file_the_secret() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tokens, out) = (dir.path().join("tokens"), dir.path().join("ci.token"));
        let operator = Identity::parse("lockstep://operator/ci")?;
        token(&operator, &tokens, &out)?;
        let secret = std::fs::read_to_string(&out).expect("token");
        let stored = std::fs::read_to_string(&tokens).expect("tokens");
        assert!(!stored.contains(secret.trim()));
        assert_eq!(
            Tokens::parse(&stored)?.identity(secret.trim()),
            Some(operator)
        );
        Ok(())
    }

    fn rustls_pem(pem: &[u8]) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem)
            .expect("pem")
            .to_vec()
    }
}
