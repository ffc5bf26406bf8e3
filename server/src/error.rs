//! Errors of the serving path, each mapped to the gRPC status a client can act on.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong (bad image, bad shape, bad parameter).
    #[error("{0}")]
    InvalidArgument(String),
    /// A parameter is well-formed but outside what this model supports.
    #[error("{0}")]
    OutOfRange(String),
    /// A limit was hit (too many images, too many pixels).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The admission queue is full: transient, worth retrying after a pause.
    #[error("{0}")]
    QueueFull(String),
    /// The server is shutting down or the worker is gone.
    #[error("{0}")]
    Unavailable(String),
    /// The client's deadline passed before the work could run.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("{0}")]
    Cancelled(String),
    /// A failure inside the model: a bug, not the client's fault.
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) | Self::QueueFull(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Internal(_) => Code::Internal,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<crate_mae::ModelError> for ServeError {
    fn from(e: crate_mae::ModelError) -> Self {
        match e {
            crate_mae::ModelError::Input(msg) => Self::InvalidArgument(msg),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The canonical gRPC name of a status code (`RESOURCE_EXHAUSTED`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
