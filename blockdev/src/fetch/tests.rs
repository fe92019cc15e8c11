//! Fetcher logic against in-process sources that are good, corrupt, flaky,
//! gated or dead. Time-dependent cases run on tokio's paused clock, so no test
//! depends on the machine's speed.

use std::sync::atomic::AtomicU32;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::*;
use crate::format::{sha256, write_blob, Layout, Shape, NARROW_READ_AHEAD_KB};
use crate::source::{Answer, SourceError, Verdict};

const CS: u32 = 4096;

enum Behavior {
    Good,
    /// Flips a byte in every response.
    Corrupt,
    /// Fails this many requests with a transient error, then serves.
    FailFirst(AtomicU32),
    /// Never answers.
    Hang,
    /// Answers once a permit is available.
    Gated(Arc<Semaphore>),
    /// Never answers requests that start at this blob offset; serves the rest.
    HangAt(u64),
    /// Sends the answer in pieces of this many bytes, each once a permit is
    /// available.
    Trickle(Arc<Semaphore>, usize),
    /// Sends this many bytes after the range.
    TooLong(usize),
}

struct TestSource {
    name: &'static str,
    blob: Bytes,
    behavior: Behavior,
    calls: AtomicU32,
    ranges: Mutex<Vec<Range<u64>>>,
}

#[async_trait]
impl ChunkSource for TestSource {
    fn name(&self) -> &str {
        self.name
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        self.calls.fetch_add(1, Relaxed);
        self.ranges.lock().unwrap().push(range.clone());
        let data = self.blob.slice(range.start as usize..range.end as usize);
        if let Behavior::Trickle(gate, piece) = &self.behavior {
            let (gate, piece) = (gate.clone(), *piece);
            let pieces: Vec<Bytes> = (0..data.len())
                .step_by(piece)
                .map(|at| data.slice(at..(at + piece).min(data.len())))
                .collect();
            let body = futures_util::stream::iter(pieces).then(move |p| {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.expect("gate open").forget();
                    Ok(p)
                }
            });
            return Ok(Answer::streamed(body));
        }
        if let Behavior::TooLong(extra) = &self.behavior {
            let mut v = data.to_vec();
            v.extend(std::iter::repeat_n(7u8, *extra));
            return Ok(Answer::whole(v.into()));
        }
        self.answer(range, data).await.map(Answer::whole)
    }
}

impl TestSource {
    async fn answer(&self, range: Range<u64>, data: Bytes) -> Result<Bytes, SourceError> {
        match &self.behavior {
            Behavior::Good => Ok(data),
            Behavior::Corrupt => {
                let mut v = data.to_vec();
                let mid = v.len() / 2;
                v[mid] ^= 0x40;
                Ok(v.into())
            }
            Behavior::FailFirst(n) => {
                if n.load(Relaxed) > 0 {
                    n.fetch_sub(1, Relaxed);
                    return Err(SourceError::Transient("503 service unavailable".into()));
                }
                Ok(data)
            }
            Behavior::Hang => std::future::pending().await,
            Behavior::Gated(gate) => {
                let _permit = gate.acquire().await.expect("gate open");
                Ok(data)
            }
            Behavior::HangAt(offset) if range.start == *offset => std::future::pending().await,
            Behavior::HangAt(_) | Behavior::Trickle(..) | Behavior::TooLong(_) => Ok(data),
        }
    }
}

/// Answers from several servers, like the peer source: the first one not
/// shunned answers; a corrupt verdict shuns it.
struct RelaySource {
    blob: Bytes,
    /// Server name and whether it tells the truth.
    servers: Vec<(&'static str, bool)>,
    shunned: Mutex<Vec<String>>,
    verdicts: Mutex<Vec<(String, Verdict)>>,
}

#[async_trait]
impl ChunkSource for RelaySource {
    fn name(&self) -> &str {
        "relay"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        let shunned = self.shunned.lock().unwrap().clone();
        let Some(&(server, honest)) = self
            .servers
            .iter()
            .find(|(s, _)| !shunned.iter().any(|x| x == s))
        else {
            return Err(SourceError::Transient("every server shunned".into()));
        };
        let mut data = self.blob[range.start as usize..range.end as usize].to_vec();
        if !honest {
            let mid = data.len() / 2;
            data[mid] ^= 0x40;
        }
        Ok(Answer::whole(data.into()).from_server(server.to_owned()))
    }

    fn verdict(&self, server: &str, _range: &Range<u64>, verdict: &Verdict) -> bool {
        self.verdicts
            .lock()
            .unwrap()
            .push((server.to_owned(), verdict.clone()));
        if matches!(verdict, Verdict::Corrupt(_)) {
            self.shunned.lock().unwrap().push(server.to_owned());
        }
        let shunned = self.shunned.lock().unwrap();
        self.servers
            .iter()
            .any(|(s, _)| !shunned.iter().any(|x| x == s))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    image: Vec<u8>,
    blob: Bytes,
    index: Arc<Index>,
    cache: Arc<ChunkCache>,
    stats: Arc<Stats>,
}

/// Eight chunks of distinct, compressible text.
fn fixture() -> Fixture {
    fixture_profiled(&[])
}

/// [`fixture`] with the chunks `profile` names stored first, in its order.
fn fixture_profiled(profile: &[u64]) -> Fixture {
    fixture_narrow(profile, None)
}

/// [`fixture_profiled`] with the first `narrow` of the profile's chunks
/// its narrow part (`None`: all).
fn fixture_narrow(profile: &[u64], narrow: Option<usize>) -> Fixture {
    let image: Vec<u8> = (0..8 * CS as usize)
        .map(|i| b"abcdefgh"[(i / CS as usize) % 8] ^ (i % 7) as u8)
        .collect();
    let mut blob = Vec::new();
    let ranges: Vec<Range<u64>> = profile
        .iter()
        .map(|&c| c * u64::from(CS)..(c + 1) * u64::from(CS))
        .collect();
    let shape = Shape {
        profile: &ranges,
        narrow,
        ..Shape::default()
    };
    let layout = Layout::plan(image.len() as u64, CS, &shape).unwrap();
    let written = write_blob(&image[..], &mut blob, &layout).unwrap();
    let index = Arc::new(written.index);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _) =
        ChunkCache::open(dir.path(), index.clone(), sha256(&index.to_bytes())).unwrap();
    Fixture {
        _dir: dir,
        image,
        blob: blob.into(),
        index,
        cache: Arc::new(cache),
        stats: Arc::new(Stats::default()),
    }
}

impl Fixture {
    fn source(&self, name: &'static str, behavior: Behavior) -> Arc<TestSource> {
        Arc::new(TestSource {
            name,
            blob: self.blob.clone(),
            behavior,
            calls: AtomicU32::new(0),
            ranges: Mutex::default(),
        })
    }

    fn relay(&self, servers: Vec<(&'static str, bool)>) -> Arc<RelaySource> {
        Arc::new(RelaySource {
            blob: self.blob.clone(),
            servers,
            shunned: Mutex::default(),
            verdicts: Mutex::default(),
        })
    }

    fn fetcher(&self, sources: Vec<Arc<TestSource>>, config: FetchConfig) -> Arc<ChunkFetcher> {
        self.fetcher_of(
            sources
                .into_iter()
                .map(|s| s as Arc<dyn ChunkSource>)
                .collect(),
            config,
        )
    }

    fn fetcher_of(
        &self,
        sources: Vec<Arc<dyn ChunkSource>>,
        config: FetchConfig,
    ) -> Arc<ChunkFetcher> {
        Arc::new(ChunkFetcher::new(
            "sha256:test",
            self.index.clone(),
            self.cache.clone(),
            sources,
            self.stats.clone(),
            config,
        ))
    }

    fn cached(&self, chunk: u64) -> Vec<u8> {
        let r = self.index.image_range(chunk);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        self.cache.read_at(&mut buf, r.start).unwrap();
        assert_eq!(buf, self.image[r.start as usize..r.end as usize]);
        buf
    }
}

/// Waits until no on-demand fetch runs: a reader is woken as soon as its
/// chunk is stored, before its fetch has counted the rest of the answer
/// and told its source's verdict.
async fn demand_settled(fetcher: &ChunkFetcher) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetcher.gate().demand_active() > 0 {
        assert!(Instant::now() < deadline, "an on-demand fetch never ended");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn quick() -> FetchConfig {
    FetchConfig {
        request_timeout: Duration::from_secs(1),
        read_deadline: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(4),
        max_request_bytes: 1 << 20,
        // No demand window unless a test wants one: requests stay exact.
        window_max: 0,
        lookahead: 1 << 20,
        keep_stored: false,
    }
}

#[tokio::test]
async fn adjacent_chunks_come_in_one_request() {
    let f = fixture();
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    fetcher.ensure(2..6).await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1);
    for c in 2..6 {
        f.cached(c);
    }
    assert!(!f.cache.is_present(1) && !f.cache.is_present(6));
    let s = f.stats.snapshot();
    assert_eq!(s.source("registry").unwrap().chunks, 4);
    assert_eq!((s.cache_hits, s.cache_misses), (0, 4));

    // Present chunks are hits and fetch nothing.
    fetcher.ensure(3..5).await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1);
    assert_eq!(f.stats.snapshot().cache_hits, 2);
}

#[tokio::test]
async fn request_size_is_capped() {
    let f = fixture();
    let registry = f.source("registry", Behavior::Good);
    let config = FetchConfig {
        max_request_bytes: 1, // every chunk on its own
        ..quick()
    };
    let fetcher = f.fetcher(vec![registry.clone()], config);
    fetcher.ensure(0..3).await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_of_one_chunk_trigger_one_fetch() {
    let f = fixture();
    let gate = Arc::new(Semaphore::new(0));
    let registry = f.source("registry", Behavior::Gated(gate.clone()));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    let readers: Vec<_> = (0..10)
        .map(|_| {
            let fetcher = fetcher.clone();
            tokio::spawn(async move { fetcher.ensure(4..5).await })
        })
        .collect();
    // Every reader is waiting before the single request may answer.
    while f.stats.snapshot().waiting_reads < 10 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(100);
    for r in readers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(registry.calls.load(Relaxed), 1);
    assert_eq!(f.stats.snapshot().source("registry").unwrap().chunks, 1);
    f.cached(4);
}

#[tokio::test]
async fn corrupt_chunk_is_reported_and_taken_from_the_next_source() {
    let f = fixture();
    let peer = f.source("peer", Behavior::Corrupt);
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher(vec![peer.clone(), registry.clone()], quick());
    fetcher.ensure(1..2).await.unwrap();
    f.cached(1);
    let s = f.stats.snapshot();
    assert_eq!(s.source("peer").unwrap().corrupt_chunks, 1);
    assert_eq!(s.source("peer").unwrap().chunks, 0);
    assert_eq!(s.source("registry").unwrap().chunks, 1);
}

#[tokio::test]
async fn a_relayed_lie_is_told_to_the_source_which_is_asked_again_at_once() {
    let f = fixture();
    let relay = f.relay(vec![("liar", false), ("honest", true)]);
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher_of(vec![relay.clone(), registry.clone()], quick());
    // The liar garbles the middle of the range: chunk 2 of chunks 1..3.
    fetcher.ensure(1..3).await.unwrap();
    demand_settled(&fetcher).await;
    f.cached(1);
    f.cached(2);
    assert_eq!(registry.calls.load(Relaxed), 0, "the honest server served");
    let verdicts = relay.verdicts.lock().unwrap().clone();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert_eq!(verdicts[0].0, "liar");
    assert!(
        matches!(&verdicts[0].1, Verdict::Corrupt(why) if why.contains("chunk 2")),
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts[1],
        ("honest".to_owned(), Verdict::Verified { chunks: 1 }),
        "only the bad chunk is asked again"
    );
    let s = f.stats.snapshot();
    let r = s.source("relay").unwrap();
    assert_eq!((r.requests, r.corrupt_chunks, r.chunks), (2, 1, 2));
}

#[tokio::test]
async fn a_relay_of_liars_falls_through_to_the_next_source() {
    let f = fixture();
    let relay = f.relay(vec![("liar-1", false), ("liar-2", false)]);
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher_of(vec![relay.clone(), registry.clone()], quick());
    fetcher.ensure(0..1).await.unwrap();
    f.cached(0);
    let verdicts = relay.verdicts.lock().unwrap().clone();
    let servers: Vec<&str> = verdicts.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(servers, ["liar-1", "liar-2"], "each liar asked once");
    assert!(verdicts
        .iter()
        .all(|(_, v)| matches!(v, Verdict::Corrupt(_))));
    assert_eq!(registry.calls.load(Relaxed), 1);
    assert_eq!(f.stats.snapshot().source("registry").unwrap().chunks, 1);
}

#[tokio::test]
async fn corrupt_everywhere_fails_at_once_and_stores_nothing() {
    let f = fixture();
    let registry = f.source("registry", Behavior::Corrupt);
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    let err = fetcher.ensure(0..1).await.unwrap_err().to_string();
    assert!(err.contains("registry: chunk 0 corrupt"), "{err}");
    assert!(!f.cache.is_present(0));
    assert_eq!(
        registry.calls.load(Relaxed),
        1,
        "a corrupt source is not asked again"
    );
    assert_eq!(
        f.stats
            .snapshot()
            .source("registry")
            .unwrap()
            .corrupt_chunks,
        1
    );
}

#[tokio::test]
async fn transient_failures_are_retried() {
    let f = fixture();
    let registry = f.source("registry", Behavior::FailFirst(AtomicU32::new(3)));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    fetcher.ensure(7..8).await.unwrap();
    f.cached(7);
    assert_eq!(registry.calls.load(Relaxed), 4);
    assert_eq!(f.stats.snapshot().source("registry").unwrap().errors, 3);
}

#[tokio::test(start_paused = true)]
async fn dead_sources_fail_the_read_after_the_deadline_and_say_why() {
    let f = fixture();
    let peer = f.source("peer", Behavior::Hang);
    let registry = f.source("registry", Behavior::FailFirst(AtomicU32::new(u32::MAX)));
    let config = FetchConfig {
        request_timeout: Duration::from_secs(2),
        read_deadline: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..quick()
    };
    let fetcher = f.fetcher(vec![peer, registry], config);
    let started = Instant::now();
    let err = fetcher.ensure(3..4).await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited <= Duration::from_secs(31), "waited {waited:?}");
    assert!(
        waited >= Duration::from_secs(25),
        "gave up early: {waited:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("layer sha256:test: chunks 3..=3"), "{msg}");
    assert!(msg.contains("peer: timed out after 2s"), "{msg}");
    assert!(msg.contains("registry: 503 service unavailable"), "{msg}");
    assert!(!f.cache.is_present(3));
    assert_eq!(f.stats.snapshot().waiting_reads, 0);

    // The failed fetch left no stale flight: the next read fetches anew.
    let again = fetcher.ensure(3..4).await.unwrap_err();
    assert!(again.to_string().contains("unavailable"));
}

#[tokio::test]
async fn no_sources_is_a_clear_error() {
    let f = fixture();
    let fetcher = f.fetcher(vec![], quick());
    let err = fetcher.ensure(0..1).await.unwrap_err().to_string();
    assert!(err.contains("no sources configured"), "{err}");
}

#[tokio::test]
async fn readers_overtake_a_stuck_background_fetch_instead_of_waiting() {
    let f = fixture();
    // The background request (chunks 0..2, starting at chunk 0) never
    // returns; a reader's own request for chunk 1 is served.
    let source = f.source("registry", Behavior::HangAt(f.index.chunks[0].offset));
    let fetcher = f.fetcher(vec![source], quick());
    let bg = fetcher.clone();
    let background = tokio::spawn(async move { bg.fetch_background(&[0, 1]).await });
    for _ in 0..1000 {
        if !fetcher.inflight.lock().unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        fetcher.inflight.lock().unwrap().contains_key(&1),
        "background claimed chunk 1"
    );
    fetcher.ensure(1..2).await.unwrap();
    demand_settled(&fetcher).await;
    f.cached(1);
    let p = f.stats.prefetch.snapshot();
    assert_eq!(p.demand_overtook_background, 1, "{p:?}");
    assert_eq!(p.demand_waited_on_background, 0, "{p:?}");
    assert_eq!(p.demand_fetches, 1, "{p:?}");
    assert_eq!(fetcher.gate().demand_active(), 0);
    // Chunk 0 is still the background fetch's: a reader of it overtakes too.
    assert!(!f.cache.is_present(0));
    background.abort();
}

#[tokio::test]
async fn background_fetch_skips_present_and_claimed_chunks() {
    let f = fixture();
    let source = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher(vec![source.clone()], quick());
    fetcher.ensure(0..2).await.unwrap();
    demand_settled(&fetcher).await;
    assert_eq!(fetcher.fetch_background(&[0, 1, 2, 3]).await.unwrap(), 2);
    assert_eq!(fetcher.fetch_background(&[0, 1, 2, 3]).await.unwrap(), 0);
    for c in 0..4 {
        f.cached(c);
    }
    let p = f.stats.prefetch.snapshot();
    assert_eq!((p.background_fetches, p.background_chunks), (1, 2), "{p:?}");
    assert!(fetcher.inflight.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_window_takes_the_chunks_stored_next() {
    let f = fixture();
    let registry = f.source("registry", Behavior::Good);
    let config = FetchConfig {
        window_max: 1 << 20,
        ..quick()
    };
    let fetcher = f.fetcher(vec![registry.clone()], config);
    // A link worth about 2.5 chunks of this blob after a miss.
    let chunk = u64::from(f.index.chunks[3].stored_len);
    fetcher.link.sample(
        fetcher.link.send(),
        Duration::from_millis(10),
        1 << 20,
        Duration::from_secs_f64((1 << 20) as f64 / (chunk as f64 * 500.0)),
    );
    fetcher.ensure(2..3).await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1, "one request");
    let got: Vec<u64> = (0..8).filter(|&c| f.cache.is_present(c)).collect();
    assert!(got.len() >= 3 && got[0] == 2, "{got:?}");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    let p = f.stats.prefetch.snapshot();
    assert_eq!(p.window_chunks, got.len() as u64 - 1, "{p:?}");
    // Readers of the window's chunks now hit the cache.
    fetcher.ensure(3..4).await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_its_chunk_before_the_rest_of_the_answer_arrives() {
    let f = fixture();
    let gate = Arc::new(Semaphore::new(0));
    let chunk0 = f.index.chunks[0].stored_len as usize;
    let registry = f.source("registry", Behavior::Trickle(gate.clone(), chunk0));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    let all = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.ensure(0..4).await }
    });
    while !fetcher.inflight.lock().unwrap().contains_key(&3) {
        tokio::task::yield_now().await;
    }
    // The first piece is exactly chunk 0: a reader of it is served while
    // the rest of the answer is still held back.
    gate.add_permits(1);
    fetcher.ensure(0..1).await.unwrap();
    f.cached(0);
    assert!(!f.cache.is_present(3) && !all.is_finished());
    gate.add_permits(1000);
    all.await.unwrap().unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1, "one request, joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_stream_fetches_the_profile_first_in_one_request() {
    let f = fixture_profiled(&[5, 2, 6]);
    assert_eq!(f.index.prefetch_chunks(), [5, 2, 6]);
    let gate = Arc::new(Semaphore::new(0));
    let piece = f.index.chunks[5].stored_len as usize;
    let registry = f.source("registry", Behavior::Trickle(gate.clone(), piece));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    let stream = fetcher.start_stream().expect("something to stream");
    while !fetcher.inflight.lock().unwrap().contains_key(&2) {
        tokio::task::yield_now().await;
    }
    // A reader of chunk 2 joins the stream instead of asking on its own.
    let reader = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.ensure(2..3).await }
    });
    gate.add_permits(1000);
    reader.await.unwrap().unwrap();
    stream.await.unwrap();
    assert_eq!(registry.calls.load(Relaxed), 1, "one range for the stream");
    let prefix = 0..f.index.prefetch_len;
    assert_eq!(registry.ranges.lock().unwrap()[0], prefix);
    for c in [5, 2, 6] {
        f.cached(c);
    }
    assert!(!f.cache.is_present(0), "only the profile was streamed");
    let p = f.stats.prefetch.snapshot();
    assert_eq!(
        (p.startup_chunks, p.demand_overtook_stream),
        (3, 0),
        "{p:?}"
    );
    assert!(fetcher.start_stream().is_none(), "nothing left to stream");
}

/// A node whose lazy devices read ahead no further than the narrow part
/// was recorded with streams that part alone; one reading ahead further
/// streams the rest of the area after it, as a second range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_stream_takes_the_wide_reads_only_for_a_wide_readahead() {
    for (kb, wide) in [(NARROW_READ_AHEAD_KB, false), (128, true)] {
        let f = fixture_narrow(&[5, 2, 6], Some(1));
        assert_eq!(f.index.prefetch_parts(), (vec![5], vec![2, 6]));
        let registry = f.source("registry", Behavior::Good);
        let read_ahead = LazyReadAhead {
            max_kb: kb,
            follows_link: false,
            warms_narrow: false,
        };
        let fetcher = Arc::new(
            Arc::into_inner(f.fetcher(vec![registry.clone()], quick()))
                .unwrap()
                .on_node(PriorityGate::new(), Arc::default(), read_ahead),
        );
        fetcher
            .start_stream()
            .expect("something to stream")
            .await
            .unwrap();
        let (narrow, whole) = (f.index.prefetch_narrow_len, f.index.prefetch_len);
        let expected: Vec<Range<u64>> = std::iter::once(0..narrow)
            .chain(wide.then_some(narrow..whole))
            .collect();
        assert_eq!(*registry.ranges.lock().unwrap(), expected, "{kb} KiB");
        f.cached(5);
        for c in [2, 6] {
            assert_eq!(f.cache.is_present(c), wide, "chunk {c} at {kb} KiB");
        }
        let streamed = f.stats.prefetch.snapshot().startup_chunks;
        assert_eq!(streamed, if wide { 3 } else { 1 }, "{kb} KiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_far_ahead_of_the_stream_fetches_its_chunk_itself() {
    let f = fixture_profiled(&[5, 2, 6]);
    let gate = Arc::new(Semaphore::new(0));
    let registry = f.source("registry", Behavior::Trickle(gate.clone(), 1));
    let config = FetchConfig {
        lookahead: 0,
        ..quick()
    };
    let fetcher = f.fetcher(vec![registry.clone()], config);
    let stream = fetcher.start_stream().expect("something to stream");
    // The stream has claimed chunk 6 and sent its request (the reader's
    // must come second, for the order asserted below).
    while !fetcher.inflight.lock().unwrap().contains_key(&6)
        || registry.ranges.lock().unwrap().is_empty()
    {
        tokio::task::yield_now().await;
    }
    // The stream is held at its first byte; chunk 6 is its last. The
    // reader's own request trickles too: let it through.
    let reader = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.ensure(6..7).await }
    });
    while registry.calls.load(Relaxed) < 2 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(100_000);
    reader.await.unwrap().unwrap();
    stream.await.unwrap();
    f.cached(6);
    let p = f.stats.prefetch.snapshot();
    assert_eq!(p.demand_overtook_stream, 1, "{p:?}");
    let asked = registry.ranges.lock().unwrap().clone();
    assert_eq!(asked[1], f.index.chunks[6].stored_range(), "{asked:?}");
}

#[tokio::test]
async fn chunks_adjacent_in_the_blob_come_in_one_request_whatever_their_image_order() {
    let f = fixture_profiled(&[5, 2, 6]);
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    fetcher.ensure(2..3).await.unwrap();
    fetcher.ensure(5..7).await.unwrap();
    let asked = registry.ranges.lock().unwrap().clone();
    // Chunk 2 alone, then 5 and 6, which are not adjacent in the blob
    // (2 lies between them): two requests.
    assert_eq!(asked.len(), 3, "{asked:?}");
    fetcher.ensure(0..2).await.unwrap();
    assert_eq!(
        registry.ranges.lock().unwrap().len(),
        4,
        "0 and 1 are adjacent"
    );
}

#[tokio::test]
async fn an_answer_longer_than_asked_is_cut_off_and_counted() {
    let f = fixture();
    let registry = f.source("registry", Behavior::TooLong(100));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    fetcher.ensure(1..3).await.unwrap();
    f.cached(1);
    f.cached(2);
    let s = f.stats.snapshot();
    let r = s.source("registry").unwrap();
    assert_eq!((r.overlong_answers, r.chunks), (1, 2), "{r:?}");
    let asked = f.index.chunks[2].stored_range().end - f.index.chunks[1].offset;
    assert_eq!(r.bytes, asked + 100, "counted as it came, never stored");
}

#[tokio::test]
async fn a_replay_fills_small_gaps_and_sends_one_range() {
    let f = fixture();
    let registry = f.source("registry", Behavior::Good);
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    // Scattered, read out of blob order; the gaps (chunks 2, 4, 5) are far
    // smaller than a round trip's worth on an unknown link.
    assert_eq!(fetcher.replay(&[6, 1, 3]).await, 6);
    let asked = registry.ranges.lock().unwrap().clone();
    let whole = f.index.chunks[1].offset..f.index.chunks[6].stored_range().end;
    assert_eq!(asked, [whole], "one range, gaps filled");
    for c in 1..=6 {
        f.cached(c);
    }
    assert!(!f.cache.is_present(0) && !f.cache.is_present(7));
    let t = f.stats.trace.snapshot();
    assert_eq!((t.replayed_chunks, t.replays), (6, 1), "{t:?}");
    assert_eq!(fetcher.replay(&[6, 1, 3]).await, 0, "nothing left to fetch");
    assert_eq!(registry.calls.load(Relaxed), 1);
}

#[tokio::test]
async fn a_replay_sends_the_first_read_first_and_never_refetches_a_claimed_chunk() {
    let f = fixture();
    let gate = Arc::new(Semaphore::new(0));
    let registry = f.source("registry", Behavior::Gated(gate.clone()));
    let lens: Vec<u64> = f
        .index
        .chunks
        .iter()
        .map(|e| u64::from(e.stored_len))
        .collect();
    let (shortest, longest) = (*lens.iter().min().unwrap(), *lens.iter().max().unwrap());
    assert!(3 * shortest > 2 * longest, "{lens:?}");
    let config = FetchConfig {
        // Two chunks per range at most.
        max_request_bytes: 2 * longest,
        ..quick()
    };
    let fetcher = f.fetcher(vec![registry.clone()], config);
    // A reader has claimed chunk 4: the replay must neither fetch it again
    // nor fill a gap across it.
    let reader = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.ensure(4..5).await }
    });
    while !fetcher.inflight.lock().unwrap().contains_key(&4) {
        tokio::task::yield_now().await;
    }
    let replay = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.replay(&[6, 5, 0, 1, 3]).await }
    });
    // The reader's request and the replay's first two ranges.
    while registry.calls.load(Relaxed) < 3 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(100);
    assert_eq!(replay.await.unwrap(), 5);
    reader.await.unwrap().unwrap();
    let range = |a: usize, b: usize| f.index.chunks[a].offset..f.index.chunks[b].stored_range().end;
    let mut asked = registry.ranges.lock().unwrap().clone();
    asked.retain(|r| *r != range(4, 4));
    // The replay's ranges, first read first: 5-6 (6 was read first), 0-1,
    // 3 (cut off by the size limit and the claimed chunk 4).
    assert_eq!(asked, [range(5, 6), range(0, 1), range(3, 3)]);
    for c in [0, 1, 3, 4, 5, 6] {
        f.cached(c);
    }
}

#[tokio::test]
async fn readers_join_a_replay() {
    let f = fixture();
    let gate = Arc::new(Semaphore::new(0));
    let piece = f.index.chunks[2].stored_len as usize;
    let registry = f.source("registry", Behavior::Trickle(gate.clone(), piece));
    let fetcher = f.fetcher(vec![registry.clone()], quick());
    let replay = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.replay(&[2, 5]).await }
    });
    while !fetcher.inflight.lock().unwrap().contains_key(&5) {
        tokio::task::yield_now().await;
    }
    let reader = tokio::spawn({
        let fetcher = fetcher.clone();
        async move { fetcher.ensure(5..6).await }
    });
    gate.add_permits(1000);
    reader.await.unwrap().unwrap();
    assert_eq!(replay.await.unwrap(), 4);
    assert_eq!(
        registry.calls.load(Relaxed),
        1,
        "the reader joined the replay"
    );
    f.cached(5);
}

#[tokio::test(start_paused = true)]
async fn bad_bytes_from_a_replay_are_never_stored() {
    let f = fixture();
    let liar = f.source("liar", Behavior::Corrupt);
    let fetcher = f.fetcher(vec![liar], quick());
    // The liar flips a byte in the middle of each answer: the chunks before
    // it verify and are kept, the one it hit never is.
    let stored = fetcher.replay(&[2, 5]).await;
    let present: Vec<u64> = (2..=5).filter(|&c| f.cache.is_present(c)).collect();
    assert!(
        present.len() < 4 && present.len() as u64 == stored,
        "{present:?}"
    );
    for c in present {
        f.cached(c);
    }
    assert!(f.stats.snapshot().source("liar").unwrap().corrupt_chunks > 0);
}
