//! A blob in a local file: for tests, benchmarks and blobs already on disk.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Answer, ChunkSource, SourceError};

pub struct FileSource {
    name: String,
    path: PathBuf,
    file: Arc<File>,
}

impl FileSource {
    pub fn open(name: &str, path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let file = Arc::new(File::open(&path)?);
        Ok(FileSource {
            name: name.to_owned(),
            path,
            file,
        })
    }
}

#[async_trait]
impl ChunkSource for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        let file = self.file.clone();
        let path = self.path.clone();
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| SourceError::Permanent(format!("range {range:?} too large")))?;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, range.start)
                .map(|()| Answer::whole(Bytes::from(buf)))
                .map_err(|e| {
                    SourceError::Permanent(format!("{}: read {range:?}: {e}", path.display()))
                })
        })
        .await
        .map_err(|e| SourceError::Transient(format!("read task failed: {e}")))?
    }
}
