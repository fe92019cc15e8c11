//! One OCI layer blob -> one lazybd layer blob.
//!
//! decompress (and hash: the diff_id) -> unpack with overlayfs whiteouts ->
//! mkfs.erofs -> plan the chunks (cut at file edges and at the startup
//! profile's edges, startup chunks first) -> compress, index
//! (`format::write_blob`).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use std::ops::Range;

use tracing::warn;

use super::unpack::{LayerLimits, UnpackError};
use super::{erofs, unpack, ConvertError, LayerProfile};
use crate::format::{self, Layout, Shape, WrittenBlob};
use crate::oci::{LayerCompression, LazyLayerAnnotations};

pub struct ConvertedLayer {
    pub blob_path: PathBuf,
    pub digest: String,
    pub size: u64,
    pub annotations: LazyLayerAnnotations,
}

/// What shapes a layer's chunks.
#[derive(Debug, Clone, Copy)]
pub struct LayerPlan<'a> {
    /// The largest chunk.
    pub chunk_size: u32,
    /// What a container read at start, if there is a startup profile.
    pub profile: Option<&'a LayerProfile>,
}

/// Converts the layer blob `src` (compressed as its media type says) using
/// the scratch directory `work`, which it leaves holding only the result.
/// `limits` bound the unpacked layer; `plan` gets the layer's diff_id and
/// says how to cut it.
pub fn convert_layer<'a>(
    src: &Path,
    compression: LayerCompression,
    work: &Path,
    limits: &LayerLimits,
    plan: impl FnOnce(&str) -> LayerPlan<'a>,
) -> Result<ConvertedLayer, ConvertError> {
    let io_ctx = |what: &str| {
        let what = format!("{what} ({})", src.display());
        move |e: io::Error| ConvertError::Io { what, source: e }
    };
    let (image, diff_id) = build_layer_image(src, compression, work, limits)?;
    let blob_path = work.join("layer.lazybd");
    let plan = plan(&diff_id);
    let written: WrittenBlob = {
        let input = File::open(&image).map_err(io_ctx("opening the image"))?;
        let layout = layout_of(&input, &diff_id, plan)?;
        let out = BufWriter::with_capacity(
            1 << 20,
            File::create(&blob_path).map_err(io_ctx("creating the blob"))?,
        );
        format::write_blob(&input, out, &layout).map_err(io_ctx("writing the lazybd blob"))?
    };
    fs::remove_file(&image).map_err(io_ctx("removing the image"))?;
    Ok(ConvertedLayer {
        blob_path,
        digest: format!("sha256:{}", hex::encode(written.blob_digest)),
        size: written.blob_len,
        annotations: LazyLayerAnnotations {
            version: written.index.version,
            index_digest: Some(format!("sha256:{}", hex::encode(written.anchor()))),
            source_diff_id: diff_id,
            index_offset: written.footer.index_offset,
            index_length: written.footer.index_length,
            image_size: written.index.image_size,
            chunk_size: plan.chunk_size,
        },
    })
}

/// Unpacks the layer blob `src` and builds its EROFS image in `work`
/// (`work/image.erofs`, depending only on the uncompressed tar), within
/// `limits`; returns
/// the image and the layer's diff_id. `lazybd check --against` rebuilds a
/// lazy layer's image this way to compare it with what the blob holds.
pub fn build_layer_image(
    src: &Path,
    compression: LayerCompression,
    work: &Path,
    limits: &LayerLimits,
) -> Result<(std::path::PathBuf, String), ConvertError> {
    let io_ctx = |what: &str| {
        let what = format!("{what} ({})", src.display());
        move |e: io::Error| ConvertError::Io { what, source: e }
    };
    let rootfs = work.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(io_ctx("creating the unpack directory"))?;

    let file = BufReader::new(File::open(src).map_err(io_ctx("opening the layer"))?);
    let mut tar = HashingReader {
        inner: decompressor(file, compression, src)?,
        hasher: Sha256::new(),
        left: limits.max_bytes,
    };
    let unpack_err = |e| ConvertError::Unpack {
        layer: src.display().to_string(),
        source: e,
    };
    unpack::unpack_layer(&mut tar, &rootfs, limits).map_err(unpack_err)?;
    // The diff_id covers the whole tar stream, including the padding after
    // the end-of-archive marker that the unpacker does not read.
    io::copy(&mut tar, &mut io::sink()).map_err(|e| match e.kind() {
        io::ErrorKind::FileTooLarge => unpack_err(UnpackError::Tar(e)),
        _ => io_ctx("reading the layer to its end")(e),
    })?;
    let diff_id = format!("sha256:{}", hex::encode(tar.hasher.finalize()));

    let image = work.join("image.erofs");
    erofs::build_image(&rootfs, &image, &diff_id)?;
    fs::remove_dir_all(&rootfs).map_err(io_ctx("removing the unpack directory"))?;
    Ok((image, diff_id))
}

/// Chunks cut where files' data begins and ends, the metadata apart and in
/// the prefetch area (when the image can be read as EROFS; fixed-size chunks
/// and no prefetch area otherwise), and the profile's chunks first.
fn layout_of(image: &File, diff_id: &str, plan: LayerPlan) -> Result<Layout, ConvertError> {
    let size = image
        .metadata()
        .map_err(|e| ConvertError::Io {
            what: "reading the image size".into(),
            source: e,
        })?
        .len();
    let file_data = match crate::erofs::data_ranges(image) {
        Ok(ranges) => ranges,
        Err(e) => {
            warn!("layer {diff_id}: {e}; cutting fixed-size chunks instead");
            Vec::new()
        }
    };
    let metadata = if file_data.is_empty() {
        Vec::new()
    } else {
        gaps(&file_data, size)
    };
    let shape = Shape {
        file_data: &file_data,
        metadata: &metadata,
        profile: plan.profile.map_or(&[], |p| &p.ranges),
        narrow: plan.profile.and_then(|p| p.narrow),
    };
    Layout::plan(size, plan.chunk_size, &shape)
        .map_err(|e| ConvertError::Invalid(format!("layer {diff_id}: {e}")))
}

/// What of `[0, size)` the sorted `ranges` leave out.
fn gaps(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in ranges {
        if r.start > at {
            out.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < size {
        out.push(at..size);
    }
    out
}

/// A reader for the layer's tar stream, after checking that the bytes look
/// like the compression the media type claims.
fn decompressor<'a, R: io::BufRead + 'a>(
    mut r: R,
    compression: LayerCompression,
    src: &Path,
) -> Result<Box<dyn Read + 'a>, ConvertError> {
    let head = r.fill_buf().map_err(|e| ConvertError::Io {
        what: format!("reading {}", src.display()),
        source: e,
    })?;
    let looks = if head.starts_with(&[0x1f, 0x8b]) {
        Some(LayerCompression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(LayerCompression::Zstd)
    } else {
        None
    };
    let mismatch = match (compression, looks) {
        (LayerCompression::None, None) => false,
        (c, Some(l)) => c != l,
        (_, None) => true,
    };
    if mismatch {
        return Err(ConvertError::Invalid(format!(
            "{}: media type says {compression:?} but the data looks like {}",
            src.display(),
            looks.map_or("an uncompressed tar".to_owned(), |l| format!("{l:?}"))
        )));
    }
    Ok(match compression {
        LayerCompression::None => Box::new(r),
        LayerCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(
            |e| ConvertError::Io {
                what: format!("starting zstd on {}", src.display()),
                source: e,
            },
        )?),
    })
}

/// The uncompressed tar stream, hashed as it is read and cut off past the
/// layer size limit (a gzip bomb decompresses a thousandfold: its length
/// is bounded here, the files it writes by the unpacker).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    left: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One byte more than allowed means the stream is too long.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the uncompressed layer is longer than the layer size limit (see --max-layer-size)",
            ));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}
