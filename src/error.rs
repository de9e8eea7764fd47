//! The typed errors the BOSH director and CLI understand (cpi-contract.md section 2).
//!
//! Every failure in the CPI ends up as one `CpiError`; its `kind` becomes the
//! `error.type` of the response. Only the types in the director's
//! `KNOWN_RPC_ERRORS` are ever produced, because any other type fails the task.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is unusable (malformed JSON, bad arguments).
    CpiError,
    NotImplemented,
    NotSupported,
    /// Infrastructure failure or an outcome the CPI cannot vouch for.
    CloudError,
    VmNotFound,
    DiskNotFound,
    DiskNotAttached,
    NoDiskSpace,
    VmCreationFailed,
}

impl ErrorKind {
    /// The `error.type` string, exactly as the callers match it.
    pub fn bosh_type(self) -> &'static str {
        match self {
            ErrorKind::CpiError => "Bosh::Clouds::CpiError",
            ErrorKind::NotImplemented => "Bosh::Clouds::NotImplemented",
            ErrorKind::NotSupported => "Bosh::Clouds::NotSupported",
            ErrorKind::CloudError => "Bosh::Clouds::CloudError",
            ErrorKind::VmNotFound => "Bosh::Clouds::VMNotFound",
            ErrorKind::DiskNotFound => "Bosh::Clouds::DiskNotFound",
            ErrorKind::DiskNotAttached => "Bosh::Clouds::DiskNotAttached",
            ErrorKind::NoDiskSpace => "Bosh::Clouds::NoDiskSpace",
            ErrorKind::VmCreationFailed => "Bosh::Clouds::VMCreationFailed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpiError {
    pub kind: ErrorKind,
    pub message: String,
    pub ok_to_retry: bool,
}

pub type Result<T> = std::result::Result<T, CpiError>;

impl CpiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CpiError {
            kind,
            message: message.into(),
            ok_to_retry: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CpiError, message)
    }

    pub fn cloud(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CloudError, message)
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, message)
    }

    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, message)
    }

    pub fn vm_not_found(vm_cid: &str) -> Self {
        Self::new(ErrorKind::VmNotFound, format!("VM '{vm_cid}' not found"))
    }

    pub fn disk_not_found(disk_cid: &str) -> Self {
        Self::new(
            ErrorKind::DiskNotFound,
            format!("disk '{disk_cid}' not found"),
        )
    }

    /// An object the call found a moment ago is gone (another client
    /// removed it); the call as a whole can be retried.
    pub fn vanished(what: impl std::fmt::Display) -> Self {
        Self::cloud(format!("{what} vanished meanwhile; retry"))
    }

    pub fn retryable(mut self, ok_to_retry: bool) -> Self {
        self.ok_to_retry = ok_to_retry;
        self
    }

    /// Prefixes the message with what was being done, keeping the type.
    pub fn context(mut self, doing: impl fmt::Display) -> Self {
        self.message = format!("{doing}: {}", self.message);
        self
    }
}

impl fmt::Display for CpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.bosh_type(), self.message)
    }
}

impl std::error::Error for CpiError {}

/// Adds "what was being done" to any error on its way to becoming a `CloudError`.
pub trait Context<T> {
    fn context<D: fmt::Display>(self, doing: D) -> Result<T>;
    fn with_context<D: fmt::Display, F: FnOnce() -> D>(self, doing: F) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context<D: fmt::Display>(self, doing: D) -> Result<T> {
        self.map_err(|e| CpiError::cloud(format!("{doing}: {e}")))
    }
    fn with_context<D: fmt::Display, F: FnOnce() -> D>(self, doing: F) -> Result<T> {
        self.map_err(|e| CpiError::cloud(format!("{}: {e}", doing())))
    }
}
