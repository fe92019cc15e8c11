//! Image references (`HOST[:PORT]/REPO[:TAG][@DIGEST]`), parsed by the
//! distribution project's grammar.
//!
//! Hand-written on purpose, around the same regular expression as
//! `oci_spec::distribution::Reference`'s parser: that one compiles the
//! expression with Unicode classes, whose `\w` alone takes about 25 ms of
//! CPU on every process's first parse. That lands on the critical path of a
//! cold start twice (in `lazybd pull`, and in the snapshotter's first
//! Prepare). The grammar is ASCII (Go's `\w`, which the distribution
//! project's expression is written for, is `[0-9A-Za-z_]`), so compiled
//! without Unicode it means the same and compiles in well under a
//! millisecond. The result is the same `Reference` (a test compares the
//! two parsers).

use std::sync::OnceLock;

use oci_client::Reference;
use regex::{Regex, RegexBuilder};

use super::RegistryError;

/// The distribution project's anchored reference expression: captures the
/// name, the tag and the digest (as in `oci_spec`).
const REFERENCE: &str = r"^((?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))+)?(?::[0-9]+)?/)?[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?(?:(?:/[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?)+)?)(?::([\w][\w.-]{0,127}))?(?:@([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][[:xdigit:]]{32,}))?$";

/// Longest repository path, as in the distribution project.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";

fn reference_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        RegexBuilder::new(REFERENCE)
            .unicode(false)
            .build()
            .expect("the reference expression compiles")
    })
}

/// Parses `s` as containerd and Docker do: Docker Hub names (`busybox`,
/// `user/app`) get `docker.io` and `library/`, no tag and no digest means
/// `latest`. The error says what is wrong.
pub fn parse(s: &str) -> Result<Reference, RegistryError> {
    parse_parts(s).map_err(|message| RegistryError::BadReference {
        reference: s.to_owned(),
        message,
    })
}

fn parse_parts(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("repository name must have at least one component".into());
    }
    let caps = reference_regex()
        .captures(s)
        .ok_or("invalid reference format")?;
    let (registry, repository) = split_domain(&caps[1]);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(format!(
            "repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
        ));
    }
    let tag = caps.get(2).map(|m| m.as_str().to_owned());
    let Some(digest) = caps.get(3).map(|m| m.as_str().to_owned()) else {
        let tag = tag.unwrap_or_else(|| "latest".to_owned());
        return Ok(Reference::with_tag(registry, repository, tag));
    };
    check_digest(&digest)?;
    Ok(match tag {
        Some(tag) => Reference::with_tag_and_digest(registry, repository, tag, digest),
        None => Reference::with_digest(registry, repository, digest),
    })
}

/// Only the algorithms `oci_spec` knows, with their hex lengths.
fn check_digest(digest: &str) -> Result<(), String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or("invalid checksum digest format")?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm".into()),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length".into());
    }
    Ok(())
}

/// The distribution project's `splitDomain`: the first path component is
/// a host when it has a dot or a port, or is `localhost`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_owned(), right.to_owned())
        }
        _ => (DOCKER_HUB.to_owned(), name.to_owned()),
    };
    if domain == DOCKER_HUB_LEGACY {
        domain = DOCKER_HUB.to_owned();
    }
    if domain == DOCKER_HUB && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reference parses to, comparable across the two parsers.
    fn parts(r: &Reference) -> (String, String, Option<String>, Option<String>, String) {
        (
            r.registry().to_owned(),
            r.repository().to_owned(),
            r.tag().map(str::to_owned),
            r.digest().map(str::to_owned),
            r.whole(),
        )
    }

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn same_answers_as_oci_spec() {
        let digest = format!("sha256:{HEX64}");
        let cases: Vec<String> = [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "user/app:v1",
            "docker.io/busybox",
            "index.docker.io/busybox",
            "index.docker.io/user/app:tag",
            "localhost/app",
            "localhost:5000/app:tag",
            "10.203.0.2:5000/bench/python:lazybd-optimized",
            "registry.example.com/a/b/c/d:1.0_rc-1",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "Upper/app",
            "upper/App",
            "example.com/App",
            "a..b/c",
            "example.com/a__b/c--d/e.f",
            "example.com/a___b",
            "example.com/-a",
            "example.com/a-",
            "example.com:port/a",
            "example.com/a:",
            "example.com/a:-tag",
            "example.com/a:.tag",
            "example.com/a:_tag",
            "example.com/a::tag",
            "example.com/a@",
            "example.com/a@sha256",
            "example.com/a@sha256:abc",
            "example.com/a@md5:0123456789abcdef0123456789abcdef",
            "example.com/a@sha512:0123456789abcdef0123456789abcdef",
            "-example.com/a",
            "example-.com/a",
            "exa_mple.com/a",
            "/a",
            "a/",
            "a//b",
            " a",
            "a b",
            "",
            "é/a",
            "example.com/a:tagé",
            "example.com/a:ta\u{0660}g",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("example.com/a@{digest}"),
            format!("example.com/a:tag@{digest}"),
            format!("busybox@{digest}"),
            format!("example.com/a@sha256:{HEX64}0"),
            format!("example.com/a@sha384:{HEX64}{}", &HEX64[..32]),
            format!("example.com/a:{}", "t".repeat(128)),
            format!("example.com/a:{}", "t".repeat(129)),
            format!("example.com/{}", "a".repeat(255)),
            format!("example.com/{}", "a".repeat(256)),
            "a".repeat(248),
        ])
        .collect();
        for s in &cases {
            let ours = parse(s).map(|r| parts(&r));
            let theirs = s.parse::<Reference>().map(|r| parts(&r));
            if !s.is_ascii() {
                // Go's (and so the distribution grammar's) `\w` is ASCII;
                // oci_spec's Unicode `\w` accepts more in tags.
                assert!(ours.is_err(), "{s:?}: {ours:?}");
                continue;
            }
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{s:?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{s:?}: ours {ours:?}, oci_spec {theirs:?}"),
            }
        }
    }

    #[test]
    fn errors_say_why() {
        let why = |s: &str| parse(s).unwrap_err().to_string();
        assert!(why("").contains("at least one component"));
        assert!(why("A/b c").contains("invalid reference"));
        assert!(why("A/b c").contains("A/b c"), "names the reference");
        let long = format!("example.com/{}", "a".repeat(256));
        assert!(why(&long).contains("255"));
        let md5 = "example.com/a@md5:0123456789abcdef0123456789abcdef";
        assert!(why(md5).contains("unsupported"));
    }
}
