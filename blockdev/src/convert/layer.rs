//! One OCI layer blob -> one lazybd layer blob.
//!
//! decompress (and hash: the diff_id) -> unpack with overlayfs whiteouts ->
//! mkfs.erofs -> chunk, compress, index (`format::write_blob`).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{erofs, unpack, ConvertError};
use crate::format::{self, WrittenBlob};
use crate::oci::{LayerCompression, LazyLayerAnnotations};

pub struct ConvertedLayer {
    pub blob_path: PathBuf,
    pub digest: String,
    pub size: u64,
    pub annotations: LazyLayerAnnotations,
}

/// Converts the layer blob `src` (compressed as its media type says) using
/// the scratch directory `work`, which it leaves holding only the result.
pub fn convert_layer(
    src: &Path,
    compression: LayerCompression,
    work: &Path,
    chunk_size: u32,
) -> Result<ConvertedLayer, ConvertError> {
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
    };
    unpack::unpack_layer(&mut tar, &rootfs).map_err(|e| ConvertError::Unpack {
        layer: src.display().to_string(),
        source: e,
    })?;
    // The diff_id covers the whole tar stream, including the padding after
    // the end-of-archive marker that the unpacker does not read.
    io::copy(&mut tar, &mut io::sink()).map_err(io_ctx("reading the layer to its end"))?;
    let diff_id = format!("sha256:{}", hex::encode(tar.hasher.finalize()));

    let image = work.join("image.erofs");
    erofs::build_image(&rootfs, &image, &diff_id)?;
    fs::remove_dir_all(&rootfs).map_err(io_ctx("removing the unpack directory"))?;

    let blob_path = work.join("layer.lazybd");
    let written: WrittenBlob = {
        let input = BufReader::with_capacity(
            1 << 20,
            File::open(&image).map_err(io_ctx("opening the image"))?,
        );
        let out = BufWriter::with_capacity(
            1 << 20,
            File::create(&blob_path).map_err(io_ctx("creating the blob"))?,
        );
        format::write_blob(input, out, chunk_size).map_err(io_ctx("writing the lazybd blob"))?
    };
    fs::remove_file(&image).map_err(io_ctx("removing the image"))?;
    Ok(ConvertedLayer {
        blob_path,
        digest: format!("sha256:{}", hex::encode(written.blob_digest)),
        size: written.blob_len,
        annotations: LazyLayerAnnotations {
            source_diff_id: diff_id,
            index_offset: written.footer.index_offset,
            index_length: written.footer.index_length,
            image_size: written.index.image_size,
            chunk_size,
        },
    })
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

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
