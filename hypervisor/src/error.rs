//! `HypervisorError`: the one error type of the `Hypervisor` trait, and the mapping of libvirt's
//! error codes onto it. Callers branch on the variant (retry on `Unavailable`, treat `NotFound` as
//! "already gone"), so the mapping is the contract, not the message.

use virt::error::{ErrorDomain, ErrorNumber};

/// What can go wrong when talking to the hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The named domain does not exist (libvirt `VIR_ERR_NO_DOMAIN`).
    #[error("domain not found: {message}")]
    NotFound { message: String },
    /// A domain with this name or UUID already exists (libvirt `VIR_ERR_DOM_EXIST`).
    #[error("domain already exists: {message}")]
    AlreadyExists { message: String },
    /// The hypervisor cannot be reached; retrying later may succeed (the next call reconnects).
    #[error("hypervisor unavailable: {message}")]
    Unavailable { message: String },
    /// The request was malformed: a bad spec, a bad argument or XML libvirt refused.
    #[error("invalid request: {message}")]
    Invalid { message: String },
    /// Libvirt refused or failed the operation for another reason; `code` is libvirt's number.
    #[error("hypervisor operation failed (libvirt code {code}): {message}")]
    Operation { code: u32, message: String },
}

impl HypervisorError {
    /// Whether the error is about the connection rather than the request, so the cached
    /// connection must be dropped and reopened on the next call.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, HypervisorError::Unavailable { .. })
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        HypervisorError::Invalid {
            message: message.into(),
        }
    }
}

impl From<virt::error::Error> for HypervisorError {
    fn from(e: virt::error::Error) -> Self {
        let message = e.message().to_string();
        // Errors raised by the RPC layer mean the daemon went away (libvirtd restart, socket
        // closed) whatever their number says.
        let rpc_domain = matches!(
            e.domain(),
            virt::enumutil::Enum::Known(ErrorDomain::Rpc | ErrorDomain::Remote)
        );
        match e.code() {
            virt::enumutil::Enum::Known(code) => match code {
                ErrorNumber::NoDomain => HypervisorError::NotFound { message },
                ErrorNumber::DomExist => HypervisorError::AlreadyExists { message },
                ErrorNumber::NoConnect
                | ErrorNumber::InvalidConn
                | ErrorNumber::AuthFailed
                | ErrorNumber::Rpc => HypervisorError::Unavailable { message },
                ErrorNumber::SystemError if rpc_domain => HypervisorError::Unavailable { message },
                ErrorNumber::InternalError if rpc_domain => {
                    HypervisorError::Unavailable { message }
                }
                ErrorNumber::InvalidArg | ErrorNumber::XmlError | ErrorNumber::XmlDetail => {
                    HypervisorError::Invalid { message }
                }
                _ => HypervisorError::Operation {
                    code: e.code().to_raw(),
                    message,
                },
            },
            virt::enumutil::Enum::Unknown(raw) => HypervisorError::Operation { code: raw, message },
        }
    }
}
