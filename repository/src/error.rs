//! The typed error of every Lockstep operation, carrying the seed error codes.
//!
//! The codes are public API: operators grep logs for them and programs branch on them.
//! Each code has one severity and one operator hint, defined here and nowhere else.

use std::fmt;

/// A stable, documented error code (the ThemisDB seed codes plus Lockstep's own).
/// Serialized as operators see it (`ERR_BACKUP_CHECKSUM_MISMATCH`), the same in JSON as in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BackupCreationFailed,
    BackupRestorationFailed,
    BackupVerificationFailed,
    BackupNotFound,
    BackupInvalidType,
    BackupIncomplete,
    BackupCompressionFailed,
    BackupDecompressionFailed,
    BackupChecksumMismatch,
    BackupManifestCorrupt,
    BackupWalArchiveFailed,
    StorageDiskFull,
    /// Lockstep: the WAL range an incremental backup needs is gone.
    BackupWalGap,
    /// Lockstep: a barrier lease ran out before the coordinator committed.
    BarrierLeaseExpired,
    /// Lockstep: the restore target exists and is not empty.
    RestoreTargetNotEmpty,
    /// Lockstep: the repository could not be reached or refused the request.
    StorageUnavailable,
    /// Lockstep: an argument, URL or identifier is malformed.
    InvalidArgument,
    /// Lockstep: the shard's storage engine reported an error.
    ShardEngineFailed,
    /// Lockstep: another backup barrier is running.
    BarrierBusy,
    /// Lockstep: an agent could not be reached or did not answer in time.
    AgentUnavailable,
    /// Lockstep: the barrier was aborted before this shard committed.
    BarrierAborted,
    /// Lockstep: another coordinator took the repository over; this one no longer acts.
    CoordinatorFenced,
    /// Lockstep: the caller proved no identity (no valid certificate, no known token).
    Unauthenticated,
    /// Lockstep: the caller's role may not make this call.
    PermissionDenied,
    /// Lockstep: an encrypted repository's passphrase is missing or opens none of its key
    /// slots, or a passphrase was given for a repository that is not encrypted.
    EncryptionKey,
}

/// How bad an error is, in the seed's three levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
    Critical,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        })
    }
}

impl ErrorCode {
    /// The code as operators see it, e.g. `ERR_BACKUP_CHECKSUM_MISMATCH`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BackupCreationFailed => "ERR_BACKUP_CREATION_FAILED",
            ErrorCode::BackupRestorationFailed => "ERR_BACKUP_RESTORATION_FAILED",
            ErrorCode::BackupVerificationFailed => "ERR_BACKUP_VERIFICATION_FAILED",
            ErrorCode::BackupNotFound => "ERR_BACKUP_NOT_FOUND",
            ErrorCode::BackupInvalidType => "ERR_BACKUP_INVALID_TYPE",
            ErrorCode::BackupIncomplete => "ERR_BACKUP_INCOMPLETE",
            ErrorCode::BackupCompressionFailed => "ERR_BACKUP_COMPRESSION_FAILED",
            ErrorCode::BackupDecompressionFailed => "ERR_BACKUP_DECOMPRESSION_FAILED",
            ErrorCode::BackupChecksumMismatch => "ERR_BACKUP_CHECKSUM_MISMATCH",
            ErrorCode::BackupManifestCorrupt => "ERR_BACKUP_MANIFEST_CORRUPT",
            ErrorCode::BackupWalArchiveFailed => "ERR_BACKUP_WAL_ARCHIVE_FAILED",
            ErrorCode::StorageDiskFull => "ERR_STORAGE_DISK_FULL",
            ErrorCode::BackupWalGap => "ERR_BACKUP_WAL_GAP",
            ErrorCode::BarrierLeaseExpired => "ERR_BARRIER_LEASE_EXPIRED",
            ErrorCode::RestoreTargetNotEmpty => "ERR_RESTORE_TARGET_NOT_EMPTY",
            ErrorCode::StorageUnavailable => "ERR_STORAGE_UNAVAILABLE",
            ErrorCode::InvalidArgument => "ERR_INVALID_ARGUMENT",
            ErrorCode::ShardEngineFailed => "ERR_SHARD_ENGINE_FAILED",
            ErrorCode::BarrierBusy => "ERR_BARRIER_BUSY",
            ErrorCode::AgentUnavailable => "ERR_AGENT_UNAVAILABLE",
            ErrorCode::BarrierAborted => "ERR_BARRIER_ABORTED",
            ErrorCode::CoordinatorFenced => "ERR_COORDINATOR_FENCED",
            ErrorCode::Unauthenticated => "ERR_AUTH_UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "ERR_AUTH_PERMISSION_DENIED",
            ErrorCode::EncryptionKey => "ERR_ENCRYPTION_KEY",
        }
    }

    /// Every code, for parsing and documentation.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::BackupCreationFailed,
        ErrorCode::BackupRestorationFailed,
        ErrorCode::BackupVerificationFailed,
        ErrorCode::BackupNotFound,
        ErrorCode::BackupInvalidType,
        ErrorCode::BackupIncomplete,
        ErrorCode::BackupCompressionFailed,
        ErrorCode::BackupDecompressionFailed,
        ErrorCode::BackupChecksumMismatch,
        ErrorCode::BackupManifestCorrupt,
        ErrorCode::BackupWalArchiveFailed,
        ErrorCode::StorageDiskFull,
        ErrorCode::BackupWalGap,
        ErrorCode::BarrierLeaseExpired,
        ErrorCode::RestoreTargetNotEmpty,
        ErrorCode::StorageUnavailable,
        ErrorCode::InvalidArgument,
        ErrorCode::ShardEngineFailed,
        ErrorCode::BarrierBusy,
        ErrorCode::AgentUnavailable,
        ErrorCode::BarrierAborted,
        ErrorCode::CoordinatorFenced,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::EncryptionKey,
    ];

    /// The code named `ERR_...`, if it is one of ours.
    pub fn parse(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == name)
    }

    /// The seed's severity for this code.
    pub fn severity(self) -> Severity {
        match self {
            ErrorCode::BackupIncomplete
            | ErrorCode::BackupChecksumMismatch
            | ErrorCode::BackupWalGap
            | ErrorCode::StorageDiskFull => Severity::Critical,
            ErrorCode::BackupVerificationFailed => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// What an operator should do next.
    pub fn hint(self) -> &'static str {
        match self {
            ErrorCode::BackupCreationFailed => {
                "check the agent log and the repository permissions, then retry the backup"
            }
            ErrorCode::BackupRestorationFailed => {
                "the target was left untouched; fix the cause named above and run the restore again"
            }
            ErrorCode::BackupVerificationFailed => {
                "run `verify --full` to locate the damaged objects, then take a new full backup"
            }
            ErrorCode::BackupNotFound => "list the available backups with `list`",
            ErrorCode::BackupInvalidType => "use one of: full, incremental, differential",
            ErrorCode::BackupIncomplete => {
                "a component of this backup is missing; do not rely on it, take a new full backup"
            }
            ErrorCode::BackupCompressionFailed => {
                "check memory and disk on the agent, then retry the backup"
            }
            ErrorCode::BackupDecompressionFailed => {
                "the stored object is damaged; run `verify --full` and restore an older backup"
            }
            ErrorCode::BackupChecksumMismatch => {
                "stored data is corrupt; restore another backup and take a new full backup"
            }
            ErrorCode::BackupManifestCorrupt => {
                "the manifest cannot be read; restore another backup and take a new full backup"
            }
            ErrorCode::BackupWalArchiveFailed => {
                "check the WAL destination's reachability and credentials"
            }
            ErrorCode::StorageDiskFull => "free space on the target filesystem and retry",
            ErrorCode::BackupWalGap => {
                "the WAL needed for this backup is gone; take a full backup instead"
            }
            ErrorCode::BarrierLeaseExpired => {
                "the barrier took longer than its lease; check agent health or raise the lease"
            }
            ErrorCode::RestoreTargetNotEmpty => {
                "restore into a new or empty directory; Lockstep never overwrites existing data"
            }
            ErrorCode::StorageUnavailable => {
                "check the repository URL, credentials and network, then retry"
            }
            ErrorCode::InvalidArgument => "see `--help` for the accepted forms",
            ErrorCode::ShardEngineFailed => {
                "check the agent log and the shard's disk; the engine's message is above"
            }
            ErrorCode::BarrierBusy => {
                "wait for the running operation named above to finish (`lockstep cluster status`), then retry"
            }
            ErrorCode::AgentUnavailable => {
                "check that the agent named above is running and reachable (`lockstep cluster status`)"
            }
            ErrorCode::BarrierAborted => "the backup was aborted; retry it",
            ErrorCode::CoordinatorFenced => {
                "a newer coordinator acts on this repository; use it, and stop this one (restarting it takes the repository back)"
            }
            ErrorCode::Unauthenticated => {
                "give the client a certificate issued by the cluster's CA (`lockstep cert issue`) or a bearer token (`--token-file`)"
            }
            ErrorCode::PermissionDenied => {
                "this identity's role may not make the call: changes need an operator (lockstep://operator/NAME), reads a reader"
            }
            ErrorCode::EncryptionKey => {
                "give the repository's passphrase in a file named by LOCKSTEP_PASSPHRASE_FILE (or in LOCKSTEP_PASSPHRASE); `lockstep key list` shows its key slots"
            }
        }
    }

    /// The process exit code a CLI returns for this error.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::BackupInvalidType => 2,
            ErrorCode::BackupNotFound => 3,
            ErrorCode::BackupChecksumMismatch
            | ErrorCode::BackupManifestCorrupt
            | ErrorCode::BackupIncomplete
            | ErrorCode::BackupVerificationFailed
            | ErrorCode::BackupDecompressionFailed => 4,
            ErrorCode::StorageDiskFull => 5,
            ErrorCode::AgentUnavailable => 6,
            _ => 1,
        }
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        ErrorCode::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {name:?}")))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its code, a message saying what failed, and the underlying cause.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a manifest or record that failed to read is damaged (it does not parse, or its
    /// seal does not open), as opposed to unknown (the store did not answer): a damaged one
    /// can be skipped and deleted, an unknown one must be read again.
    pub fn is_damaged_record(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::BackupManifestCorrupt | ErrorCode::BackupChecksumMismatch
        )
    }

    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        code: ErrorCode,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            code,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Maps a local I/O error, turning "no space left" into `ERR_STORAGE_DISK_FULL`.
    pub fn io(code: ErrorCode, what: impl Into<String>, err: std::io::Error) -> Self {
        let code = if is_disk_full(&err) {
            ErrorCode::StorageDiskFull
        } else {
            code
        };
        Error::with_source(code, what, err)
    }

    /// The kind of the I/O error this error wraps, if it wraps one.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        let source = self.source.as_ref()?;
        source
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
    }

    pub fn severity(&self) -> Severity {
        self.code.severity()
    }

    pub fn hint(&self) -> &'static str {
        self.code.hint()
    }

    /// The full cause chain on one line, for reports and logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            out.push_str(": ");
            out.push_str(&err.to_string());
            cause = err.source();
        }
        out
    }

    /// Replaces the message's prefix with more context while keeping the code.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// True for ENOSPC and EDQUOT, which an operator fixes by freeing space.
pub fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(err.raw_os_error(), Some(28) | Some(122))
}

/// Attaches an error code and context to foreign results.
pub trait ResultExt<T> {
    fn code(self, code: ErrorCode, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> ResultExt<T> for std::result::Result<T, E> {
    fn code(self, code: ErrorCode, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error::with_source(code, what(), err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_spells_codes_as_text_does() {
        let json = serde_json::to_string(&ErrorCode::BackupChecksumMismatch).expect("serialize");
        assert_eq!(json, "\"ERR_BACKUP_CHECKSUM_MISMATCH\"");
        let back: ErrorCode = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, ErrorCode::BackupChecksumMismatch);
        assert!(serde_json::from_str::<ErrorCode>("\"BACKUP_CHECKSUM_MISMATCH\"").is_err());
    }

    #[test]
    fn unreachable_has_its_own_exit_code() {
        assert_eq!(ErrorCode::AgentUnavailable.exit_code(), 6);
        assert_ne!(
            ErrorCode::AgentUnavailable.exit_code(),
            ErrorCode::BackupVerificationFailed.exit_code()
        );
    }

    #[test]
    fn disk_full_io_errors_get_their_own_code() {
        let err = Error::io(
            ErrorCode::BackupRestorationFailed,
            "write file",
            std::io::Error::from_raw_os_error(28),
        );
        assert_eq!(err.code, ErrorCode::StorageDiskFull);
        assert_eq!(err.severity(), Severity::Critical);
        let other = Error::io(
            ErrorCode::BackupRestorationFailed,
            "write file",
            std::io::Error::from_raw_os_error(13),
        );
        assert_eq!(other.code, ErrorCode::BackupRestorationFailed);
    }

    #[test]
    fn every_code_parses_back() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("ERR_NOPE"), None);
    }

    #[test]
    fn codes_render_as_the_seed_spells_them() {
        assert_eq!(
            ErrorCode::BackupChecksumMismatch.to_string(),
            "ERR_BACKUP_CHECKSUM_MISMATCH"
        );
    }
}
