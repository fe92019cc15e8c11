//! Requests to a registry whose answers are read as a stream and cut off
//! at a limit before they are buffered (manifests, image configs, whole
//! blobs), or handed on as a stream (blob ranges), and whose error answers
//! are read only far enough for a message; pushes ([`push`](super::push))
//! go the same way.
//!
//! `oci-client` reads every manifest and every error body whole before
//! anything looks at its length (`Response::bytes`): a registry streaming
//! an endless manifest made `lazybd inspect` hold a GiB and then ask again.
//! Here the registry gets [`MAX_ERROR_BODY`] bytes to explain an error and
//! `limit` bytes of content; more is a lying registry, a permanent error
//! that is not retried. The bearer-token flow is done here too, its answer
//! read to at most [`MAX_TOKEN_ANSWER`] bytes (`oci_client::Client::auth`
//! reads it whole); a token is kept per [`Access`] and renewed on a 401.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, RANGE, WWW_AUTHENTICATE,
};
use reqwest::StatusCode;
use tokio::sync::Mutex;

use super::{RegistryError, RegistryOptions};

/// Of an error answer, this much is read for its message.
pub const MAX_ERROR_BODY: usize = 4 << 10;
/// A token service's answer: JSON with a token (a JWT of a few KiB at
/// most) and its lifetime. More is a lying service.
pub const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// One metadata request, however the registry trickles its answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);

/// What a token is asked for: reading the repository, or also writing it
/// (a push checks which blobs the registry has, so it reads too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

impl Access {
    /// The actions of the token scope `repository:NAME:ACTIONS`.
    fn actions(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        }
    }
}

/// How requests are authorized, as learned from the registry.
#[derive(Clone)]
enum Authorization {
    Bearer(String),
    /// No token flow: the credentials as basic auth, if any.
    Basic,
}

/// Whose registry, and with which credentials, a request goes to.
pub struct Target<'a> {
    pub reference: &'a Reference,
    pub auth: &'a RegistryAuth,
}

pub struct BoundedClient {
    http: reqwest::Client,
    plain_http: bool,
    /// Per access: `[pull, push]`.
    authorization: [Mutex<Option<Authorization>>; 2],
}

impl BoundedClient {
    /// `extra_roots`: PEM CA certificates trusted besides the system's.
    pub fn new(
        opts: &RegistryOptions,
        extra_roots: &[Vec<u8>],
        user_agent: &'static str,
    ) -> Result<Self, RegistryError> {
        let failed = |e: reqwest::Error| RegistryError::Permanent {
            what: "creating the HTTP client".into(),
            message: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(user_agent)
            .use_preconfigured_tls(super::tls::client_config(extra_roots, opts.skip_verify)?)
            .build()
            .map_err(failed)?;
        Ok(BoundedClient {
            http,
            plain_http: opts.plain_http,
            authorization: Default::default(),
        })
    }

    /// `/v2/<repo>/<kind>/<name>` of `reference`'s registry and repository.
    pub fn url(&self, reference: &Reference, kind: &str, name: &str) -> String {
        let ns = reference
            .namespace()
            .map(|ns| format!("?ns={ns}"))
            .unwrap_or_default();
        format!(
            "{}/{}/{kind}/{name}{ns}",
            self.api_root(reference),
            reference.repository()
        )
    }

    /// `<scheme>://<registry>/v2` of `reference`.
    fn api_root(&self, reference: &Reference) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}/v2", reference.resolve_registry())
    }

    /// GETs `url` with `reference`'s credentials: the body, at most `limit`
    /// bytes, and the answer's headers. Over-long answers and error statuses
    /// are errors (transient for 5xx, 429 and 408, as asking again may help;
    /// permanent otherwise, over-long answers included).
    pub async fn get(
        &self,
        target: &Target<'_>,
        url: &str,
        accept: &str,
        limit: usize,
        what: &str,
    ) -> Result<(Bytes, HeaderMap), RegistryError> {
        let exchange = async {
            let response = self.respond(target, url, accept, what).await?;
            read_body(response, limit, what).await
        };
        within_deadline(what, "complete answer", exchange).await
    }

    /// GETs the blob at `url` into `file`, hashing it: at most `max_len`
    /// bytes, else a permanent error. Returns the length and the sha256
    /// digest of what was written. (oci-client's `pull_blob` buffers error
    /// bodies whole and writes whatever length the registry sends.)
    pub async fn to_file(
        &self,
        target: &Target<'_>,
        url: &str,
        max_len: u64,
        file: &mut tokio::fs::File,
        what: &str,
    ) -> Result<(u64, String), RegistryError> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let mut response = self.respond(target, url, "", what).await?;
        let response = &mut response;
        let too_long = || RegistryError::Permanent {
            what: what.to_owned(),
            message: format!(
                "the blob is longer than the {max_len} bytes its descriptor says; not asked again"
            ),
        };
        if response.content_length().is_some_and(|n| n > max_len) {
            return Err(too_long());
        }
        let (mut len, mut hash) = (0u64, sha2::Sha256::new());
        let io = |e: std::io::Error| RegistryError::Io {
            what: what.to_owned(),
            source: e,
        };
        // No overall deadline: a layer may take long; each read has the
        // client's read timeout.
        while let Some(piece) = response.chunk().await.map_err(|e| transport(what, e))? {
            len += piece.len() as u64;
            if len > max_len {
                return Err(too_long());
            }
            hash.update(&piece);
            file.write_all(&piece).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        Ok((len, format!("sha256:{}", hex::encode(hash.finalize()))))
    }

    /// A successful answer to GET `url` for blob bytes `range` (`206`, or
    /// `200` with the whole blob from a registry that ignores Range), its
    /// body not read yet. (oci-client's `pull_blob_stream_partial` reads an
    /// error answer whole, however long.) One attempt: the fetcher owns the
    /// retries of range reads and their deadline.
    pub async fn range(
        &self,
        target: &Target<'_>,
        url: &str,
        range: std::ops::Range<u64>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let last = range.end.saturating_sub(1).max(range.start);
        let header = format!("bytes={}-{last}", range.start);
        self.respond_with(target, url, "", Some(&header), what)
            .await
    }

    /// A successful response to GET `url` (a 401 renews the token once);
    /// for any other status an error with the start of its body.
    async fn respond(
        &self,
        target: &Target<'_>,
        url: &str,
        accept: &str,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.respond_with(target, url, accept, None, what).await
    }

    async fn respond_with(
        &self,
        target: &Target<'_>,
        url: &str,
        accept: &str,
        range: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.send(target, Access::Pull, what, |http| {
            let mut request = http.get(url);
            if !accept.is_empty() {
                request = request.header(ACCEPT, accept);
            }
            if let Some(range) = range {
                request = request.header(RANGE, range);
            }
            Ok(request)
        })
        .await
    }

    /// Sends the request `build` makes, authorized for `access`: the
    /// response if it succeeded, else an error with the start of its body.
    /// A 401 renews the token and sends a request built anew, once (a
    /// token may expire; a body can be sent only once).
    pub(super) async fn send(
        &self,
        target: &Target<'_>,
        access: Access,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder, RegistryError>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut response = self.send_any(target, access, what, build).await?;
        if !response.status().is_success() {
            return Err(error_answer(&mut response, what).await);
        }
        Ok(response)
    }

    /// [`send`](Self::send), with the response whatever its status (a 401
    /// after the token was renewed included).
    ///
    /// Without credentials the first request goes out as is, not after a
    /// `GET /v2/` asking how to authorize: a registry that serves anyone
    /// answers it, and one that wants a token says so in its 401, whose
    /// challenge is then followed. That saves a round trip per image (per
    /// pull, and per image at its first Prepare in the snapshotter).
    /// With credentials the ping stays: they go only where the registry's
    /// challenge says, never with a request that did not ask for them.
    pub(super) async fn send_any(
        &self,
        target: &Target<'_>,
        access: Access,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder, RegistryError>,
    ) -> Result<reqwest::Response, RegistryError> {
        let auth = target.auth;
        let mut renewed = false;
        loop {
            let cached = self.slot(access).lock().await.clone();
            let authorization = match (cached, auth) {
                (Some(a), _) => Some(a),
                (None, RegistryAuth::Anonymous) => None,
                (None, _) => Some(self.authorization(target, access, what).await?),
            };
            let request = build(&self.http)?;
            let request = match (&authorization, auth) {
                (Some(Authorization::Bearer(token)), _) => {
                    request.header(AUTHORIZATION, format!("Bearer {token}"))
                }
                (Some(Authorization::Basic), RegistryAuth::Basic(user, password)) => {
                    request.basic_auth(user, Some(password))
                }
                _ => request,
            };
            let response = request.send().await.map_err(|e| transport(what, e))?;
            if response.status() == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(bearer_challenge);
                drop(response);
                let renewal = match challenge {
                    Some(challenge) => {
                        let what = format!("{what}: authorizing");
                        let token = self.token(target, access, &what, &challenge);
                        Some(within_deadline(&what, "token", token).await?)
                    }
                    None => None,
                };
                *self.slot(access).lock().await = renewal;
                continue;
            }
            if authorization.is_none() && response.status() != StatusCode::UNAUTHORIZED {
                // Served without a token: so are the next requests.
                self.slot(access)
                    .lock()
                    .await
                    .get_or_insert(Authorization::Basic);
            }
            return Ok(response);
        }
    }

    fn slot(&self, access: Access) -> &Mutex<Option<Authorization>> {
        &self.authorization[access as usize]
    }

    async fn authorization(
        &self,
        target: &Target<'_>,
        access: Access,
        what: &str,
    ) -> Result<Authorization, RegistryError> {
        let mut cached = self.slot(access).lock().await;
        if let Some(a) = &*cached {
            return Ok(a.clone());
        }
        let what = format!("{what}: authorizing");
        let a = within_deadline(&what, "token", self.authorize(target, access, &what)).await?;
        *cached = Some(a.clone());
        Ok(a)
    }

    /// The registry's token flow (the distribution token spec, as
    /// `oci_client::Client::auth` runs it, answers bounded): `GET /v2/`
    /// names the token service in a Bearer challenge; the service is asked
    /// for a token for `access` to the repository, with the credentials as
    /// basic auth. No challenge: requests carry the credentials as basic
    /// auth.
    async fn authorize(
        &self,
        target: &Target<'_>,
        access: Access,
        what: &str,
    ) -> Result<Authorization, RegistryError> {
        if let RegistryAuth::Bearer(token) = target.auth {
            return Ok(Authorization::Bearer(token.clone()));
        }
        // Only the headers count; the body is never read.
        let ping = self
            .http
            .get(format!("{}/", self.api_root(target.reference)))
            .send()
            .await
            .map_err(|e| transport(what, e))?;
        let Some(challenge) = ping
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(bearer_challenge)
        else {
            return Ok(Authorization::Basic);
        };
        drop(ping);
        self.token(target, access, what, &challenge).await
    }

    /// A token for `access` to the repository from the service the
    /// challenge names, asked with the credentials, if any, as basic auth.
    async fn token(
        &self,
        target: &Target<'_>,
        access: Access,
        what: &str,
        challenge: &BearerChallenge,
    ) -> Result<Authorization, RegistryError> {
        let mut url =
            reqwest::Url::parse(&challenge.realm).map_err(|e| RegistryError::Permanent {
                what: what.to_owned(),
                message: format!("the token service {:?} is no URL: {e}", challenge.realm),
            })?;
        url.query_pairs_mut().append_pair(
            "scope",
            &format!(
                "repository:{}:{}",
                target.reference.repository(),
                access.actions()
            ),
        );
        if let Some(service) = &challenge.service {
            url.query_pairs_mut().append_pair("service", service);
        }
        let mut request = self.http.get(url);
        if let RegistryAuth::Basic(user, password) = target.auth {
            request = request.basic_auth(user, Some(password));
        }
        let mut response = request.send().await.map_err(|e| transport(what, e))?;
        if !response.status().is_success() {
            return Err(error_answer(&mut response, what).await);
        }
        let (body, _) = read_body(response, MAX_TOKEN_ANSWER, what).await?;
        token_of(&body)
            .map(Authorization::Bearer)
            .ok_or_else(|| RegistryError::Permanent {
                what: what.to_owned(),
                message: "the token service answered no token".into(),
            })
    }
}

/// `waiting` (an answer, or an authorization: ping and token, or token
/// alone) within the deadline of one request; past it, a transient error
/// saying which `awaited` thing did not come.
async fn within_deadline<T>(
    what: &str,
    awaited: &str,
    waiting: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    tokio::time::timeout(REQUEST_DEADLINE, waiting)
        .await
        .map_err(|_| RegistryError::Transient {
            what: what.to_owned(),
            message: format!("no {awaited} within {REQUEST_DEADLINE:?}"),
        })?
}

/// Where a registry's Bearer challenge says tokens come from.
struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

/// The first Bearer challenge with a realm in a `WWW-Authenticate` value.
fn bearer_challenge(value: &HeaderValue) -> Option<BearerChallenge> {
    let value = value.to_str().ok()?;
    http_auth::parser::ChallengeParser::new(value)
        .filter_map(Result::ok)
        .filter(|c| c.scheme.eq_ignore_ascii_case("Bearer"))
        .find_map(|c| {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            Some(BearerChallenge {
                realm: param("realm")?,
                service: param("service"),
            })
        })
}

/// The token of a token service's answer (`token`, or OAuth2's
/// `access_token`).
fn token_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    answer
        .token
        .or(answer.access_token)
        .filter(|t| !t.is_empty())
}

pub(super) fn transport(what: &str, e: reqwest::Error) -> RegistryError {
    // reqwest's own message names only the URL; the cause (a refused
    // connection, an unknown certificate issuer) is in its sources.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    if e.is_timeout() || e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
        RegistryError::Transient {
            what: what.to_owned(),
            message,
        }
    } else {
        RegistryError::Permanent {
            what: what.to_owned(),
            message,
        }
    }
}

/// An error for a non-success answer, with the start of its body.
pub(super) async fn error_answer(response: &mut reqwest::Response, what: &str) -> RegistryError {
    let status = response.status();
    let body = read_at_most(response, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = format!("the registry answered {status}: {}", text.trim());
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    if transient {
        RegistryError::Transient {
            what: what.to_owned(),
            message,
        }
    } else {
        RegistryError::Permanent {
            what: what.to_owned(),
            message,
        }
    }
}

/// The body of a successful answer, at most `limit` bytes.
async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<(Bytes, HeaderMap), RegistryError> {
    let too_long = || RegistryError::Permanent {
        what: what.to_owned(),
        message: format!(
            "the answer is longer than the {limit} bytes such an object may have; not asked again"
        ),
    };
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_long());
    }
    let headers = response.headers().clone();
    let body = read_at_most(&mut response, limit + 1)
        .await
        .map_err(|e| transport(what, e))?;
    if body.len() > limit {
        return Err(too_long());
    }
    Ok((body, headers))
}

/// The body up to `max` bytes (the rest is never read; the connection is
/// dropped with the response).
async fn read_at_most(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<Bytes, reqwest::Error> {
    let mut out = BytesMut::new();
    while out.len() < max {
        let Some(piece) = response.chunk().await? else {
            break;
        };
        let take = piece.len().min(max - out.len());
        out.extend_from_slice(&piece[..take]);
    }
    Ok(out.freeze())
}
