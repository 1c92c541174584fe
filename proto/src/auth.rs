//! Who is calling and what they may call (DESIGN §15): identities, the role table every
//! server applies, and bearer tokens.
//!
//! An identity is a `lockstep://` URI, carried in a certificate's subject alternative names
//! or bound to a token in the server's token file:
//!
//! | identity | may call |
//! |---|---|
//! | `lockstep://coordinator` | every `Agent` RPC; the `WalArchive` reads (restores from another region) and `DeleteSegments` (its retention) |
//! | `lockstep://agent/<shard>` | `WalArchive.PutSegment` for its own shard only (the service checks the shard), the `WalArchive` reads |
//! | `lockstep://operator/<name>` | every `Coordinator` RPC; the `WalArchive` reads |
//! | `lockstep://reader/<name>` | the `Coordinator` RPCs that change nothing: lists, gets, status, watch (not verify: it downloads everything and records what it checked) |
//! | `lockstep://client/<name>` | the `Shard` API (an application's reads and writes) |
//!
//! Anyone authenticated may use health checks and reflection; every other call is refused. A
//! new `Coordinator` RPC is an operator's until it is listed here as a read.

use std::fmt;
use std::path::Path;

use lockstep_repository::{Error, ErrorCode, Result, ShardId};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The scheme of identity URIs.
pub const SCHEME: &str = "lockstep://";

/// A caller, as a certificate or a token proves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Coordinator,
    Agent(ShardId),
    Operator(String),
    Reader(String),
    Client(String),
}

impl Identity {
    /// The identity `uri` names, e.g. `lockstep://agent/shard-0`.
    pub fn parse(uri: &str) -> Result<Identity> {
        let invalid = |why: &str| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "identity {uri:?}: {why}; write lockstep://coordinator, lockstep://agent/SHARD, lockstep://operator/NAME, lockstep://reader/NAME or lockstep://client/NAME"
                ),
            )
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("not a lockstep:// URI"))?;
        let (role, name) = match rest.split_once('/') {
            Some((role, name)) => (role, Some(name)),
            None => (rest, None),
        };
        // Names follow the rules of every other identifier (no '/', no '..').
        let named = |name: Option<&str>| -> Result<String> {
            let name = name.ok_or_else(|| invalid("the role needs a name"))?;
            Ok(ShardId::new(name)
                .map_err(|err| invalid(&err.message))?
                .to_string())
        };
        match role {
            "coordinator" if name.is_none() => Ok(Identity::Coordinator),
            "agent" => Ok(Identity::Agent(
                ShardId::new(named(name)?).map_err(|err| invalid(&err.message))?,
            )),
            "operator" => Ok(Identity::Operator(named(name)?)),
            "reader" => Ok(Identity::Reader(named(name)?)),
            "client" => Ok(Identity::Client(named(name)?)),
            _ => Err(invalid("unknown role")),
        }
    }

    /// Whether a bearer token may stand for this identity: people and applications without
    /// certificates; never the coordinator or an agent, whose rights (the barrier, restores,
    /// WAL puts) need mutual TLS.
    pub fn may_hold_a_token(&self) -> bool {
        matches!(
            self,
            Identity::Operator(_) | Identity::Reader(_) | Identity::Client(_)
        )
    }

    /// May this identity make the call at `path` (`/package.Service/Method`)?
    pub fn may_call(&self, path: &str) -> bool {
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return false;
        };
        match service {
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection" => true,
            "lockstep.v1.Agent" => matches!(self, Identity::Coordinator),
            "lockstep.v1.Shard" => matches!(self, Identity::Client(_)),
            "lockstep.v1.WalArchive" => match method {
                "PutSegment" => matches!(self, Identity::Agent(_)),
                "DeleteSegments" => matches!(self, Identity::Coordinator),
                "ListLineages" | "ListSegments" | "GetSegment" => matches!(
                    self,
                    Identity::Agent(_) | Identity::Coordinator | Identity::Operator(_)
                ),
                _ => false,
            },
            "lockstep.v1.Coordinator" => match self {
                Identity::Operator(_) => true,
                Identity::Reader(_) => matches!(
                    method,
                    "GetBackupJob"
                        | "ListBackups"
                        | "GetBackup"
                        | "ClusterStatus"
                        | "WalStatus"
                        | "ListSchedules"
                        | "ListTags"
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Coordinator => write!(f, "{SCHEME}coordinator"),
            Identity::Agent(shard) => write!(f, "{SCHEME}agent/{shard}"),
            Identity::Operator(name) => write!(f, "{SCHEME}operator/{name}"),
            Identity::Reader(name) => write!(f, "{SCHEME}reader/{name}"),
            Identity::Client(name) => write!(f, "{SCHEME}client/{name}"),
        }
    }
}

/// One DER element of `input`: its tag, its contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The elements of a DER sequence's contents, in order (stops at a malformed one).
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = der(input)?;
        input = rest;
        Some((tag, value))
    })
}

const SEQUENCE: u8 = 0x30;
/// `[3]` EXPLICIT, the extensions of a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// GeneralName's uniformResourceIdentifier, `[6]` IMPLICIT IA5String.
const URI: u8 = 0x86;

/// Every URI among a certificate's subject alternative names (RFC 5280, 4.1 and 4.2.1.6);
/// `None` if the certificate is not well-formed DER.
fn alternative_uris(certificate: &[u8]) -> Option<Vec<String>> {
    let (SEQUENCE, cert, _) = der(certificate)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(cert)? else {
        return None;
    };
    let mut uris = Vec::new();
    for (_, extensions) in elements(tbs).filter(|(tag, _)| *tag == EXTENSIONS) {
        let (SEQUENCE, extensions, _) = der(extensions)? else {
            return None;
        };
        for (_, extension) in elements(extensions).filter(|(tag, _)| *tag == SEQUENCE) {
            let mut parts = elements(extension).peekable();
            if parts.next() != Some((OID, SUBJECT_ALT_NAME)) {
                continue;
            }
            parts.next_if(|(tag, _)| *tag == BOOLEAN);
            let Some((OCTET_STRING, names)) = parts.next() else {
                return None;
            };
            let (SEQUENCE, names, _) = der(names)? else {
                return None;
            };
            uris.extend(
                elements(names)
                    .filter(|(tag, _)| *tag == URI)
                    .map(|(_, uri)| String::from_utf8_lossy(uri).into_owned()),
            );
        }
    }
    Some(uris)
}

/// The identity a certificate (DER) carries: its one `lockstep://` subject alternative name.
pub fn certificate_identity(der: &[u8]) -> std::result::Result<Identity, String> {
    let uris =
        alternative_uris(der).ok_or_else(|| "the certificate cannot be parsed".to_string())?;
    let uris: Vec<&str> = uris
        .iter()
        .map(String::as_str)
        .filter(|uri| uri.starts_with(SCHEME))
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|err| err.message),
        [] => Err("the certificate names no lockstep:// identity".to_string()),
        _ => Err(format!(
            "the certificate names {} lockstep:// identities; it must name one",
            uris.len()
        )),
    }
}

/// The bearer tokens a server accepts: each stored as the SHA-256 of the token, bound to an
/// identity. A token file holds one `sha256:HEX IDENTITY` per line (`lockstep cert token`
/// writes them); `#` starts a comment.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    hashed: Vec<([u8; 32], Identity)>,
}

impl Tokens {
    /// The tokens of `path`.
    pub fn load(path: &Path) -> Result<Tokens> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("read the token file {}", path.display()),
                err,
            )
        })?;
        Tokens::parse(&text).map_err(|err| err.context(format!("token file {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Tokens> {
        let mut hashed = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let invalid = |why: String| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "line {}: {why}; write `sha256:HEX lockstep://ROLE/NAME` (lockstep cert token writes it)",
                        n + 1
                    ),
                )
            };
            let (hash, identity) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| invalid("a hash and an identity are needed".into()))?;
            let hash = hash
                .strip_prefix("sha256:")
                .and_then(|hex| hex::decode(hex).ok())
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| invalid("the hash is not sha256: and 64 hex digits".into()))?;
            let identity = Identity::parse(identity.trim()).map_err(|err| invalid(err.message))?;
            if !identity.may_hold_a_token() {
                return Err(invalid(format!(
                    "{identity} proves itself with its certificate; tokens are for operators, readers and clients"
                )));
            }
            hashed.push((hash, identity));
        }
        Ok(Tokens { hashed })
    }

    /// The line of the token file that accepts `token` for `identity`.
    pub fn line(token: &str, identity: &Identity) -> String {
        format!("sha256:{} {identity}", hex::encode(Sha256::digest(token)))
    }

    /// The identity `token` is bound to. Every stored hash is compared, in constant time, so
    /// the time taken says nothing about which one (or how much of one) matched.
    pub fn identity(&self, token: &str) -> Option<Identity> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (hash, identity) in &self.hashed {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(identity.clone());
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.hashed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uri: &str) -> Identity {
        Identity::parse(uri).expect("identity")
    }

    #[test]
    fn identities_round_trip_and_bad_ones_are_refused() {
        for uri in [
            "lockstep://coordinator",
            "lockstep://agent/shard-0",
            "lockstep://operator/alice",
            "lockstep://reader/grafana",
            "lockstep://client/app",
        ] {
            assert_eq!(id(uri).to_string(), uri);
        }
        for bad in [
            "lockstep://agent/../shard-0",
            "lockstep://agent/a/b",
            "lockstep://operator/",
            "lockstep://operator",
            "lockstep://coordinator/x",
            "lockstep://admin/root",
            "https://operator/alice",
            "lockstep://client/a\0b",
        ] {
            let err = Identity::parse(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn each_role_may_call_its_part_and_nothing_else() {
        let coordinator = id("lockstep://coordinator");
        let agent = id("lockstep://agent/shard-0");
        let operator = id("lockstep://operator/alice");
        let reader = id("lockstep://reader/grafana");
        let client = id("lockstep://client/app");
        let table: [(&str, [bool; 5]); 11] = [
            // path: coordinator, agent, operator, reader, client
            (
                "/lockstep.v1.Agent/RestoreApply",
                [true, false, false, false, false],
            ),
            (
                "/lockstep.v1.Agent/Prepare",
                [true, false, false, false, false],
            ),
            ("/lockstep.v1.Shard/Put", [false, false, false, false, true]),
            (
                "/lockstep.v1.WalArchive/PutSegment",
                [false, true, false, false, false],
            ),
            (
                "/lockstep.v1.WalArchive/GetSegment",
                [true, true, true, false, false],
            ),
            (
                "/lockstep.v1.WalArchive/DeleteSegments",
                [true, false, false, false, false],
            ),
            (
                "/lockstep.v1.Coordinator/CreateBackup",
                [false, false, true, false, false],
            ),
            (
                "/lockstep.v1.Coordinator/Restore",
                [false, false, true, false, false],
            ),
            (
                "/lockstep.v1.Coordinator/ListBackups",
                [false, false, true, true, false],
            ),
            (
                "/grpc.health.v1.Health/Check",
                [true, true, true, true, true],
            ),
            (
                "/lockstep.v1.Coordinator/NoSuchRpc",
                [false, false, true, false, false],
            ),
        ];
        for (path, allowed) in table {
            for (who, allowed) in [&coordinator, &agent, &operator, &reader, &client]
                .into_iter()
                .zip(allowed)
            {
                assert_eq!(who.may_call(path), allowed, "{who} {path}");
            }
        }
        assert!(!operator.may_call("/other.Service/Method"));
        assert!(!operator.may_call("garbage"));
    }

    #[test]
    fn tokens_are_stored_hashed_and_bound_to_their_identity() -> Result<()> {
        let operator = id("lockstep://operator/ci");
        let text = format!(
            "# tokens\n{}\n\n{}  # the dashboard\n",
            Tokens::line("s3cret-operator", &operator),
            Tokens::line("s3cret-reader", &id("lockstep://reader/dash"))
        );
        assert!(!text.contains("s3cret"));
        let tokens = Tokens::parse(&text)?;
        assert_eq!(tokens.identity("s3cret-operator"), Some(operator));
        assert_eq!(
            tokens.identity("s3cret-reader"),
            Some(id("lockstep://reader/dash"))
        );
        assert_eq!(tokens.identity("s3cret"), None);
        assert_eq!(tokens.identity(""), None);
        for bad in [
            "sha256:abcd lockstep://operator/x",
            "md5:00 lockstep://operator/x",
            &format!("sha256:{} lockstep://root", "00".repeat(32)),
            &format!("sha256:{} lockstep://coordinator", "00".repeat(32)),
            &format!("sha256:{} lockstep://agent/shard-0", "00".repeat(32)),
            "justonefield",
        ] {
            let err = Tokens::parse(bad).expect_err(bad);
            assert!(err.message.contains("line 1"), "{err}");
        }
        Ok(())
    }
}
