//! A node walks the EROFS metadata of each lazy layer it warms
//! (`erofs::files`, `device::warm`): the image chains to its anchor, but
//! its author may be hostile. Any bytes must not panic or run away, and
//! every file the walk returns has its data inside the image.
#![no_main]

use std::io;

use lazybd_blockdev::erofs::files;
use lazybd_blockdev::format::ReadAt;
use libfuzzer_sys::fuzz_target;

/// The input as the image.
struct Image<'a>(&'a [u8]);

impl ReadAt for Image<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..start.checked_add(buf.len())?))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(files) = files(&Image(data), size, 4096) {
        for f in &files {
            assert!(f.data.start < f.data.end && f.data.end <= size, "{f:?}");
        }
    }
});
