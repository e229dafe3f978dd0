//! What can go wrong reading the auth filter's files or making credentials.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file could not be read at all.
    #[error("{}: cannot read the {what}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but an entry in it is wrong; `problem` names the entry and the fix.
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: Invalid },
    /// The operating system gave no randomness for a new key.
    #[error("no randomness from the OS: {0}")]
    Random(String),
    #[error("bcrypt: {0}")]
    Bcrypt(#[from] bcrypt::BcryptError),
    /// Both files of a reload are broken.
    #[error("{0}; {1}")]
    Both(Box<AuthError>, Box<AuthError>),
}

impl AuthError {
    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            AuthError::Read { path, .. } | AuthError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// A wrong entry in a keys or htpasswd file: where (`keys[2].expires`, `line 4`) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct Invalid {
    pub at: String,
    pub message: String,
}

impl Invalid {
    pub fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            at: at.into(),
            message: message.into(),
        }
    }
}
