//! TOTP (RFC 6238) second factor: secrets, otpauth URLs and code checks, with totp-rs.
//!
//! Parameters are the ones every authenticator app supports: SHA-1, 6 digits, 30-second steps,
//! one step of clock skew either way. Replay protection (a step is accepted once) lives in the
//! replicated state, see `raft::Command::UseTotpStep`.

use totp_rs::{Builder, Secret, Totp};

use crate::error::{ApiError, ApiResult};

const ISSUER: &str = "NovaCron";

fn totp(secret: &[u8], account: &str) -> ApiResult<Totp> {
    Builder::new()
        .with_secret(Secret::from(secret))
        .with_issuer(Some(ISSUER))
        .with_account_name(account)
        .build()
        .map_err(|e| ApiError::Internal(format!("TOTP setup failed: {e:?}")))
}

/// A fresh random secret (160 bits, the RFC's recommendation for SHA-1).
pub fn new_secret() -> Vec<u8> {
    Secret::generate().as_bytes().to_vec()
}

/// The secret as base32 (for manual entry) and the `otpauth://` URL (for QR codes).
pub fn provisioning(secret: &[u8], account: &str) -> ApiResult<(String, String)> {
    let t = totp(secret, account)?;
    let url = t
        .to_url()
        .map_err(|e| ApiError::Internal(format!("otpauth URL failed: {e:?}")))?;
    Ok((Secret::from(secret).to_base32(), url))
}

/// The time step a code is valid for at `now_secs`, or `None` when it is wrong.
pub fn check(secret: &[u8], account: &str, code: &str, now_secs: u64) -> ApiResult<Option<u64>> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::Validation("a TOTP code has 6 digits".into()));
    }
    Ok(totp(secret, account)?.check(code, now_secs))
}

/// The code for `now_secs`; what an authenticator app would show (used by tests and the CLI).
pub fn code_at(secret: &[u8], account: &str, now_secs: u64) -> ApiResult<String> {
    Ok(totp(secret, account)?.generate(now_secs).to_string())
}

/// Decodes a base32 secret as shown at enrolment.
pub fn secret_from_base32(s: &str) -> ApiResult<Vec<u8>> {
    Secret::try_from_base32(s)
        .map(|s| s.as_bytes().to_vec())
        .map_err(|_| ApiError::Validation("not a base32 TOTP secret".into()))
}
