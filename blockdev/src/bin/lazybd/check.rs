//! `lazybd check IMAGE [--against ORIGINAL]`: verifies a converted image the
//! way a node will read it, for a CI job after `lazybd convert`:
//!
//! 1. each layer's index is read from its blob tail and must hash to the
//!    anchor its descriptor carries (`lazybd.index-digest`), and sit where
//!    the descriptor says;
//! 2. every chunk is fetched, in blob order, and must decode to the bytes
//!    its index entry's sha256 names;
//! 3. the image the chunks make up must be a well-formed EROFS image
//!    (`fsck.erofs`, which reads every inode and file);
//! 4. with `--against`, it must be exactly the EROFS image converting the
//!    original's layer builds (the same bytes: conversion depends only on
//!    the layer's tar), and the descriptor's source diff_id the original's.
//!
//! Exit status 0 only when every check of every layer passed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::convert::{self, ConvertOptions, ImageStore};
use lazybd_blockdev::format::{sha256, Footer, Index, FOOTER_LEN};
use lazybd_blockdev::layer::LayerSource;
use serde::Serialize;

use crate::image_source::OpenImage;

/// Largest blob range fetched at once (whole chunks in blob order).
const READ_WINDOW: u64 = 8 << 20;
/// Chunk errors listed per layer; the rest are only counted.
const MAX_LISTED: usize = 10;

/// Verify every chunk and anchor of a converted image, and optionally that
/// it is exactly the conversion of the original.
///
/// IMAGE and ORIGINAL are `oci:DIR[:TAG]` or registry references. Reads no
/// config file and no socket: only the images (and `--docker-config` for
/// credentials). Needs `fsck.erofs` (erofs-utils).
#[derive(clap::Args)]
pub struct Args {
    image: String,
    /// The image IMAGE was converted from: each layer's EROFS image must be
    /// the one converting it builds.
    #[arg(long, value_name = "ORIGINAL")]
    against: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Scratch directory for the layers' images while they are checked.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    #[command(flatten)]
    registry: crate::registry_args::RegistryArgs,
}

#[derive(Serialize)]
struct LayerReport {
    digest: String,
    anchor: Option<String>,
    chunks: u64,
    bad_chunks: u64,
    /// Every failed check, first the layer-wide ones, then chunk errors.
    errors: Vec<String>,
    /// `fsck.erofs` passed on the image the chunks make up.
    erofs_ok: bool,
    /// The image equals the original's conversion (`None`: not asked).
    same_as_original: Option<bool>,
}

impl LayerReport {
    fn ok(&self) -> bool {
        self.errors.is_empty() && self.erofs_ok && self.same_as_original != Some(false)
    }
}

#[derive(Serialize)]
struct Report {
    image: String,
    ok: bool,
    layers: Vec<LayerReport>,
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let work = tempfile::Builder::new()
        .prefix("lazybd-check-")
        .tempdir_in(&args.work_dir)
        .with_context(|| format!("creating a scratch dir in {}", args.work_dir.display()))?;
    let image = rt.block_on(OpenImage::open(&args.image, &args.registry))?;
    // Unanchored (version 1) layers are checked too, and reported as such.
    let layers = image.lazy_layers(&args.image, true)?;
    let originals = match &args.against {
        Some(original) => Some(original_images(original, &args, work.path())?),
        None => None,
    };
    if let Some(o) = &originals {
        if o.len() != layers.len() {
            bail!(
                "{} has {} layers, {} has {}",
                args.image,
                layers.len(),
                args.against.as_deref().unwrap_or_default(),
                o.len()
            );
        }
    }
    let mut reports = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let original = originals.as_ref().map(|o| &o[i]);
        let image_file = work.path().join(format!("lazy-{i}.erofs"));
        let report = rt.block_on(check_layer(layer, &image_file, original))?;
        let _ = std::fs::remove_file(&image_file);
        reports.push(report);
    }
    let report = Report {
        image: args.image.clone(),
        ok: reports.iter().all(LayerReport::ok),
        layers: reports,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if !report.ok {
        bail!("{}: check failed", args.image);
    }
    Ok(())
}

/// The original's layers as conversion rebuilds them: (diff_id, image).
fn original_images(original: &str, args: &Args, work: &Path) -> Result<Vec<(String, PathBuf)>> {
    let src: Box<dyn ImageStore> = match crate::image_ref::ImageRef::parse(original) {
        crate::image_ref::ImageRef::Layout { dir, tag } => {
            Box::new(convert::LayoutStore::open(&dir, tag)?)
        }
        crate::image_ref::ImageRef::Registry(r) => {
            Box::new(convert::RegistryStore::new(&r, &args.registry.options())?)
        }
    };
    let opts = ConvertOptions {
        work_dir: work.to_owned(),
        ..ConvertOptions::default()
    };
    convert::layer_images(src.as_ref(), &opts, &work.join("original"))
        .with_context(|| format!("rebuilding the layers of {original}"))
}

async fn check_layer(
    layer: &LayerSource,
    image_file: &Path,
    original: Option<&(String, PathBuf)>,
) -> Result<LayerReport> {
    let mut report = LayerReport {
        digest: layer.digest.clone(),
        anchor: layer.anchor.clone(),
        chunks: 0,
        bad_chunks: 0,
        errors: Vec::new(),
        erofs_ok: false,
        same_as_original: None,
    };
    let index = match read_index(layer).await {
        Ok(index) => index,
        Err(e) => {
            report.errors.push(format!("index: {e:#}"));
            return Ok(report);
        }
    };
    report.chunks = index.chunk_count();
    let file = std::fs::File::create(image_file)
        .with_context(|| format!("creating {}", image_file.display()))?;
    file.set_len(index.image_size)?;
    let mut chunk_errors = Vec::new();
    for window in windows(&index) {
        let (start, end) = (
            index.chunks[window[0] as usize].offset,
            window
                .iter()
                .map(|&c| index.chunks[c as usize].stored_range().end)
                .max()
                .unwrap_or(0),
        );
        // All-zero chunks store nothing: nothing to ask for.
        let stored = match if end > start {
            fetch(layer, start..end).await
        } else {
            Ok(Vec::new())
        } {
            Ok(b) => b,
            Err(e) => {
                report.bad_chunks += window.len() as u64;
                chunk_errors.push(format!("blob bytes {start}..{end}: {e:#}"));
                continue;
            }
        };
        for &c in &window {
            let r = index.chunks[c as usize].stored_range();
            let bytes = &stored[(r.start - start) as usize..(r.end - start) as usize];
            match index.decode_chunk(c, bytes) {
                Ok(data) => file.write_all_at(&data, index.image_range(c).start)?,
                Err(e) => {
                    report.bad_chunks += 1;
                    chunk_errors.push(format!("chunk {c}: {e}"));
                }
            }
        }
    }
    file.sync_all()?;
    drop(file);
    if report.bad_chunks > 0 {
        let listed = chunk_errors.len().min(MAX_LISTED);
        report.errors.extend(chunk_errors.drain(..listed));
        if !chunk_errors.is_empty() {
            report
                .errors
                .push(format!("... and {} more chunk errors", chunk_errors.len()));
        }
        return Ok(report);
    }
    match fsck_erofs(image_file) {
        Ok(()) => report.erofs_ok = true,
        Err(e) => report.errors.push(format!("EROFS image: {e:#}")),
    }
    if let Some((diff_id, rebuilt)) = original {
        let same = convert::file_digest(image_file)? == convert::file_digest(rebuilt)?;
        report.same_as_original = Some(same);
        if !same {
            report
                .errors
                .push("the image differs from the original layer's conversion".into());
        }
        if layer.diff_id.as_deref() != Some(diff_id.as_str()) {
            report.errors.push(format!(
                "source diff_id {:?}, but the original layer's is {diff_id}",
                layer.diff_id
            ));
        }
    }
    Ok(report)
}

/// The layer's index, from its blob's tail, checked against the anchor and
/// the location its descriptor names.
async fn read_index(layer: &LayerSource) -> Result<Index> {
    let size = layer.blob_size;
    if size < FOOTER_LEN {
        bail!("{size} bytes is too small for a lazybd blob");
    }
    let footer = Footer::parse(&fetch(layer, size - FOOTER_LEN..size).await?)?;
    footer.check_blob_len(size)?;
    if let Some((offset, length)) = layer.index_location {
        if (offset, length) != (footer.index_offset, footer.index_length) {
            bail!(
                "the descriptor places the index at {offset}+{length}, the footer at {}+{}",
                footer.index_offset,
                footer.index_length
            );
        }
    }
    let range = footer.index_offset..footer.index_offset + footer.index_length;
    let bytes = fetch(layer, range).await?;
    let index = Index::parse(&bytes, &footer)?;
    let actual = format!("sha256:{}", hex::encode(sha256(&bytes)));
    match &layer.anchor {
        Some(anchor) if *anchor != actual => {
            bail!("the index hashes to {actual}, the descriptor's anchor is {anchor}")
        }
        Some(_) => {}
        None => bail!("no content anchor (a version 1 layer): nothing ties it to the manifest"),
    }
    Ok(index)
}

/// Chunks in blob order, grouped into runs adjacent in the blob of at most
/// [`READ_WINDOW`] bytes (one range request each).
fn windows(index: &Index) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut run_start = 0;
    let mut run_end = 0;
    for c in index.blob_order() {
        let r = index.chunks[c as usize].stored_range();
        match out.last_mut() {
            Some(run)
                if r.start == run_end && r.end > r.start && r.end - run_start <= READ_WINDOW =>
            {
                run.push(c);
                run_end = r.end;
            }
            _ => {
                out.push(vec![c]);
                (run_start, run_end) = (r.start, r.end);
            }
        }
    }
    out
}

/// Blob bytes `range` from the layer's first source that answers.
async fn fetch(layer: &LayerSource, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
    let mut failures = Vec::new();
    for source in &layer.sources {
        let len = range.end - range.start;
        let answer = async { source.read_range(range.clone()).await?.collect(len).await };
        match answer.await {
            Ok(bytes) => return Ok(bytes.into()),
            Err(e) => failures.push(format!("{}: {e}", source.name())),
        }
    }
    bail!("no source answered: {}", failures.join("; "))
}

/// `fsck.erofs` reads every inode and file of the image.
fn fsck_erofs(image: &Path) -> Result<()> {
    let out = Command::new("fsck.erofs")
        .arg("--extract")
        .arg(image)
        .output()
        .context("running fsck.erofs (install erofs-utils)")?;
    if !out.status.success() {
        bail!(
            "fsck.erofs: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn print_text(report: &Report) {
    for l in &report.layers {
        let verdict = if l.ok() { "ok" } else { "FAILED" };
        println!("{} {verdict}", l.digest);
        println!(
            "  anchor        {}",
            l.anchor.as_deref().unwrap_or("none (version 1)")
        );
        println!(
            "  chunks        {} verified of {}",
            l.chunks - l.bad_chunks,
            l.chunks
        );
        println!(
            "  erofs         {}",
            if l.erofs_ok { "ok" } else { "not ok" }
        );
        if let Some(same) = l.same_as_original {
            println!(
                "  original      {}",
                if same { "same image" } else { "DIFFERENT" }
            );
        }
        for e in &l.errors {
            println!("  error: {e}");
        }
    }
    let failed = report.layers.iter().filter(|l| !l.ok()).count();
    println!(
        "{}: {} layers, {}",
        report.image,
        report.layers.len(),
        if failed == 0 {
            "all ok".to_owned()
        } else {
            format!("{failed} FAILED")
        }
    );
}
