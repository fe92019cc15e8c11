//! `lazybd inspect TARGET`: header and chunk table summary of a lazybd layer
//! blob (a local file) or of every layer of a converted image.

use anyhow::{bail, Context, Result};
use lazybd_blockdev::format::{ChunkKind, Footer, Index, FOOTER_LEN, NARROW_READ_AHEAD_KB};
use lazybd_blockdev::oci::MEDIA_LAZYBD_LAYER;
use lazybd_blockdev::source::{ChunkSource, FileSource};
use serde::Serialize;

use crate::image_source::OpenImage;

/// Show the header and chunk table summary of a lazybd layer or image.
///
/// TARGET is a layer blob file, `oci:DIR[:TAG]`, or a registry reference.
#[derive(clap::Args)]
pub struct Args {
    target: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also list every chunk (offset, stored length, image length, kind, sha256).
    #[arg(long)]
    chunks: bool,
    #[command(flatten)]
    registry: crate::registry_args::RegistryArgs,
}

#[derive(Serialize)]
struct LayerSummary {
    digest: Option<String>,
    blob_size: u64,
    format_version: u32,
    compression: &'static str,
    chunk_size: u32,
    image_size: u64,
    chunk_count: u64,
    zstd_chunks: u64,
    raw_chunks: u64,
    zero_chunks: u64,
    stored_bytes: u64,
    /// The startup chunks, streamed when a node attaches the layer: the
    /// first `prefetch_length` bytes of the blob. Since version 2 the
    /// superblock's chunk, a profile's reads if any, then the metadata;
    /// version 1 has none (0).
    prefetch_length: u64,
    prefetch_chunks: u64,
    /// Of those, the first `prefetch_narrow_length` bytes are what a
    /// container reads with little readahead (all of them unless a
    /// profile recorded twice says otherwise; version 3).
    prefetch_narrow_length: u64,
    prefetch_narrow_chunks: u64,
    index_offset: u64,
    index_length: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<ChunkRow>>,
}

#[derive(Serialize)]
struct ChunkRow {
    offset: u64,
    stored_len: u32,
    /// The image bytes it covers (version 2 chunks vary in size).
    image_len: u32,
    kind: &'static str,
    sha256: String,
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let layers = rt.block_on(collect(&args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&layers)?);
        return Ok(());
    }
    for l in &layers {
        print_text(l);
    }
    Ok(())
}

async fn collect(args: &Args) -> Result<Vec<LayerSummary>> {
    let path = std::path::Path::new(&args.target);
    if path.is_file() {
        let size = std::fs::metadata(path)?.len();
        let source = FileSource::open("file", path)
            .with_context(|| format!("opening {}", path.display()))?;
        return Ok(vec![summarize(None, &source, size, args.chunks).await?]);
    }
    let image = OpenImage::open(&args.target, &args.registry).await?;
    let mut out = Vec::new();
    for (l, source) in image.manifest.layers().iter().zip(&image.sources) {
        if l.media_type().to_string() != MEDIA_LAZYBD_LAYER {
            bail!(
                "layer {} has media type {}: not a lazybd image",
                l.digest(),
                l.media_type()
            );
        }
        out.push(
            summarize(
                Some(l.digest().to_string()),
                source.as_ref(),
                l.size(),
                args.chunks,
            )
            .await?,
        );
    }
    Ok(out)
}

async fn summarize(
    digest: Option<String>,
    source: &dyn ChunkSource,
    blob_size: u64,
    chunks: bool,
) -> Result<LayerSummary> {
    if blob_size < FOOTER_LEN {
        bail!("{blob_size} bytes is too small for a lazybd blob");
    }
    let tail = source
        .read_range(blob_size - FOOTER_LEN..blob_size)
        .await?
        .collect(FOOTER_LEN)
        .await?;
    let footer = Footer::parse(&tail)?;
    footer.check_blob_len(blob_size)?;
    let bytes = source
        .read_range(footer.index_offset..footer.index_offset + footer.index_length)
        .await?
        .collect(footer.index_length)
        .await?;
    let index = Index::parse(&bytes, &footer)?;
    let count = |k: ChunkKind| index.chunks.iter().filter(|c| c.kind == k).count() as u64;
    Ok(LayerSummary {
        digest,
        blob_size,
        format_version: index.version,
        compression: index.compression.name(),
        chunk_size: index.chunk_size,
        image_size: index.image_size,
        chunk_count: index.chunk_count(),
        zstd_chunks: count(ChunkKind::Zstd),
        raw_chunks: count(ChunkKind::Raw),
        zero_chunks: count(ChunkKind::Zero),
        stored_bytes: index.stored_bytes(),
        prefetch_length: index.prefetch_len,
        prefetch_chunks: index.prefetch_chunks().len() as u64,
        prefetch_narrow_length: index.prefetch_narrow_len,
        prefetch_narrow_chunks: index.prefetch_parts().0.len() as u64,
        index_offset: footer.index_offset,
        index_length: footer.index_length,
        chunks: chunks.then(|| {
            index
                .chunks
                .iter()
                .map(|c| ChunkRow {
                    offset: c.offset,
                    stored_len: c.stored_len,
                    image_len: c.image_len,
                    kind: match c.kind {
                        ChunkKind::Raw => "raw",
                        ChunkKind::Zstd => "zstd",
                        ChunkKind::Zero => "zero",
                    },
                    sha256: hex::encode(c.digest),
                })
                .collect()
        }),
    })
}

fn print_text(l: &LayerSummary) {
    println!("layer {}", l.digest.as_deref().unwrap_or("(file)"));
    println!("  blob size     {}", l.blob_size);
    println!(
        "  format        v{} {} chunks of {} bytes",
        l.format_version, l.compression, l.chunk_size
    );
    println!("  image size    {}", l.image_size);
    println!(
        "  chunks        {} ({} zstd, {} raw, {} zero)",
        l.chunk_count, l.zstd_chunks, l.raw_chunks, l.zero_chunks
    );
    let ratio = if l.image_size == 0 {
        1.0
    } else {
        l.stored_bytes as f64 / l.image_size as f64
    };
    println!(
        "  stored bytes  {} ({:.1}% of the image)",
        l.stored_bytes,
        ratio * 100.0
    );
    if l.prefetch_length > 0 {
        println!(
            "  startup       {} chunks in the first {} bytes (streamed at attach)",
            l.prefetch_chunks, l.prefetch_length
        );
    }
    if l.prefetch_narrow_length < l.prefetch_length {
        println!(
            "  narrow part   {} chunks in the first {} bytes (alone on a node reading ahead \
             at most {NARROW_READ_AHEAD_KB} KiB)",
            l.prefetch_narrow_chunks, l.prefetch_narrow_length
        );
    }
    println!(
        "  index         offset {} length {}",
        l.index_offset, l.index_length
    );
    for c in l.chunks.iter().flatten() {
        println!(
            "    {:>12} {:>9} {:>9} {:<4} {}",
            c.offset, c.stored_len, c.image_len, c.kind, c.sha256
        );
    }
}
