//! Writing a blob: chunks in the layout's order, then index, then footer.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use super::{
    sha256, ChunkEntry, ChunkKind, Footer, Index, Layout, Sha256Digest, FORMAT_V1, FORMAT_VERSION,
    ZSTD_LEVEL,
};

/// Random-access reads of the image being written (it is read in blob
/// order, which need not be image order).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Result of writing a blob: its index, footer, total length and digest.
#[derive(Debug, Clone)]
pub struct WrittenBlob {
    pub index: Index,
    pub footer: Footer,
    pub blob_len: u64,
    /// sha256 of the whole blob (its OCI digest).
    pub blob_digest: Sha256Digest,
}

impl WrittenBlob {
    /// The sha256 of the index: the layer's content anchor.
    pub fn anchor(&self) -> Sha256Digest {
        self.footer.index_digest
    }
}

/// How many chunks are compressed in parallel at once. Compression is the
/// converter's CPU cost; chunks are independent, and writing them in order
/// keeps the output a pure function of the input.
const BATCH: usize = 64;

/// Writes `image` (of the layout's size) as a blob of this build's version.
///
/// The output is a pure function of the image bytes and the layout, so
/// converting the same layer with the same profile gives the same digest.
pub fn write_blob<R: ReadAt + ?Sized, W: Write>(
    image: &R,
    out: W,
    layout: &Layout,
) -> io::Result<WrittenBlob> {
    write_version(image, out, layout, FORMAT_VERSION)
}

/// Writes a version 1 blob (fixed chunks in image order): what older nodes
/// read, kept for compatibility tests and `lazybd convert --format-version 1`.
pub fn write_blob_v1<R: ReadAt + ?Sized, W: Write>(
    image: &R,
    image_size: u64,
    out: W,
    chunk_size: u32,
) -> io::Result<WrittenBlob> {
    let layout = Layout::fixed(image_size, chunk_size).map_err(io::Error::other)?;
    write_version(image, out, &layout, FORMAT_V1)
}

fn write_version<R: ReadAt + ?Sized, W: Write>(
    image: &R,
    out: W,
    layout: &Layout,
    version: u32,
) -> io::Result<WrittenBlob> {
    let mut out = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        written: 0,
    };
    let count = layout.chunk_count() as usize;
    let mut entries: Vec<Option<ChunkEntry>> = vec![None; count];
    let (mut prefetch_len, mut narrow_len) = (0, 0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (batch_no, batch) in layout.order().chunks(BATCH).enumerate() {
        let encoded = encode_batch(image, layout, batch, threads)?;
        for (i, (&c, (data_digest, kind, stored, image_len))) in
            batch.iter().zip(encoded).enumerate()
        {
            let offset = out.written;
            out.write_all(&stored)?;
            entries[c as usize] = Some(ChunkEntry {
                offset,
                stored_len: stored.len() as u32,
                image_len,
                kind,
                digest: data_digest,
            });
            let placed = batch_no * BATCH + i + 1;
            if placed == layout.narrow_count() {
                narrow_len = out.written;
            }
            if placed == layout.prefetch_count() {
                prefetch_len = out.written;
            }
        }
    }
    let chunks: Vec<ChunkEntry> = entries
        .into_iter()
        .map(|e| e.expect("the layout's order names every chunk once"))
        .collect();
    let index = Index::new(
        version,
        layout.chunk_size(),
        layout.image_size(),
        out.written,
        prefetch_len,
        narrow_len,
        chunks,
    );
    let index_bytes = index.to_bytes();
    let footer = Footer {
        version,
        index_offset: out.written,
        index_length: index_bytes.len() as u64,
        index_digest: sha256(&index_bytes),
    };
    out.write_all(&index_bytes)?;
    out.write_all(&footer.to_bytes())?;
    out.flush()?;
    Ok(WrittenBlob {
        index,
        footer,
        blob_len: out.written,
        blob_digest: out.hasher.finalize().into(),
    })
}

type Encoded = (Sha256Digest, ChunkKind, Vec<u8>, u32);

/// Reads and encodes the chunks of one batch on up to `threads` threads; the
/// results are in the batch's order.
fn encode_batch<R: ReadAt + ?Sized>(
    image: &R,
    layout: &Layout,
    batch: &[u64],
    threads: usize,
) -> io::Result<Vec<Encoded>> {
    let mut data = Vec::with_capacity(batch.len());
    for &c in batch {
        let r = layout.image_range(c);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        image.read_exact_at(&mut buf, r.start)?;
        data.push(buf);
    }
    let per_thread = data.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = data
            .chunks(per_thread)
            .map(|part| {
                s.spawn(move || -> io::Result<Vec<Encoded>> {
                    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
                    part.iter().map(|d| encode(&mut compressor, d)).collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for w in workers {
            out.extend(
                w.join()
                    .map_err(|_| io::Error::other("compression thread panicked"))??,
            );
        }
        Ok(out)
    })
}

fn encode(compressor: &mut zstd::bulk::Compressor, data: &[u8]) -> io::Result<Encoded> {
    let digest = sha256(data);
    let len = data.len() as u32;
    if data.iter().all(|&b| b == 0) {
        return Ok((digest, ChunkKind::Zero, Vec::new(), len));
    }
    let compressed = compressor.compress(data)?;
    Ok(if compressed.len() < data.len() {
        (digest, ChunkKind::Zstd, compressed, len)
    } else {
        (digest, ChunkKind::Raw, data.to_vec(), len)
    })
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
