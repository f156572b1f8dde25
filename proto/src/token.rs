//! The job token: a shared secret every RPC carries in its `authorization` header, so that a
//! client with a certificate but not the job's token (or any client, when the coordinator does
//! not ask for certificates) gets `Unauthenticated` and nothing else.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::tls::CredentialsError;

/// Fewer characters than this is a password, not a token.
const MIN_TOKEN_CHARS: usize = 16;
const SCHEME: &str = "Bearer ";

/// A job token, as read from a credentials folder.
#[derive(Clone)]
pub struct JobToken(Arc<str>);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in logs.
        f.write_str("JobToken(..)")
    }
}

impl JobToken {
    /// A token from its text: printable ASCII without spaces, at least 16 characters.
    pub fn new(text: &str) -> Result<JobToken, String> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_CHARS {
            return Err(format!(
                "a job token must have at least {MIN_TOKEN_CHARS} characters, this one has {}",
                text.len()
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a job token must be printable ASCII without spaces".into());
        }
        Ok(JobToken(text.into()))
    }

    /// Reads the token file (one line).
    pub fn read(path: &Path) -> Result<JobToken, CredentialsError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| CredentialsError::file(path, format!("cannot read: {e}")))?;
        JobToken::new(&text).map_err(|message| CredentialsError::file(path, message))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented))
    }
}

/// The client's interceptor: puts the token on every call (nothing without one).
#[derive(Debug, Clone, Default)]
pub struct AddToken(pub Option<JobToken>);

impl Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("{SCHEME}{}", token.as_str()))
                .map_err(|_| Status::internal("the job token is not a valid header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The server's interceptor: a call without the job's token ends here, before any service
/// code runs. With no token (an `--insecure` coordinator) every call passes.
#[derive(Debug, Clone, Default)]
pub struct RequireToken(pub Option<JobToken>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        // The scheme's name is case-insensitive (RFC 9110), the token itself is not.
        let presented = request.metadata().get("authorization").and_then(|value| {
            let value = value.as_bytes();
            let scheme = value.get(..SCHEME.len())?;
            scheme
                .eq_ignore_ascii_case(SCHEME.as_bytes())
                .then(|| &value[SCHEME.len()..])
        });
        match presented {
            Some(presented) if token.matches(presented) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the job token is wrong")),
            None => Err(Status::unauthenticated(
                "no job token: this coordinator needs the token from its credentials folder",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JobToken {
        JobToken::new("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn checked(header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request.metadata_mut().insert("authorization", header.parse().unwrap());
        }
        RequireToken(Some(token())).call(request).map(|_| ())
    }

    #[test]
    fn only_the_right_token_passes() {
        let mut added = AddToken(Some(token())).call(Request::new(())).unwrap();
        let header = added
            .metadata_mut()
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(checked(Some(&header)).is_ok());
        for wrong in [
            None,
            Some("Bearer 0123456789abcdef0123456789abcdee"),
            Some("Bearer 0123456789abcdef"),
            Some("Bearer "),
            Some("0123456789abcdef0123456789abcdef"),
            Some("Basic 0123456789abcdef0123456789abcdef"),
        ] {
            let status = checked(wrong).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_is_not() {
        assert!(checked(Some("bearer 0123456789abcdef0123456789abcdef")).is_ok());
        assert!(checked(Some("BEARER 0123456789abcdef0123456789abcdef")).is_ok());
        assert!(checked(Some("Bearer 0123456789ABCDEF0123456789abcdef")).is_err());
    }

    #[test]
    fn an_insecure_server_lets_every_call_through() {
        assert!(RequireToken(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn short_or_spaced_tokens_are_refused() {
        assert!(JobToken::new("short").is_err());
        assert!(JobToken::new("has a space in it, sixteen+").is_err());
        assert!(JobToken::new("  0123456789abcdef\n").is_ok());
        assert_eq!(format!("{:?}", token()), "JobToken(..)");
    }
}
