//! Errors of the serving path. Each variant is a kind a client can act on; the transports map
//! them to status codes (`transport::status`).

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong (bad image, bad shape, bad parameter).
    #[error("{0}")]
    InvalidArgument(String),
    /// A parameter is well-formed but outside what this model supports.
    #[error("{0}")]
    OutOfRange(String),
    /// The request names something that is not served (an unknown model or version).
    #[error("{0}")]
    NotFound(String),
    /// A limit was hit (too many images, too many pixels).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The admission queue is full: transient, worth retrying after a pause.
    #[error("{0}")]
    QueueFull(String),
    /// The device had no memory for this batch, even split as small as it goes.
    #[error("{0}")]
    OutOfMemory(String),
    /// The server is shutting down, still loading, or the worker is gone.
    #[error("{0}")]
    Unavailable(String),
    /// The device failed for good: this server stops serving and should be restarted.
    #[error("{0}")]
    DeviceLost(String),
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
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The same kind of error with `prefix: ` in front of its message.
    pub fn prefixed(self, prefix: &str) -> Self {
        let wrap = |m: String| format!("{prefix}: {m}");
        match self {
            Self::InvalidArgument(m) => Self::InvalidArgument(wrap(m)),
            Self::OutOfRange(m) => Self::OutOfRange(wrap(m)),
            Self::NotFound(m) => Self::NotFound(wrap(m)),
            Self::ResourceExhausted(m) => Self::ResourceExhausted(wrap(m)),
            other => other,
        }
    }
}

impl From<crate_mae::ModelError> for ServeError {
    fn from(e: crate_mae::ModelError) -> Self {
        use crate_mae::ModelError;
        match e {
            ModelError::Input(msg) => Self::InvalidArgument(msg),
            ModelError::OutOfMemory(msg) => Self::OutOfMemory(msg),
            ModelError::DeviceLost(msg) => Self::DeviceLost(msg),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for ServeError {
    fn from(e: candle_core::Error) -> Self {
        crate_mae::ModelError::from(e).into()
    }
}
