//! The registry client against a registry that lies about sizes: a tiny
//! HTTP server on loopback that streams endless answers (bounded: it stops
//! when the client hangs up, and at 1 GiB).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

#[derive(Clone, Copy)]
enum Lie {
    /// 200, no length, bytes until the client hangs up.
    EndlessManifest,
    /// 500 with an endless explanation.
    EndlessError,
    /// 200 claiming a 10 GB body.
    HugeLength,
    /// `/v2/` asks for a bearer token from `/token`, which answers 200 with
    /// endless JSON.
    EndlessToken,
    /// The same, the token service answering 401 with an endless reason.
    EndlessTokenRefusal,
    /// A push: no blob is there, and an upload started answers 202 with a
    /// Location on another host (where the credentials would go next);
    /// PUTs are counted.
    UploadElsewhere,
}

impl Lie {
    fn about_tokens(self) -> bool {
        matches!(self, Lie::EndlessToken | Lie::EndlessTokenRefusal)
    }

    /// How much the server sends at most: enough that reading it whole is
    /// unmistakable, little enough that a client that does survives.
    fn cap(self) -> u64 {
        if self.about_tokens() {
            128 << 20
        } else {
            1 << 30
        }
    }
}

#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    /// `GET /v2/`: asking how to authorize.
    pings: AtomicU64,
}

/// Serves `lie` for every manifest request on 127.0.0.1 (token lies: for
/// every token request); `/v2/` answers 200 (no auth), or 401 naming the
/// token service for token lies.
async fn lying_registry(lie: Lie) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Seen::default());
    let (s, here) = (seen.clone(), addr.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (seen, addr) = (s.clone(), here.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                if head.starts_with("GET /v2/ ") {
                    seen.pings.fetch_add(1, Ordering::Relaxed);
                }
                if let Lie::UploadElsewhere = lie {
                    let answer = if head.starts_with("HEAD ") {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                    } else if head.starts_with("POST ") {
                        "HTTP/1.1 202 Accepted\r\nLocation: http://127.0.0.1:9/steal\r\n\
                         Content-Length: 0\r\n"
                    } else if head.starts_with("PUT ") {
                        seen.requests.fetch_add(1, Ordering::Relaxed);
                        "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n"
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                    };
                    let _ = conn
                        .write_all(format!("{answer}Connection: close\r\n\r\n").as_bytes())
                        .await;
                    return;
                }
                // As a token registry does: every API request without a
                // token is challenged (the ping and an anonymous first try).
                let authorized = head.to_ascii_lowercase().contains("\r\nauthorization:");
                if lie.about_tokens() && head.contains(" /v2/") && !authorized {
                    let challenge = format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer \
                         realm=\"http://{addr}/token\",service=\"lying\"\r\n\
                         Content-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(challenge.as_bytes()).await;
                    return;
                }
                let lied_about = if lie.about_tokens() {
                    head.starts_with("GET /token")
                } else {
                    head.contains("/manifests/") || head.contains("/blobs/")
                };
                if !lied_about {
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                seen.requests.fetch_add(1, Ordering::Relaxed);
                let status = match lie {
                    Lie::EndlessManifest => "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n".to_owned(),
                    Lie::EndlessError => "HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n".to_owned(),
                    Lie::HugeLength => "HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n".to_owned(),
                    Lie::EndlessToken => "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"token\":\"".to_owned(),
                    Lie::EndlessTokenRefusal => "HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n".to_owned(),
                    Lie::UploadElsewhere => unreachable!("answered above"),
                };
                if conn.write_all(status.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'a'; 64 << 10];
                for _ in 0..lie.cap() / chunk.len() as u64 {
                    if conn.write_all(&chunk).await.is_err() {
                        return;
                    }
                    seen.bytes_sent
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, seen)
}

fn client(addr: &str) -> RegistryClient {
    let opts = RegistryOptions {
        plain_http: true,
        ..RegistryOptions::default()
    };
    RegistryClient::with_auth(&format!("{addr}/app:v1"), &opts, RegistryAuth::Anonymous).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_manifest_is_cut_off_and_not_asked_again() {
    let (addr, seen) = lying_registry(Lie::EndlessManifest).await;
    let start = Instant::now();
    let e = client(&addr).manifest().await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(
        e.to_string().contains("longer than the 4194304 bytes"),
        "{e}"
    );
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "read {} MiB of it", sent >> 20);
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_is_read_only_for_its_message() {
    let (addr, seen) = lying_registry(Lie::EndlessError).await;
    let e = client(&addr).manifest().await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    assert!(
        e.to_string().len() < 8 << 10,
        "{} bytes of message",
        e.to_string().len()
    );
    // Transient, so asked again, but only as often as any 500.
    assert_eq!(seen.requests.load(Ordering::Relaxed), u64::from(ATTEMPTS));
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "read {} MiB of errors", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_declared_length_is_refused_unread() {
    let (addr, seen) = lying_registry(Lie::HugeLength).await;
    let e = client(&addr).manifest().await.unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "read {} MiB", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_config_blob_is_cut_off() {
    let (addr, seen) = lying_registry(Lie::EndlessManifest).await;
    let digest = format!("sha256:{}", "0".repeat(64));
    let e = client(&addr).blob(&digest).await.unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    assert!(seen.bytes_sent.load(Ordering::Relaxed) < 64 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_its_descriptor_does_not_fill_the_disk() {
    let (addr, seen) = lying_registry(Lie::EndlessManifest).await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("blob");
    let digest = format!("sha256:{}", "0".repeat(64));
    let e = client(&addr)
        .blob_to_file(&digest, 1 << 20, &path)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("longer than the 1048576 bytes"),
        "{e}"
    );
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let written = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(written <= 1 << 20, "{written} bytes written");
    let (addr, _) = lying_registry(Lie::HugeLength).await;
    let e = client(&addr)
        .blob_to_file(&digest, 1 << 20, &path)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_to_a_range_read_is_read_only_for_its_message() {
    let (addr, seen) = lying_registry(Lie::EndlessError).await;
    let digest = format!("sha256:{}", "0".repeat(64));
    let e = match client(&addr).blob_range_stream(&digest, 0..4096).await {
        Ok(_) => panic!("a 500 is an error"),
        Err(e) => e,
    };
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("500"), "{e}");
    assert!(
        e.to_string().len() < 8 << 10,
        "{} bytes",
        e.to_string().len()
    );
    // One attempt: the fetcher owns the retries of range reads.
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "read {} MiB of an error", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_takes_only_its_range_of_an_endless_answer() {
    // The lying registry ignores Range and streams without end.
    let (addr, seen) = lying_registry(Lie::EndlessManifest).await;
    let digest = format!("sha256:{}", "0".repeat(64));
    let mut stream = client(&addr)
        .blob_range_stream(&digest, 100..100 + 8192)
        .await
        .unwrap();
    let mut got = 0usize;
    while let Some(piece) = stream.next().await {
        got += piece.unwrap().len();
    }
    assert_eq!(got, 8192);
    drop(stream);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(
        sent < 64 << 20,
        "sent {} MiB for an 8 KiB range",
        sent >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_token_answer_is_cut_off_and_not_asked_again() {
    let (addr, seen) = lying_registry(Lie::EndlessToken).await;
    let start = Instant::now();
    let e = client(&addr).manifest().await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("longer than"), "{e}");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 16 << 20, "read {} MiB of a token", sent >> 20);
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_the_first_request_is_not_preceded_by_a_ping() {
    // A registry serving anyone: asked directly.
    let (addr, seen) = lying_registry(Lie::EndlessManifest).await;
    let _ = client(&addr).manifest().await;
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    assert_eq!(seen.pings.load(Ordering::Relaxed), 0);
    // A token registry: its 401 says where the token comes from.
    let (addr, seen) = lying_registry(Lie::EndlessToken).await;
    let _ = client(&addr).manifest().await;
    assert_eq!(
        seen.requests.load(Ordering::Relaxed),
        1,
        "one token request"
    );
    assert_eq!(seen.pings.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_token_refusal_is_read_only_for_its_message() {
    let (addr, seen) = lying_registry(Lie::EndlessTokenRefusal).await;
    let e = client(&addr).manifest().await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("401"), "{e}");
    assert!(
        e.to_string().len() < 8 << 10,
        "{} bytes of message",
        e.to_string().len()
    );
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 16 << 20, "read {} MiB of a refusal", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_an_endless_token_answer_is_cut_off() {
    let (addr, seen) = lying_registry(Lie::EndlessToken).await;
    let e = client(&addr).push_blob(b"a layer").await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("longer than"), "{e}");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1);
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 16 << 20, "read {} MiB of a token", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_to_an_upload_is_read_only_for_its_message() {
    let (addr, seen) = lying_registry(Lie::EndlessError).await;
    let e = client(&addr).push_blob(b"a layer").await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    assert!(
        e.to_string().len() < 8 << 10,
        "{} bytes",
        e.to_string().len()
    );
    let sent = seen.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "read {} MiB of errors", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_sent_to_another_host_is_refused() {
    let (addr, seen) = lying_registry(Lie::UploadElsewhere).await;
    let e = client(&addr).push_blob(b"a layer").await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("not to itself"), "{e}");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 0, "no PUT was sent");
}
