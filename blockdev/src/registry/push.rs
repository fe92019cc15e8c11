//! Pushes on the bounded client: which blobs the registry has, blob
//! uploads, manifests. Their token flow and error answers are bounded as
//! every other request's ([`bounded`](super::bounded)); oci-client, which
//! pushed before, read a token service's answer whole.
//!
//! A blob goes up in one piece, as the distribution spec's monolithic
//! upload: `POST /v2/NAME/blobs/uploads/` answers 202 with the upload's
//! Location, and one `PUT LOCATION?digest=D` streams the whole blob. That
//! Location must be on the registry itself (a relative one is): the PUT
//! carries the credentials, which go to no other host.

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Body, StatusCode, Url};

use super::bounded::{error_answer, Access, BoundedClient, Target};
use super::RegistryError;

impl BoundedClient {
    /// Whether the repository has blob `digest`.
    pub async fn has_blob(
        &self,
        target: &Target<'_>,
        digest: &str,
        what: &str,
    ) -> Result<bool, RegistryError> {
        let url = self.url(target.reference, "blobs", digest);
        let mut response = self
            .send_any(target, Access::Push, what, |http| Ok(http.head(&url)))
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(error_answer(&mut response, what).await),
        }
    }

    /// Uploads blob `digest` of `len` bytes; `body` gives them, once per
    /// request sent (a 401 sends the PUT again, with a renewed token).
    pub async fn upload_blob(
        &self,
        target: &Target<'_>,
        digest: &str,
        len: u64,
        body: impl Fn() -> Result<Body, RegistryError>,
        what: &str,
    ) -> Result<(), RegistryError> {
        let start = self.url(target.reference, "blobs", "uploads/");
        let started = self
            .send(target, Access::Push, what, |http| {
                Ok(http.post(&start).header(CONTENT_LENGTH, 0))
            })
            .await?;
        if started.status() != StatusCode::ACCEPTED {
            return Err(permanent(
                what,
                format!(
                    "the registry answered {} to starting an upload, not 202",
                    started.status()
                ),
            ));
        }
        let location = started
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| permanent(what, "the registry named no upload location".into()))?;
        let mut url = upload_url(&start, location, what)?;
        drop(started);
        url.query_pairs_mut().append_pair("digest", digest);
        self.send(target, Access::Push, what, |http| {
            Ok(http
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, len)
                .body(body()?))
        })
        .await?;
        Ok(())
    }

    /// Puts `bytes` as the manifest `name` (a tag or a digest).
    pub async fn put_manifest(
        &self,
        target: &Target<'_>,
        name: &str,
        bytes: Bytes,
        media_type: &str,
        what: &str,
    ) -> Result<(), RegistryError> {
        let url = self.url(target.reference, "manifests", name);
        self.send(target, Access::Push, what, |http| {
            Ok(http
                .put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.clone()))
        })
        .await?;
        Ok(())
    }
}

/// The upload's `location`, relative to the `start` URL that answered it;
/// refused unless it is on the same scheme, host and port.
fn upload_url(start: &str, location: &str, what: &str) -> Result<Url, RegistryError> {
    let start = Url::parse(start).map_err(|e| permanent(what, format!("{start}: {e}")))?;
    let url = start
        .join(location)
        .map_err(|e| permanent(what, format!("the upload location {location:?}: {e}")))?;
    if url.origin() != start.origin() {
        return Err(permanent(
            what,
            format!(
                "the registry sent the upload to {location:?}, not to itself; \
                 the credentials go to the registry only"
            ),
        ));
    }
    Ok(url)
}

fn permanent(what: &str, message: String) -> RegistryError {
    RegistryError::Permanent {
        what: what.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_stay_on_the_registry() {
        let start = "http://reg:5000/v2/app/blobs/uploads/";
        let at = |l| upload_url(start, l, "t").map(|u| u.to_string());
        assert_eq!(
            at("/v2/app/blobs/uploads/abc?_state=x").unwrap(),
            "http://reg:5000/v2/app/blobs/uploads/abc?_state=x"
        );
        assert_eq!(
            at("http://reg:5000/v2/app/blobs/uploads/abc").unwrap(),
            "http://reg:5000/v2/app/blobs/uploads/abc"
        );
        for elsewhere in [
            "http://evil:5000/v2/app/blobs/uploads/abc",
            "https://reg:5000/v2/app/blobs/uploads/abc",
            "http://reg:5001/v2/app/blobs/uploads/abc",
            "//evil/upload",
        ] {
            let e = at(elsewhere).unwrap_err();
            assert!(e.to_string().contains("not to itself"), "{elsewhere}: {e}");
        }
    }
}
